"""The geometry review dock: instance flags (missed, spurious, badly drawn nuclei), a thin Qt
skin over :class:`cellcurate.curation.geometry_review.GeometrySession`.

Layers: ``geometry image`` (the window around the flag), ``annotated`` (the outlines of the
current nuclei: grey, the nuclei the flag concerns in yellow) and ``proposed`` (the proposal's
outline, magenta). They are created once and updated in place.

Keys (taken before napari's layer keymaps, like the class review dock): ``p`` accept the
proposal (whatever it is: add, delete, replace, merge, split), ``a`` add the proposed nucleus,
``d`` delete the annotated nucleus, ``r`` replace its outline by the proposal, ``k`` keep the
annotation, ``s`` skip (next flag), ``u`` undo the last decision, ``1``-``9`` the class of the
nucleus to add (default: the flag's predicted class), ``v`` proposal on/off. Every decision is in
the ledger before the next flag is shown; a failed or refused one (read-only store, a proposal
that is not a valid outline) shows a red message and records nothing.

Opened from napari's Plugins menu (*Review nucleus geometry*) the dock starts without a session:
type a store folder (or leave the box empty for a folder dialog) and press Open; with
``$CELLCURATE_STORE`` set it opens that store at once, as the class review dock does.

Dimensions: w×w pixels of the window.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QApplication, QGridLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from ..curation.geometry_review import GeometrySession, default_reviewer
from ..errors import CellcurateError
from .widget import DOCK_WIDTH, ElidedLabel, _camera, _KeyFilter, _redraw, _wrapping, ask_store_path, store_rows

if TYPE_CHECKING:
    import napari

#: key -> decision of :meth:`GeometrySession.act` (or a view action).
GEOMETRY_KEYS: dict[str, str] = {"p": "accept", "a": "add", "d": "delete", "r": "replace", "k": "keep",
                                 "u": "undo", "s": "skip", "v": "toggle_proposal"}
ANNOTATED_COLORS = {None: "transparent", 0: "transparent", 1: "#b0b0b0", 2: "#ffd166"}
PROPOSED_COLOR = "#ff00ff"


class GeometryWidget(QWidget):
    """Dock widget reviewing the instance flags of one store. Give a :class:`GeometrySession` or open
    one with :meth:`open_store`; without a session it opens ``$CELLCURATE_STORE`` when that is set
    (the Plugins menu entry), else it waits for a store folder."""

    def __init__(self, napari_viewer: "napari.Viewer", session: GeometrySession | None = None, *,
                 reviewer: str | None = None, issues: list[str] | None = None, window: int = 128) -> None:
        super().__init__()
        self.viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)
        self.session: GeometrySession | None = None
        self.issues = issues
        self.window_px = int(window)
        self.last_error: str | None = None
        self.keys = dict(GEOMETRY_KEYS)
        self._own_store: Any = None  # a store this dock opened (closed with its session)
        self._build(reviewer)
        self._filter = _KeyFilter(self)  # type: ignore[arg-type]  # duck-typed: key_of + handle_key
        qv = self.viewer.window._qt_viewer
        for target in (qv.canvas.native, qv):
            target.installEventFilter(self._filter)
        if session is not None:
            self.set_session(session)
        elif os.environ.get("CELLCURATE_STORE"):
            self.open_store(os.environ["CELLCURATE_STORE"])
        else:
            self.progress_label.setText("no store open: type its folder above and press Open")

    def set_session(self, session: GeometrySession) -> None:
        """Review ``session``'s queue (closing the one before it, and the store this dock opened for it)."""
        if self.session is not None and self.session is not session:
            self.close_session()
        self.session = session
        self.store_edit.setText(str(session.store.path))
        self.reviewer_edit.setText(session.reviewer)
        self.keys = dict(GEOMETRY_KEYS)
        self.keys.update({str(c.id): "class" for c in session.store.taxonomy.classes if 1 <= c.id <= 9})
        self._make_layers()
        self.show_current()

    def open_store(self, path: str, *, reviewer: str | None = None) -> None:
        """Open a store (read-write) and review its instance flags as the reviewer in the dock's box; a
        store that cannot be opened shows a red one-line message and changes nothing."""
        from ..datasets.store import Store

        who = reviewer or self.reviewer_edit.text().strip() or default_reviewer()
        try:
            store = Store.open(path, mode="a")
        except CellcurateError as exc:
            self._error(str(exc))
            return
        try:
            session = GeometrySession(store, reviewer=who, issues=self.issues, window=self.window_px)
        except CellcurateError as exc:
            store.close()
            self._error(str(exc))
            return
        self.set_session(session)
        self._own_store = store

    def _choose_store(self) -> None:
        path = ask_store_path(self, self.store_edit)
        if path:
            self.open_store(path)
        self._focus_canvas()

    # -- layout ---------------------------------------------------------------------------------
    def _build(self, reviewer: str | None) -> None:
        self.setFixedWidth(DOCK_WIDTH)
        lay = QVBoxLayout(self)
        open_btn = QPushButton("Open store")
        open_btn.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        open_btn.clicked.connect(lambda _=False: self._choose_store())
        self.store_edit, self.reviewer_edit = store_rows(lay, reviewer, open_btn, self._choose_store,
                                                         self._focus_canvas)
        self.progress_label = _wrapping("")
        lay.addWidget(self.progress_label)
        grid = QGridLayout()
        grid.setColumnStretch(1, 1)
        self.fields: dict[str, ElidedLabel] = {}
        for i, (key, title) in enumerate([("flag_id", "Flag"), ("image", "Image"), ("issue", "Issue"),
                                          ("score", "Score"), ("proposed", "Proposed"), ("nuclei", "Nuclei"),
                                          ("predicted", "Predicted class"), ("label", "Class to add")]):
            grid.addWidget(QLabel(title), i, 0)
            val = ElidedLabel("-")
            grid.addWidget(val, i, 1)
            self.fields[key] = val
        lay.addLayout(grid)
        buttons = QGridLayout()
        self.buttons: dict[str, QPushButton] = {}
        for i, (text, action) in enumerate([("Accept proposal [p]", "accept"), ("Add nucleus [a]", "add"),
                                            ("Delete nucleus [d]", "delete"), ("Replace outline [r]", "replace"),
                                            ("Keep [k]", "keep"), ("Skip [s]", "skip"), ("Undo [u]", "undo")]):
            b = QPushButton(text)
            b.setFocusPolicy(Qt.FocusPolicy.NoFocus)
            b.clicked.connect(lambda _=False, a=action: self._clicked(a))
            buttons.addWidget(b, i // 2, i % 2)
            self.buttons[action] = b
        lay.addLayout(buttons)
        self.message = _wrapping("")
        lay.addWidget(self.message)
        lay.addStretch(1)

    def _clicked(self, action: str) -> None:
        self.handle_key(_key_of_action(action))
        self._focus_canvas()

    def _make_layers(self) -> None:
        assert self.session is not None
        v, w = self.viewer, self.session.window
        for name in ("proposed", "annotated", "geometry image"):
            if name in v.layers:
                v.layers.remove(name)
        self.image_layer = v.add_image(np.zeros((w, w, 3), np.uint8), name="geometry image", rgb=True)
        self.annotated_layer = v.add_labels(np.zeros((w, w), np.uint8), name="annotated", opacity=1.0,
                                            colormap=ANNOTATED_COLORS)
        colors: dict[int | None, str] = {None: "transparent", 0: "transparent"}
        colors.update({k: PROPOSED_COLOR for k in range(1, 256)})
        self.proposed_layer = v.add_labels(np.zeros((w, w), np.uint8), name="proposed", opacity=1.0,
                                           colormap=colors)
        self.proposed_layer.contour = 1
        for layer in (self.annotated_layer, self.proposed_layer):
            layer.editable = False
        v.layers.selection.active = self.image_layer
        cam = _camera(v)
        cam.center = ((w - 1) / 2, (w - 1) / 2)
        cam.zoom = max(cam.zoom, 1.0)

    # -- keys -----------------------------------------------------------------------------------
    def _focus_canvas(self) -> None:
        try:
            self.viewer.window._qt_viewer.canvas.native.setFocus(Qt.FocusReason.OtherFocusReason)
        except (AttributeError, RuntimeError):
            pass

    def key_of(self, event: Any) -> str | None:
        mods = event.modifiers()
        if mods & (Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.AltModifier
                   | Qt.KeyboardModifier.MetaModifier):
            return None
        text = (event.text() or "").lower()
        return text if text in self.keys else None

    def handle_key(self, key: str) -> None:
        what = self.keys.get(key)
        if what is None:
            return
        if self.session is None:
            self._error("open a store first")
            return
        if what == "toggle_proposal":
            self.proposed_layer.visible = not self.proposed_layer.visible
        elif what == "class":
            try:
                self.session.set_label(int(key))
            except CellcurateError as exc:
                self._error(str(exc))
            self._show_fields()
        elif what == "skip":
            self.session.next()
            self.show_current()
        else:
            self.decide(what)
        self._focus_canvas()

    def keyPressEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        key = self.key_of(event)
        if key is None:
            super().keyPressEvent(event)
            return
        self.handle_key(key)
        event.accept()

    # -- actions --------------------------------------------------------------------------------
    def decide(self, decision: str) -> bool:
        """Record a decision on the shown flag; True when it was saved."""
        s = self.session
        if s is None:
            self._error("open a store first")
            return False
        if decision != "undo" and s.done:
            self._info("the instance queue is done: nothing left to decide")
            return False
        try:
            d = s.act(decision)
        except CellcurateError as exc:
            self._error(f"NOT SAVED ({decision}): {exc}")
            return False
        self.show_current(keep_message=True)
        done = "; queue done: every instance flag has a decision" if s.done else ""
        self._info(f"saved: {d.decision} ({', '.join(d.actions)}) seq {', '.join(map(str, d.seqs))}{done}")
        return True

    # -- display --------------------------------------------------------------------------------
    def show_current(self, *, keep_message: bool = False) -> None:
        s = self.session
        if s is None:
            return
        done, total = s.progress()
        self.progress_label.setText(f"instance flags: {done} / {total} decided by {s.reviewer}, {total - done} left")
        flag = s.current()
        if flag is None:
            for f in self.fields.values():
                f.setText("-")
            for layer in (self.annotated_layer, self.proposed_layer):
                layer.data[...] = 0
                _redraw(layer)
            self._info("queue done: every instance flag has a decision" if total else "no instance flags")
            return
        try:
            ctx = s.context(flag)
        except CellcurateError as exc:
            self._error(str(exc))
            return
        self.image_layer.data[...] = ctx.image
        self.annotated_layer.data[...] = ctx.annotated
        self.proposed_layer.data[...] = ctx.proposed
        for layer in (self.image_layer, self.annotated_layer, self.proposed_layer):
            _redraw(layer)
        self._show_fields()
        if not keep_message:
            self._info("")

    def _show_fields(self) -> None:
        s = self.session
        if s is None:
            return
        flag = s.current()
        if flag is None:
            return
        tax = s.store.taxonomy

        def cname(v: int | None) -> str:
            return "-" if not v or v not in tax.ids else f"{v} {tax.class_name(v)}"

        f = self.fields
        f["flag_id"].setText(str(flag["flag_id"]))
        f["image"].setText(str(flag["image_id"]))
        f["issue"].setText(str(flag["issue"]).replace("_", " "))
        f["score"].setText(f"{float(flag['score']):.3f}")
        f["proposed"].setText(f"{flag['proposed_action']} ({len(flag['polygons'])} polygon(s))")
        f["nuclei"].setText(", ".join(str(n) for n in flag["nucleus_ids"]) or "-")
        f["predicted"].setText(cname(int(flag["label"] or 0)))
        f["label"].setText(cname(s.label) if s.label else f"{cname(int(flag['label'] or 0))} (predicted)")

    def _error(self, text: str) -> None:
        self.last_error = text
        self.message.setStyleSheet("color: #ff5555; font-weight: bold;")
        self.message.setText(text)

    def _info(self, text: str) -> None:
        self.last_error = None
        self.message.setStyleSheet("")
        self.message.setText(text)

    def close_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
        if self._own_store is not None:
            self._own_store.close()
            self._own_store = None

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        self.close_session()
        super().closeEvent(event)


def _key_of_action(action: str) -> str:
    return next(k for k, a in GEOMETRY_KEYS.items() if a == action)


def launch(store: str, *, reviewer: str | None = None, issues: list[str] | None = None) -> None:
    """Open napari with the geometry review dock (``curate review --instances``); blocks until closed."""
    import napari

    from ..datasets.store import Store
    from .widget import default_window_size

    opened = Store.open(store, mode="a")
    session = GeometrySession(opened, reviewer=reviewer or default_reviewer(), issues=issues)
    viewer = napari.Viewer(title=f"cellcurate geometry review - {store}")
    screen = QApplication.primaryScreen()
    if screen is not None:
        g = screen.availableGeometry()
        viewer.window.resize(*default_window_size((g.width(), g.height())))
    widget = GeometryWidget(viewer, session)
    viewer.window.add_dock_widget(widget, name="cellcurate geometry review", area="right")
    _camera(viewer).zoom = 3.0
    widget._focus_canvas()
    try:
        napari.run()
    finally:
        widget.close_session()
        opened.close()

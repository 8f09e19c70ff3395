"""The review dock widget: a thin Qt skin over :class:`cellcurate.curation.review.ReviewSession`.

Layers: ``context`` (the image window around the nucleus), ``classes`` (the nuclei of that window
coloured by current class) and ``current`` (the outline of the nucleus under review). Keys (bound
on the viewer): ``a`` accept proposal, ``k`` keep current label, ``1``-``K`` set class
(the digit of each class id of the store's taxonomy), ``n`` not a
nucleus, ``s`` skip, ``u`` undo, ``j`` jump to an id. Every decision is in the ledger before the
next nucleus is shown; a failed write (read-only store, full disk) shows a red message, keeps the
nucleus on screen and records nothing, so the reviewer can retry.

Dimensions: h×w pixels of the context window, K classes.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..curation.review import ReviewSession, default_reviewer, open_session
from ..errors import CellcurateError
from .reader import class_colors

if TYPE_CHECKING:
    import napari

#: key -> (action, class id or None); the class keys come from the store's taxonomy (class_keys)
KEYS: dict[str, tuple[str, int | None]] = {
    "a": ("accept", None), "k": ("keep", None), "n": ("not_nucleus", None), "s": ("skip", None),
    "u": ("undo", None),
}


def class_keys(taxonomy: Any) -> dict[str, tuple[str, int | None]]:
    """Digit keys of the taxonomy's classes: key ``d`` sets the class with id ``d`` (ids 1..9)."""
    return {str(c.id): ("set_class", c.id) for c in taxonomy.classes if 1 <= c.id <= 9}


class ReviewWidget(QWidget):
    """Dock widget reviewing one store's queue. Give a ``session`` or open one with :meth:`open_store`."""

    def __init__(self, napari_viewer: "napari.Viewer", session: ReviewSession | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session: ReviewSession | None = None
        self.last_error: str | None = None
        self._class_keys: dict[str, tuple[str, int | None]] = {}
        self._build()
        self._bind_keys()
        if session is not None:
            self.set_session(session)

    # -- layout -----------------------------------------------------------------------------------
    def _build(self) -> None:
        lay = QVBoxLayout(self)
        row = QHBoxLayout()
        self.store_edit = QLineEdit()
        self.store_edit.setPlaceholderText("store folder")
        open_btn = QPushButton("Open store")
        open_btn.clicked.connect(self._choose_store)
        row.addWidget(self.store_edit)
        row.addWidget(open_btn)
        lay.addLayout(row)
        self.progress_label = QLabel("no store open")
        self.progress_bar = QProgressBar()
        lay.addWidget(self.progress_label)
        lay.addWidget(self.progress_bar)

        grid = QGridLayout()
        self.fields: dict[str, QLabel] = {}
        for i, (key, title) in enumerate([("nucleus_id", "Nucleus"), ("source", "Source"),
                                          ("source_label", "Source label"), ("label", "Current"),
                                          ("proposed", "Proposed"), ("score", "Issue score"),
                                          ("reason", "Reason"), ("round", "Round")]):
            grid.addWidget(QLabel(title), i, 0)
            val = QLabel("-")
            val.setTextInteractionFlags(Qt.TextSelectableByMouse)
            grid.addWidget(val, i, 1)
            self.fields[key] = val
        lay.addLayout(grid)

        lay.addWidget(QLabel("Class probabilities"))
        self.prob_grid = QGridLayout()
        self.prob_bars: list[QProgressBar] = []
        self.prob_names: list[QLabel] = []
        lay.addLayout(self.prob_grid)

        buttons = QGridLayout()
        self.buttons: dict[str, QPushButton] = {}
        for i, (text, action) in enumerate([("Accept proposal [a]", "accept"), ("Keep current [k]", "keep"),
                                            ("Not a nucleus [n]", "not_nucleus"), ("Skip [s]", "skip"),
                                            ("Undo [u]", "undo")]):
            b = QPushButton(text)
            b.clicked.connect(lambda _=False, a=action: self.decide(a))
            buttons.addWidget(b, i // 2, i % 2)
            self.buttons[action] = b
        lay.addLayout(buttons)
        self.class_row = QGridLayout()
        lay.addLayout(self.class_row)

        jump = QHBoxLayout()
        self.jump_edit = QLineEdit()
        self.jump_edit.setPlaceholderText("nucleus id [j]")
        self.jump_edit.returnPressed.connect(self._jump_from_edit)
        jump_btn = QPushButton("Jump")
        jump_btn.clicked.connect(self._jump_from_edit)
        refresh = QPushButton("Refresh queue")
        refresh.clicked.connect(self.refresh)
        jump.addWidget(self.jump_edit)
        jump.addWidget(jump_btn)
        jump.addWidget(refresh)
        lay.addLayout(jump)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        lay.addWidget(self.message)
        lay.addStretch(1)

    def _bind_keys(self) -> None:
        for key, (action, label) in KEYS.items():
            self.viewer.bind_key(key, lambda _v, a=action, c=label: self.decide(a, label=c), overwrite=True)
        self.viewer.bind_key("j", lambda _v: self.jump_edit.setFocus(), overwrite=True)

    def _set_classes(self, session: ReviewSession) -> None:
        tax = session.store.taxonomy
        for key in [k for k in self._class_keys if k not in class_keys(tax)]:
            self.viewer.bind_key(key, None, overwrite=True)  # a previous store's class keys
        self._class_keys = class_keys(tax)
        for key, (action, label) in self._class_keys.items():
            self.viewer.bind_key(key, lambda _v, a=action, c=label: self.decide(a, label=c), overwrite=True)
        for w in self.prob_bars + self.prob_names:
            w.deleteLater()
        self.prob_bars, self.prob_names = [], []
        for i, c in enumerate(tax.classes):
            name = QLabel(f"{c.id} {c.name}")
            bar = QProgressBar()
            bar.setRange(0, 1000)
            bar.setTextVisible(True)
            bar.setFormat("-")
            bar.setStyleSheet(f"QProgressBar::chunk {{ background-color: {c.color}; }}")
            self.prob_grid.addWidget(name, i, 0)
            self.prob_grid.addWidget(bar, i, 1)
            self.prob_bars.append(bar)
            self.prob_names.append(name)
            if c.id <= 9 and self.class_row.count() < tax.n_classes:
                b = QPushButton(f"{c.id} {c.name}")
                b.setStyleSheet(f"border-left: 6px solid {c.color};")
                b.clicked.connect(lambda _=False, cid=c.id: self.decide("set_class", label=cid))
                self.class_row.addWidget(b, i // 4, i % 4)

    # -- session ----------------------------------------------------------------------------------
    def _choose_store(self) -> None:
        path = self.store_edit.text().strip()
        if not path:
            path = QFileDialog.getExistingDirectory(self, "Open a cellcurate store")
        if path:
            self.open_store(path)

    def open_store(self, path: str, *, reviewer: str | None = None, **filters: Any) -> None:
        """Open a store (read-write) and start reviewing its queue."""
        try:
            session = open_session(path, reviewer=reviewer or default_reviewer(), **filters)
        except CellcurateError as exc:
            self._error(str(exc))
            return
        self.set_session(session)

    def set_session(self, session: ReviewSession) -> None:
        if self.session is not None and self.session is not session:
            self.session.close()
        self.session = session
        self.store_edit.setText(str(session.store.path))
        self._set_classes(session)
        colors = class_colors(session.store.taxonomy)
        v = self.viewer
        for name in ("current", "classes", "context"):
            if name in v.layers:
                v.layers.remove(name)
        self.image_layer = v.add_image(np.zeros((session.window, session.window, 3), np.uint8), name="context",
                                       rgb=True)
        self.classes_layer = v.add_labels(np.zeros((session.window, session.window), np.uint8), name="classes",
                                          opacity=0.5, colormap=colors)
        self.current_layer = v.add_labels(np.zeros((session.window, session.window), np.uint8), name="current",
                                          opacity=1.0, colormap={None: "transparent", 0: "transparent",
                                                                 1: "#ffff00"})
        self.current_layer.contour = 2
        v.layers.selection.active = self.image_layer
        self.show_current()

    def close_session(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    # -- actions --------------------------------------------------------------------------------
    def decide(self, action: str, *, label: int | None = None) -> bool:
        """Record a decision on the shown nucleus; True when it was saved."""
        if self.session is None:
            self._error("open a store first")
            return False
        if action != "undo" and self.session.done:
            self._info("the queue is done: nothing left to decide")
            return False
        try:
            d = self.session.act(action, label=label)  # type: ignore[arg-type]
        except CellcurateError as exc:
            self._error(f"NOT SAVED ({action}): {exc}")
            return False
        self.show_current()
        old = "-" if d.prev_label is None else d.prev_label
        new = "-" if d.label is None else d.label
        self._info(f"saved: {d.action} on {d.nucleus_id} ({old} -> {new}), seq {d.seq}")
        return True

    def jump(self, nucleus_id: int) -> bool:
        if self.session is None:
            self._error("open a store first")
            return False
        try:
            self.session.jump(nucleus_id)
        except CellcurateError as exc:
            self._error(str(exc))
            return False
        self.show_current()
        return True

    def _jump_from_edit(self) -> None:
        text = self.jump_edit.text().strip()
        try:
            nid = int(text)
        except ValueError:
            self._error(f"not a nucleus id: {text!r}")
            return
        self.jump(nid)

    def refresh(self) -> None:
        if self.session is None:
            return
        try:
            self.session.refresh()
        except CellcurateError as exc:
            self._error(str(exc))
            return
        self.show_current()

    # -- display ----------------------------------------------------------------------------------
    def show_current(self) -> None:
        """Show the session's current nucleus: layers, panel, progress."""
        s = self.session
        if s is None:
            return
        done, total = s.progress()
        self.progress_label.setText(f"reviewed {done} / {total}   reviewer: {s.reviewer}")
        self.progress_bar.setRange(0, max(total, 1))
        self.progress_bar.setValue(done)
        item = s.current()
        if item is None:
            for f in self.fields.values():
                f.setText("-")
            self._info("queue done: every flagged nucleus has a decision" if total else "no flagged nuclei")
            return
        try:
            ctx = s.context(item)
        except CellcurateError as exc:
            self._error(str(exc))
            return
        y0, x0 = ctx.offset
        for layer, data in ((self.image_layer, ctx.image), (self.classes_layer, ctx.classes),
                            (self.current_layer, ctx.current)):
            layer.data = data
            layer.translate = (y0, x0)
        tax = s.store.taxonomy

        def name(v: int | None) -> str:
            if v is None:
                return "-"
            return {-1: "not a nucleus", 0: "unresolved"}.get(v) or f"{v} {tax.class_name(v)}"

        f = self.fields
        f["nucleus_id"].setText(f"{item.nucleus_id}  ({item.image_id})")
        f["source"].setText(item.source)
        f["source_label"].setText(item.source_label)
        f["label"].setText(f"{name(item.label)}  [{item.status}]")
        f["proposed"].setText(name(item.proposed))
        f["score"].setText(f"{item.score:.3f}")
        f["reason"].setText(item.reason.replace("_", " "))
        f["round"].setText("-" if item.round is None else str(item.round))
        for i, bar in enumerate(self.prob_bars):
            p = item.probs[i] if i < len(item.probs) else None
            bar.setValue(0 if p is None else int(round(p * 1000)))
            bar.setFormat("-" if p is None else f"{p:.2f}")
        _camera(self.viewer).center = item.centroid

    def _error(self, text: str) -> None:
        self.last_error = text
        self.message.setStyleSheet("color: #ff5555; font-weight: bold;")
        self.message.setText(text)
        try:
            from napari.utils.notifications import show_error

            show_error(text)
        except ImportError:  # pragma: no cover - napari is this module's dependency
            pass

    def _info(self, text: str) -> None:
        self.last_error = None
        self.message.setStyleSheet("")
        self.message.setText(text)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        self.close_session()
        super().closeEvent(event)


def _camera(viewer: "napari.Viewer") -> Any:
    scene = getattr(viewer, "scene", None)  # napari >= 0.9 moved the camera to viewer.scene
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def review_widget(napari_viewer: "napari.Viewer") -> ReviewWidget:
    """npe2 widget contribution; opens ``$CELLCURATE_STORE`` when set."""
    w = ReviewWidget(napari_viewer)
    path = os.environ.get("CELLCURATE_STORE")
    if path:
        w.open_store(path)
    return w


def launch(store: str, *, reviewer: str | None = None, **filters: Any) -> None:
    """Open napari with the review dock on a store's queue (``curate review``); blocks until closed."""
    import napari

    from ..datasets.store import Store

    session = ReviewSession(Store.open(store, mode="a"), reviewer=reviewer, **filters)
    viewer = napari.Viewer(title=f"cellcurate review - {store}")
    widget = ReviewWidget(viewer, session)
    viewer.window.add_dock_widget(widget, name="cellcurate review", area="right")
    _camera(viewer).zoom = 3.0
    try:
        napari.run()
    finally:
        widget.close_session()

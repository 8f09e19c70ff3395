"""The review dock widget: a thin Qt skin over :class:`cellcurate.curation.review.ReviewSession`.

Layers: ``context`` (the window around the nucleus, always the same size with the nucleus at its
centre, padded grey outside the image), ``classes`` (the nuclei of that window coloured by
current class: outlines by default, filled with ``o``, hidden with ``v``) and ``current`` (the
outline of the nucleus under review, in a colour distinct from every class colour). The layers
are created once per session and updated in place; the next nuclei's windows are read ahead on a
worker thread (``napari.qt.threading``), so a key press shows the next nucleus without waiting
for the disk or the ledger.

Keys win over napari's layer keymaps (``1`` and ``2`` are pan/zoom and transform on an image
layer, ``1``-``7`` paint tools on a labels layer): an event filter on the canvas takes the review
keys before napari sees them, the review layers are not editable, the dock's buttons never take
keyboard focus and focus goes back to the canvas after every action (a jump included).

Keys: ``a`` accept proposal, ``k`` keep current label, ``1``-``9`` set the class with that id
(from the store's taxonomy), ``n`` not a nucleus, ``s`` skip, ``u`` undo, ``j`` jump to an id,
``d`` adjudicate (then a class key or ``n``), ``c`` next conflict, ``o`` outlines/filled, ``v``
overlay on/off. Every decision is in the ledger before the next nucleus is shown; a failed write
(read-only store, full disk) shows a red message, keeps the nucleus on screen and records
nothing, so the reviewer can retry. Deciding a nucleus another reviewer already decided asks for
the same key a second time (not with ``--double-review``).

Dimensions: w×w pixels of the context window, K classes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QEvent, QObject, Qt
from qtpy.QtGui import QKeyEvent
from qtpy.QtWidgets import (
    QApplication,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from ..curation.review import (
    Context,
    DecidedByOthers,
    ReviewItem,
    ReviewSession,
    default_reviewer,
    open_session,
)
from ..datasets.taxonomy import Taxonomy
from ..errors import CellcurateError
from .reader import class_colors, outline_color

if TYPE_CHECKING:
    import napari

#: Width of the dock in pixels: fixed, so the canvas does not move from one nucleus to the next.
DOCK_WIDTH = 400
#: Nuclei read ahead on the worker thread.
PREFETCH = 3
#: Keys of the widget itself (besides the decision keys of :func:`review_keys`).
VIEW_KEYS: dict[str, str] = {"j": "jump", "d": "adjudicate", "c": "next_conflict", "o": "outline", "v": "overlay"}


def review_keys(taxonomy: Taxonomy) -> dict[str, tuple[str, int | None]]:
    """key -> (action, class id or None): the fixed keys plus one digit per class id 1..9."""
    keys: dict[str, tuple[str, int | None]] = {
        "a": ("accept", None), "k": ("keep", None), "n": ("not_nucleus", None), "s": ("skip", None),
        "u": ("undo", None),
    }
    keys.update({str(c.id): ("set_class", c.id) for c in taxonomy.classes if 1 <= c.id <= 9})
    return keys


class ElidedLabel(QLabel):
    """A one-line label that elides its text (middle) to its width; the full text is the tooltip."""

    def __init__(self, text: str = "") -> None:
        super().__init__()
        self._full = ""
        self.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.setMinimumWidth(10)
        self.setText(text)

    def setText(self, text: str | None) -> None:  # noqa: N802 - Qt's name
        self._full = text or ""
        self.setToolTip(self._full)
        self._elide()

    def full_text(self) -> str:
        return self._full

    def text(self) -> str:
        return self._full

    def _elide(self) -> None:
        width = max(10, self.width())
        shown = self.fontMetrics().elidedText(self._full, Qt.TextElideMode.ElideMiddle, width)
        super().setText(shown)

    def resizeEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        super().resizeEvent(event)
        self._elide()


def _wrapping(text: str) -> QLabel:
    """A label that wraps its text within the dock's fixed width (never widens the dock)."""
    label = QLabel(text)
    label.setWordWrap(True)
    label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    return label


class _KeyFilter(QObject):
    """Takes the review keys (no Ctrl/Alt/Meta) before napari's keymaps see them."""

    def __init__(self, widget: "ReviewWidget") -> None:
        super().__init__(widget)
        self.widget = widget

    def eventFilter(self, obj: Any, event: Any) -> bool:  # noqa: N802 - Qt's name
        kind = event.type()
        if kind not in (QEvent.Type.KeyPress, QEvent.Type.KeyRelease, QEvent.Type.ShortcutOverride):
            return False
        key = self.widget.key_of(event)
        if key is None:
            return False
        if kind == QEvent.Type.ShortcutOverride:  # keep menu shortcuts from taking the key
            event.accept()
            return True
        if kind == QEvent.Type.KeyPress and not event.isAutoRepeat():
            self.widget.handle_key(key)
        return True


def class_keys(taxonomy: Any) -> dict[str, tuple[str, int | None]]:
    """Digit keys of the taxonomy's classes: key ``d`` sets the class with id ``d`` (ids 1..9)."""
    return {str(c.id): ("set_class", c.id) for c in taxonomy.classes if 1 <= c.id <= 9}


def store_rows(lay: QVBoxLayout, reviewer: str | None, open_button: QPushButton, on_open: Callable[[], None],
               on_reviewer: Callable[[], None]) -> tuple[QLineEdit, QLineEdit]:
    """The dock's first two rows, shared by the class and geometry docks: a store folder box with its
    Open button (Return opens it too), and the reviewer's name (Return gives the focus back)."""
    row = QHBoxLayout()
    store_edit = QLineEdit()
    store_edit.setPlaceholderText("store folder")
    store_edit.returnPressed.connect(on_open)
    row.addWidget(store_edit, 1)
    row.addWidget(open_button)
    lay.addLayout(row)
    who = QHBoxLayout()
    who.addWidget(QLabel("Reviewer"))
    reviewer_edit = QLineEdit(reviewer or default_reviewer())
    reviewer_edit.returnPressed.connect(on_reviewer)
    who.addWidget(reviewer_edit, 1)
    lay.addLayout(who)
    return store_edit, reviewer_edit


def ask_store_path(parent: QWidget, store_edit: QLineEdit) -> str:
    """The store folder typed in the box, or (box empty) one chosen in a folder dialog; "" if none."""
    path = store_edit.text().strip()
    if not path:
        path = QFileDialog.getExistingDirectory(parent, "Open a cellcurate store")
    return path


class ReviewWidget(QWidget):
    """Dock widget reviewing one store's queue. Give a ``session`` or open one with :meth:`open_store`;
    without a session it opens ``$CELLCURATE_STORE`` when that is set (the Plugins menu entry)."""

    def __init__(self, napari_viewer: "napari.Viewer", session: ReviewSession | None = None, *,
                 reviewer: str | None = None, filters: dict[str, Any] | None = None,
                 prefetch: int = PREFETCH) -> None:
        super().__init__()
        # napari hands plugin widgets a proxy that hides private attributes; the canvas is one
        self.viewer = getattr(napari_viewer, "__wrapped__", napari_viewer)
        self.session: ReviewSession | None = None
        self.last_error: str | None = None
        self.filters: dict[str, Any] = dict(filters or {})
        self.prefetch_n = int(prefetch)
        self.keys: dict[str, tuple[str, int | None]] = review_keys(Taxonomy.default())
        self.adjudicating = False
        self.outline_only = True
        self._confirm: tuple[int, str, int | None] | None = None
        self._worker: Any = None
        self._layers: tuple[Any, Any, Any] | None = None
        self._ctx: Context | None = None
        self.shown_at = 0.0
        self._build(reviewer)
        self._filter = _KeyFilter(self)
        for target in self._key_targets():
            target.installEventFilter(self._filter)
        if session is not None:
            self.set_session(session)
        elif os.environ.get("CELLCURATE_STORE"):
            self.open_store(os.environ["CELLCURATE_STORE"])

    # -- layout -----------------------------------------------------------------------------------
    def _build(self, reviewer: str | None) -> None:
        self.setFixedWidth(DOCK_WIDTH)
        lay = QVBoxLayout(self)
        self.store_edit, self.reviewer_edit = store_rows(
            lay, reviewer, self._button("Open store", self._choose_store), self._choose_store, self._focus_canvas)

        self.progress_label = _wrapping("no store open")
        self.progress_bar = QProgressBar()
        self.session_label = _wrapping("")
        self.counts_label = _wrapping("")
        for w in (self.progress_label, self.progress_bar, self.session_label, self.counts_label):
            lay.addWidget(w)

        grid = QGridLayout()
        grid.setColumnStretch(1, 1)
        self.fields: dict[str, ElidedLabel] = {}
        for i, (key, title) in enumerate([("nucleus_id", "Nucleus"), ("image", "Image"), ("source", "Source"),
                                          ("source_label", "Source label"), ("label", "Current"),
                                          ("proposed", "Proposed"), ("score", "Issue score"),
                                          ("reason", "Reason"), ("round", "Round"), ("others", "Others")]):
            grid.addWidget(QLabel(title), i, 0)
            val = ElidedLabel("-")
            grid.addWidget(val, i, 1)
            self.fields[key] = val
        lay.addLayout(grid)
        self.others_box = _wrapping("")
        lay.addWidget(self.others_box)

        lay.addWidget(QLabel("Class probabilities"))
        self.prob_grid = QGridLayout()
        self.prob_grid.setColumnStretch(1, 1)
        self.prob_bars: list[QProgressBar] = []
        self.prob_names: list[QLabel] = []
        lay.addLayout(self.prob_grid)

        buttons = QGridLayout()
        self.buttons: dict[str, QPushButton] = {}
        for i, (text, action) in enumerate([("Accept proposal [a]", "accept"), ("Keep current [k]", "keep"),
                                            ("Not a nucleus [n]", "not_nucleus"), ("Skip [s]", "skip"),
                                            ("Undo [u]", "undo"), ("Adjudicate [d]", "adjudicate")]):
            if action == "adjudicate":
                b = self._button(text, self.toggle_adjudicate)
            else:
                b = self._button(text, lambda a=action: self.decide(a))
            buttons.addWidget(b, i // 2, i % 2)
            self.buttons[action] = b
        lay.addLayout(buttons)
        self.class_row = QGridLayout()
        self.class_buttons: list[QPushButton] = []
        lay.addLayout(self.class_row)

        view = QHBoxLayout()
        view.addWidget(self._button("Outline/fill [o]", self.toggle_outline))
        view.addWidget(self._button("Overlay [v]", self.toggle_overlay))
        view.addWidget(self._button("Next conflict [c]", self.next_conflict))
        lay.addLayout(view)

        jump = QHBoxLayout()
        self.jump_edit = QLineEdit()
        self.jump_edit.setPlaceholderText("nucleus id [j]")
        self.jump_edit.returnPressed.connect(self._jump_from_edit)
        jump.addWidget(self.jump_edit, 1)
        jump.addWidget(self._button("Jump", self._jump_from_edit))
        jump.addWidget(self._button("Refresh queue", self.refresh))
        lay.addLayout(jump)
        self.message = _wrapping("")
        lay.addWidget(self.message)
        lay.addStretch(1)

    def _button(self, text: str, slot: Any) -> QPushButton:
        """A button that never takes keyboard focus and gives it back to the canvas when clicked."""
        b = QPushButton(text)
        b.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        b.clicked.connect(lambda _=False: (slot(), self._focus_canvas()))
        return b

    def _set_classes(self, session: ReviewSession) -> None:
        tax = session.store.taxonomy
        self.keys = review_keys(tax)
        for w in self.prob_bars + self.prob_names + self.class_buttons:
            w.deleteLater()
        self.prob_bars, self.prob_names, self.class_buttons = [], [], []
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
            key = next((k for k, (_a, cid) in self.keys.items() if cid == c.id), None)
            b = self._button(f"[{key}] {c.name}" if key else c.name,
                             lambda cid=c.id: self.decide("set_class", label=cid))
            b.setStyleSheet(f"border-left: 6px solid {c.color}; text-align: left; padding-left: 4px;")
            self.class_row.addWidget(b, i // 3, i % 3)
            self.class_buttons.append(b)

    # -- keys ---------------------------------------------------------------------------------------
    def _canvas(self) -> Any:
        qv = self.viewer.window._qt_viewer
        return qv.canvas.native

    def _key_targets(self) -> list[Any]:
        qv = self.viewer.window._qt_viewer
        return [qv.canvas.native, qv]

    def _focus_canvas(self) -> None:
        try:
            self._canvas().setFocus(Qt.FocusReason.OtherFocusReason)
        except (AttributeError, RuntimeError):  # the viewer is closing
            pass

    def key_of(self, event: QKeyEvent) -> str | None:
        """The review key an event stands for (None: not ours, let napari have it)."""
        mods = event.modifiers()
        if mods & (Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.AltModifier
                   | Qt.KeyboardModifier.MetaModifier):
            return None
        text = (event.text() or "").lower()
        if text in self.keys or text in VIEW_KEYS:
            return text
        return None

    def handle_key(self, key: str) -> None:
        """One review key (as typed on the canvas or in the dock)."""
        view = VIEW_KEYS.get(key)
        if view == "jump":
            self.jump_edit.setFocus(Qt.FocusReason.ShortcutFocusReason)
            self.jump_edit.selectAll()
            return
        if view == "adjudicate":
            self.toggle_adjudicate()
        elif view == "next_conflict":
            self.next_conflict()
        elif view == "outline":
            self.toggle_outline()
        elif view == "overlay":
            self.toggle_overlay()
        else:
            action, label = self.keys[key]
            if self.adjudicating and action in ("set_class", "not_nucleus", "accept"):
                self.adjudicate(label if action == "set_class" else ("not_nucleus" if action == "not_nucleus"
                                                                     else None))
            else:
                self.decide(action, label=label)
        self._focus_canvas()

    def keyPressEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        """Keys typed while the dock (not one of its text boxes) has focus."""
        key = self.key_of(event)
        if key is None:
            super().keyPressEvent(event)
            return
        self.handle_key(key)
        event.accept()

    # -- session ----------------------------------------------------------------------------------
    def _choose_store(self) -> None:
        path = ask_store_path(self, self.store_edit)
        if path:
            self.open_store(path)
        self._focus_canvas()

    def open_store(self, path: str, *, reviewer: str | None = None, **filters: Any) -> None:
        """Open a store (read-write) and start reviewing its queue, as the reviewer in the dock's
        reviewer box (``--reviewer`` of ``curate review``) with the filters it was started with."""
        who = reviewer or self.reviewer_edit.text().strip() or default_reviewer()
        use = {**self.filters, **filters}
        try:
            session = open_session(path, reviewer=who, **use)
        except CellcurateError as exc:
            self._error(str(exc))
            return
        self.filters = use
        self.set_session(session)

    def set_session(self, session: ReviewSession) -> None:
        if self.session is not None and self.session is not session:
            self._wait_worker()
            self.session.close()
        self.session = session
        self.store_edit.setText(str(session.store.path))
        self.reviewer_edit.setText(session.reviewer)
        self._set_classes(session)
        self._make_layers(session)
        self.show_current()

    def _make_layers(self, session: ReviewSession) -> None:
        tax = session.store.taxonomy
        colors = class_colors(tax)
        v = self.viewer
        w = session.window
        for name in ("current", "classes", "context"):
            if name in v.layers:
                v.layers.remove(name)
        image = v.add_image(np.zeros((w, w, 3), np.uint8), name="context", rgb=True)
        classes = v.add_labels(np.zeros((w, w), np.uint8), name="classes", opacity=1.0, colormap=colors)
        current = v.add_labels(np.zeros((w, w), np.uint8), name="current", opacity=1.0,
                               colormap={None: "transparent", 0: "transparent", 1: outline_color(tax)})
        current.contour = 2
        for layer in (classes, current):
            layer.editable = False
        self._layers = (image, classes, current)
        self.image_layer, self.classes_layer, self.current_layer = image, classes, current
        v.layers.selection.active = image
        cam = _camera(v)
        cam.center = ((w - 1) / 2, (w - 1) / 2)
        cam.zoom = max(cam.zoom, 1.0)

    def close_session(self) -> None:
        self._wait_worker()
        if self.session is not None:
            self.session.close()
            self.session = None

    # -- actions --------------------------------------------------------------------------------
    def decide(self, action: str, *, label: int | str | None = None) -> bool:
        """Record a decision on the shown nucleus; True when it was saved."""
        s = self.session
        if s is None:
            self._error("open a store first")
            return False
        if action != "undo" and s.done:
            self._info("the queue is done: nothing left to decide")
            return False
        item = s.current()
        lab = label if label is None else int(label) if str(label).lstrip("-").isdigit() else None
        key = (-1 if item is None else item.nucleus_id, action, lab)
        confirm = self._confirm == key
        self._confirm = None
        try:
            d = s.act(action, label=label, confirm=confirm)  # type: ignore[arg-type]
        except DecidedByOthers as exc:
            self._confirm = key
            self._warn(f"{exc}: press the same key again to record your decision too")
            return False
        except CellcurateError as exc:
            self._error(f"NOT SAVED ({action}): {exc}")
            return False
        self.adjudicating = False
        self.show_current()
        old = "-" if d.prev_label is None else d.prev_label
        new = "-" if d.label is None else d.label
        self._info(f"saved: {d.action} on {d.nucleus_id} ({old} -> {new}), seq {d.seq}")
        return True

    def adjudicate(self, label: int | str | None) -> bool:
        """Settle the shown nucleus (a conflict) with a class (None: the proposed class)."""
        item = None if self.session is None else self.session.current()
        if label is None and item is not None:
            label = item.proposed
        if label is None:
            self._error("adjudicate needs a class: press a class key or n")
            return False
        return self.decide("adjudicate", label=label)

    def toggle_adjudicate(self) -> None:
        self.adjudicating = not self.adjudicating
        if self.adjudicating:
            self._warn("ADJUDICATE: press a class key (or n, or a for the proposal) to settle this nucleus; d cancels")
        else:
            self._info("adjudication cancelled")

    def toggle_outline(self) -> None:
        self.outline_only = not self.outline_only
        self._update_classes()

    def toggle_overlay(self) -> None:
        if self._layers is not None:
            self.classes_layer.visible = not self.classes_layer.visible

    def next_conflict(self) -> bool:
        """Jump to the next nucleus of the queue whose reviewers disagree."""
        s = self.session
        if s is None:
            return False
        status = s.queue["status"].to_numpy()
        start = -1 if s.cursor is None else s.cursor
        order = np.r_[np.arange(start + 1, len(status)), np.arange(0, start + 1)]
        hit = order[status[order] == "conflict"]
        if not hit.size:
            self._info("no conflicts in this queue")
            return False
        return self.jump(int(s.queue["nucleus_id"].iat[int(hit[0])]))

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
        self._focus_canvas()  # the next key is a review key, not more text in the box
        try:
            nid = int(text)
        except ValueError:
            self._error(f"not a nucleus id: {text!r}")
            return
        if self.jump(nid):
            self.jump_edit.clear()

    def refresh(self) -> None:
        if self.session is None:
            return
        self._wait_worker()
        try:
            self.session.refresh()
        except CellcurateError as exc:
            self._error(str(exc))
            return
        self.show_current()

    # -- prefetch ---------------------------------------------------------------------------------
    def _prefetch(self) -> None:
        s = self.session
        if s is None or self.prefetch_n <= 0 or self._worker is not None:
            return
        items = [i for i in s.upcoming(self.prefetch_n) if i.nucleus_id not in s._cache]
        if not items:
            return
        from napari.qt.threading import create_worker

        from ..datasets.ledger import Ledger

        path = s.store.ledger.path

        def work() -> list[Context]:
            ledger = Ledger(path, readonly=True)
            try:
                return [s.load_context(i, ledger=ledger) for i in items]
            finally:
                ledger.close()

        worker = create_worker(work)

        def done(result: list[Context]) -> None:
            if self.session is s:
                s.prefetched(result)

        def finished() -> None:
            self._worker = None

        worker.returned.connect(done)
        worker.errored.connect(lambda exc: None)  # a failed read ahead is read again when shown
        worker.finished.connect(finished)
        self._worker = worker
        worker.start()

    def _wait_worker(self, timeout: float = 30.0) -> None:
        """Let a running read-ahead finish (before the session changes or closes)."""
        end = time.monotonic() + timeout
        while self._worker is not None and time.monotonic() < end:
            QApplication.processEvents()
            time.sleep(0.002)

    # -- display ----------------------------------------------------------------------------------
    def show_current(self) -> None:
        """Show the session's current nucleus: layers, panel, progress; then read the next ones ahead."""
        s = self.session
        if s is None:
            return
        self._show_progress(s)
        item = s.current()
        if item is None:
            for f in self.fields.values():
                f.setText("-")
            self.others_box.setText("")
            done, total = s.progress()
            self._info("queue done: every flagged nucleus has a decision" if total else "no flagged nuclei")
            return
        try:
            ctx = s.context(item)
        except CellcurateError as exc:
            self._error(str(exc))
            return
        self._ctx = ctx
        image, _classes, current = self._layers  # type: ignore[misc]
        image.data[...] = ctx.image
        _redraw(image)
        self._update_classes()
        current.data[...] = ctx.current
        _redraw(current)
        _camera(self.viewer).center = ((s.window - 1) / 2, (s.window - 1) / 2)
        self._show_item(s, item)
        self.shown_at = time.perf_counter()
        self._prefetch()

    def _update_classes(self) -> None:
        ctx = self._ctx
        if ctx is None or self._layers is None:
            return
        layer = self.classes_layer
        if self.outline_only and ctx.outline is not None:
            layer.data[...] = ctx.outline
            if layer.opacity != 1.0:
                layer.opacity = 1.0
        else:
            layer.data[...] = ctx.classes
            if layer.opacity != 0.35:
                layer.opacity = 0.35
        _redraw(layer)

    def _show_progress(self, s: ReviewSession) -> None:
        done, total = s.progress()
        st = s.stats()
        taken = f", {st['taken']} held by other reviewers" if st["taken"] else ""
        self.progress_label.setText(f"this queue: {done} / {total} settled, {total - done} left{taken}")
        self.progress_bar.setRange(0, max(total, 1))
        self.progress_bar.setValue(done)
        rate = st["rate_per_hour"]
        eta = f", ~{st['left'] / rate:.1f} h left at this rate" if rate > 0 and st["left"] else ""
        self.session_label.setText(f"this session ({s.reviewer}): {st['decided']} decided, {st['skipped']} skipped, "
                                   f"{rate:.0f}/h{eta}")
        if st["per_class"]:
            self.counts_label.setText("decided as: " + ", ".join(f"{s.names.get(k, k)} {v}"
                                                               for k, v in st["per_class"].items()))
        else:
            self.counts_label.setText("decided as: -")

    def _show_item(self, s: ReviewSession, item: ReviewItem) -> None:
        def name(v: int | None) -> str:
            if v is None:
                return "-"
            return s.names.get(v, str(v)) if v <= 0 else f"{v} {s.names.get(v, '?')}"

        f = self.fields
        f["nucleus_id"].setText(str(item.nucleus_id))
        y, x = item.centroid
        f["image"].setText(f"{item.image_id} @ ({y:.0f}, {x:.0f})")
        f["source"].setText(item.source)
        f["source_label"].setText(item.source_label)
        f["label"].setText(f"{name(item.label)}  [{item.status}]")
        f["proposed"].setText(name(item.proposed))
        f["score"].setText(f"{item.score:.3f}")
        f["reason"].setText(item.reason.replace("_", " "))
        f["round"].setText("-" if item.round is None else str(item.round))
        others = item.others
        conflict = item.status == "conflict" or len({o.label for o in others}) > 1
        if not others:
            f["others"].setText("-")
            self.others_box.setText("")
            self.others_box.setStyleSheet("")
        elif s.double_review and not conflict:
            f["others"].setText(f"{len(others)} other review(s), hidden (double review)")
            self.others_box.setText("")
            self.others_box.setStyleSheet("")
        else:
            f["others"].setText(", ".join(o.reviewer for o in others))
            lines = [f"{o.reviewer}: {o.action.replace('_', ' ')} -> {name(o.label)} ({o.time[:16].replace('T', ' ')})"
                     for o in others]
            if conflict:
                lines.insert(0, "CONFLICT: reviewers disagree. Press d, then a class key (or n), to adjudicate.")
                self.others_box.setStyleSheet("color: #ff9f43; font-weight: bold;")
            else:
                self.others_box.setStyleSheet("color: #ffd166;")
            self.others_box.setText("\n".join(lines))
        if item.held_by:
            self._warn(f"{item.held_by} is reviewing this nucleus right now")
        for i, bar in enumerate(self.prob_bars):
            p = item.probs[i] if i < len(item.probs) else None
            bar.setValue(0 if p is None else round(p * 1000))
            bar.setFormat("-" if p is None else f"{p:.2f}")

    def _error(self, text: str) -> None:
        self.last_error = text
        self.message.setStyleSheet("color: #ff5555; font-weight: bold;")
        self.message.setText(text)
        try:
            from napari.utils.notifications import show_error

            show_error(text)
        except ImportError:  # pragma: no cover - napari is this module's dependency
            pass

    def _warn(self, text: str) -> None:
        self.last_error = None
        self.message.setStyleSheet("color: #ffb000; font-weight: bold;")
        self.message.setText(text)

    def _info(self, text: str) -> None:
        self.last_error = None
        self.message.setStyleSheet("")
        self.message.setText(text)

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        self.close_session()
        super().closeEvent(event)


def _redraw(layer: Any) -> None:
    """Show a layer's data changed in place: same shape and position, so no thumbnail, extent or
    highlight work (napari would otherwise redo them on every nucleus)."""
    layer.refresh(thumbnail=False, extent=False, highlight=False)


def _camera(viewer: "napari.Viewer") -> Any:
    scene = getattr(viewer, "scene", None)  # napari >= 0.9 moved the camera to viewer.scene
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def review_widget(napari_viewer: "napari.Viewer") -> ReviewWidget:
    """The dock widget for a viewer (opens ``$CELLCURATE_STORE`` when set)."""
    return ReviewWidget(napari_viewer)


def default_window_size(available: tuple[int, int]) -> tuple[int, int]:
    """Main window size for a screen's available (width, height): 90 % of it, at least
    1280×800 when the screen allows, so the canvas gets what the dock does not take."""
    aw, ah = available
    return min(aw, max(1280, int(aw * 0.9))), min(ah, max(800, int(ah * 0.9)))


def launch(store: str, *, reviewer: str | None = None, **filters: Any) -> None:
    """Open napari with the review dock on a store's queue (``curate review``); blocks until closed."""
    import napari

    from ..datasets.store import Store

    session = ReviewSession(Store.open(store, mode="a"), reviewer=reviewer, **filters)
    viewer = napari.Viewer(title=f"cellcurate review - {store}")
    screen = QApplication.primaryScreen()
    if screen is not None:
        g = screen.availableGeometry()
        viewer.window.resize(*default_window_size((g.width(), g.height())))
    widget = ReviewWidget(viewer, session, reviewer=session.reviewer, filters=filters)
    viewer.window.add_dock_widget(widget, name="cellcurate review", area="right")
    _camera(viewer).zoom = 3.0
    widget._focus_canvas()
    try:
        napari.run()
    finally:
        widget.close_session()

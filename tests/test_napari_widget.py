"""The review dock widget, headless (pytest-qt, QT_QPA_PLATFORM=offscreen), driven with real key
events sent to the canvas (``qtbot.keyClick``), each layer selected in turn."""

import importlib
import sqlite3
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from qtpy.QtCore import Qt  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from cellcurate.curation.review import ReviewSession, decide  # noqa: E402
from cellcurate.datasets.ledger import Ledger  # noqa: E402
from cellcurate.datasets.store import Store  # noqa: E402
from cellcurate.napari_plugin.sample import write_disc_store, write_flags  # noqa: E402

pytestmark = pytest.mark.gui


def _gl_works() -> bool:
    try:
        from napari._vispy.utils import gl

        return isinstance(gl.get_max_texture_sizes()[0], int)
    except Exception:  # no OpenGL context (offscreen Qt without a display)
        return False


@pytest.fixture()
def viewer(make_napari_viewer, monkeypatch):
    """A shown napari viewer (offscreen); without OpenGL (offscreen CI) the layers' texture
    queries are answered with fixed values so layers can be added and updated (nothing is drawn)."""
    if not _gl_works():
        for name in ("napari._vispy.utils.gl", "napari._vispy.layers.image", "napari._vispy.layers.base",
                     "napari._vispy.layers.labels", "napari._vispy.canvas"):
            mod = importlib.import_module(name)
            if hasattr(mod, "get_max_texture_sizes"):
                monkeypatch.setattr(mod, "get_max_texture_sizes", lambda: (4096, 2048))
            if hasattr(mod, "get_gl_extensions"):
                monkeypatch.setattr(mod, "get_gl_extensions", lambda: "texture_float")
    return make_napari_viewer(show=True)


@pytest.fixture()
def store(tmp_path):
    s = write_disc_store(tmp_path / "s", n_images=3, per_image=9, size=128, seed=1)
    write_flags(s, fraction=0.5, seed=2)
    return s


def canvas(viewer):
    return viewer.window._qt_viewer.canvas.native


def key(qtbot, viewer, text):
    """A real key press + release on the canvas, as typing it with the mouse over the image."""
    qtbot.keyClick(canvas(viewer), text)
    QApplication.processEvents()


def make_widget(viewer, store, qtbot, reviewer="ana", **kw):
    from cellcurate.napari_plugin.widget import ReviewWidget

    w = ReviewWidget(viewer, ReviewSession(store, reviewer=reviewer, window=64, **kw), prefetch=0)
    viewer.window.add_dock_widget(w, name="cellcurate review", area="right")
    QApplication.processEvents()
    return w


def decisions(store):
    return store.ledger.events(kinds=("decision",))


def test_keys_win_over_every_layer_keymap(viewer, store, qtbot):
    w = make_widget(viewer, store, qtbot)
    names = ["context", "classes", "current"]
    expect = []
    for name in names:  # 1 and 2 are pan/zoom and transform on an image layer, paint tools on labels
        viewer.layers.selection.active = viewer.layers[name]
        for k in ("1", "2", "7"):
            nid = w.session.current().nucleus_id
            key(qtbot, viewer, k)
            expect.append((nid, int(k)))
            assert viewer.layers[name].mode == "pan_zoom", f"key {k} changed the mode of {name}"
    dec = decisions(store)
    assert list(zip(dec["nucleus_id"].astype(int), dec["label"].astype(int))) == expect
    assert dec["action"].eq("set_class").all() and dec["actor"].eq("ana").all()
    viewer.layers.selection.active = viewer.layers["classes"]
    key(qtbot, viewer, "a")
    key(qtbot, viewer, "n")
    key(qtbot, viewer, "s")
    assert decisions(store)["action"].tolist()[-3:] == ["accept", "not_nucleus", "skip"]
    w.close_session()


def test_progress_counts_and_status_after_undo(viewer, store, qtbot):
    w = make_widget(viewer, store, qtbot)
    assert "this queue: 0 / 14 settled, 14 left" in w.progress_label.text()
    assert "0 decided" in w.session_label.text()
    first = w.session.current()
    assert w.fields["nucleus_id"].text() == str(first.nucleus_id)
    assert [b.value() for b in w.prob_bars] == [round(p * 1000) for p in first.probs]
    key(qtbot, viewer, "3")
    key(qtbot, viewer, "3")
    key(qtbot, viewer, "n")
    assert "this queue: 3 / 14 settled, 11 left" in w.progress_label.text()
    assert "3 decided, 0 skipped" in w.session_label.text() and "/h" in w.session_label.text()
    assert w.counts_label.text() == "decided as: not a nucleus 1, Connective 2"
    key(qtbot, viewer, "u")
    last = decisions(store).iloc[-2]
    assert w.session.current().nucleus_id == int(last["nucleus_id"])
    assert "[reviewed]" not in w.fields["label"].text() and "[flagged]" in w.fields["label"].text()
    assert "this queue: 2 / 14 settled" in w.progress_label.text()
    assert w.counts_label.text() == "decided as: Connective 2"
    w.close_session()


def test_focus_returns_to_the_canvas_after_a_jump_and_a_button(viewer, store, qtbot):
    w = make_widget(viewer, store, qtbot)
    canvas(viewer).setFocus()
    target = int(w.session.queue["nucleus_id"].iloc[-1])
    key(qtbot, viewer, "j")
    assert QApplication.focusWidget() is w.jump_edit
    qtbot.keyClicks(w.jump_edit, str(target))
    qtbot.keyClick(w.jump_edit, Qt.Key.Key_Return)
    assert w.fields["nucleus_id"].text() == str(target)
    assert QApplication.focusWidget() is canvas(viewer)
    qtbot.keyClick(QApplication.focusWidget(), "s")  # goes to the review, not into the id box
    assert w.jump_edit.text() == ""
    dec = decisions(store)
    assert dec["action"].tolist() == ["skip"] and int(dec["nucleus_id"].iloc[0]) == target

    button = w.class_buttons[1]
    assert button.focusPolicy() == Qt.FocusPolicy.NoFocus
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)
    assert decisions(store)["label"].tolist()[-1] == 2
    assert QApplication.focusWidget() is canvas(viewer)
    qtbot.keyClick(QApplication.focusWidget(), Qt.Key.Key_Space)  # Space must not press the button again
    assert len(decisions(store)) == 2
    w.close_session()


def test_view_toggles_and_fixed_dock(viewer, store, qtbot):
    from cellcurate.napari_plugin.widget import DOCK_WIDTH, ElidedLabel

    w = make_widget(viewer, store, qtbot)
    assert w.width() == DOCK_WIDTH and w.minimumWidth() == w.maximumWidth() == DOCK_WIDTH
    layer = viewer.layers["classes"]
    outline = layer.data.copy()
    assert w.outline_only and outline.any()
    key(qtbot, viewer, "o")
    filled = layer.data.copy()
    assert not w.outline_only and (filled > 0).sum() > (outline > 0).sum()
    assert np.array_equal(filled[outline > 0], outline[outline > 0])
    key(qtbot, viewer, "v")
    assert not layer.visible
    key(qtbot, viewer, "v")
    assert layer.visible
    assert len(decisions(store)) == 0
    # the nucleus is at the centre of the window
    cur = viewer.layers["current"].data
    ys, xs = np.nonzero(cur)
    assert abs(ys.mean() - 31.5) <= 2 and abs(xs.mean() - 31.5) <= 2

    label = ElidedLabel("x" * 400)
    label.resize(120, 20)
    assert label.text() == "x" * 400 and label.toolTip() == "x" * 400
    assert len(super(ElidedLabel, label).text()) < 400 and "…" in super(ElidedLabel, label).text()
    w.close_session()


def test_nucleus_at_a_tile_edge_is_centred(store):
    s = ReviewSession(store, reviewer="ana", window=64)
    nuc = store.nuclei()
    edge = nuc.sort_values("centroid_y").iloc[0]  # the nucleus nearest the top edge
    q = s.queue
    if int(edge["nucleus_id"]) not in set(q["nucleus_id"]):
        pytest.skip("no flagged nucleus at the edge in this sample")
    item = s.jump(int(edge["nucleus_id"]))
    ctx = s.context(item)
    assert ctx.image.shape == (64, 64, 3) and ctx.offset[0] < 0
    ys, xs = np.nonzero(ctx.current)
    assert abs(ys.mean() - (item.centroid[0] - ctx.offset[0])) < 1e-6 + 1
    assert abs(ys.mean() - 32) <= 2 and abs(xs.mean() - 32) <= 2
    assert (ctx.image[0] == (48, 48, 48)).all()  # padding above the tile
    s.close()


def test_warning_before_deciding_what_someone_else_decided(viewer, store, qtbot):
    probe = ReviewSession(Store.open(store.path, mode="a"), reviewer="probe", leases=False)
    nid = probe.current().nucleus_id
    probe.close()
    decide(store, nid, "set_class", reviewer="bob", label=4)
    w = make_widget(viewer, store, qtbot)
    assert w.jump(nid)
    assert "bob" in w.fields["others"].text() and "Dead" in w.others_box.text()
    key(qtbot, viewer, "3")
    assert "already decided by bob (Dead)" in w.message.text() and len(decisions(store)) == 1
    key(qtbot, viewer, "3")  # the same key again: recorded
    dec = decisions(store)
    assert len(dec) == 2 and dec["actor"].iloc[-1] == "ana" and int(dec["label"].iloc[-1]) == 3
    w.close_session()


def test_conflicts_shown_and_adjudicated_in_the_panel(viewer, store, qtbot):
    probe = ReviewSession(Store.open(store.path, mode="a"), reviewer="probe", leases=False)
    nid = probe.current().nucleus_id
    probe.close()
    decide(store, nid, "set_class", reviewer="ana", label=2)
    decide(store, nid, "set_class", reviewer="bob", label=5)
    w = make_widget(viewer, store, qtbot, reviewer="carol", double_review=True)
    key(qtbot, viewer, "c")
    assert w.session.current().nucleus_id == nid
    assert "CONFLICT" in w.others_box.text() and "ana" in w.others_box.text() and "bob" in w.others_box.text()
    key(qtbot, viewer, "d")
    assert w.adjudicating
    key(qtbot, viewer, "5")
    dec = decisions(store)
    assert dec["action"].iloc[-1] == "adjudicate" and int(dec["label"].iloc[-1]) == 5
    assert dec["actor"].iloc[-1] == "carol"
    cur = store.current_labels().set_index("nucleus_id")
    assert cur.loc[nid, "status"] == "reviewed" and int(cur.loc[nid, "label"]) == 5
    w.close_session()


def test_two_reviewers_get_different_nuclei(viewer, store, qtbot):
    bob = ReviewSession(Store.open(store.path, mode="a"), reviewer="bob", claim_batch=3)
    w = make_widget(viewer, store, qtbot, claim_batch=3)
    seen_ana, seen_bob = [], []
    for _ in range(4):
        seen_ana.append(w.session.current().nucleus_id)
        key(qtbot, viewer, "2")
        seen_bob.append(bob.current().nucleus_id)
        bob.act("set_class", label=2)
    assert not set(seen_ana) & set(seen_bob)
    assert "held by other reviewers" in w.progress_label.text()
    bob.close()
    w.close_session()


def test_write_errors_keep_the_nucleus(viewer, store, qtbot, monkeypatch):
    from cellcurate.napari_plugin.widget import ReviewWidget

    ro = ReviewWidget(viewer, ReviewSession(Store.open(store.path, mode="r"), reviewer="ana", window=64), prefetch=0)
    qtbot.addWidget(ro)
    nid = ro.session.current().nucleus_id
    assert not ro.decide("set_class", label=2)
    assert "NOT SAVED" in ro.message.text() and "read-only" in ro.message.text()
    assert ro.session.current().nucleus_id == nid and store.ledger.count("decision") == 0
    ro.close_session()

    w = make_widget(viewer, store, qtbot)
    nid = w.session.current().nucleus_id

    def full(self, c, events):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Ledger, "_insert", full)
    key(qtbot, viewer, "n")
    assert "database or disk is full" in w.message.text() and w.last_error
    monkeypatch.undo()
    assert w.session.current().nucleus_id == nid and store.ledger.count("decision") == 0
    key(qtbot, viewer, "n")  # retry saves it
    assert store.ledger.count("decision") == 1
    w.close_session()


def test_prefetch_reads_the_next_nuclei_on_a_worker(viewer, store, qtbot):
    from cellcurate.napari_plugin.widget import ReviewWidget

    w = ReviewWidget(viewer, ReviewSession(store, reviewer="ana", window=64), prefetch=2)
    qtbot.addWidget(w)
    upcoming = [i.nucleus_id for i in w.session.upcoming(2)]
    qtbot.waitUntil(lambda: w._worker is None, timeout=10000)
    assert set(upcoming) <= set(w.session._cache)
    calls = []
    orig = w.session.load_context
    main = threading.main_thread()
    w.session.load_context = lambda *a, **k: (threading.current_thread() is main and calls.append(1)) or orig(*a, **k)
    key(qtbot, viewer, "2")  # the next nucleus comes from the cache, refolded after the decision
    assert w.session.current().nucleus_id == upcoming[0] and not calls
    qtbot.waitUntil(lambda: w._worker is None, timeout=10000)
    w.close_session()


def test_reviewer_kept_when_opening_from_the_dock(viewer, store, qtbot):
    from cellcurate.napari_plugin.widget import ReviewWidget

    w = ReviewWidget(viewer, reviewer="ana", filters={"double_review": True}, prefetch=0)
    qtbot.addWidget(w)
    w.store_edit.setText(str(store.path))
    qtbot.mouseClick(w.findChildren(type(w.buttons["accept"]))[0], Qt.MouseButton.LeftButton)  # "Open store"
    assert w.session is not None and w.session.reviewer == "ana" and w.session.double_review
    assert w.decide("skip") and decisions(store)["actor"].tolist() == ["ana"]
    w.close_session()


def test_plugins_menu_entry_creates_the_dock(viewer, store, monkeypatch):
    """What napari runs for Plugins > Review flagged nuclei (the app-model command of the widget)."""
    from napari._app_model import get_app_model

    from cellcurate.napari_plugin.widget import ReviewWidget

    monkeypatch.setenv("CELLCURATE_STORE", str(store.path))
    monkeypatch.setenv("USER", "menu-user")
    get_app_model().commands.execute_command("cellcurate.review_widget").result()
    docks = [d for name, d in viewer.window._wrapped_dock_widgets.items() if "Review flagged nuclei" in name]
    assert docks
    w = docks[0].widget()
    assert isinstance(w, ReviewWidget) and w.session is not None and w.session.reviewer == "menu-user"
    w.close_session()
    # and the way napari instantiates a dock widget class from a plugin
    dock, widget = viewer.window.add_plugin_dock_widget("cellcurate", "Review flagged nuclei")
    assert isinstance(widget, ReviewWidget)
    widget.close_session()


def test_reader_and_manifest(store):
    from npe2 import PluginManifest

    import cellcurate.napari_plugin as plugin
    from cellcurate.napari_plugin import reader

    manifest = PluginManifest.from_file(Path(plugin.__file__).with_name("napari.yaml"))
    assert {c.id for c in manifest.contributions.commands} == {
        "cellcurate.review_widget", "cellcurate.geometry_widget", "cellcurate.get_reader", "cellcurate.sample"}
    assert reader.napari_get_reader(str(store.path / "units")) is None
    read = reader.napari_get_reader(str(store.path))
    layers = read(str(store.path))
    assert [t for _, _, t in layers] == ["image", "labels"] * 3
    classes = layers[1][0][0]
    cur = store.current_labels()
    first = cur[cur["image_id"] == layers[0][1]["name"]]
    expect = {int(v) if v > 0 else 8 for v in first["label"]}
    assert set(np.unique(classes)) - {0} == expect
    assert layers[3][1]["translate"][1] > 0  # side by side


def test_reader_layers_are_read_only_with_class_names(viewer, store):
    viewer.open(str(store.path), plugin="cellcurate")
    assert len(viewer.layers) == 6
    labels = [layer for layer in viewer.layers if layer.name.endswith("classes")]
    assert labels and all(not layer.editable for layer in labels)
    layer = labels[0]
    ys, xs = np.nonzero(layer.data[0] == 3) if (layer.data[0] == 3).any() else np.nonzero(layer.data[0] > 0)
    value = int(layer.data[0][ys[0], xs[0]])
    status = layer.get_status((float(ys[0]), float(xs[0]) + layer.translate[1]), world=True)
    text = status["coordinates"] if isinstance(status, dict) else str(status)
    from cellcurate.napari_plugin.reader import class_names

    assert class_names(store.taxonomy)[value] in text


def test_sample_data_leaves_no_temp_folder(tmp_path, monkeypatch):
    from cellcurate.napari_plugin import sample

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    steps = []
    orig = sample.make_sample_store
    monkeypatch.setattr(sample, "make_sample_store",
                        lambda path, **kw: orig(path, **{**kw, "step": lambda s: (steps.append(s), kw["step"](s))}))
    layers = sample.sample_data()
    assert [t for _, _, t in layers] == ["image", "labels"] * 4
    assert np.asarray(layers[0][0]).mean() > 0
    assert list(tmp_path.iterdir()) == []
    assert steps[0] == "writing the synthetic sample" and "flagging" in steps


def test_outline_colour_differs_from_every_class_colour():
    from cellcurate.datasets.taxonomy import Taxonomy
    from cellcurate.napari_plugin.reader import _lab, class_colors, outline_color

    tax = Taxonomy.default()
    out = outline_color(tax)
    used = [c for c in class_colors(tax).values() if c != "transparent"]
    assert out not in used and out.lower() != "#ffe119"  # not the Dead yellow
    assert min(np.linalg.norm(_lab(out) - _lab(c)) for c in used) > 40  # CIE Lab: clearly another colour
    assert np.allclose(_lab("#ffffff"), [100, 0, 0], atol=0.1) and np.allclose(_lab("#000000"), [0, 0, 0])
    data = tax.to_dict()
    data["classes"][0]["color"] = out  # a taxonomy using that very colour gets another outline
    assert outline_color(Taxonomy.from_dict(data)) != out


def test_review_keys_follow_the_taxonomy():
    from cellcurate.datasets.taxonomy import Taxonomy
    from cellcurate.napari_plugin.widget import review_keys

    tax = Taxonomy.default()
    keys = review_keys(tax)
    assert {k for k, (a, _) in keys.items() if a == "set_class"} == {str(i) for i in tax.ids}
    data = tax.to_dict()
    data["classes"] = data["classes"][:3]
    for src in data["sources"].values():
        for k, v in list(src.items()):
            if isinstance(v, list):
                src[k] = [n for n in v if n in {c["name"] for c in data["classes"]}] or "ignore"
    small = review_keys(Taxonomy.from_dict(data))
    assert {k for k, (a, _) in small.items() if a == "set_class"} == {"1", "2", "3"}


def test_default_window_size():
    from cellcurate.napari_plugin.widget import default_window_size

    assert default_window_size((1920, 1040)) == (1728, 936)
    assert default_window_size((1366, 728)) == (1280, 728)

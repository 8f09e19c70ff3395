"""The review dock widget, headless (pytest-qt, QT_QPA_PLATFORM=offscreen)."""

import importlib
import sqlite3

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from cellcurate.curation.review import ReviewSession  # noqa: E402
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
    """A napari viewer; without OpenGL (offscreen CI) the layers' texture queries are answered
    with fixed values so layers can be added and updated (nothing is drawn)."""
    v = make_napari_viewer()
    if not _gl_works():
        for name in ("napari._vispy.utils.gl", "napari._vispy.layers.image", "napari._vispy.layers.base",
                     "napari._vispy.layers.labels", "napari._vispy.canvas"):
            mod = importlib.import_module(name)
            if hasattr(mod, "get_max_texture_sizes"):
                monkeypatch.setattr(mod, "get_max_texture_sizes", lambda: (4096, 2048))
            if hasattr(mod, "get_gl_extensions"):
                monkeypatch.setattr(mod, "get_gl_extensions", lambda: "texture_float")
    return v


@pytest.fixture()
def store(tmp_path):
    s = write_disc_store(tmp_path / "s", n_images=3, per_image=9, size=128, seed=1)
    write_flags(s, fraction=0.5, seed=2)
    return s


def press(viewer, key):
    viewer.window._qt_viewer._key_map_handler.press_key(key)
    viewer.window._qt_viewer._key_map_handler.release_key(key)


def test_widget_keyboard_review(viewer, store, qtbot):
    from cellcurate.napari_plugin.widget import ReviewWidget

    w = ReviewWidget(viewer, ReviewSession(store, reviewer="ana", window=64))
    qtbot.addWidget(w)
    assert {"context", "classes", "current"} <= {layer.name for layer in viewer.layers}
    first = w.session.current()
    assert w.fields["nucleus_id"].text().startswith(str(first.nucleus_id))
    assert viewer.layers["current"].data.sum() > 0
    assert [b.value() for b in w.prob_bars] == [round(p * 1000) for p in first.probs]
    assert "reviewed 0 / 14" in w.progress_label.text()
    press(viewer, "a")
    press(viewer, "3")
    press(viewer, "n")
    assert "reviewed 3 / 14" in w.progress_label.text()
    dec = store.ledger.events(kinds=("decision",))
    assert dec["action"].tolist() == ["accept", "set_class", "not_nucleus"]
    assert dec["actor"].eq("ana").all() and dec["label"].tolist()[1:] == [3, -1]
    press(viewer, "u")
    assert "reviewed 2 / 14" in w.progress_label.text()
    assert w.session.current().nucleus_id == int(dec["nucleus_id"].iloc[-1])
    target = int(w.session.queue["nucleus_id"].iloc[-1])
    assert w.jump(target) and w.fields["nucleus_id"].text().startswith(str(target))
    assert not w.jump(42) and "not in this review queue" in w.message.text()
    w.close_session()


def test_widget_shows_write_errors_and_keeps_the_nucleus(viewer, store, qtbot, monkeypatch):
    from cellcurate.napari_plugin.widget import ReviewWidget

    ro = ReviewWidget(viewer, ReviewSession(Store.open(store.path, mode="r"), reviewer="ana", window=64))
    qtbot.addWidget(ro)
    nid = ro.session.current().nucleus_id
    assert not ro.decide("set_class", label=2)
    assert "NOT SAVED" in ro.message.text() and "read-only" in ro.message.text()
    assert ro.session.current().nucleus_id == nid and store.ledger.count("decision") == 0
    ro.close_session()

    w = ReviewWidget(viewer, ReviewSession(store, reviewer="ana", window=64))
    qtbot.addWidget(w)

    def full(self, c, events):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Ledger, "_insert", full)
    assert not w.decide("not_nucleus")
    assert "database or disk is full" in w.message.text() and w.last_error
    monkeypatch.undo()
    assert w.session.current().nucleus_id == nid and store.ledger.count("decision") == 0
    assert w.decide("not_nucleus") and store.ledger.count("decision") == 1  # retry saves it
    w.close_session()


def test_reader_and_manifest(store):
    from npe2 import PluginManifest

    from cellcurate.napari_plugin import reader

    import cellcurate.napari_plugin as plugin
    from pathlib import Path

    manifest = PluginManifest.from_file(Path(plugin.__file__).with_name("napari.yaml"))
    assert {c.id for c in manifest.contributions.commands} == {
        "cellcurate.review_widget", "cellcurate.get_reader", "cellcurate.sample"}
    assert reader.napari_get_reader(str(store.path / "units")) is None
    read = reader.napari_get_reader(str(store.path))
    layers = read(str(store.path))
    assert [t for _, _, t in layers] == ["image", "labels"] * 3
    classes = layers[1][0]
    cur = store.current_labels()
    first = cur[cur["image_id"] == layers[0][1]["name"]]
    expect = {int(v) if v > 0 else 8 for v in first["label"]}
    assert set(np.unique(classes)) - {0} == expect
    assert layers[3][1]["translate"][1] > 0  # side by side


def test_viewer_opens_a_store_through_the_plugin(viewer, store):
    viewer.open(str(store.path), plugin="cellcurate")
    assert len(viewer.layers) == 6

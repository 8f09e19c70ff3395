"""The geometry review dock, headless (pytest-qt, QT_QPA_PLATFORM=offscreen), driven with real key
events on the canvas, each layer selected in turn."""

import importlib

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from qtpy.QtWidgets import QApplication  # noqa: E402

from cellcurate.curation.geometry import store_geometry  # noqa: E402
from cellcurate.curation.geometry_review import GeometrySession  # noqa: E402
from cellcurate.napari_plugin.sample import write_disc_store  # noqa: E402

from instance_flags_helper import flag_event, square, write_instance_flags  # noqa: E402

pytestmark = pytest.mark.gui


def _gl_works() -> bool:
    try:
        from napari._vispy.utils import gl

        return isinstance(gl.get_max_texture_sizes()[0], int)
    except Exception:
        return False


@pytest.fixture()
def viewer(make_napari_viewer, monkeypatch):
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
    s = write_disc_store(tmp_path / "s", n_images=1, per_image=4, size=64, seed=5)
    img = str(s.images()["image_id"].iloc[0])
    nuc = s.nuclei().sort_values("instance_id").reset_index(drop=True)
    ids = [int(n) for n in nuc["nucleus_id"]]
    bx, by = int(nuc.at[1, "bbox_x0"]), int(nuc.at[1, "bbox_y0"])
    write_instance_flags(s, [
        flag_event(img, "missing_annotation", n=0, polygons=[square(28, 0, 4)], label=2, score=0.95),
        flag_event(img, "bad_outline", n=1, nucleus_ids=[ids[1]], action="replace", polygons=[square(bx, by, 3)],
                   score=0.8),
        flag_event(img, "spurious_annotation", n=2, nucleus_ids=[ids[0]], action="delete", score=0.6),
        flag_event(img, "missing_annotation", n=3, polygons=[square(0, 60, 3)], label=1, score=0.5),
    ])
    s.ids = ids
    yield s
    s.close()


def key(qtbot, viewer, text):
    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, text)
    QApplication.processEvents()


def make_widget(viewer, store, reviewer="ana"):
    from cellcurate.napari_plugin.geometry_widget import GeometryWidget

    w = GeometryWidget(viewer, GeometrySession(store, reviewer=reviewer, window=32))
    viewer.window.add_dock_widget(w, name="cellcurate geometry review", area="right")
    QApplication.processEvents()
    return w


def actions(store):
    return store.ledger.events(kinds=("geometry",))["action"].tolist()


def test_keys_decide_flags_and_undo(viewer, store, qtbot):
    w = make_widget(viewer, store)
    assert w.fields["issue"].text() == "missing annotation"
    assert (viewer.layers["proposed"].data == 1).sum() == 16
    assert "0 / 4 decided" in w.progress_label.text()
    viewer.layers.selection.active = viewer.layers["annotated"]  # digits are paint tools on a labels layer
    key(qtbot, viewer, "3")
    assert w.session.label == 3 and w.fields["label"].text().startswith("3 ")
    assert viewer.layers["annotated"].mode == "pan_zoom"
    key(qtbot, viewer, "a")
    ev = store.ledger.events(kinds=("geometry",))
    assert actions(store) == ["add"] and int(ev["label"].iloc[0]) == 3 and ev["actor"].iloc[0] == "ana"
    assert w.fields["issue"].text() == "bad outline" and (viewer.layers["annotated"].data == 2).any()
    viewer.layers.selection.active = viewer.layers["proposed"]
    key(qtbot, viewer, "r")
    assert w.fields["issue"].text() == "spurious annotation"
    viewer.layers.selection.active = viewer.layers["geometry image"]
    key(qtbot, viewer, "u")  # back to the bad outline
    assert w.fields["issue"].text() == "bad outline" and actions(store) == ["add", "replace", "undo"]
    key(qtbot, viewer, "k")
    key(qtbot, viewer, "d")
    assert actions(store)[-2:] == ["keep", "delete"]
    key(qtbot, viewer, "s")  # skip the last one, it stays pending
    key(qtbot, viewer, "p")  # accept its proposal: add
    assert actions(store)[-1] == "add" and w.session.done
    assert "4 / 4 decided" in w.progress_label.text() and "queue done" in w.message.text()
    counts = store_geometry(store).counts()
    assert counts == {"added": 2, "deleted": 1, "replaced": 0}
    w.close_session()


def test_a_refused_decision_shows_an_error_and_records_nothing(viewer, store, qtbot):
    w = make_widget(viewer, store)
    key(qtbot, viewer, "d")  # a missing annotation has no nucleus to delete
    assert w.last_error and "NOT SAVED (delete)" in w.last_error and "no annotated nucleus" in w.last_error
    assert actions(store) == [] and w.fields["issue"].text() == "missing annotation"
    key(qtbot, viewer, "v")
    assert not viewer.layers["proposed"].visible
    assert np.isin(viewer.layers["annotated"].data, [0, 1, 2]).all()
    w.close_session()


def test_plugins_menu_dock_opens_a_typed_store(viewer, store, qtbot, tmp_path):
    """Plugins > Review nucleus geometry: the dock napari builds from the manifest starts without a store;
    a folder that is not a store shows a red line, the typed store opens with a click on Open, and the
    keys then decide its flags."""
    from qtpy.QtCore import Qt

    from cellcurate.napari_plugin.geometry_widget import GeometryWidget

    dock, w = viewer.window.add_plugin_dock_widget("cellcurate", "Review nucleus geometry")
    assert isinstance(w, GeometryWidget) and w.session is None
    assert "no store open" in w.progress_label.text()
    key(qtbot, viewer, "k")
    assert w.last_error == "open a store first" and actions(store) == []
    open_btn = next(b for b in w.findChildren(type(w.buttons["keep"])) if b.text() == "Open store")
    qtbot.keyClicks(w.store_edit, str(tmp_path / "nowhere"))
    qtbot.mouseClick(open_btn, Qt.MouseButton.LeftButton)
    assert w.session is None and "no such store folder" in w.last_error and "nowhere" in w.last_error
    w.store_edit.clear()
    qtbot.keyClicks(w.store_edit, str(store.path))
    w.reviewer_edit.clear()
    qtbot.keyClicks(w.reviewer_edit, "bo")
    qtbot.mouseClick(open_btn, Qt.MouseButton.LeftButton)
    assert w.session is not None and w.session.reviewer == "bo" and w.last_error is None
    assert w.fields["issue"].text() == "missing annotation" and "0 / 4 decided by bo" in w.progress_label.text()
    key(qtbot, viewer, "k")
    ev = store.ledger.events(kinds=("geometry",))
    assert ev["action"].tolist() == ["keep"] and ev["actor"].tolist() == ["bo"]
    w.close_session()
    assert w.session is None and w._own_store is None


def test_dock_opens_the_store_named_in_the_environment(viewer, store, monkeypatch):
    from napari._app_model import get_app_model

    from cellcurate.napari_plugin.geometry_widget import GeometryWidget

    monkeypatch.setenv("CELLCURATE_STORE", str(store.path))
    monkeypatch.setenv("USER", "menu-user")
    get_app_model().commands.execute_command("cellcurate.geometry_widget").result()
    docks = [d for name, d in viewer.window._wrapped_dock_widgets.items() if "Review nucleus geometry" in name]
    assert docks
    w = docks[0].widget()
    assert isinstance(w, GeometryWidget) and w.session is not None and w.session.reviewer == "menu-user"
    assert w.fields["issue"].text() == "missing annotation"
    w.close_session()

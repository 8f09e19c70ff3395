"""The review widget follows the store's taxonomy: 5 classes with ids 1, 2, 3, 4, 9 give five
probability bars, five class buttons and the digit keys 1-4 and 9 (5 is not a class)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.gui


from test_napari_widget import viewer  # noqa: E402,F401 - the shared (offscreen) viewer fixture


def _press(qtbot, v, key):
    """A real key event on the canvas, as an annotator types it."""
    qtbot.keyClick(v.window._qt_viewer.canvas.native, key)


@pytest.mark.slow
def test_widget_keys_bars_and_buttons_follow_a_five_class_taxonomy(viewer, qtbot, tmp_path):  # noqa: F811
    from test_taxonomy_as_data import TAXONOMY

    from cellcurate.cli.demo import real_sample_path
    from cellcurate.curation.review import ReviewSession
    from cellcurate.datasets.ingest import ingest_source
    from cellcurate.datasets.store import Store
    from cellcurate.datasets.taxonomy import Taxonomy
    from cellcurate.napari_plugin.sample import write_flags
    from cellcurate.napari_plugin.widget import ReviewWidget

    store = Store.create(tmp_path / "s", taxonomy=Taxonomy.from_dict(json.loads(json.dumps(TAXONOMY))))
    ingest_source(store, "consep", real_sample_path(), progress=False)
    flags = write_flags(store, fraction=0.05, seed=3)
    assert set(flags["label"]) <= {1, 2, 3, 4, 9}
    w = ReviewWidget(viewer, ReviewSession(store, reviewer="ana", window=64))
    qtbot.addWidget(w)
    assert [n.text() for n in w.prob_names] == ["1 Tumour", "2 Immune", "3 Stroma", "4 Necrotic", "9 Normal epithelium"]
    assert w.class_row.count() == 5
    _press(qtbot, viewer, "5")  # not a class of this taxonomy: nothing happens
    assert store.ledger.count("decision") == 0
    _press(qtbot, viewer, "9")
    dec = store.ledger.events(kinds=("decision",))
    assert dec["action"].tolist() == ["set_class"] and dec["label"].tolist() == [9]
    w.close_session()

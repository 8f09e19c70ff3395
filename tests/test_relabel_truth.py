"""Relabeling on the synthetic sample (real release formats, planted flips): accuracy against truth."""

import pandas as pd
import pytest

from cellcurate.datasets.ingest import ingest_monusac, ingest_pannuke
from cellcurate.datasets.store import Store
from cellcurate.datasets.synthetic import write_sample
from cellcurate.relabel.rounds import RoundConfig, run_round
from cellcurate.relabel.truth import score_against_truth, truth_for_nuclei


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    info = write_sample(root / "sample", preset="tiny", seed=0, flip_fraction=0.10)
    store = Store.create(root / "store")
    ingest_pannuke(store, info.pannuke_root, progress=False)
    ingest_monusac(store, info.monusac_root, progress=False)
    return store, pd.read_parquet(info.truth_path)


@pytest.mark.slow
def test_truth_join_covers_every_nucleus(sample_store):
    store, truth = sample_store
    t = truth_for_nuclei(store.nuclei(include_ignore=False), truth)
    assert t["true_class"].notna().all()


@pytest.mark.slow
def test_rounds_against_truth(sample_store):
    store, truth = sample_store
    cfg = RoundConfig(folds=3)
    r1 = run_round(store, 1, config=cfg, truth=truth, progress=False)
    t1 = r1.metrics["truth"]
    assert t1["n_proposals"] > 50 and t1["proposal_accuracy"] >= 0.9  # README target
    r2 = run_round(store, 2, config=cfg, truth=truth, progress=False)
    t2 = score_against_truth(store, truth, round=2)
    assert t2 == pytest.approx(r2.metrics["truth"], nan_ok=True)
    assert t2["flag_recall"] >= 0.8 and t2["flag_precision"] >= 0.5  # README target
    assert (store.path / "rounds" / "2" / "gallery.png").exists()
    assert "Against the synthetic truth" in (store.path / "rounds" / "2" / "report.html").read_text()

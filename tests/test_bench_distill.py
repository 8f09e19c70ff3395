"""benchmarks/bench_distill.py: its summary arithmetic, and its whole plumbing on a tiny release."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_distill", ROOT / "benchmarks" / "bench_distill.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mean_sd_and_ratios_by_hand():
    b = _bench()
    assert b.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample sd: sqrt(((1)^2 + 0 + 1^2) / 2)
    assert b.mean_sd([0.5]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in b.mean_sd([float("nan")]))
    assert b.fmt_mean_sd([0.25, 0.75]) == "0.500 ± 0.354"
    assert b.ratio(0.5, 0.25) == 2.0
    assert math.isnan(b.ratio(0.5, 0.0)) and math.isnan(b.ratio(-0.5, -1.0))
    assert b.fmt_ratio(0.3, 0.2) == "1.50×"
    assert b.fmt_ratio(-0.5, -1.0) == "Δ +0.500"  # a ratio of negative R² means nothing


def test_summary_rows_ratio_to_baseline():
    b = _bench()
    keys = list(b.METRICS)
    rows = {
        "teacher (all labelled)": [dict.fromkeys(keys, 0.8)],
        b.BASELINE: [dict.fromkeys(keys, 0.2), dict.fromkeys(keys, 0.4)],
        "(b) kd": [dict.fromkeys(keys, 0.45), dict.fromkeys(keys, 0.45)],
    }
    summary = {r["setting"]: r for r in b.summary_rows(rows)}
    assert summary[b.BASELINE]["PQ_mean"] == pytest.approx(0.3)
    assert summary[b.BASELINE]["PQ_ratio_to_a"] == pytest.approx(1.0)
    assert summary["(b) kd"]["mPQ_ratio_to_a"] == pytest.approx(1.5)
    assert summary["(b) kd"]["mPQ_sd"] == 0.0
    md = b.markdown_tables(rows)
    assert "| (b) kd | 1.50× | 1.50× | 1.50× | 1.50× |" in md
    assert "| (a) gt | 2 | 0.300 ± 0.141 |" in md


@pytest.mark.slow
def test_bench_runs_every_setting_on_a_tiny_release(tmp_path):
    """Teachers, the five settings, the printed tables and the files, on the tiny synthetic release."""
    import pandas as pd

    from cellcurate.curation.release import export_release
    from cellcurate.datasets.ingest import ingest_monusac, ingest_pannuke
    from cellcurate.datasets.store import Store
    from cellcurate.datasets.synthetic import write_sample

    info = write_sample(tmp_path / "sample", preset="tiny", seed=0)
    with Store.create(tmp_path / "store") as store:
        ingest_pannuke(store, info.pannuke_root, progress=False)
        ingest_monusac(store, info.monusac_root, progress=False)
        export_release(store, "v1", out=tmp_path / "rel", allow_unreviewed=True, progress=False)
    out = tmp_path / "bench"
    b = _bench()
    rc = b.main(["--release", str(tmp_path / "rel" / "v1"), "--out", str(out), "--teacher-encoder", "micro-vit",
                 "--labelled", "4", "--val", "1", "--pretrain", "1", "--test", "1", "--tile", "64", "--epochs", "1",
                 "--teacher-epochs", "1", "--pretrain-epochs", "1", "--seeds", "0", "--jobs", "1"])
    assert rc == 0
    table = pd.read_csv(out / "table.csv")
    assert list(table["setting"]) == ["teacher (all labelled)", "teacher (25% labelled)", "(a) gt", "(b) kd",
                                      "(c) cellgennet", "(d) gt@25%", "(e) cellgennet@25%+unlabelled"]
    assert list(table["n"]) == [1] * 7
    base = table.set_index("setting").loc["(a) gt"]
    for k in b.METRICS:
        assert math.isnan(base[f"{k}_ratio_to_a"]) or base[f"{k}_ratio_to_a"] == pytest.approx(1.0)
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 2 + 5 and set(runs["seed"]) == {0}
    students = runs[~runs["setting"].str.startswith("teacher")].set_index(["setting", "seed"])
    # same optimiser steps for every setting (the 25 % ground-truth run takes 4x the epochs)
    assert students["steps"].nunique() == 1
    assert students.loc[("(d) gt@25%", 0), "epochs"] == 4 * students.loc[("(a) gt", 0), "epochs"]
    assert students.loc[("(e) cellgennet@25%+unlabelled", 0), "unlabelled"] == 3
    md = (out / "table.md").read_text(encoding="utf-8")
    assert "| (e) cellgennet@25%+unlabelled |" in md and "Ratio of each setting" in md
    # the teachers are reused by a later run with the same settings, refused with other ones
    from cellcurate.errors import ConfigError

    common = ["--release", str(tmp_path / "rel" / "v1"), "--teacher-encoder", "micro-vit", "--labelled", "4",
              "--val", "1", "--pretrain", "1", "--test", "1", "--tile", "64", "--epochs", "1", "--pretrain-epochs", "1",
              "--seeds", "0", "--jobs", "1", "--only", "b", "--teachers", str(out / "teachers")]
    assert b.main([*common, "--out", str(tmp_path / "again"), "--teacher-epochs", "1"]) == 0
    again = pd.read_csv(tmp_path / "again" / "table.csv").set_index("setting")
    assert list(again.index) == ["teacher (all labelled)", "(b) kd"]
    first = table.set_index("setting").loc["teacher (all labelled)"]
    for k in b.METRICS:  # the recorded figures of the same teacher (NaN where the tiny test image has no nuclei)
        assert str(again.loc["teacher (all labelled)", f"{k}_mean"]) == str(first[f"{k}_mean"])
    assert (tmp_path / "again" / "teachers" / "all" / "model.pt").is_file()
    with pytest.raises(ConfigError, match=r"bench_teacher\.json: teacher trained with other settings \(epochs\)"):
        b.main([*common, "--out", str(tmp_path / "other"), "--teacher-epochs", "2"])

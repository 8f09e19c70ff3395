import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cellcurate.cli.main import cli
from cellcurate.datasets.store import Store
from cellcurate.errors import ConfigError, InputFormatError, StateError, StoreError
from cellcurate.relabel.features import cache_dir
from cellcurate.relabel.issues import list_issues
from cellcurate.relabel.rounds import RoundConfig, active_run, run_round
from relabel_synth import build_store

CFG = RoundConfig(folds=3, report=False)


def snapshot(store):
    return store.ledger.head(), store.ledger.count()


def payloads(store, round):
    ev = store.ledger.events(kinds=("proposal", "flag"), round=round)
    return ev[["kind", "nucleus_id", "action", "label", "prev_label", "score", "payload"]].to_dict("records")


@pytest.fixture
def store(tmp_path):
    return build_store(tmp_path / "s", flip=0.1)


def test_rounds_write_events_and_folder(store):
    r1 = run_round(store, 1, config=RoundConfig(folds=3), progress=False)
    assert r1.counts["proposals"] == int((store.nuclei()["candidates"].str.contains("|", regex=False)).sum())
    ev = store.ledger.events(kinds=("round", "proposal", "flag"), round=1, parse_payload=True)
    started = ev[(ev["kind"] == "round") & (ev["action"] == "started")]
    assert len(started) == 1 and started["payload"].iloc[0]["folds"] == 3
    props = ev[ev["kind"] == "proposal"]
    assert set(props["action"]) <= {"auto_accepted", "queued"} and (props["ref"] == started["seq"].iloc[0]).all()
    p = props["payload"].iloc[0]
    assert len(p["probs"]) == 7 and abs(sum(p["probs"]) - 1) < 1e-4 and p["backbone"] == "handcrafted-v1"
    assert props["actor"].iloc[0].startswith("relabel:r1:")
    # queued proposals are also low-confidence flags; auto-accepted ones set the label
    flags = ev[ev["kind"] == "flag"]
    assert (flags["action"] == "low_confidence_proposal").sum() == (props["action"] == "queued").sum()
    cur = store.current_labels().set_index("nucleus_id")
    auto = props[props["action"] == "auto_accepted"]
    assert (cur.loc[auto["nucleus_id"].astype(np.int64), "label"].to_numpy() == auto["label"].to_numpy()).all()
    assert (auto["score"] >= 0.9).all()
    folder = store.path / "rounds" / "1"
    for name in ("config.json", "summary.json", "proposals.parquet", "flags.parquet", "report.html",
                 "class_distribution.png", "confusion.png", "calibration.png", "flags.png"):
        assert (folder / name).exists(), name
    assert json.loads((folder / "config.json").read_text())["round"] == 1
    clf = r1.metrics["classifiers"]
    assert {c["source"] for c in clf} == {"pannuke", "monusac"} and all(0 <= c["accuracy"] <= 1 for c in clf)

    r2 = run_round(store, 2, config=CFG, progress=False)
    assert r2.counts["flags"] >= 1 and r2.metrics["cv_folds"] == 3
    f2 = store.ledger.events(kinds=("flag",), round=2, parse_payload=True)
    assert set(f2["action"]) <= {"low_confidence_proposal", "confident_disagreement", "likely_class_swap"}
    cl = f2[f2["action"] != "low_confidence_proposal"]
    assert (cl["label"] != cl["prev_label"]).all() and cl["score"].between(0, 1).all()
    assert all("label_quality" in p and "rank" in p for p in cl["payload"])
    issues = list_issues(store, round=2)
    assert len(issues) == len(f2) and issues["score"].is_monotonic_decreasing


def test_same_seed_identical_payloads(tmp_path):
    a = build_store(tmp_path / "a", flip=0.1)
    b = build_store(tmp_path / "b", flip=0.1)
    for s in (a, b):
        run_round(s, 1, config=CFG, progress=False)
        run_round(s, 2, config=CFG, progress=False)
    assert payloads(a, 1) == payloads(b, 1) and payloads(a, 2) == payloads(b, 2)


def test_dry_run_writes_nothing(store):
    before = snapshot(store)
    res = run_round(store, 1, config=CFG, dry_run=True)
    assert res.dry_run and "round 1 (cross-source)" in res.summary()
    assert snapshot(store) == before
    assert not (store.path / "rounds").exists() and not (store.path / "features").exists()


def test_finished_round_not_overwritten_and_overwrite_supersedes(store):
    run_round(store, 1, config=CFG, progress=False)
    first = active_run(store, 1)
    with pytest.raises(StateError, match="already finished.*--overwrite"):
        run_round(store, 1, config=CFG)
    n_prop = store.ledger.count("proposal")
    run_round(store, 1, config=RoundConfig(folds=3, report=False, auto_accept=0.5), overwrite=True, progress=False)
    second = active_run(store, 1)
    assert second > first
    ev = store.ledger.events(kinds=("round",))
    sup = ev[ev["action"] == "superseded"]
    assert sup["ref"].tolist() == [first]
    assert store.ledger.count("proposal") == 2 * n_prop  # history kept
    # the fold counts only the new run's accepted proposals
    cur = store.current_labels()
    auto = cur[cur["status"] == "auto"]
    assert len(auto) and (auto["seq"] > second).all()
    assert list((store.path / "rounds").glob("1-superseded-*"))
    run_round(store, 2, config=CFG, progress=False)
    with pytest.raises(StateError, match="round 2 builds on round 1"):
        run_round(store, 1, config=CFG, overwrite=True)


def test_round_two_without_round_one_refuses(store):
    before = snapshot(store)
    with pytest.raises(StateError, match="round 1 has not been run"):
        run_round(store, 2, config=CFG)
    assert snapshot(store) == before


def _nan_cache(store):
    run_round(store, 1, config=CFG, dry_run=True)
    from cellcurate.relabel.backbones import HandcraftedBackbone
    from cellcurate.relabel.features import nucleus_features, save_cache

    bb = HandcraftedBackbone()
    f, ids = nucleus_features(store, bb, progress=False)
    f = f.copy()
    f[3, 0] = np.nan
    save_cache(store, bb, f, ids)


def _corrupt_cache_unreadable(store):
    from cellcurate.relabel.backbones import HandcraftedBackbone
    from cellcurate.relabel.features import nucleus_features

    bb = HandcraftedBackbone()
    nucleus_features(store, bb, progress=False)
    (cache_dir(store, bb.id) / "features.npy").write_bytes(b"\x93NUMPY garbage")


BAD = [
    ("no_ingest", lambda tmp: Store.create(tmp / "e"), 1, CFG, StoreError, "no ingested nuclei"),
    ("monusac_alone", lambda tmp: build_store(tmp / "m", sources=("monusac",)), 1, CFG, StateError,
     "needs labelled Neoplastic/Epithelial nuclei from a source other than monusac"),
    ("too_few_for_folds", lambda tmp: build_store(tmp / "f"), 1, RoundConfig(folds=40, report=False), ConfigError,
     "fewer than --folds 40"),
    ("bad_folds", lambda tmp: build_store(tmp / "b"), 1, RoundConfig(folds=1), ConfigError, "--folds must be"),
]


@pytest.mark.parametrize("name,make,rnd,cfg,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_leave_ledger_unchanged(tmp_path, name, make, rnd, cfg, exc, msg):
    store = make(tmp_path)
    before = snapshot(store)
    with pytest.raises(exc, match=msg) as info:
        run_round(store, rnd, config=cfg, progress=False)
    assert "\n" not in str(info.value)
    assert snapshot(store) == before
    assert not (store.path / "rounds" / str(rnd)).exists()


def test_nan_features_refused(store):
    _nan_cache(store)
    before = snapshot(store)
    with pytest.raises(InputFormatError, match="1 nuclei have NaN") as info:
        run_round(store, 1, config=CFG, progress=False)
    assert "\n" not in str(info.value) and snapshot(store) == before


def test_unreadable_cache_is_recomputed(store, caplog):
    _corrupt_cache_unreadable(store)
    res = run_round(store, 1, config=CFG, progress=False)
    assert res.counts["proposals"] > 0 and "recomputing" in caplog.text


def test_dead_class_too_rare_for_round_two(tmp_path):
    store = build_store(tmp_path / "r", dead=0.03, seed=2)
    run_round(store, 1, config=CFG, progress=False)
    before = snapshot(store)
    n_dead = int((store.current_labels()["label"] == 4).sum())
    assert 0 < n_dead < 3
    with pytest.raises(ConfigError, match=f"class Dead has {n_dead} labelled nuclei"):
        run_round(store, 2, config=CFG, progress=False)
    assert snapshot(store) == before


def test_cli_relabel_and_issues(store, tmp_path):
    path = str(store.path)
    store.close()
    runner = CliRunner()
    r = runner.invoke(cli, ["relabel", path, "--round", "2", "--folds", "3"])
    assert r.exit_code == 1 and "round 1 has not been run" in r.output
    r = runner.invoke(cli, ["relabel", path, "--round", "1", "--folds", "3", "--dry-run"])
    assert r.exit_code == 0 and "dry run" in r.output
    r = runner.invoke(cli, ["relabel", path, "--round", "1", "--folds", "3", "--no-report"])
    assert r.exit_code == 0, r.output
    assert "held-out accuracy" in r.output and "proposals:" in r.output
    r = runner.invoke(cli, ["relabel", path, "--round", "2", "--folds", "3", "--no-report"])
    assert r.exit_code == 0, r.output
    csv = tmp_path / "flags.csv"
    r = runner.invoke(cli, ["issues", path, "--round", "2", "--limit", "3", "--csv", str(csv)])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(csv)
    assert len(df) >= len(r.output.splitlines()) - 2 and {"nucleus_id", "reason", "score"} <= set(df.columns)
    r = runner.invoke(cli, ["issues", path, "--class", "Nope"])
    assert r.exit_code == 1 and "unknown class" in r.output


# -- crash between folder rename and ledger commit (issue 10) -------------------------------------
def test_crash_before_ledger_commit_leaves_no_finished_round_without_folder(store, monkeypatch):
    import cellcurate.relabel.rounds as rounds
    from cellcurate.datasets.checks import check_round_folders, verify_store

    def crash(folder):
        assert (folder / "summary.json").is_file()  # the folder is complete and in place
        raise KeyboardInterrupt  # the process dies before the ledger commit

    before = snapshot(store)
    monkeypatch.setattr(rounds, "_before_commit", crash)
    with pytest.raises(KeyboardInterrupt):
        run_round(store, 1, config=CFG, progress=False)
    assert snapshot(store) == before and active_run(store, 1) is None
    assert not (store.path / "rounds" / "1").exists()  # an error is cleaned up
    assert not [p for p in (store.path / "rounds").iterdir()]

    # a hard crash (no cleanup) right after the rename: the folder is an orphan, never a finished round
    monkeypatch.setattr(rounds, "remove_tree", lambda p: None)
    with pytest.raises(KeyboardInterrupt):
        run_round(store, 1, config=CFG, progress=False)
    assert active_run(store, 1) is None and (store.path / "rounds" / "1").is_dir()
    (problem,) = check_round_folders(store)
    assert "rounds/1: orphan round folder" in problem
    assert any("orphan round folder" in p for p in verify_store(store, deep=False, progress=False).problems)
    monkeypatch.undo()
    # the next run moves the orphan aside and the store verifies clean
    run_round(store, 1, config=CFG, progress=False)
    assert active_run(store, 1) is not None and check_round_folders(store) == []
    assert list((store.path / "rounds").glob("1-superseded-orphan-*"))


def test_failed_overwrite_puts_the_previous_folder_back(store, monkeypatch):
    import cellcurate.relabel.rounds as rounds
    from cellcurate.datasets.checks import check_round_folders

    run_round(store, 1, config=CFG, progress=False)
    first = json.loads((store.path / "rounds" / "1" / "summary.json").read_text())["metrics"]["run_seq"]

    def fail(folder):
        raise OSError(28, "No space left on device", str(folder))

    # the failure after the new folder is in place, and while putting it in place (the old one already aside)
    for name in ("_before_commit", "replace_dir"):
        with monkeypatch.context() as m:
            m.setattr(rounds, name, fail if name == "_before_commit" else lambda tmp, final: fail(final))
            with pytest.raises(OSError):
                run_round(store, 1, config=CFG, overwrite=True, progress=False)
        assert json.loads((store.path / "rounds" / "1" / "summary.json").read_text())["metrics"]["run_seq"] == first
        assert check_round_folders(store) == [] and not list((store.path / "rounds").glob(".tmp-*"))


def test_verify_reports_a_finished_round_whose_folder_is_missing(store):
    import shutil

    from cellcurate.datasets.checks import check_round_folders

    run_round(store, 1, config=CFG, progress=False)
    shutil.rmtree(store.path / "rounds" / "1")
    (problem,) = check_round_folders(store)
    assert "rounds/1: folder of round 1" in problem and "is missing" in problem

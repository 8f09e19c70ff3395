"""The instance round end to end: imported predictions (every reader path and its bad inputs), the
prediction cache, `curate instances`, the ledger events and flags.parquet of the contract, atomicity,
the planted synthetic errors, and recall on the tiny planted sample."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cellcurate.cli.main import cli
from cellcurate.datasets.store import Store

ISSUE_NAMES = ("missing_annotation", "spurious_annotation", "bad_outline", "merged", "split")


@pytest.fixture()
def store_path(tiny_store_path: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(tiny_store_path, dst)
    return dst


def _write_predictions(store_path: Path, out: Path) -> dict[str, object]:
    """Predictions = the annotation (ignore regions left out), with one annotated nucleus removed
    (-> spurious_annotation) and one nucleus added on background (-> missing_annotation)."""
    planted: dict[str, object] = {}
    with Store.open(store_path) as store:
        nuc = store.nuclei()
        ids = store.images()["image_id"].astype(str).tolist()
        target = nuc[(nuc["kind"] == "nucleus") & (nuc["source"] == "pannuke") & (nuc["area"] > 150)].iloc[0]
        for image_id in ids:
            ins = store.read_instances(image_id).astype(np.int32)
            ig = nuc[(nuc["image_id"] == image_id) & (nuc["kind"] == "ignore")]["instance_id"].tolist()
            pred = np.where(np.isin(ins, ig), 0, ins)
            if image_id == target["image_id"]:
                pred[ins == int(target["instance_id"])] = 0
                free = np.argwhere(ins == 0)
                # a 13 x 13 square (169 px, 10.6 µm² at 0.25 µm/px) far from every annotated pixel
                from scipy import ndimage

                dist = ndimage.distance_transform_edt(np.pad(ins == 0, 1))[1:-1, 1:-1]  # border = obstacle
                y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
                assert dist[y, x] > 10 and len(free)
                pred[y - 6:y + 7, x - 6:x + 7] = pred.max() + 1
                planted = {"image_id": image_id, "nucleus_id": int(target["nucleus_id"]), "added": (y, x)}
            path = out.joinpath(*image_id.split("/")).with_suffix("")
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path.with_name(path.name + ".npy"), pred)
    return planted


def _invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_round_from_imported_maps_writes_the_contract(store_path: Path, tmp_path: Path):
    import pyarrow.parquet as pq
    import shapely

    planted = _write_predictions(store_path, tmp_path / "pred")
    r = _invoke("instances", str(store_path), "--round", "1", "--predictions", str(tmp_path / "pred"))
    assert r.exit_code == 0, r.output
    assert "instance round 1 finished" in r.output

    folder = store_path / "rounds" / "instances-1"
    table = pq.read_table(folder / "flags.parquet")  # someone else's reader
    assert str(table.schema.field("nucleus_ids").type) == "list<element: int64>"
    assert str(table.schema.field("proposed_wkb").type) == "list<element: binary>"
    assert table.schema.names == ["flag_id", "image_id", "issue", "score", "nucleus_ids", "proposed_action",
                                  "proposed_wkb", "evidence", "run"]
    flags = table.to_pandas()
    by_issue = flags.groupby("issue").size().to_dict()
    assert by_issue == {"missing_annotation": 1, "spurious_annotation": 1}, flags[["issue", "image_id"]]
    spur = flags[flags["issue"] == "spurious_annotation"].iloc[0]
    assert list(spur["nucleus_ids"]) == [planted["nucleus_id"]] and spur["proposed_action"] == "delete"
    assert len(spur["proposed_wkb"]) == 0
    miss = flags[flags["issue"] == "missing_annotation"].iloc[0]
    poly = shapely.from_wkb(miss["proposed_wkb"][0])
    assert poly.area == 169 and poly.contains(shapely.Point(planted["added"][1] + 0.5, planted["added"][0] + 0.5))
    assert miss["proposed_action"] == "add" and list(miss["nucleus_ids"]) == []
    assert json.loads(miss["evidence"])["confidence"] == 1.0

    with Store.open(store_path) as store:
        ev = store.ledger.events(kinds=("instance_flag",), parse_payload=True)
    assert len(ev) == 2
    assert set(ev["actor"]) == {"cellcurate-instances"} and set(ev["round"]) == {1}
    assert ev["ref"].isna().all() and set(ev["label"]) == {0}
    for e in ev.itertuples():
        p = e.payload
        assert set(p) == {"flag_id", "image_id", "nucleus_ids", "proposed", "evidence", "run"}
        assert re.fullmatch(r"i1-[0-9a-f]{8}-\d+", p["flag_id"]) and p["run"] == flags["run"].iloc[0]
        assert p["proposed"]["action"] in ("add", "delete")
        assert 0 <= e.score <= 1
        if e.action == "missing_annotation":
            assert pd.isna(e.nucleus_id)
            ring = p["proposed"]["polygons"][0]
            assert ring[0] != ring[-1] and shapely.Polygon(ring).area == 169
        else:
            assert int(e.nucleus_id) == planted["nucleus_id"]
    # the class-label side never sees these events
    with Store.open(store_path) as store:
        assert store.ledger.events(kinds=("flag",)).empty

    # same inputs, same flag ids; without --overwrite: refused, nothing written
    r2 = CliRunner().invoke(cli, ["instances", str(store_path), "--round", "1", "--predictions", str(tmp_path / "pred")])
    assert r2.exit_code == 1 and "already exists" in r2.output and "--overwrite" in r2.output
    r3 = _invoke("instances", str(store_path), "--round", "1", "--predictions", str(tmp_path / "pred"), "--overwrite")
    assert r3.exit_code == 0, r3.output
    assert "(cached)" in r3.output  # the imported predictions came from the cache
    with Store.open(store_path) as store:
        ev2 = store.ledger.events(kinds=("instance_flag",), parse_payload=True)
    assert len(ev2) == 4
    runs = [p["run"] for p in ev2["payload"]]
    assert runs[0] == runs[1] != runs[2] == runs[3]
    assert sorted(p["flag_id"] for p in ev2["payload"][:2]) == sorted(p["flag_id"] for p in ev2["payload"][2:])
    assert pq.read_table(folder / "flags.parquet").column("run").to_pylist()[0] == runs[2]


def _npy(base: Path) -> Path:
    return base.with_name(base.name + ".npy")


def _truncated(base: Path, shape: tuple[int, int]) -> None:
    data = _npy(base).read_bytes()
    _npy(base).write_bytes(data[: len(data) // 2])


def _instead(suffix: str, content: bytes):
    def write(base: Path, shape: tuple[int, int]) -> None:
        _npy(base).unlink()
        base.with_name(base.name + suffix).write_bytes(content)
    return write


BAD_PREDICTIONS = [
    ("truncated npy", _truncated, "cannot read the instance map"),
    ("wrong shape", lambda b, s: np.save(_npy(b), np.zeros((s[0] + 1, s[1]), np.int32)), "expected the image's"),
    ("float map", lambda b, s: np.save(_npy(b), np.zeros(s, np.float32)), "must hold integers"),
    ("negative ids", lambda b, s: np.save(_npy(b), -np.ones(s, np.int32)), "negative ids"),
    ("pickled npy", lambda b, s: np.save(_npy(b), np.array([{"a": 1}], dtype=object)), "cannot read the instance map"),
    ("damaged tif", _instead(".tif", b"II*\x00garbage"), "cannot read the instance map"),
    ("truncated geojson", _instead(".geojson", b'{"type": "FeatureCollection", "features": ['), "json"),
    ("missing file", lambda b, s: _npy(b).unlink(), "no prediction for 1 of"),
]


@pytest.mark.parametrize("write, expect", [c[1:] for c in BAD_PREDICTIONS], ids=[c[0] for c in BAD_PREDICTIONS])
def test_bad_prediction_files_are_one_line_errors_and_write_nothing(store_path: Path, tmp_path: Path, write, expect):
    _write_predictions(store_path, tmp_path / "pred")
    with Store.open(store_path) as store:
        row = store.images().iloc[0]
        before = store.ledger.count()
    base = tmp_path.joinpath("pred", *str(row.image_id).split("/"))
    write(base, (int(row.height), int(row.width)))
    r = CliRunner().invoke(cli, ["instances", str(store_path), "--round", "1", "--predictions", str(tmp_path / "pred")])
    assert r.exit_code == 1, r.output
    err = r.output.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect.lower() in err[0].lower(), err
    assert str(row.image_id).split("/")[-1] in err[0] or expect.startswith("no prediction")
    assert not (store_path / "rounds" / "instances-1").exists()
    preds = store_path / "instances" / "predictions"
    assert not preds.exists() or not list(preds.iterdir())
    with Store.open(store_path) as store:
        assert store.ledger.count() == before


def test_geojson_predictions_are_read_with_the_qupath_reader(store_path: Path, tmp_path: Path):
    from cellcurate.core.geometry import mask_to_geometry
    from cellcurate.curation.qupath import make_feature, write_geojson

    planted = _write_predictions(store_path, tmp_path / "npy")
    out = tmp_path / "geo"
    for npy in (tmp_path / "npy").rglob("*.npy"):
        lab = np.load(npy)
        feats = []
        for i in range(1, int(lab.max()) + 1):
            geom = mask_to_geometry(lab == i)
            if geom is not None:
                feats.append(make_feature(geom, measurements={"Detection probability": 0.9}))
        rel = npy.relative_to(tmp_path / "npy")
        dst = out / rel.parent / (rel.name[: -len(".npy")] + ".geojson")
        dst.parent.mkdir(parents=True, exist_ok=True)
        write_geojson(dst, feats)
    r = _invoke("instances", str(store_path), "--round", "1", "--predictions", str(out), "--no-cleanlab")
    assert r.exit_code == 0, r.output
    flags = pd.read_parquet(store_path / "rounds" / "instances-1" / "flags.parquet")
    spur = flags[flags["issue"] == "spurious_annotation"]
    assert [list(v) for v in spur["nucleus_ids"]] == [[planted["nucleus_id"]]]
    miss = flags[flags["issue"] == "missing_annotation"]
    assert len(miss) == 1 and json.loads(miss["evidence"].iloc[0])["confidence"] == pytest.approx(0.9, abs=0.01)
    r = _invoke("instances", str(store_path), "--round", "1", "--predictions", str(out), "--no-cleanlab",
                "--no-map-rules", "--overwrite")
    assert r.exit_code == 0, r.output
    config = json.loads((store_path / "rounds" / "instances-1" / "config.json").read_text())
    assert config["registration"] is False and config["blob_missing"] is False
    flags = pd.read_parquet(store_path / "rounds" / "instances-1" / "flags.parquet")
    (ev,) = [json.loads(e) for e, i in zip(flags["evidence"], flags["issue"]) if i == "missing_annotation"]
    assert ev["confidence"] == pytest.approx(0.9, abs=0.01)
    # --appearance is recorded; it needs the map rules, and the refusal writes nothing
    r = _invoke("instances", str(store_path), "--round", "1", "--predictions", str(out), "--no-cleanlab",
                "--appearance", "--overwrite")
    assert r.exit_code == 0, r.output
    config = json.loads((store_path / "rounds" / "instances-1" / "config.json").read_text())
    assert config["appearance"] is True and config["blob_missing"] is True
    before = (store_path / "rounds" / "instances-1" / "config.json").read_bytes()
    r = CliRunner().invoke(cli, ["instances", str(store_path), "--round", "1", "--predictions", str(out),
                                 "--appearance", "--no-map-rules", "--overwrite"])
    assert r.exit_code != 0 and "--appearance" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert (store_path / "rounds" / "instances-1" / "config.json").read_bytes() == before


def test_prediction_cache_is_reused_and_a_damaged_one_recomputed(store_path: Path, tmp_path: Path, caplog):
    from cellcurate.relabel.instance_predict import get_predictions

    _write_predictions(store_path, tmp_path / "pred")
    with Store.open(store_path, mode="a") as store:
        first, cached = get_predictions(store, folder=tmp_path / "pred", progress=False)
        assert not cached
        again, cached = get_predictions(store, folder=tmp_path / "pred", progress=False)
        assert cached and again.folder == first.folder
        iid = first.image_ids()[0]
        np.testing.assert_array_equal(again.maps(iid)[0], first.maps(iid)[0])
        victim = next(first.folder.glob("labels_*.npy"))
        raw = bytearray(victim.read_bytes())
        raw[-1] ^= 0xFF
        victim.write_bytes(bytes(raw))
        with caplog.at_level("WARNING"):
            third, cached = get_predictions(store, folder=tmp_path / "pred", progress=False)
        assert not cached and "checksum" in caplog.text
        # new prediction files: another predictor id, another cache folder
        f = next((tmp_path / "pred").rglob("*.npy"))
        np.save(f, np.load(f))
        fourth, cached = get_predictions(store, folder=tmp_path / "pred", progress=False)
        assert not cached and fourth.folder != third.folder


def test_a_crash_before_the_commit_leaves_no_events_and_the_old_folder(store_path: Path, tmp_path: Path,
                                                                       monkeypatch):
    from cellcurate.relabel import instances as mod
    from cellcurate.relabel.instance_predict import get_predictions

    _write_predictions(store_path, tmp_path / "pred")
    with Store.open(store_path, mode="a") as store:
        cache, _ = get_predictions(store, folder=tmp_path / "pred", progress=False)
        first = mod.run_instance_round(store, 1, predictions=cache, config=mod.InstanceConfig(cleanlab=False))
        n = store.ledger.count()

        def boom(folder: Path) -> None:
            raise RuntimeError("killed")

        monkeypatch.setattr(mod, "_before_commit", boom)
        with pytest.raises(RuntimeError):
            mod.run_instance_round(store, 1, predictions=cache, overwrite=True,
                                   config=mod.InstanceConfig(cleanlab=False))
        assert store.ledger.count() == n
        cfg = json.loads((store_path / "rounds" / "instances-1" / "config.json").read_text())
        assert cfg["run"] == first.run
        assert not [p for p in (store_path / "rounds").iterdir() if p.name.startswith(".")]


def test_planting_keeps_the_image_and_records_the_truth(tmp_path: Path):
    from cellcurate.datasets import synthetic as syn

    rates = {"missing_annotation": 0.1, "spurious_annotation": 0.1, "bad_outline": 0.1, "merged": 0.1,
             "split": 0.1}
    plain = syn.write_pannuke(tmp_path / "a", tiles_per_fold=(8, 0, 0), seed=2)
    truth, planted = syn.write_pannuke_planted(tmp_path / "b", tiles_per_fold=(8, 0, 0), seed=2,
                                               instance_errors=rates)
    img = "Fold 1/images/fold1/images.npy"
    assert (tmp_path / "a" / img).read_bytes() == (tmp_path / "b" / img).read_bytes()  # pixels stay
    off, _ = syn.write_pannuke_planted(tmp_path / "c", tiles_per_fold=(8, 0, 0), seed=2)
    pd.testing.assert_frame_equal(off, plain)
    for name in ("masks/fold1/masks.npy", "images/fold1/images.npy"):
        assert (tmp_path / "a" / "Fold 1" / name).read_bytes() == (tmp_path / "c" / "Fold 1" / name).read_bytes()
    assert set(planted["issue"]) == set(ISSUE_NAMES)
    masks = np.load(tmp_path / "b" / "Fold 1" / "masks" / "fold1" / "masks.npy")
    before = np.load(tmp_path / "a" / "Fold 1" / "masks" / "fold1" / "masks.npy")
    for t in planted.itertuples():
        ch = masks[t.origin_index, :, :, : 5]
        if t.issue == "missing_annotation":  # its pixels left the annotation
            box = (slice(t.bbox_y0, t.bbox_y1), slice(t.bbox_x0, t.bbox_x1))
            lost = before[t.origin_index, :, :, :5][box].any(axis=2).sum() - ch[box].any(axis=2).sum()
            assert t.origin_instance == -1 and lost >= 0.5 * t.area
        else:
            assert (ch[..., t.origin_channel] == t.origin_instance).any()
        if t.issue == "split":
            assert (ch[..., t.origin_channel] == t.origin_instance2).any()
        if t.issue == "bad_outline":
            assert 0 < t.iou_to_true < 0.8
    # truth rows follow the annotation: every row's instance is in the mask
    for r in truth.itertuples():
        assert (masks[r.origin_index, :, :, r.origin_channel] == r.origin_instance).any()
    with pytest.raises(Exception, match="unknown instance issue"):
        syn.write_pannuke_planted(tmp_path / "d", tiles_per_fold=(1, 0, 0), instance_errors={"typo": 0.1})


@pytest.mark.slow
def test_planted_errors_on_the_tiny_sample_are_found(tmp_path: Path):
    from cellcurate.datasets.ingest import ingest_monusac, ingest_pannuke
    from cellcurate.datasets.synthetic import DEMO_INSTANCE_RATES, write_sample
    from cellcurate.relabel.instance_predict import get_predictions
    from cellcurate.relabel.instances import InstanceConfig, planted_for_store, run_instance_round

    info = write_sample(tmp_path / "s", preset="tiny", seed=0, instance_errors=DEMO_INSTANCE_RATES)
    with Store.create(tmp_path / "store") as store:
        ingest_pannuke(store, info.pannuke_root, progress=False)
        ingest_monusac(store, info.monusac_root, progress=False)
        cache, cached = get_predictions(store, progress=False)
        planted = planted_for_store(store, pd.read_parquet(info.instance_truth_path))
        assert len(planted) == sum(info.instance_errors.values())
        res = run_instance_round(store, 1, predictions=cache, planted=planted)
        _, cached = get_predictions(store, progress=False)
        assert cached
        ranked = run_instance_round(store, 2, predictions=cache, planted=planted,
                                    config=InstanceConfig(appearance=True))
    # the appearance ranking (--appearance) rescores the probability-blob flags and changes no other flag
    plain = res
    assert sorted(ranked.flags["flag_id"].str[3:]) == sorted(plain.flags["flag_id"].str[3:])
    a = ranked.flags.set_index(ranked.flags["flag_id"].str[3:])
    b = plain.flags.set_index(plain.flags["flag_id"].str[3:]).loc[a.index]
    blob = np.array([e.get("rule") == "probability_blob" for e in a["evidence"]])
    assert blob.sum() >= 5
    ranked = np.array(["appearance_p" in e for e in a["evidence"]])
    assert ranked.any() and not (ranked & ~blob).any()
    assert not any("appearance_p" in e for e in b["evidence"])
    np.testing.assert_allclose(a["score"][~blob], b["score"][~blob])
    for e, score in zip(a["evidence"][ranked], a["score"][ranked]):
        assert 0.0 <= e["appearance_p"] <= 1.0
        assert score == pytest.approx(0.5 + 0.5 * np.sqrt(e["appearance_p"] * e["blob_score"]), abs=2e-4)
    t = res.truth
    assert t is not None
    hit = sum(v["hit"] for v in t.values())
    flags = sum(v["flags"] for v in t.values())
    assert hit / len(planted) >= 0.8, t  # recall over every planted error
    for issue, v in t.items():
        assert v["recall"] >= 0.6 and v["precision"] >= 0.3, (issue, v)
    assert flags <= 2 * len(planted)


def test_a_second_round_matches_the_geometry_after_review(store_path: Path, tmp_path: Path):
    """Round 2 reads the annotation as the geometry review left it: a nucleus added in review is
    not flagged missing again, a deleted one is not flagged spurious again; round 2's flags on an
    added nucleus carry its review id."""
    from cellcurate.curation.geometry_review import decide_flag, store_flags

    _write_predictions(store_path, tmp_path / "pred")
    r = _invoke("instances", str(store_path), "--round", "1", "--predictions", str(tmp_path / "pred"))
    assert r.exit_code == 0, r.output
    with Store.open(store_path, mode="a") as store:
        flags = store_flags(store)
        assert sorted(flags["issue"]) == ["missing_annotation", "spurious_annotation"]
        miss = flags[flags["issue"] == "missing_annotation"].iloc[0]
        spur = flags[flags["issue"] == "spurious_annotation"].iloc[0]
        added = decide_flag(store, miss, "accept", reviewer="ann")
        decide_flag(store, spur, "accept", reviewer="ann")
    new_id = [n for n in added.nucleus_ids if n is not None][0]
    r = _invoke("instances", str(store_path), "--round", "2", "--predictions", str(tmp_path / "pred"))
    assert r.exit_code == 0, r.output
    with Store.open(store_path) as store:
        ev = store.ledger.events(kinds=("instance_flag",), round=2, parse_payload=True)
        cfg = json.loads((store_path / "rounds" / "instances-2" / "config.json").read_text())
    assert ev.empty, ev[["action", "nucleus_id"]]  # nothing left to flag: both decisions are in the geometry
    assert cfg["geometry_changes"] == {"added": 1, "deleted": 1, "replaced": 0}

    # the added nucleus is an annotation now: a prediction that moves it makes it a bad outline of round 3
    pred_file = _npy((tmp_path / "pred").joinpath(*str(miss["image_id"]).split("/")))
    pred = np.load(pred_file)
    pid = int(pred[int(miss["polygons"][0][0][1]) + 1, int(miss["polygons"][0][0][0]) + 1])
    assert pid > 0
    m = pred == pid
    pred[m] = 0
    pred[np.roll(m, 6, axis=1)] = pid
    np.save(pred_file, pred)
    r = _invoke("instances", str(store_path), "--round", "3", "--predictions", str(tmp_path / "pred"))
    assert r.exit_code == 0, r.output
    with Store.open(store_path) as store:
        ev = store.ledger.events(kinds=("instance_flag",), round=3, parse_payload=True)
    assert list(ev["action"]) == ["bad_outline"] and int(ev["nucleus_id"].iloc[0]) == new_id

"""Releases rebuild instances and class maps from the geometry fold; diff counts geometry changes;
a release without geometry events is byte for byte what it was before geometry review existed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from cellcurate.curation.geometry_review import decide_flag, instance_queue, undo_last
from cellcurate.curation.release import diff_releases, export_release, verify_release

from instance_flags_helper import flag_event, square, write_instance_flags
from test_release_export import add_round, build_test_store

#: sha256 over the sha256 of nuclei.parquet, images.parquet, arrays.zarr/** and hf/** of release v1
#: of ``build_test_store`` + ``add_round(flag_unreviewed=False)``, computed with the code before
#: geometry review (commit 7a29ad8).
FROZEN_NO_GEOMETRY = ("914d6ee160c5743f830b40264f62a0fa51e7a0d3ebfb7cfcad1d5dbaf94ae109", 50)

PN = "pannuke/fold1/00000"   # 48x48, discs r=4 (radius² 16) at (8,8) (8,22) (8,36) (22,8)
MO = "monusac/TCGA-AA-0001/TCGA-AA-0001-01"  # 40x56 native, discs at (8,8) (8,22)


def release_digest(root: Path) -> tuple[str, int]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and (rel.startswith(("arrays.zarr/", "hf/")) or rel in ("nuclei.parquet", "images.parquet")):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest(), len(out)


@pytest.fixture()
def store(tmp_path):
    s = build_test_store(tmp_path / "store")
    add_round(s, flag_unreviewed=False)
    yield s
    s.close()


def nucleus_at(store, image_id, cy, cx):
    nuc = store.nuclei()
    r = nuc[(nuc["image_id"] == image_id) & (nuc["centroid_y"].round() == cy) & (nuc["centroid_x"].round() == cx)]
    assert len(r) == 1
    return int(r["nucleus_id"].iloc[0]), int(r["instance_id"].iloc[0])


def release_arrays(path: Path, image_id: str):
    """instances and classes of one image, read with pyarrow + zarr (not our loader)."""
    import pyarrow.parquet as pq
    import zarr

    im = pq.read_table(path / "images.parquet").to_pandas().set_index("image_id")
    g, i = im.at[image_id, "zarr_group"], int(im.at[image_id, "zarr_index"])
    root = zarr.open_group(str(path / "arrays.zarr"), mode="r")
    ins, cls = root[f"{g}/instances"], root[f"{g}/classes"]
    return (np.asarray(ins[i]), np.asarray(cls[i])) if i >= 0 else (np.asarray(ins[:]), np.asarray(cls[:]))


def test_a_release_without_geometry_events_is_unchanged(store, tmp_path):
    r = export_release(store, "v1", out=tmp_path / "rel", progress=False)
    assert release_digest(r.path) == FROZEN_NO_GEOMETRY
    assert "geometry" not in r.manifest


def test_release_rebuilds_instances_and_classes_from_geometry(store, tmp_path):
    import pyarrow.parquet as pq

    v0 = export_release(store, "v0", out=tmp_path / "rel", progress=False)
    spurious, sp_inst = nucleus_at(store, PN, 8, 22)
    bad, bad_inst = nucleus_at(store, PN, 8, 36)
    split, _ = nucleus_at(store, MO, 8, 22)
    outline = square(33, 5, 6)             # replaces the disc at (8, 36): 6x6 = 36 pixels at x 33..38, y 5..10
    missing = square(30, 30, 5)            # an empty place of the tile: 25 pixels, class 3 (predicted)
    halves = [square(18, 4, 4), square(22, 4, 4)]
    write_instance_flags(store, [
        flag_event(PN, "missing_annotation", n=0, polygons=[missing], label=3, score=0.95),
        flag_event(PN, "spurious_annotation", n=1, nucleus_ids=[spurious], action="delete", score=0.9),
        flag_event(PN, "bad_outline", n=2, nucleus_ids=[bad], action="replace", polygons=[outline], score=0.8),
        flag_event(MO, "merged", n=0, nucleus_ids=[split], action="split", polygons=halves, score=0.7, label=1),
    ])
    q = instance_queue(store, reviewer="ana")
    assert q["issue"].tolist() == ["missing_annotation", "spurious_annotation", "bad_outline", "merged"]
    ds = [decide_flag(store, q.iloc[i].to_dict(), "accept", reviewer="ana") for i in range(4)]
    assert [d.actions for d in ds] == [["add"], ["delete"], ["replace"], ["replace", "add"]]
    added, split_new = ds[0].nucleus_ids[0], ds[3].nucleus_ids[1]
    assert instance_queue(store, reviewer="ana")["decided"].all()
    assert not instance_queue(store, reviewer="bob")["decided"].any()

    v1 = export_release(store, "v1", out=tmp_path / "rel", progress=False)
    assert verify_release(v1.path) == []
    assert v1.manifest["geometry"] == {"added": 2, "deleted": 1, "replaced": 2, "images": 2}
    nuc = pq.read_table(v1.path / "nuclei.parquet").to_pandas().set_index("nucleus_id")
    assert spurious not in nuc.index
    a = nuc.loc[added]
    assert (a["origin_file"], a["origin_region"], a["area"], a["class_value"], a["decided"], a["decided_by"]) == (
        "review", q.iloc[0]["flag_id"], 25, 3, "reviewed", "ana")
    assert (a["bbox_y0"], a["bbox_x0"], a["bbox_y1"], a["bbox_x1"]) == (30, 30, 35, 35)
    assert nuc.loc[bad, "area"] == 36 and nuc.loc[bad, "instance_id"] == bad_inst
    assert nuc.loc[split, "area"] == 16 and nuc.loc[split_new, "area"] == 16
    assert nuc.loc[split_new, "class_value"] == 1 and nuc.loc[split_new, "origin_file"] == "review"

    ins, cls = release_arrays(v1.path, PN)
    assert (ins == sp_inst).sum() == 0
    new_inst = int(a["instance_id"])
    assert new_inst == 5 and (ins[30:35, 30:35] == new_inst).all() and (ins == new_inst).sum() == 25
    assert (cls[30:35, 30:35] == 3).all()
    assert (ins[5:11, 33:39] == bad_inst).all() and (ins == bad_inst).sum() == 36
    im0 = pq.read_table(v0.path / "images.parquet").to_pandas().set_index("image_id")
    im1 = pq.read_table(v1.path / "images.parquet").to_pandas().set_index("image_id")
    assert im1.at[PN, "n_nuclei"] == im0.at[PN, "n_nuclei"] == 4  # one deleted, one added
    mo_ins, _ = release_arrays(v1.path, MO)
    assert mo_ins.shape == (40, 56) and (mo_ins == int(nuc.loc[split_new, "instance_id"])).sum() == 16

    d = diff_releases(v0.path, v1.path)
    assert d.geometry_counts() == {"added": 2, "deleted": 1, "reshaped": 2}
    assert sorted(d.reviewed_added.tolist()) == sorted([added, split_new])
    assert sorted(d.reshaped.tolist()) == sorted([bad, split])

    undo_last(store, "ana")  # the split: both of its events
    v2 = export_release(store, "v2", out=tmp_path / "rel", progress=False)
    assert v2.manifest["geometry"] == {"added": 1, "deleted": 1, "replaced": 1, "images": 1}
    d2 = diff_releases(v0.path, v2.path)
    assert d2.geometry_counts() == {"added": 1, "deleted": 1, "reshaped": 1}
    assert verify_release(v2.path) == []


def test_the_release_loader_and_datasets_read_a_reviewed_release(store, tmp_path):
    from cellcurate.datasets.release import ReleaseDataset

    write_instance_flags(store, [flag_event(PN, "missing_annotation", n=0, polygons=[square(30, 30, 5)], label=2)])
    decide_flag(store, instance_queue(store).iloc[0].to_dict(), "add", reviewer="ana")
    r = export_release(store, "v1", out=tmp_path / "rel", progress=False)
    ds = ReleaseDataset(r.path, split="all")
    i = int(np.flatnonzero(ds.images["image_id"] == PN)[0])
    _img, ins, cls = ds.read(i)
    assert (np.asarray(cls)[30:35, 30:35] == 2).all()
    assert int(np.asarray(ins)[32, 32]) in set(ds.nuclei.loc[ds.nuclei["origin_file"] == "review", "instance_id"])


def test_cli_diff_prints_geometry_counts_and_verify_passes(tmp_path):
    from click.testing import CliRunner

    from cellcurate.cli.main import cli

    store = build_test_store(tmp_path / "store")
    export_release(store, "v0", out=tmp_path / "rel", progress=False)
    spurious, _ = nucleus_at(store, PN, 8, 22)
    write_instance_flags(store, [flag_event(PN, "spurious_annotation", n=1, nucleus_ids=[spurious], action="delete")])
    decide_flag(store, instance_queue(store).iloc[0].to_dict(), "accept", reviewer="ana")
    export_release(store, "v1", out=tmp_path / "rel", progress=False)
    r = CliRunner().invoke(cli, ["diff", str(tmp_path / "rel" / "v0"), str(tmp_path / "rel" / "v1")])
    assert r.exit_code == 0, r.output
    assert "geometry: 0 added (0 in review), 1 deleted, 0 reshaped" in r.output
    r = CliRunner().invoke(cli, ["verify", str(tmp_path / "rel" / "v1")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["verify", str(store.path)])
    assert r.exit_code == 0, r.output

"""Ingest of the real-format synthetic sample: counts against truth, idempotence, atomicity, bad input."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cellcurate.cli.main import cli
from cellcurate.datasets.checks import store_summary, verify_store
from cellcurate.datasets.ingest import ingest_monusac, ingest_pannuke
from cellcurate.datasets.store import Store

JOIN = ["source", "origin_file", "origin_index", "origin_channel", "origin_instance", "origin_region"]


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def snapshot(store_path: Path):
    """Everything a failed ingest must leave untouched."""
    with Store.open(store_path) as s:
        return (s.ledger.head(), s.units()[["unit", "dir", "fingerprint"]].to_dict("records"),
                sorted(p.name for p in (store_path / "units").iterdir()))


def test_every_truth_nucleus_is_ingested_once_with_its_label(tiny_sample, tiny_store_path):
    truth = pd.read_parquet(tiny_sample.truth_path)
    with Store.open(tiny_store_path) as store:
        nuc = store.nuclei()
        images = store.images()
    assert len(nuc) == len(truth)
    m = nuc.merge(truth, left_on=JOIN + ["source_label"], right_on=JOIN + ["written_label"], how="outer",
                  indicator=True, validate="one_to_one")
    assert (m["_merge"] == "both").all()
    assert (m["kind_x"] == m["kind_y"]).all()
    # resolved labels agree with the truth except where a flip was planted
    resolved = m[(m["unified_label"] > 0) & ~m["flipped"]]
    assert (resolved["unified_label"] == resolved["true_class"]).all()
    assert set(nuc.loc[nuc.source_label == "Inflammatory", "candidates"]) == {"2|6|7"}
    assert set(nuc.loc[nuc.source_label == "Ambiguous", "kind"]) == {"ignore"}
    # image table facts
    pn = images[images.source == "pannuke"]
    mo = images[images.source == "monusac"]
    assert set(pn["split"]) == {"fold1", "fold2", "fold3"} and (pn[["height", "width"]] == 256).all().all()
    assert pn["tissue"].notna().all() and pn["patient_id"].isna().all()
    assert mo["patient_id"].str.fullmatch(r"TCGA-\w\w-\w{4}").all()
    assert mo["mpp"].between(0.2, 0.3).all() and set(mo["split"]) == {"train", "test"}
    assert (pn["n_nuclei"] == 0).any(), "empty PanNuke tiles are kept"


def test_native_size_and_pixels_preserved(tiny_sample, tiny_store_path):
    import tifffile

    with Store.open(tiny_store_path) as store:
        row = store.images().query("source == 'monusac'").iloc[0]
        img, ins = store.read(row.image_id)
        src = tifffile.imread(tiny_sample.monusac_root / _release_dir(row.split) / row.origin_file)
    assert img.shape == src.shape[:2] + (3,) and np.array_equal(img, src[..., :3])
    assert ins.shape == img.shape[:2]
    pn = np.load(tiny_sample.pannuke_root / "Fold 2/images/fold2/images.npy", mmap_mode="r")
    with Store.open(tiny_store_path) as store:
        assert np.array_equal(store.read_image("pannuke/fold2/00003"), pn[3].astype(np.uint8))


def _release_dir(split: str) -> str:
    return "MoNuSAC_images_and_annotations" if split == "train" else "MoNuSAC Testing Data and Annotations"


def test_info_json_and_verify(tiny_sample, tiny_store_path):
    r = run("info", str(tiny_store_path), "--json")
    assert r.exit_code == 0
    import json

    info = json.loads(r.output)
    truth = pd.read_parquet(tiny_sample.truth_path)
    assert info["images"] == {"monusac": tiny_sample.n_images, "pannuke": tiny_sample.n_tiles}
    want = truth.groupby(["source", "written_label"]).size()
    for (src, lab), n in want.items():
        assert info["nuclei"][src][lab] == n
    assert info["unified"]["Lymphocyte|Macrophage|Neutrophil"] == int(want["pannuke"]["Inflammatory"])
    assert info["unified"]["Neoplastic|Epithelial"] == int(want["monusac"]["Epithelial"])
    r = run("verify", str(tiny_store_path))
    assert r.exit_code == 0 and "OK" in r.output
    r = run("info", str(tiny_store_path))
    assert "Nuclei by source label" in r.output and "Inflammatory" in r.output


def test_reingest_is_a_noop_and_overwrite_keeps_ids(tiny_sample, tiny_store_path, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(tiny_store_path, path)
    before = snapshot(path)
    with Store.open(path, mode="a") as s:
        ids = sorted(s.nuclei()["nucleus_id"])
        r1 = ingest_pannuke(s, tiny_sample.pannuke_root, progress=False)
        r2 = ingest_monusac(s, tiny_sample.monusac_root, progress=False)
    assert {u.status for u in r1.units + r2.units} == {"unchanged"}
    assert snapshot(path) == before
    r = run("ingest", "pannuke", str(tiny_sample.pannuke_root / "Fold 1"), "--store", str(path), "--overwrite")
    assert r.exit_code == 0, r.output
    assert "replaced" in r.output
    with Store.open(path) as s:
        assert sorted(s.nuclei()["nucleus_id"]) == ids
        assert s.ledger.count("ingest") == len(ids) + int((s.nuclei()["image_id"].str.startswith("pannuke/fold1")).sum())
        assert verify_store(s).ok


def test_changed_files_need_overwrite(tiny_sample, tiny_store_path, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(tiny_store_path, path)
    src = tmp_path / "pannuke"
    shutil.copytree(tiny_sample.pannuke_root / "Fold 3", src / "Fold 3")
    imgs = np.load(src / "Fold 3/images/fold3/images.npy", mmap_mode="r+")
    imgs[0, 0, 0, 0] = 255 - imgs[0, 0, 0, 0]
    imgs.flush()
    del imgs
    before = snapshot(path)
    r = CliRunner().invoke(cli, ["ingest", "pannuke", str(src), "--store", str(path)])
    assert r.exit_code == 1 and "use --overwrite" in r.output
    assert snapshot(path) == before


def _fold_copy(tiny_sample, tmp_path) -> Path:
    dst = tmp_path / "bad" / "Fold 1"
    shutil.copytree(tiny_sample.pannuke_root / "Fold 1", dst)
    return dst


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _bad_pannuke_cases():
    def truncated(d):
        _truncate(d / "images/fold1/images.npy")

    def non_numeric(d):
        np.save(d / "images/fold1/images.npy", np.array(["a"] * 6))

    def different_n(d):
        m = np.load(d / "masks/fold1/masks.npy")
        np.save(d / "masks/fold1/masks.npy", m[:4])

    def five_channels(d):
        m = np.load(d / "masks/fold1/masks.npy")
        np.save(d / "masks/fold1/masks.npy", m[..., :5])

    def missing_types(d):
        (d / "images/fold1/types.npy").unlink()

    def out_of_range(d):
        im = np.load(d / "images/fold1/images.npy")
        im[2, 5, 5, 1] = 300.0
        np.save(d / "images/fold1/images.npy", im)

    return [
        (truncated, "images.npy"),
        (non_numeric, "images.npy"),
        (different_n, "masks.npy"),
        (five_channels, "masks.npy"),
        (missing_types, "types.npy"),
        (out_of_range, "images.npy"),
    ]


@pytest.mark.parametrize("damage,names", _bad_pannuke_cases(), ids=lambda x: getattr(x, "__name__", x))
def test_bad_pannuke_input_is_one_line_and_store_unchanged(tiny_sample, tiny_store_path, tmp_path, damage, names):
    path = tmp_path / "store"
    shutil.copytree(tiny_store_path, path)
    fold = _fold_copy(tiny_sample, tmp_path)
    damage(fold)
    before = snapshot(path)
    r = CliRunner().invoke(cli, ["ingest", "pannuke", str(fold), "--store", str(path), "--overwrite"])
    assert r.exit_code == 1
    err = r.output.strip().splitlines()
    assert err[-1].startswith("error: ") and names in err[-1], r.output
    assert "Traceback" not in r.output
    assert snapshot(path) == before


def _bad_monusac_cases():
    def malformed(p):
        xml = next(p.glob("*.xml"))
        xml.write_text(xml.read_text()[:-40])

    def bomb(p):
        xml = next(p.glob("*.xml"))
        xml.write_text('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
                       "<Annotations>&lol2;</Annotations>")

    def external(p):
        xml = next(p.glob("*.xml"))
        xml.write_text('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                       "<Annotations MicronsPerPixel=\"0.25\">&x;</Annotations>")

    def no_image(p):
        for f in p.iterdir():
            if f.suffix.lower() in (".tif", ".svs"):
                f.unlink()

    def unknown_class(p):
        xml = next(p.glob("*.xml"))
        xml.write_text(xml.read_text().replace('Name="Lymphocyte"', 'Name="Plasma cell"')
                       .replace('Name="Macrophage"', 'Name="Plasma cell"'))

    return [(malformed, ".xml"), (bomb, ".xml"), (external, ".xml"), (no_image, ".xml"), (unknown_class, ".xml")]


@pytest.mark.parametrize("damage,names", _bad_monusac_cases(), ids=lambda x: getattr(x, "__name__", x))
def test_bad_monusac_input_is_one_line_and_store_unchanged(tiny_sample, tiny_store_path, tmp_path, damage, names):
    path = tmp_path / "store"
    shutil.copytree(tiny_store_path, path)
    release = tmp_path / "MoNuSAC_images_and_annotations"
    shutil.copytree(tiny_sample.monusac_root / "MoNuSAC_images_and_annotations", release)
    patient = sorted(d for d in release.iterdir() if d.is_dir())[0]
    damage(patient)
    before = snapshot(path)
    r = CliRunner().invoke(cli, ["ingest", "monusac", str(release), "--store", str(path), "--overwrite"])
    assert r.exit_code == 1, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and names in last and "Traceback" not in r.output, r.output
    assert snapshot(path) == before


def test_path_with_neither_dataset(tmp_path, tiny_sample):
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(cli, ["ingest", "pannuke", str(tmp_path / "empty"), "--store", str(tmp_path / "s")])
    assert r.exit_code == 1 and "error:" in r.output and str(tmp_path / "empty") in r.output
    r = CliRunner().invoke(cli, ["ingest", "pannuke", str(tiny_sample.monusac_root), "--store", str(tmp_path / "s")])
    assert r.exit_code == 1 and "curate ingest monusac" in r.output


def test_verify_detects_tampering(tiny_store_path, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(tiny_store_path, path)
    with Store.open(path, mode="a") as s:
        unit = s.units().iloc[0]
        row = s.images().query("unit == @unit.unit and n_nuclei > 0").iloc[0]
    # 1) taxonomy edited behind the store's back
    tax = path / "taxonomy.json"
    tax.write_text(tax.read_text().replace("#e6194b", "#e6194c"))
    r = CliRunner().invoke(cli, ["verify", str(path)])
    assert r.exit_code == 1 and "taxonomy.json" in r.output
    # 2) a nucleus erased from an instance map
    shutil.rmtree(path)
    shutil.copytree(tiny_store_path, path)
    import zarr

    g = zarr.open_group(str(path / unit.dir / "arrays.zarr"), mode="r+")
    arr = g["instances"] if row.zarr_path == "images" else g[row.zarr_path.replace("img/", "ins/")]
    idx = (row.zarr_index,) if row.zarr_index >= 0 else ()
    ins = np.asarray(arr[idx])
    ins[ins == 1] = 0
    arr[idx] = ins
    r = CliRunner().invoke(cli, ["verify", str(path)])
    assert r.exit_code == 1 and row.image_id in r.output and "area" in r.output
    # 3) a unit folder lost
    shutil.rmtree(path / unit.dir)
    r = CliRunner().invoke(cli, ["verify", str(path)])
    assert r.exit_code == 1 and "missing" in r.output


@pytest.mark.slow
def test_sigkill_during_ingest_leaves_old_or_new_state(tmp_path, tiny_store_path):
    from cellcurate.datasets.synthetic import write_pannuke

    src = tmp_path / "big"
    write_pannuke(src, tiles_per_fold=(0, 0, 400), seed=3, unique_tiles=8)
    path = tmp_path / "store"
    shutil.copytree(tiny_store_path, path)
    before = snapshot(path)
    cmd = [sys.executable, "-m", "cellcurate.cli.main", "ingest", "pannuke", str(src), "--store", str(path),
           "--overwrite"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".tmp-") for p in (path / "units").iterdir()):
        time.sleep(0.02)
    time.sleep(0.3)  # well into writing tiles
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with Store.open(path) as s:
        res = verify_store(s)
        assert res.ok, res.problems
        assert snapshot(path)[:2] == before[:2]  # the commit never happened: old state
        assert any("interrupted" in n for n in res.notes)
    r = run("ingest", "pannuke", str(src), "--store", str(path), "--overwrite")
    assert r.exit_code == 0
    with Store.open(path) as s:
        assert verify_store(s).ok and len(s.images().query("split == 'fold3'")) == 400
        assert not any(p.name.startswith(".tmp-") for p in (path / "units").iterdir())


def test_store_summary_counts_match_tables(tiny_store_path):
    with Store.open(tiny_store_path) as s:
        summary = store_summary(s)
        assert sum(summary["unified"].values()) == len(s.nuclei())

"""Parallel ingest (``curate ingest --jobs N``, cellcurate.datasets.workers): the store is the same
for every N, failures in workers are one line naming the file, workers die with their parent."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from store_readback import assert_same_content, content, snapshot

from cellcurate.cli.main import cli
from cellcurate.datasets import lizard, pannuke
from cellcurate.datasets.checks import verify_store
from cellcurate.datasets.ingest import ingest_source
from cellcurate.datasets.records import IngestReport, SourceImage, UnitPart
from cellcurate.datasets.store import Store
from cellcurate.datasets.taxonomy import Taxonomy
from cellcurate.datasets.workers import ConversionPool, convert_part, resolve_jobs, usable_cores
from cellcurate.errors import ConfigError, InputFormatError, InputNotFoundError, StoreError

ROOT = Path(__file__).resolve().parents[1]


# -- small exact cases ----------------------------------------------------------------------------
def test_jobs_default_to_the_usable_cores_and_bad_values_are_refused():
    assert usable_cores() == len(os.sched_getaffinity(0))
    assert resolve_jobs(None) == usable_cores()
    assert resolve_jobs(3) == 3
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ConfigError, match="jobs must be an integer >= 1"):
            resolve_jobs(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("err", [InputFormatError("a/b.xml", "bad vertex"), InputNotFoundError("x.tif", "missing"),
                                 StoreError("locked", path="/s"), ConfigError("no such rule")])
def test_errors_survive_the_trip_from_a_worker(err):
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err) and back.path == err.path


def _one_tile(key: str, n: int) -> SourceImage:
    import pandas as pd

    ins = np.zeros((4, 5), np.int32)
    for i in range(1, n + 1):
        ins[i - 1, :i] = i  # instance i: i pixels on row i-1
    nuclei = pd.DataFrame({"instance_id": np.arange(1, n + 1, dtype=np.int32), "kind": ["nucleus"] * n,
                           "source_label": ["Neoplastic"] * n, "origin_channel": np.zeros(n, np.int16),
                           "origin_instance": np.arange(1, n + 1, dtype=np.int64), "origin_region": [""] * n,
                           "origin_annotation": [""] * n})
    return SourceImage(key, "fold1", np.zeros((4, 5, 3), np.uint8), ins, nuclei, "f.npy", origin_index=int(key))


def _tiles_part(keys: tuple[str, ...], report: IngestReport):
    for k in keys:
        report.count("seen")
        report.warn(f"tile {k}")
        yield _one_tile(k, int(k) % 4)


def _failing_part(report: IngestReport):
    yield _one_tile("0", 1)
    raise KeyError("inst_type")


def _killed_part(report: IngestReport):
    os.kill(os.getpid(), signal.SIGKILL)
    yield from ()


def test_convert_part_computes_geometry_ids_and_its_own_report():
    from functools import partial

    images, report = convert_part(UnitPart(partial(_tiles_part, ("3",)), "f.npy"), source="pannuke",
                                  taxonomy=Taxonomy.default())
    (conv,) = images
    assert conv.row["image_id"] == "pannuke/3" and conv.row["n_nuclei"] == 3
    assert conv.cols["area"].tolist() == [1, 2, 3]
    assert conv.cols["bbox"].tolist() == [[0, 0, 1, 1], [1, 0, 2, 2], [2, 0, 3, 3]]
    assert conv.cols["centroid_x"].tolist() == [0.0, 0.5, 1.0]
    assert report.counts["seen"] == 1 and report.warnings == ["tile 3"]


def test_an_unexpected_error_in_a_part_is_one_line_naming_its_files():
    with pytest.raises(InputFormatError) as info:
        convert_part(UnitPart(_failing_part, "Labels/a.mat, Images/a.png"), source="pannuke",
                     taxonomy=Taxonomy.default())
    text = str(info.value)
    assert text.startswith("Labels/a.mat, Images/a.png: cannot convert (KeyError: 'inst_type')") and "\n" not in text


def test_the_pool_returns_every_part_in_order_with_its_report():
    from functools import partial

    parts = [UnitPart(partial(_tiles_part, tuple(str(k) for k in range(s, s + 3))), f"part{s}")
             for s in range(0, 30, 3)]
    with ConversionPool(2, source="pannuke", taxonomy=Taxonomy.default()) as pool:
        out = list(pool.convert(parts))
    assert [c.key for images, _ in out for c in images] == [str(k) for k in range(30)]
    assert [w for _, r in out for w in r.warnings] == [f"tile {k}" for k in range(30)]


def test_a_worker_that_dies_is_one_error_naming_its_files():
    with ConversionPool(2, source="pannuke", taxonomy=Taxonomy.default()) as pool:
        with pytest.raises(StoreError, match=r"^masks\.npy: the worker process converting these files died"):
            list(pool.convert([UnitPart(_killed_part, "masks.npy")]))


# -- the same store for every N, for every reader of the registry ---------------------------------
def _pannuke(tmp_path, tiny_sample):
    return "pannuke", tiny_sample.pannuke_root


def _monusac(tmp_path, tiny_sample):
    return "monusac", tiny_sample.monusac_root


def _real(name, *rel):
    def build(tmp_path, tiny_sample):
        path = ROOT.parent / "shared" / "fixtures" / "real" / Path(*rel)
        if not path.exists():
            pytest.skip(f"real fixture {path} not found")
        return name, path
    build.__name__ = f"_{name}"
    return build


def _lizard(tmp_path, tiny_sample):
    from test_lizard import _lizard as write

    write(tmp_path / "lizard")
    return "lizard", tmp_path / "lizard"


def _conic(tmp_path, tiny_sample):
    from test_lizard import _conic as write

    write(tmp_path / "conic")
    return "lizard", tmp_path / "conic"


SOURCES = [_pannuke, _monusac, _real("consep", "consep"), _real("cpm", "cpm15"), _lizard, _conic,
           pytest.param(_real("monuseg", "monuseg", "MoNuSegTrainingData"), marks=pytest.mark.slow)]


@pytest.mark.parametrize("build", SOURCES, ids=lambda b: b.__name__[1:])
def test_jobs_1_and_2_give_the_same_store(tmp_path, tiny_sample, monkeypatch, build):
    """Arrays, parquet tables, every file's bytes, the catalog and the ledger events (less times)."""
    monkeypatch.setattr(pannuke, "PART_TILES", 4)  # 6-tile folds: two parts each, so order matters
    monkeypatch.setattr(lizard, "PART_PATCHES", 2)
    source, path = build(tmp_path, tiny_sample)
    stores = {}
    for jobs in (1, 2):
        stores[jobs] = tmp_path / f"store-{jobs}"
        with Store.create(stores[jobs]) as store:
            res = ingest_source(store, source, path, progress=False, jobs=jobs)
        assert res.n_images > 0
        stores[jobs, "report"] = res.report.as_dict()
    assert stores[1, "report"] == stores[2, "report"]
    assert_same_content(stores[1], stores[2])
    assert len(content(stores[2])["events"]) == res.n_nuclei + res.report.counts.get("ignore_regions", 0)


def test_cli_jobs_option(tmp_path, tiny_sample):
    r = CliRunner().invoke(cli, ["ingest", "pannuke", str(tiny_sample.pannuke_root), "--store", str(tmp_path / "s"),
                                 "--jobs", "0"])
    assert r.exit_code == 2 and "--jobs" in r.output
    for jobs in ("1", "2"):
        r = CliRunner().invoke(cli, ["ingest", "pannuke", str(tiny_sample.pannuke_root), "--store",
                                     str(tmp_path / f"s{jobs}"), "--jobs", jobs])
        assert r.exit_code == 0, r.output
    assert_same_content(tmp_path / "s1", tmp_path / "s2")


# -- failures --------------------------------------------------------------------------------------
def _corrupt_consep(tmp_path: Path) -> tuple[Path, Path]:
    src = ROOT.parent / "shared" / "fixtures" / "real" / "consep"
    if not src.exists():
        pytest.skip("real CoNSeP fixture not found")
    folder = tmp_path / "consep"
    shutil.copytree(src, folder)
    bad = sorted((folder / "inst").glob("*.npy"))[5]
    bad.write_bytes(bad.read_bytes()[:300])
    return folder, bad


@pytest.mark.parametrize("what", ["consep npy", "monusac xml"])
def test_a_corrupt_file_with_two_jobs_is_one_line_naming_it_and_the_store_is_unchanged(tmp_path, tiny_sample,
                                                                                       tiny_store_path, what):
    path = tmp_path / "store"
    shutil.copytree(tiny_store_path, path)
    if what == "consep npy":
        folder, bad = _corrupt_consep(tmp_path)
        source = "consep"
    else:
        folder = tmp_path / "MoNuSAC_images_and_annotations"
        shutil.copytree(tiny_sample.monusac_root / "MoNuSAC_images_and_annotations", folder)
        bad = sorted(folder.rglob("*.xml"))[-1]
        bad.write_text(bad.read_text()[:-60])
        source = "monusac"
    before = snapshot(path)
    r = CliRunner().invoke(cli, ["ingest", source, str(folder), "--store", str(path), "--overwrite", "--jobs", "2"])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith(f"error: {bad}: ") and "Traceback" not in r.output, r.output
    assert snapshot(path) == before
    assert not [p for p in (path / "units").iterdir() if p.name.startswith(".tmp-")]


def _children_gone(pids: list[int], timeout: float = 30.0) -> bool:
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_sigkill_during_parallel_ingest_leaves_the_old_state_and_no_worker(tmp_path, tiny_store_path):
    """Killed while two workers convert: nothing half-written, no orphan worker, the next ingest
    cleans up and works."""
    import psutil

    from cellcurate.datasets.synthetic import write_pannuke

    src = tmp_path / "big"
    write_pannuke(src, tiles_per_fold=(0, 0, 400), seed=3, unique_tiles=8)
    path = tmp_path / "store"
    shutil.copytree(tiny_store_path, path)
    before = snapshot(path)
    cmd = [sys.executable, "-m", "cellcurate.cli.main", "ingest", "pannuke", str(src), "--store", str(path),
           "--overwrite", "--jobs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parent = psutil.Process(proc.pid)
    deadline = time.time() + 180
    workers: list[int] = []
    while time.time() < deadline:  # the unit is being written and both workers are up
        workers = [c.pid for c in parent.children()]
        if len(workers) >= 2 and any(p.name.startswith(".tmp-") for p in (path / "units").iterdir()):
            break
        time.sleep(0.02)
    assert len(workers) >= 2, "the workers never started"
    time.sleep(0.3)  # well into converting tiles
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _children_gone(workers), "a worker outlived its killed parent"
    with Store.open(path) as s:
        res = verify_store(s)
        assert res.ok, res.problems
        assert snapshot(path)[:2] == before[:2]  # the commit never happened: old state
        assert any("interrupted" in n for n in res.notes)
    r = CliRunner().invoke(cli, ["ingest", "pannuke", str(src), "--store", str(path), "--overwrite", "--jobs", "2"])
    assert r.exit_code == 0, r.output
    with Store.open(path) as s:
        assert verify_store(s).ok and len(s.images().query("split == 'fold3'")) == 400
        assert not any(p.name.startswith(".tmp-") for p in (path / "units").iterdir())

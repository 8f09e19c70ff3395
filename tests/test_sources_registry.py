"""The source-reader registry: PanNuke and MoNuSAC on it unchanged, entry points, `curate ingest` listing."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

#: Digests of the tiny sample (seed 0, flip 0.10) ingested by main's code before the registry
#: (commit 66b8d68, ``ingest_pannuke`` then ``ingest_monusac``): the nucleus/image tables, the
#: arrays and the ledger's ingest events. The registry must reproduce them exactly. A deliberate
#: change of a reader's output (e.g. PanNuke's fingerprint) must update these on purpose:
#: ``PYTHONPATH=src python tests/test_sources_registry.py`` prints the digests of the current code.
#: (nuclei/arrays/events re-frozen for issue 9's change of the synthetic sample itself: karyorrhectic
#: Dead nuclei are one connected outline now; the ingest code did not change.)
FROZEN = {
    "images": "497b88169a8cc0fcc0a4601e25fc230443a61222bc6ac0afe79e9f8e00e2b872",
    "nuclei": "02e2d16e8fe928665de11d94887abfbb75129cfea67f9941465a1f6743bba5d5",
    "arrays": "e0a8ab6769f8b4a0998ad5bc255eb5fc03bdaee3fb9a5b30106d47848c713518",
    "events": "708585373b12e40b43dd3ff2caaf3437560e15bdf1670c8e7c6dd0bc63695c35",
    "units": "b525b86c694f05e658ce6875463bdecee6973413e5f96c7d5e9e034b166c4657",
}


def store_digests(path: Path) -> dict[str, str]:
    """Content digests of a store, read with pyarrow/zarr/sqlite3 (not our Store class); the
    unit folder token, absolute origin paths and times are left out."""
    import pyarrow.parquet as pq
    import zarr

    out: dict[str, str] = {}
    con = sqlite3.connect(path / "ledger.sqlite")
    units = con.execute("SELECT unit, source, dir, fingerprint, taxonomy_hash, n_images, n_nuclei "
                        "FROM units ORDER BY unit").fetchall()
    events = con.execute("SELECT kind, nucleus_id, actor, action, label, payload FROM events "
                         "WHERE kind = 'ingest' ORDER BY seq").fetchall()
    con.close()
    # (the fingerprint is left out: issue 10 made PanNuke's a whole-file hash on purpose)
    out["units"] = hashlib.sha256(json.dumps([[u[0], u[1], u[4], u[5], u[6]] for u in units]).encode()).hexdigest()
    out["events"] = hashlib.sha256(json.dumps([list(e) for e in events]).encode()).hexdigest()
    frames = {"images": [], "nuclei": []}
    h = hashlib.sha256()
    for u in units:
        udir = path / u[2]
        for name in frames:
            frames[name].append(pq.read_table(udir / f"{name}.parquet").to_pandas())
        group = zarr.open_group(str(udir / "arrays.zarr"), mode="r")
        for key in sorted(_array_paths(group)):
            arr = np.asarray(group[key][...])
            h.update(f"{u[0]}|{key}|{arr.shape}|{arr.dtype}|".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    out["arrays"] = h.hexdigest()
    for name, parts in frames.items():
        df = pd.concat(parts, ignore_index=True)
        text = df.to_csv(index=False, lineterminator="\n") + "|" + json.dumps({c: str(t) for c, t in df.dtypes.items()})
        out[name] = hashlib.sha256(text.encode()).hexdigest()
    return out


def _array_paths(group, prefix: str = "") -> list[str]:
    import zarr

    found = []
    for name, item in group.members():
        full = f"{prefix}{name}"
        if isinstance(item, zarr.Group):
            found.extend(_array_paths(item, full + "/"))
        else:
            found.append(full)
    return found


@pytest.mark.slow
def test_pannuke_and_monusac_on_the_registry_write_the_same_store_as_before(tiny_sample, tmp_path):
    from cellcurate.datasets.ingest import ingest_source
    from cellcurate.datasets.store import Store

    with Store.create(tmp_path / "store") as store:
        # main's code resolved PanNuke overlaps with the lowest channel (issue 10 made "highest" the default)
        ingest_source(store, "pannuke", tiny_sample.pannuke_root, progress=False, overlap="lowest")
        ingest_source(store, "monusac", tiny_sample.monusac_root, progress=False)
    assert store_digests(tmp_path / "store") == FROZEN


PLUGIN = '''
from pathlib import Path
import numpy as np
import pandas as pd
from cellcurate.datasets.records import SOURCE_NUCLEI_COLUMNS, SourceImage, UnitPlan, files_fingerprint
from cellcurate.datasets.sources import SourceSpec

SPEC = SourceSpec(name="toy", title="Toy", reader="toyreader", labels={"blob": ["Neoplastic"]},
                  licence="CC0", attribution="Toy: a test plug-in.", description="one blob per .toy file")


def looks_like(path):
    return any(Path(path).glob("*.toy"))


def plan_units(path):
    files = sorted(Path(path).glob("*.toy"))

    def read(report):
        for f in files:
            ins = np.zeros((8, 8), np.int32)
            ins[2:5, 2:5] = 1
            nuc = pd.DataFrame({"instance_id": np.array([1], np.int32), "kind": ["nucleus"], "source_label": ["blob"],
                                "origin_channel": np.array([-1], np.int16), "origin_instance": np.array([1]),
                                "origin_region": [""], "origin_annotation": [""]})[list(SOURCE_NUCLEI_COLUMNS)]
            yield SourceImage(key=f.stem, split="train", image=np.zeros((8, 8, 3), np.uint8), instances=ins,
                              nuclei=nuc, origin_file=f.name, mpp=0.5)

    return [UnitPlan(unit="toy-all", n_images=len(files), fingerprint=files_fingerprint(files), origin=str(path),
                     read=read)]
'''


def _plugin(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    (site / "toyreader-1.0.dist-info").mkdir(parents=True)
    (site / "toyreader.py").write_text(PLUGIN)
    (site / "toyreader-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: toyreader\nVersion: 1.0\n")
    (site / "toyreader-1.0.dist-info" / "entry_points.txt").write_text("[cellcurate.sources]\ntoy = toyreader:SPEC\n")
    return site


@pytest.mark.slow
def test_a_third_party_reader_is_one_module_and_one_entry_point(tmp_path):
    """The done-when of issue 11: a new dataset needs its module and its registry entry, nothing else
    (no taxonomy edit: its default mapping comes from the entry; no CLI edit: `curate ingest toy`)."""
    import os
    import subprocess
    import sys

    site = _plugin(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.toy").write_text("x")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    cli = [sys.executable, "-m", "cellcurate.cli.main", "ingest"]
    listing = subprocess.run(cli, env=env, capture_output=True, text=True, check=True).stdout
    for name in ("pannuke", "monusac", "consep", "monuseg", "cpm", "lizard", "toy"):
        assert f"  {name} " in listing
    assert "toyreader:SPEC" in listing
    done = subprocess.run([*cli, "toy", str(data), "--store", str(tmp_path / "store"), "--json"], env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["units"] == [{"unit": "toy-all", "status": "ingested", "images": 1, "nuclei": 1}]
    _, nuclei = __import__("store_readback").tables(tmp_path / "store")
    assert nuclei["candidates"].tolist() == ["1"] and nuclei["source"].tolist() == ["toy"]
    auto = subprocess.run([*cli, "monusac", str(data), "--store", str(tmp_path / "s2")], env=env,
                          capture_output=True, text=True, check=False)
    assert auto.returncode == 1 and "holds toy data, not monusac; use `curate ingest toy`" in auto.stderr


def test_registry_entries_carry_licence_attribution_and_splits():
    from cellcurate.datasets.sources import (
        get_source,
        release_attribution,
        release_licence,
    )

    assert release_licence(["monusac", "pannuke"]) == "CC BY-NC-SA 4.0"
    assert [a.split(":")[0] for a in release_attribution(["monusac", "pannuke", "consep"])] == [
        "PanNuke", "MoNuSAC", "CoNSeP"]
    assert get_source("pannuke").release_split("fold3") == "fold3"
    assert get_source("lizard").release_split("fold3") == "test"
    assert get_source("consep").group_key(None, "test", "consep/test_1/003") == "test_1"
    assert get_source("monusac").group_key(None, "train", "monusac/x") == "monusac/x"
    with pytest.raises(Exception, match="unknown source 'nope'"):
        get_source("nope")


def test_detection_prefers_monuseg_over_monusac_for_monuseg_xml(fixtures_dir):
    from cellcurate.datasets.sources import detect_source

    assert detect_source(fixtures_dir / "real" / "monuseg") == "monuseg"
    assert detect_source(fixtures_dir / "real" / "consep") == "consep"
    assert detect_source(fixtures_dir / "real" / "cpm15") == "cpm"


if __name__ == "__main__":  # print the digests of the current code (see FROZEN)
    import tempfile

    from cellcurate.datasets.ingest import ingest_source
    from cellcurate.datasets.store import Store
    from cellcurate.datasets.synthetic import write_sample

    tmp = Path(tempfile.mkdtemp())
    sample = write_sample(tmp / "sample", preset="tiny", seed=0, flip_fraction=0.10)
    with Store.create(tmp / "store") as s:
        ingest_source(s, "pannuke", sample.pannuke_root, progress=False, overlap="lowest")
        ingest_source(s, "monusac", sample.monusac_root, progress=False)
    print(json.dumps(store_digests(tmp / "store"), indent=4))

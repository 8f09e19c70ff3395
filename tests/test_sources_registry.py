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
#: arrays and the ledger's ingest events. The registry must reproduce them exactly.
FROZEN = {
    "images": "497b88169a8cc0fcc0a4601e25fc230443a61222bc6ac0afe79e9f8e00e2b872",
    "nuclei": "7b51482188970fbcf160b51e27321e25be8c176f102bdccffa840f289647d6a4",
    "arrays": "e7e88e25ced84bf83e9526d2287b23a5bb6909ef842b7755b2fb3f997be8623f",
    "events": "3485dc477834288a761009835999b11babcbe137c6b686df55d35d93cd5f5914",
    "units": "d975db0530e02722f9a7747cd958a615706f81a6d9475f7663b3fe5ed8737597",
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
    out["units"] = hashlib.sha256(json.dumps([[u[0], u[1], u[3], u[4], u[5], u[6]] for u in units]).encode()).hexdigest()
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


def test_pannuke_and_monusac_on_the_registry_write_the_same_store_as_before(tiny_sample, tmp_path):
    from cellcurate.datasets.ingest import ingest_source
    from cellcurate.datasets.store import Store

    with Store.create(tmp_path / "store") as store:
        ingest_source(store, "pannuke", tiny_sample.pannuke_root, progress=False)
        ingest_source(store, "monusac", tiny_sample.monusac_root, progress=False)
    assert store_digests(tmp_path / "store") == FROZEN

"""Read a store back with pyarrow, zarr and sqlite3 only (not cellcurate's Store), for reader tests."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd


def tables(store: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(images, nuclei) of every committed unit."""
    import pyarrow.parquet as pq

    con = sqlite3.connect(store / "ledger.sqlite")
    dirs = [r[0] for r in con.execute("SELECT dir FROM units ORDER BY unit")]
    con.close()
    images = pd.concat([pq.read_table(store / d / "images.parquet").to_pandas() for d in dirs], ignore_index=True)
    nuclei = pd.concat([pq.read_table(store / d / "nuclei.parquet").to_pandas() for d in dirs], ignore_index=True)
    return images, nuclei


def arrays(store: Path, image_row: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(image, instance map) of one image row, read with zarr from its unit folder."""
    import zarr

    con = sqlite3.connect(store / "ledger.sqlite")
    (d,) = con.execute("SELECT dir FROM units WHERE unit = ?", (image_row["unit"],)).fetchone()
    con.close()
    group = zarr.open_group(str(store / d / "arrays.zarr"), mode="r")
    path, idx = str(image_row["zarr_path"]), int(image_row["zarr_index"])
    if idx >= 0:
        return np.asarray(group["images"][idx]), np.asarray(group["instances"][idx])
    return np.asarray(group[path][...]), np.asarray(group[path.replace("img/", "ins/")][...])


def snapshot(store: Path) -> tuple:
    """Everything a failed ingest must leave alone: units, events, unit folders."""
    con = sqlite3.connect(store / "ledger.sqlite")
    units = con.execute("SELECT * FROM units ORDER BY unit").fetchall()
    events = con.execute("SELECT * FROM events ORDER BY seq").fetchall()
    con.close()
    folders = sorted(p.name for p in (store / "units").iterdir())
    return units, events, folders


def assert_pixels_equal_source(store_ins: np.ndarray, nuclei: pd.DataFrame, source: np.ndarray) -> None:
    """Every instance's pixels are exactly the pixels of its source id (``origin_instance``)."""
    lut = np.zeros(int(store_ins.max(initial=0)) + 1, dtype=np.int64)
    lut[nuclei["instance_id"].to_numpy()] = nuclei["origin_instance"].to_numpy()
    np.testing.assert_array_equal(lut[store_ins], source)


def content(store: Path) -> dict:
    """A store's whole content, as other readers see it, less what differs between two ingests of the
    same files by design (unit folder tokens, times, the hash chain that covers the times):

    ``files``: unit name -> {path in the unit folder: bytes}; ``arrays``: unit -> {array: ndarray}
    (zarr); ``tables``: unit -> {table: pyarrow.Table}; ``units``: catalog rows less dir and time;
    ``events``: every event less time and chain, in ledger order.
    """
    import pyarrow.parquet as pq
    import zarr

    con = sqlite3.connect(store / "ledger.sqlite")
    con.row_factory = sqlite3.Row
    units = [dict(r) for r in con.execute("SELECT * FROM units ORDER BY unit")]
    events = [{k: r[k] for k in r.keys() if k not in ("time", "chain")}
              for r in con.execute("SELECT * FROM events ORDER BY seq")]
    con.close()
    out: dict = {"files": {}, "arrays": {}, "tables": {}, "events": events,
                 "units": [{k: v for k, v in u.items() if k not in ("dir", "time")} for u in units]}
    for u in units:
        folder = store / u["dir"]
        out["files"][u["unit"]] = {p.relative_to(folder).as_posix(): p.read_bytes()
                                   for p in sorted(folder.rglob("*")) if p.is_file()}
        group = zarr.open_group(str(folder / "arrays.zarr"), mode="r")
        out["arrays"][u["unit"]] = {name: np.asarray(arr[...]) for name, arr in group.arrays()}
        for sub in ("img", "ins"):
            if sub in group:
                out["arrays"][u["unit"]].update({f"{sub}/{name}": np.asarray(arr[...])
                                                 for name, arr in group[sub].arrays()})
        out["tables"][u["unit"]] = {t: pq.read_table(folder / f"{t}.parquet") for t in ("images", "nuclei")}
    return out


def assert_same_content(a: Path, b: Path) -> None:
    """Two stores hold the same arrays, tables, file bytes, catalog and events (see :func:`content`)."""
    ca, cb = content(a), content(b)
    assert ca["units"] == cb["units"]
    assert ca["events"] == cb["events"]
    assert ca["files"].keys() == cb["files"].keys()
    for unit in ca["files"]:
        assert ca["files"][unit].keys() == cb["files"][unit].keys(), unit
        for name, data in ca["files"][unit].items():
            assert data == cb["files"][unit][name], f"{unit}/{name} differs"
        assert ca["arrays"][unit].keys() == cb["arrays"][unit].keys()
        for name, arr in ca["arrays"][unit].items():
            np.testing.assert_array_equal(arr, cb["arrays"][unit][name])
        for t in ("images", "nuclei"):
            assert ca["tables"][unit][t].equals(cb["tables"][unit][t]), f"{unit}/{t}.parquet differs"

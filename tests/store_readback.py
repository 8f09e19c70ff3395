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

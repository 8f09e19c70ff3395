"""PanNuke fold fingerprint v3 (xxh3-128 over block digests hashed by the ingest workers) and the
migration from v2 (sha256) stores: unchanged files of a v2 store are still recognised."""

from __future__ import annotations

import dataclasses
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from cellcurate.datasets import pannuke
from cellcurate.datasets.ingest import ingest_pannuke
from cellcurate.datasets.pannuke import (
    combine_fold_fingerprint,
    discover_pannuke,
    fold_fingerprint,
    fold_fingerprint_v2,
    open_fold,
)
from cellcurate.datasets.store import Store
from cellcurate.errors import StateError

T = 256


def _fold(root: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder = root / "Fold 1"
    (folder / "images" / "fold1").mkdir(parents=True)
    (folder / "masks" / "fold1").mkdir(parents=True)
    images = rng.integers(0, 256, (n, T, T, 3)).astype(np.float64)
    masks = np.zeros((n, T, T, 6))
    masks[..., 5] = 1.0
    for t in range(n):
        masks[t, 10 + t : 20 + t, 30:40, t % 5] = t + 1
        masks[t, 10 + t : 20 + t, 30:40, 5] = 0.0
    np.save(folder / "images/fold1/images.npy", images)
    np.save(folder / "masks/fold1/masks.npy", masks)
    np.save(folder / "images/fold1/types.npy", np.array(["Colon"] * n, dtype="<U13"))
    return folder


def _units(store: Path) -> dict[str, str]:
    with Store.open(store) as s:
        return dict(zip(s.units()["unit"], s.units()["fingerprint"]))


def test_v3_is_blockwise_fixed_order_and_sees_every_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(pannuke, "PART_TILES", 2)
    folder = _fold(tmp_path / "a", 5)
    (fold,) = discover_pannuke(folder)
    arrays = open_fold(fold)
    fp = fold_fingerprint(fold)
    blocks = [pannuke._range_digest(arrays, s, e) for s, e in [(0, 2), (2, 4), (4, 5)]]
    assert len(blocks) == 3 and len(set(blocks)) == 3
    assert combine_fold_fingerprint(fold, blocks) == fp
    assert combine_fold_fingerprint(fold, blocks[::-1]) != fp  # the order is part of it
    with pytest.raises(ValueError, match="2 block digests for 3 blocks"):
        combine_fold_fingerprint(fold, blocks[:2])
    assert fold_fingerprint(fold, overlap="lowest") != fp
    # an edit in the npy header region, after the data, in the middle of a block, in types.npy
    for path, edit in ((fold.masks, "tail"), (fold.images, "middle"), (fold.types, "types")):
        original = path.read_bytes()
        if edit == "tail":
            path.write_bytes(original + b"\0")
        elif edit == "middle":
            data = bytearray(original)
            data[len(data) // 2] ^= 1
            path.write_bytes(bytes(data))
        else:
            np.save(path, np.array(["Colon"] * 4 + ["Skin"], dtype="<U13"))
        assert fold_fingerprint(fold) != fp, edit
        path.write_bytes(original)
    assert fold_fingerprint(fold) == fp


@pytest.mark.parametrize("jobs", [1, 2])
def test_ingest_records_v3_from_the_workers_blocks(tmp_path, monkeypatch, jobs):
    monkeypatch.setattr(pannuke, "PART_TILES", 2)  # 5 tiles: three parts, hashed in the workers
    folder = _fold(tmp_path, 5)
    with Store.create(tmp_path / "store") as s:
        ingest_pannuke(s, folder, progress=False, jobs=jobs)
    assert _units(tmp_path / "store") == {"pannuke-fold1": fold_fingerprint(discover_pannuke(folder)[0])}


_PLAN_UNITS = pannuke.plan_units


def _v2_plan_units(path, **kw):
    """plan_units as before v3: a v2 (sha256) fingerprint computed on its own."""
    plans = []
    for p, fold in zip(_PLAN_UNITS(path, **kw), discover_pannuke(path)):
        rule = p.settings["pannuke_overlap"]
        plans.append(dataclasses.replace(p, fingerprint_fn=partial(fold_fingerprint_v2, fold, overlap=rule),
                                         fingerprint_from_blocks=None, legacy_fingerprint_fn=None))
    return plans


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_v2_store_recognises_unchanged_files_and_moves_to_v3_on_overwrite(tmp_path, monkeypatch, jobs):
    monkeypatch.setattr(pannuke, "PART_TILES", 2)
    folder = _fold(tmp_path / "src", 5)
    (fold,) = discover_pannuke(folder)
    store = tmp_path / "store"
    with monkeypatch.context() as m:  # a store written by the v2 code path
        m.setattr(pannuke, "plan_units", _v2_plan_units)
        with Store.create(store) as s:
            ingest_pannuke(s, folder, progress=False, jobs=jobs)
    v2 = fold_fingerprint_v2(fold)
    assert _units(store) == {"pannuke-fold1": v2} and len(v2) == 64
    calls = []
    monkeypatch.setattr(pannuke, "fold_fingerprint_v2", lambda *a, **k: calls.append(1) or v2)
    with Store.open(store, mode="a") as s:
        ids = sorted(s.nuclei()["nucleus_id"])
        (u,) = ingest_pannuke(s, folder, progress=False, jobs=jobs).units
    assert u.status == "unchanged" and calls == [1] and _units(store) == {"pannuke-fold1": v2}
    monkeypatch.undo()
    monkeypatch.setattr(pannuke, "PART_TILES", 2)
    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "src", edited)
    arr = np.load(edited / "Fold 1/images/fold1/images.npy", mmap_mode="r+")
    arr[3, 100, 100, 0] = 255 - arr[3, 100, 100, 0]
    arr.flush()
    del arr
    with Store.open(store, mode="a") as s:
        with pytest.raises(StateError, match="use --overwrite"):
            ingest_pannuke(s, edited / "Fold 1", progress=False, jobs=jobs)
        (u,) = ingest_pannuke(s, edited / "Fold 1", progress=False, jobs=jobs, overwrite=True).units
        assert u.status == "replaced" and sorted(s.nuclei()["nucleus_id"]) == ids
    v3 = fold_fingerprint(discover_pannuke(edited / "Fold 1")[0])
    assert _units(store) == {"pannuke-fold1": v3}
    with Store.open(store, mode="a") as s:  # from now on compared in v3
        (u,) = ingest_pannuke(s, edited / "Fold 1", progress=False, jobs=jobs).units
        assert u.status == "unchanged"
        with pytest.raises(StateError, match="use --overwrite"):
            ingest_pannuke(s, folder, progress=False, jobs=jobs)

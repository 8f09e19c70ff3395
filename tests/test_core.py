"""cellcurate.core: atomic writes (fsync, unique temps, nothing left on failure), safe weights,
the one encoder registry, constants, and that the writers of other layers go through it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellcurate.core import atomic
from cellcurate.core.atomic import atomic_path, atomic_write_json, atomic_write_text, remove_tree, replace_dir
from cellcurate.core.constants import IGNORE_VALUE, ignore_value, n_classes
from cellcurate.errors import ModelError


@pytest.fixture()
def synced(monkeypatch):
    """Record every path fsynced through core.atomic (files and folders)."""
    files: list[str] = []
    dirs: list[str] = []
    real_file, real_dir = atomic.fsync_file, atomic.fsync_dir
    monkeypatch.setattr(atomic, "fsync_file", lambda p: (files.append(str(p)), real_file(p))[1])
    monkeypatch.setattr(atomic, "fsync_dir", lambda p: (dirs.append(str(p)), real_dir(p))[1])
    return files, dirs


def test_atomic_write_fsyncs_file_and_folder_and_uses_a_fresh_temp(tmp_path, synced):
    files, dirs = synced
    atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert len(files) == 2 and files[0] != files[1] and all(Path(f).name.startswith(".a.txt.") for f in files)
    assert dirs == [str(tmp_path)] * 2
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_path_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    atomic_write_json(tmp_path / "c.json", {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "c.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert (tmp_path / "c.json").read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_replace_dir_fsyncs_every_file_and_the_parent(tmp_path, synced):
    files, dirs = synced
    tmp = tmp_path / ".tmp-x"
    (tmp / "sub").mkdir(parents=True)
    (tmp / "a").write_text("a")
    (tmp / "sub" / "b").write_text("b")
    replace_dir(tmp, tmp_path / "x")
    assert sorted(Path(f).name for f in files) == ["a", "b"]
    assert str(tmp_path) in dirs and (tmp_path / "x" / "sub" / "b").read_text() == "b"


def test_remove_tree_never_raises(tmp_path):
    remove_tree(tmp_path / "absent")
    (tmp_path / "f").write_text("x")
    remove_tree(tmp_path / "f")
    assert not (tmp_path / "f").exists()


def test_constants():
    class T:
        classes = list(range(7))
        ignore = 250

    assert IGNORE_VALUE == 255 and n_classes(T()) == 7 and ignore_value(T()) == 250
    from cellcurate.datasets.taxonomy import Taxonomy

    tax = Taxonomy.default()
    assert n_classes(tax) == 7 and ignore_value(tax) == IGNORE_VALUE


def test_ignore_value_is_defined_once():
    """Issue 10: 255 was defined in four places."""
    from cellcurate.datasets import synthetic
    from cellcurate.datasets.taxonomy import Taxonomy

    # releases take the store taxonomy's ignore value, whose default is the core constant
    assert Taxonomy.default().ignore == IGNORE_VALUE and synthetic.IGNORE_CLASS == IGNORE_VALUE


# -- weights -------------------------------------------------------------------------------------
def test_read_state_dict_refuses_pickles_and_junk(tmp_path):
    import torch

    from cellcurate.core.weights import read_state_dict, safe_torch_load

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match=r"evil\.pt: cannot read weights safely"):
        read_state_dict(tmp_path / "evil.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"nope")
    with pytest.raises(ModelError, match=r"junk\.safetensors: cannot read weights safely"):
        read_state_dict(tmp_path / "junk.safetensors")
    torch.save({"model": {"module.a": torch.ones(2)}}, tmp_path / "wrapped.pt")
    assert list(read_state_dict(tmp_path / "wrapped.pt")) == ["a"]
    with pytest.raises(ModelError, match="optimizer state file not found"):
        safe_torch_load(tmp_path / "none.pt", what="optimizer state")


# -- the writers of other layers go through core (fsync) ---------------------------------------------
def test_checkpoint_files_are_fsynced(tmp_path, synced):
    from cellcurate.models.checkpoint import save_checkpoint
    from cellcurate.models.student import Student

    files, _ = synced
    save_checkpoint(tmp_path / "ck", Student(channels=(8, 16, 32, 64, 64)), config={"seed": 0}, epoch=1,
                    metrics={})
    names = sorted(Path(f).name.split(".")[1] for f in files)
    assert names == ["config", "model"]


def test_predict_outputs_are_fsynced(tmp_path, synced):
    from cellcurate.models.predict import Prediction, save_prediction

    files, _ = synced
    inst = np.zeros((8, 8), np.int32)
    inst[2:5, 2:5] = 1
    pred = Prediction(inst, pd.DataFrame({"instance_id": [1], "class_id": [1]}), ["A"], ["#ff0000"])
    save_prediction(pred, tmp_path, "x")
    assert sorted(Path(f).name.split(".")[1] for f in files) == ["x_instances", "x_nuclei"]


def test_feature_cache_is_fsynced(tmp_path, synced):
    from cellcurate.relabel.backbones import HandcraftedBackbone
    from cellcurate.relabel.features import save_cache
    from relabel_synth import build_store

    files, dirs = synced
    store = build_store(tmp_path / "s", tiles=1, patients=1)
    ids = store.nuclei(include_ignore=False)["nucleus_id"].to_numpy(np.int64)
    folder = save_cache(store, HandcraftedBackbone(), np.zeros((len(ids), 3), np.float32), ids)
    assert {"features.npy", "nucleus_ids.npy", "meta.json"} <= {Path(f).name for f in files}
    assert str(folder.parent) in dirs


def _union_ring(m: np.ndarray, off: tuple[int, int]) -> np.ndarray:
    """mask_to_polygon's ring the general way: the runs unioned by shapely."""
    from cellcurate.core.geometry import _union_geometry

    geom = _union_geometry(m, off)
    if geom.geom_type == "MultiPolygon":
        geom = max(geom.geoms, key=lambda g: g.area)
    ring = np.asarray(geom.exterior.coords)[:-1]
    ring = np.roll(ring, -int(np.lexsort((ring[:, 0], ring[:, 1]))[0]), axis=0)
    return np.vstack([ring, ring[:1]])


def test_row_convex_rings_equal_the_union():
    import shapely
    from skimage.draw import ellipse

    from cellcurate.core.geometry import _row_convex_ring, _union_geometry, mask_to_geometry, mask_to_polygon

    # by hand: an L of 3 rows, (x, y) pixel edges from the top-left corner, positive shoelace area
    # (4 px: 0 + 2 - 2 + 2 + 6 + 0 = 8 = twice the area), so along the top edge first (y points down)
    m = np.array([[1, 0], [1, 0], [1, 1]], bool)
    assert _row_convex_ring(m, (0, 0)).tolist() == [[0, 0], [1, 0], [1, 2], [2, 2], [2, 3], [0, 3], [0, 0]]
    assert mask_to_polygon(m, offset=(5, 7)).tolist() == [[7, 5], [8, 5], [8, 7], [9, 7], [9, 8], [7, 8], [7, 5]]
    # masks it must leave to the union: two runs in a row, a gap between rows, rows meeting at a corner
    for bad in ([[1, 0, 1]], [[1], [0], [1]], [[1, 0], [0, 1]]):
        assert _row_convex_ring(np.array(bad, bool), (0, 0)) is None
    rng = np.random.default_rng(0)
    fast = 0
    for t in range(600):
        if t % 2:
            m = np.zeros((30, 30), bool)
            rr, cc = ellipse(15, 15, rng.uniform(1, 12), rng.uniform(1, 12), shape=m.shape, rotation=rng.uniform(0, 3))
            m[rr, cc] = True
        else:
            m = rng.random((5, 5)) < 0.8
        if not m.any():
            continue
        off = (int(rng.integers(0, 50)), int(rng.integers(0, 50)))
        ring = _row_convex_ring(m, off)
        if ring is not None:
            fast += 1
            assert np.array_equal(ring, _union_ring(m, off))
        assert np.array_equal(mask_to_polygon(m, offset=off), _union_ring(m, off))
        # mask_to_geometry: the same polygon either way (holes and components included), valid,
        # exterior counter-clockwise (positive shoelace area in (x, y))
        geom, union = mask_to_geometry(m, offset=off), _union_geometry(m, off)
        assert geom.geom_type == union.geom_type and geom.is_valid and geom.equals(union)
        assert geom.area == m.sum() and geom.bounds == union.bounds
        if geom.geom_type == "Polygon":
            assert shapely.is_ccw(geom.exterior) == shapely.is_ccw(union.exterior)
            a, b = (np.asarray(g.exterior.coords)[:-1] for g in (geom, union))
            assert np.array_equal(a[np.lexsort(a.T)], b[np.lexsort(b.T)])  # the same vertices
    assert fast >= 300

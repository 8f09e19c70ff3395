"""Lizard (.mat with inst_map/id/class) and CoNIC (images.npy + labels.npy) readers, on small
files written in the real formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from store_readback import arrays, assert_pixels_equal_source, snapshot, tables

from cellcurate.datasets.ingest import ingest_source
from cellcurate.datasets.store import Store
from cellcurate.errors import InputFormatError

NAMES = {1: "Neutrophil", 2: "Epithelial", 3: "Lymphocyte", 4: "Plasma", 5: "Eosinophil", 6: "Connective"}


def _lizard(root: Path, *, truncate: bool = False) -> dict[str, np.ndarray]:
    import scipy.io
    from PIL import Image

    (root / "Lizard_Images1").mkdir(parents=True)
    (root / "Lizard_Labels" / "Labels").mkdir(parents=True)
    maps = {}
    for j, name in enumerate(("consep_1", "crag_2")):
        inst = np.zeros((12, 14), np.int32)
        inst[1:4, 1:4] = 3 + j  # 9 px
        inst[6:9, 8:13] = 10  # 15 px
        inst[10:12, 0:2] = 7  # 4 px
        maps[name] = inst
        Image.fromarray(np.full((12, 14, 3), 40 + j, np.uint8)).save(root / "Lizard_Images1" / f"{name}.png")
        ids = np.array([[3 + j], [7], [10]])
        classes = np.array([[2], [6], [4 if j else 1]])
        scipy.io.savemat(root / "Lizard_Labels" / "Labels" / f"{name}.mat",
                         {"inst_map": inst.astype(np.float64), "id": ids, "class": classes,
                          "bbox": np.zeros((3, 4)), "centroid": np.zeros((3, 2))})
    (root / "Lizard_Labels" / "info.csv").write_text("Filename,Source,Split\nconsep_1,consep,3\ncrag_2,crag,1\n")
    if truncate:
        mat = root / "Lizard_Labels" / "Labels" / "crag_2.mat"
        mat.write_bytes(mat.read_bytes()[:200])
    return maps


def test_lizard_counts_pixels_splits(tmp_path):
    maps = _lizard(tmp_path / "lizard")
    with Store.create(tmp_path / "store") as store:
        ingest_source(store, "lizard", tmp_path / "lizard", progress=False)
    images, nuclei = tables(tmp_path / "store")
    assert dict(zip(images["image_id"], images["split"])) == {"lizard/consep_1": "fold3", "lizard/crag_2": "fold1"}
    assert set(images["mpp"]) == {0.5}
    assert nuclei["source_label"].value_counts().to_dict() == {"Epithelial": 2, "Connective": 2, "Neutrophil": 1,
                                                               "Plasma": 1}
    for _, row in images.iterrows():
        nuc = nuclei[nuclei["image_id"] == row["image_id"]]
        _, ins = arrays(tmp_path / "store", row)
        assert_pixels_equal_source(ins, nuc, maps[row["image_id"].split("/")[1]])
        assert sorted(nuc["area"]) == [4, 9, 15]


def test_lizard_release_split_mapping_is_keyed_by_source():
    import pandas as pd

    from cellcurate.curation.splits import assign_splits

    images = pd.DataFrame({"image_id": ["lizard/a", "lizard/b", "pannuke/fold1/00000"],
                           "source": ["lizard", "lizard", "pannuke"], "split": ["fold3", "fold1", "fold1"],
                           "patient_id": [None, None, None]})
    out = assign_splits(images, val_fraction=0.0)
    assert out["split"].tolist() == ["test", "train", "fold1"]  # Lizard's fold1 never joins PanNuke's


def test_truncated_lizard_mat_is_refused(tmp_path):
    _lizard(tmp_path / "lizard", truncate=True)
    with Store.create(tmp_path / "store") as store:
        before = snapshot(tmp_path / "store")
        with pytest.raises(InputFormatError, match="crag_2.mat: not a readable .mat file"):
            ingest_source(store, "lizard", tmp_path / "lizard", progress=False)
    assert snapshot(tmp_path / "store") == before


def _conic(root: Path) -> tuple[np.ndarray, np.ndarray]:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    labels = np.zeros((3, 256, 256, 2), np.uint16)
    labels[0, 10:20, 10:20, 0] = 4
    labels[0, 10:20, 10:20, 1] = 3
    labels[0, 10:12, 10:20, 1] = 6  # 20 disagreeing pixels: the majority (Lymphocyte) wins
    labels[0, 100:103, 50:60, 0] = 9
    labels[0, 100:103, 50:60, 1] = 5
    labels[2, 0:5, 0:5, 0] = 1
    labels[2, 0:5, 0:5, 1] = 2
    np.save(root / "images.npy", images)
    np.save(root / "labels.npy", labels)
    (root / "patch_info.csv").write_text("patch_info\nconsep_1-0000\nconsep_1-0001\ncrag_2-0000\n")
    return images, labels


def test_conic_counts_pixels_classes(tmp_path):
    images, labels = _conic(tmp_path / "conic")
    with Store.create(tmp_path / "store") as store:
        result = ingest_source(store, "lizard", tmp_path / "conic", progress=False)
    assert result.report.counts["class_map_disagreement_pixels"] == 20
    imgs, nuclei = tables(tmp_path / "store")
    assert imgs["image_id"].tolist() == ["lizard/consep_1/0000", "lizard/consep_1/0001", "lizard/crag_2/0000"]
    assert nuclei["source_label"].tolist() == ["Lymphocyte", "Eosinophil", "Epithelial"]
    for i, (_, row) in enumerate(imgs.iterrows()):
        img, ins = arrays(tmp_path / "store", row)
        np.testing.assert_array_equal(img, images[i])
        assert_pixels_equal_source(ins, nuclei[nuclei["image_id"] == row["image_id"]], labels[i, ..., 0].astype(np.int64))


def test_conic_size_mismatch_is_refused(tmp_path):
    _, labels = _conic(tmp_path / "conic")
    np.save(tmp_path / "conic" / "labels.npy", labels[:, :128])
    with Store.create(tmp_path / "store") as store, pytest.raises(InputFormatError, match="labels.npy: labels are"):
        ingest_source(store, "lizard", tmp_path / "conic", progress=False)

"""CPM-15 reader on the two real images (ASCII instance labels), and CPM-17's .mat layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from store_readback import arrays, assert_pixels_equal_source, snapshot, tables

from cellcurate.datasets.ingest import ingest_source
from cellcurate.datasets.store import Store
from cellcurate.errors import InputFormatError


def _mask(path: Path) -> np.ndarray:
    lines = path.read_text().split("\n")
    w, h = map(int, lines[0].split())
    return np.array([int(v) for v in lines[1:] if v.strip()], dtype=np.int64).reshape(h, w)


@pytest.fixture(scope="module")
def cpm_store(fixtures_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cpm") / "store"
    with Store.create(path) as store:
        ingest_source(store, "cpm", fixtures_dir / "real" / "cpm15", progress=False)
    return path


@pytest.mark.slow
def test_counts_pixels_and_pixel_size(cpm_store, fixtures_dir):
    from PIL import Image

    root = fixtures_dir / "real" / "cpm15"
    images, nuclei = tables(cpm_store)
    assert dict(zip(images["image_id"], images["mpp"])) == {"cpm/image01": 0.5, "cpm/image08": 0.25}  # 20x, 40x
    for _, row in images.iterrows():
        stem = row["image_id"].split("/")[1]
        source = _mask(root / f"{stem}_mask.txt")
        ids = np.unique(source[source > 0])
        assert np.array_equal(ids, np.arange(1, ids.size + 1))  # CPM-15 ids run 1..N
        nuc = nuclei[nuclei["image_id"] == row["image_id"]]
        assert len(nuc) == ids.size == row["n_nuclei"]
        image, ins = arrays(cpm_store, row)
        assert_pixels_equal_source(ins, nuc, source)
        np.testing.assert_array_equal(image, np.asarray(Image.open(root / f"{stem}.png"))[..., :3])
    assert len(nuclei) == 602 and set(nuclei["source_label"]) == {"unknown nucleus"}


def test_truncated_ascii_mask_is_refused(tmp_path, cpm_store):
    import shutil

    from PIL import Image

    (tmp_path / "cpm").mkdir()
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "cpm" / "image01.png")
    (tmp_path / "cpm" / "image01_mask.txt").write_text("5 4\n" + "0\n" * 19)
    path = tmp_path / "store"
    shutil.copytree(cpm_store, path)
    before = snapshot(path)
    with Store.open(path, mode="a") as store, pytest.raises(InputFormatError, match="holds 19 pixel labels, expected 5 x 4"):
        ingest_source(store, "cpm", tmp_path / "cpm", progress=False)
    assert snapshot(path) == before


def test_cpm17_layout(tmp_path):
    import scipy.io
    from PIL import Image

    inst = np.zeros((8, 9), np.int32)
    inst[1:3, 1:4] = 5
    inst[5:8, 6:9] = 2
    for split in ("train", "test"):
        (tmp_path / "cpm17" / split / "Images").mkdir(parents=True)
        (tmp_path / "cpm17" / split / "Labels").mkdir(parents=True)
        Image.fromarray(np.full((8, 9, 3), 7, np.uint8)).save(tmp_path / "cpm17" / split / "Images" / "image_00.png")
        scipy.io.savemat(tmp_path / "cpm17" / split / "Labels" / "image_00.mat", {"inst_map": inst})
    with Store.create(tmp_path / "store") as store:
        result = ingest_source(store, "cpm", tmp_path / "cpm17", progress=False)
    assert sorted(u.unit for u in result.units) == ["cpm-test", "cpm-train"]
    images, nuclei = tables(tmp_path / "store")
    assert sorted(images["image_id"]) == ["cpm/test/image_00", "cpm/train/image_00"]
    row = images[images["image_id"] == "cpm/train/image_00"].iloc[0]
    _, ins = arrays(tmp_path / "store", row)
    assert_pixels_equal_source(ins, nuclei[nuclei["image_id"] == row["image_id"]], inst)


def test_cpm17_and_consep_release_folders_are_told_apart(tmp_path):
    """Both are train|test/Images + Labels/*.mat; the .mat keys decide (CoNSeP has inst_type)."""
    import scipy.io
    from PIL import Image

    from cellcurate.datasets.sources import detect_source

    for name, data in (("cpm17", {"inst_map": np.ones((4, 4))}),
                       ("consep", {"inst_map": np.ones((4, 4)), "inst_type": np.ones((1, 1))})):
        for split in ("train", "test"):
            (tmp_path / name / split / "Images").mkdir(parents=True)
            (tmp_path / name / split / "Labels").mkdir(parents=True)
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name / split / "Images" / "a.png")
            scipy.io.savemat(tmp_path / name / split / "Labels" / "a.mat", data)
    assert detect_source(tmp_path / "cpm17") == "cpm"
    assert detect_source(tmp_path / "consep") == "consep"

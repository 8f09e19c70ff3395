"""MoNuSeg reader on the two real training images: polygons, overlap rule, pixel size."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from store_readback import arrays, snapshot, tables

from cellcurate.datasets.ingest import ingest_source
from cellcurate.datasets.store import Store
from cellcurate.errors import InputFormatError

STEMS = ("TCGA-21-5784-01Z-00-DX1", "TCGA-A7-A13E-01Z-00-DX1")


@pytest.fixture(scope="module")
def monuseg_root(fixtures_dir) -> Path:
    return fixtures_dir / "real" / "monuseg" / "MoNuSegTrainingData"


@pytest.fixture(scope="module")
def monuseg_store(monuseg_root, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("monuseg") / "store"
    with Store.create(path) as store:
        ingest_source(store, "monuseg", monuseg_root.parent, progress=False)  # finds MoNuSegTrainingData
    return path


def _regions(xml: Path) -> tuple[float, list[tuple[str, np.ndarray]]]:
    root = ET.parse(xml).getroot()
    regs = [(r.get("Id"), np.array([(float(v.get("X")), float(v.get("Y"))) for v in r.iter("Vertex")]))
            for r in root.iter("Region")]
    return float(root.get("MicronsPerPixel")), regs


def _expected_map(regs: list[tuple[str, np.ndarray]], shape: tuple[int, int]) -> np.ndarray:
    """Independent raster: skimage polygons painted largest first (later first on ties), so the
    smaller polygon wins every overlap; value = 1-based document index."""
    from skimage.draw import polygon

    def area(v: np.ndarray) -> float:
        x, y = v[:, 0], v[:, 1]
        return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))

    out = np.zeros(shape, np.int64)
    for k in sorted(range(len(regs)), key=lambda k: (-area(regs[k][1]), -k)):
        v = regs[k][1]
        rr, cc = polygon(v[:, 1], v[:, 0], shape=shape)
        out[rr, cc] = k + 1
    return out


@pytest.mark.slow
def test_counts_pixel_size_and_labels(monuseg_store, monuseg_root):
    images, nuclei = tables(monuseg_store)
    assert sorted(images["image_id"]) == [f"monuseg/{s}" for s in STEMS]
    for stem in STEMS:
        mpp, regs = _regions(monuseg_root / "Annotations" / f"{stem}.xml")
        row = images[images["image_id"] == f"monuseg/{stem}"].iloc[0]
        assert row["mpp"] == mpp and row["patient_id"] == stem[:12] and row["split"] == "train"
        assert (nuclei["image_id"] == row["image_id"]).sum() == len(regs)
    assert [len(_regions(monuseg_root / "Annotations" / f"{s}.xml")[1]) for s in STEMS] == [398, 314]
    assert set(nuclei["source_label"]) == {"unknown nucleus"}
    assert set(nuclei["candidates"]) == {"1|2|3|4|5|6|7"} and set(nuclei["unified_label"]) == {0}


@pytest.mark.slow
def test_every_instance_has_its_polygon_pixels_smaller_wins(monuseg_store, monuseg_root):
    import tifffile

    images, nuclei = tables(monuseg_store)
    for stem in STEMS:
        row = images[images["image_id"] == f"monuseg/{stem}"].iloc[0]
        image, ins = arrays(monuseg_store, row)
        np.testing.assert_array_equal(image, tifffile.imread(monuseg_root / "Tissue_Images" / f"{stem}.tif"))
        _, regs = _regions(monuseg_root / "Annotations" / f"{stem}.xml")
        expect = _expected_map(regs, ins.shape)
        nuc = nuclei[nuclei["image_id"] == row["image_id"]]
        doc_index = {rid: k + 1 for k, (rid, _) in enumerate(regs)}
        lut = np.zeros(int(ins.max()) + 1, np.int64)
        lut[nuc["instance_id"].to_numpy()] = [doc_index[r] for r in nuc["origin_region"]]
        np.testing.assert_array_equal(lut[ins], expect)


def test_polygon_outside_the_image_is_refused_and_the_store_unchanged(monuseg_store, monuseg_root, tmp_path):
    bad = tmp_path / "MoNuSegTrainingData"
    shutil.copytree(monuseg_root, bad)
    xml = bad / "Annotations" / f"{STEMS[0]}.xml"
    text = xml.read_text()
    start = text.index("<Vertices>")
    end = text.index("</Vertices>", start)
    block = text[start:end]
    moved = "".join(f'<Vertex X="{5000 + i}" Y="{5000 + i % 2}" Z="0"/>' for i in range(4))
    xml.write_text(text[:start] + "<Vertices>" + moved + text[end:])
    assert block != moved
    path = tmp_path / "store"
    shutil.copytree(monuseg_store, path)
    before = snapshot(path)
    with Store.open(path, mode="a") as store, pytest.raises(InputFormatError) as err:
        ingest_source(store, "monuseg", bad, overwrite=True, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and str(xml) in msg and "entirely outside the 1000x1000 image" in msg
    assert snapshot(path) == before

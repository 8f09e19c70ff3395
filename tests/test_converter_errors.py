"""Converter errors name the file and the object: the MoNuSAC XML and its Region Id, the PanNuke
masks.npy and its tile index (and pixel)."""

from __future__ import annotations

import numpy as np
import pytest
from test_monusac import make_case, make_xml, square
from test_pannuke import blank, draw, write_fold

from cellcurate.datasets.ingest import ingest_monusac, ingest_pannuke
from cellcurate.datasets.monusac import parse_annotation_xml
from cellcurate.datasets.store import Store
from cellcurate.errors import InputFormatError


def _duplicate_region_xml() -> str:
    text = make_xml([("Epithelial", [square(2, 2, 10, 10), square(20, 20, 30, 30), square(12, 2, 18, 8)])])
    return text.replace('<Region Id="3"', '<Region Id="2"')  # two Regions with Id 2 in Annotation 1


def test_monusac_duplicate_region_id_names_the_xml_and_the_region(tmp_path):
    release = make_case(tmp_path, _duplicate_region_xml())
    xml = next(release.rglob("*.xml"))
    with pytest.raises(InputFormatError) as err:
        parse_annotation_xml(xml)
    msg = str(err.value)
    assert msg.startswith(f"{xml}: ")
    assert "Annotation Id=1: two Regions have Id=2 (region 2 and region 3 of the file)" in msg


def test_monusac_duplicate_region_id_at_ingest_leaves_the_store_unchanged(tmp_path):
    release = make_case(tmp_path / "src", _duplicate_region_xml())
    with Store.create(tmp_path / "store") as store:
        with pytest.raises(InputFormatError, match=r"\.xml: Annotation Id=1: two Regions have Id=2"):
            ingest_monusac(store, release, progress=False)
        assert store.units().empty and store.ledger.count() == 0
        assert [p.name for p in (tmp_path / "store" / "units").iterdir()] == []


def test_monusac_same_region_id_in_two_annotations_is_fine(tmp_path):
    """Region Ids restart in every Annotation block: the same Id in two blocks is two nuclei."""
    xml = make_xml([("Epithelial", [square(2, 2, 10, 10)]), ("Lymphocyte", [square(20, 20, 30, 30)])])
    release = make_case(tmp_path, xml)
    ann = parse_annotation_xml(next(release.rglob("*.xml")))
    assert [(r.annotation_id, r.region_id) for r in ann.regions] == [("1", "1"), ("2", "1")]


def test_monusac_repeated_annotation_id_with_the_same_region_id(tmp_path):
    xml = make_xml([("Epithelial", [square(2, 2, 10, 10)]), ("Lymphocyte", [square(20, 20, 30, 30)])])
    xml = xml.replace('<Annotation Id="2"', '<Annotation Id="1"')
    release = make_case(tmp_path, xml)
    with pytest.raises(InputFormatError, match=r"Annotation Id=1: two Regions have Id=1"):
        parse_annotation_xml(next(release.rglob("*.xml")))


@pytest.mark.parametrize(("value", "shown"), [
    (2.0**60, "1.152921504606847e+18"),
    (2.5, "2.5"),
    (-3.0, "-3.0"),
    (np.nan, "nan"),
])
def test_pannuke_bad_mask_id_names_the_tile_channel_and_pixel(tmp_path, value, shown):
    images, masks = blank(3)
    draw(masks, 0, 0, 1.0, slice(2, 8), slice(2, 8))
    draw(masks, 2, 1, 5.0, slice(10, 20), slice(10, 20))
    masks[2, 12, 17, 3] = value
    fold = write_fold(tmp_path / "src", 1, images, masks)
    with Store.create(tmp_path / "store") as store:
        with pytest.raises(InputFormatError) as err:
            ingest_pannuke(store, fold, progress=False)
        assert store.units().empty
    msg = str(err.value)
    assert msg.startswith(str(fold / "masks" / "fold1" / "masks.npy"))
    assert "masks.npy tile 2 holds mask ids that are not integers >= 0 in channels 0-4" in msg
    assert f"channel 3, pixel (y=12, x=17) has {shown}" in msg

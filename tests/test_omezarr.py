"""OME-Zarr copies of releases: NGFF 0.5 (Zarr v3) and 0.4 (Zarr v2) metadata and label images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cellcurate.datasets.taxonomy import Taxonomy
from cellcurate.errors import ConfigError


def _arrays():
    img = np.zeros((6, 9, 3), np.uint8)
    img[..., 1] = 200
    ins = np.zeros((6, 9), np.int32)
    ins[1:3, 1:4] = 1
    ins[4:6, 5:9] = 2
    cls = np.where(ins == 1, 2, np.where(ins == 2, 255, 0)).astype(np.uint8)
    return img, ins, cls


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_write_ome_image_metadata_and_data(tmp_path, version):
    import zarr

    from cellcurate.curation.omezarr import read_ome_metadata, write_ome_image

    tax = Taxonomy.default()
    img, ins, cls = _arrays()
    path = write_ome_image(tmp_path / "a.ome.zarr", img, ins, cls, mpp=0.25, taxonomy=tax, name="x", version=version)
    if version == "0.5":
        meta = json.loads((path / "zarr.json").read_text())
        assert meta["zarr_format"] == 3 and meta["attributes"]["ome"]["version"] == "0.5"
        assert "version" not in meta["attributes"]["ome"]["multiscales"][0]  # 0.5: version at the "ome" level
        arr_meta = json.loads((path / "0" / "zarr.json").read_text())
        assert arr_meta["dimension_names"] == ["c", "y", "x"]
    else:
        attrs = json.loads((path / ".zattrs").read_text())
        assert attrs["multiscales"][0]["version"] == "0.4" and (path / ".zgroup").is_file()
    m = read_ome_metadata(path)
    assert m["version"] == version
    ms = m["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"]
    assert ms["axes"][0]["type"] == "channel" and ms["axes"][1] == {"name": "y", "type": "space", "unit": "micrometer"}
    assert ms["datasets"] == [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.25, 0.25]}]}]
    assert m["labels"] == ["instances", "classes"]
    il = m["image-label"]["classes"]
    assert il["source"] == {"image": "../../"}
    assert {c["label-value"]: c["rgba"] for c in il["colors"]}[2] == [*tax.classes[1].rgb, 255]
    assert {p["label-value"]: p["class"] for p in il["properties"]}[255] == "ignore"
    assert [a["name"] for a in m["label-multiscales"]["classes"][0]["axes"]] == ["y", "x"]
    root = zarr.open_group(str(path), mode="r")
    assert np.array_equal(root["0"][:], img.transpose(2, 0, 1))
    assert np.array_equal(root["labels/instances/0"][:], ins) and root["labels/instances/0"].dtype == np.int32
    assert np.array_equal(root["labels/classes/0"][:], cls) and root["labels/classes/0"].dtype == np.uint8


def test_bad_version_and_shapes(tmp_path):
    from cellcurate.curation.omezarr import write_ome_image

    img, ins, cls = _arrays()
    with pytest.raises(ConfigError, match="OME-NGFF version"):
        write_ome_image(tmp_path / "a", img, ins, cls, mpp=0.25, taxonomy=Taxonomy.default(), version="0.3")
    with pytest.raises(ConfigError, match="do not agree"):
        write_ome_image(tmp_path / "b", img, ins[:3], cls, mpp=0.25, taxonomy=Taxonomy.default())


def test_release_with_ome_zarr_is_hashed_and_verifies(tmp_path):
    from cellcurate.curation.omezarr import read_ome_metadata
    from cellcurate.curation.release import export_release, verify_release
    from test_release_export import build_test_store

    store = build_test_store(tmp_path / "store")
    res = export_release(store, "v1", out=tmp_path / "rel", ome_zarr="0.5", progress=False)
    store.close()
    ome = sorted((res.path / "ome").glob("*.ome.zarr"))
    assert len(ome) == 7
    assert any(k.startswith("ome/") for k in res.manifest["files"])
    assert verify_release(res.path) == []
    mo = next(p for p in ome if p.name.startswith("monusac__"))
    assert read_ome_metadata(mo)["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"][1] == 0.2505

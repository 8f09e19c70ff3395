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


# -- independent readers (ome-zarr-models, ome-zarr-py, napari-ome-zarr) ------------------------------
def _write(tmp_path, version):
    from cellcurate.curation.omezarr import write_ome_image

    img, ins, cls = _arrays()
    img[..., 0] = np.arange(9, dtype=np.uint8)[None, :]  # not constant: a mis-keyed chunk would show
    path = write_ome_image(tmp_path / f"a{version}.ome.zarr", img, ins, cls, mpp=0.25,
                           taxonomy=Taxonomy.default(), name="x", version=version)
    return path, img, ins, cls


def _ome_zarr_models(version):
    """The ome-zarr-models classes of ``version`` (its v0.4 models need a rebuild under pydantic
    2.13+, which ome-zarr-models 1.6 does not do itself)."""
    pytest.importorskip("ome_zarr_models")
    if version == "0.4":
        from pydantic_zarr.v2 import ArraySpec, GroupSpec, TBaseItem

        from ome_zarr_models.v04 import image, image_label, labels

        ns = {"GroupSpec": GroupSpec, "ArraySpec": ArraySpec, "TBaseItem": TBaseItem}
        for m in (labels.Labels, image_label.ImageLabel, image.Image):
            m.model_rebuild(_types_namespace=ns)
        return image.Image, image_label.ImageLabel
    from ome_zarr_models.v05 import image, image_label

    return image.Image, image_label.ImageLabel


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_chunk_keys_are_slash_nested(tmp_path, version):
    """NGFF >= 0.2 requires '/' chunk keys; with '.' keys the zarr-2 ome-zarr stack reads zeros."""
    path, *_ = _write(tmp_path, version)
    if version == "0.4":
        zarray = json.loads((path / "0" / ".zarray").read_text())
        assert zarray["dimension_separator"] == "/"
        assert json.loads((path / "labels" / "classes" / "0" / ".zarray").read_text())["dimension_separator"] == "/"
        assert (path / "0" / "0" / "0" / "0").is_file() and not (path / "0" / "0.0.0").exists()
        assert (path / "labels" / "classes" / "0" / "0" / "0").is_file()
    else:
        meta = json.loads((path / "0" / "zarr.json").read_text())
        assert meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
        assert (path / "0" / "c" / "0" / "0" / "0").is_file()


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_ome_zarr_models_validates_image_and_label_images(tmp_path, version):
    import zarr

    Image, ImageLabel = _ome_zarr_models(version)
    path, *_ = _write(tmp_path, version)
    root = zarr.open_group(str(path), mode="r")
    if version == "0.4":
        ms = Image.from_zarr(root).ome_attributes.multiscales[0]  # the image, its labels group and both labels
    else:
        # ome-zarr-models 1.6's v0.5 Image also validates every label image and fails with a
        # TypeError on a label image without the optional "colors" (our instances): validate the
        # image's attributes and each label image's multiscales on their own
        from ome_zarr_models.v05.image import ImageAttrs

        ms = ImageAttrs.model_validate(dict(root.attrs)["ome"]).multiscales[0]
        for name in ("instances", "classes"):
            ImageAttrs.model_validate({k: v for k, v in dict(root[f"labels/{name}"].attrs)["ome"].items()
                                       if k != "image-label"})
    assert [a.name for a in ms.axes] == ["c", "y", "x"]
    assert list(ms.datasets[0].coordinateTransformations[0].scale) == [1.0, 0.25, 0.25]
    il = ImageLabel.from_zarr(root["labels/classes"]).ome_attributes.image_label
    assert [c.label_value for c in il.colors] == [0, 1, 2, 3, 4, 5, 6, 7, 255]
    props = {p.label_value: p.model_dump(by_alias=True)["class"] for p in il.properties}
    assert props[0] == "background" and props[2] == "Lymphocyte" and props[255] == "ignore"


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_ome_zarr_py_reads_the_right_pixels(tmp_path, version):
    pytest.importorskip("ome_zarr")
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    path, img, ins, cls = _write(tmp_path, version)
    nodes = list(Reader(parse_url(str(path)))())
    assert np.array_equal(np.asarray(nodes[0].data[0]), img.transpose(2, 0, 1))
    by_name = {str(n.metadata.get("name")): n for n in nodes[1:]}
    lab = next(n for k, n in by_name.items() if k.endswith("classes"))
    assert np.array_equal(np.asarray(lab.data[0]), cls)
    assert lab.metadata["properties"][2] == {"class": "Lymphocyte"}
    ins_node = next(n for k, n in by_name.items() if k.endswith("instances"))
    assert np.array_equal(np.asarray(ins_node.data[0]), ins)


@pytest.mark.parametrize("version", ["0.5", "0.4"])
def test_napari_hover_names_the_class_of_the_pixel(tmp_path, version):
    """napari-ome-zarr + a napari Labels layer: hovering a class-2 pixel says Lymphocyte, a class-0
    pixel background (before: properties had no label-0 entry and a class-1 pixel read as class 2
    in readers that map properties by position)."""
    pytest.importorskip("napari_ome_zarr")
    napari = pytest.importorskip("napari")
    from napari_ome_zarr._reader import napari_get_reader

    path, *_ = _write(tmp_path, version)
    layers = napari_get_reader(str(path))(str(path))
    data, meta, _kind = next(x for x in layers if x[2] == "labels" and str(x[1].get("name", "")).endswith("classes"))
    props = meta["properties"]
    # by position (older napari-ome-zarr) and by "index" (newer) the same class for every value
    assert props["class"][:3] == ["background", "Neoplastic", "Lymphocyte"]
    assert props["index"][: len(props["class"])] == [0, 1, 2, 3, 4, 5, 6, 7, 255]
    layer = napari.layers.Labels(np.asarray(data[0] if isinstance(data, list) else data), properties=props)
    assert layer.get_status((1, 1))["coordinates"].endswith("class: Lymphocyte") or \
        "Lymphocyte" in str(layer.get_status((1, 1)))
    assert "background" in str(layer.get_status((0, 0)))
    assert "ignore" in str(layer.get_status((4, 6)))

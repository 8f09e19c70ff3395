"""Tiled inference, prediction, evaluation, the report and the evaluate/predict commands.

An *oracle* model reads the ground truth back from the image (R = 30 × class, G/B = h/v maps),
so a perfect pipeline must score exactly 1; an *empty* model predicts nothing.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cellcurate.errors import ConfigError, InputFormatError, ModelError
from cellcurate.models.evaluate import evaluate_models, metrics_markdown, write_report
from cellcurate.models.export import export_torchscript
from cellcurate.models.predict import (
    infer_tiled,
    predict_image,
    read_image,
    save_prediction,
)
from cellcurate.models.targets import hover_targets

CLASSES = ["Background", "Neoplastic", "Lymphocyte", "Connective", "Dead", "Epithelial", "Macrophage", "Neutrophil"]


class Oracle(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.meta = {"kind": "oracle", "architecture": "oracle", "classes": CLASSES, "mpp": 0.25, "input_size": 64}

    def forward(self, x):
        cls = torch.round(x[:, 0] * 255.0 / 30.0).clamp(0, 7).long()
        fg = (cls > 0).float()
        np_logits = torch.stack([10.0 - 20.0 * fg, 20.0 * fg - 10.0], dim=1)
        hv = (x[:, 1:3] * 2.0 - 1.0) * fg[:, None]
        tp = torch.nn.functional.one_hot(cls, 8).permute(0, 3, 1, 2).float() * 20.0 - 10.0
        return {"np": np_logits, "hv": hv, "tp": tp}


class Empty(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.meta = {"kind": "empty", "classes": CLASSES, "mpp": 0.25}

    def forward(self, x):
        b, _, h, w = x.shape
        np_logits = torch.zeros(b, 2, h, w)
        np_logits[:, 0] = 5.0
        return {"np": np_logits, "hv": torch.zeros(b, 2, h, w), "tp": torch.zeros(b, 8, h, w)}


def scene(shape, n, seed):
    """An oracle-encoded image with n separated disks of random classes, and its truth maps."""
    rng = np.random.default_rng(seed)
    rows, cols = np.indices(shape)
    inst = np.zeros(shape, np.int32)
    cls = np.zeros(shape, np.uint8)
    placed = 0
    for _ in range(200):
        if placed == n:
            break
        r = int(rng.integers(4, 9))
        cy, cx = int(rng.integers(r, shape[0] - r)), int(rng.integers(r, shape[1] - r))
        disk = (rows - cy) ** 2 + (cols - cx) ** 2 <= r * r
        grown = (rows - cy) ** 2 + (cols - cx) ** 2 <= (r + 3) ** 2
        if (inst[grown] > 0).any():
            continue
        placed += 1
        inst[disk] = placed
        cls[disk] = int(rng.integers(1, 8))
    hv = hover_targets(inst, cls)["hv"]
    image = np.zeros(shape + (3,), np.uint8)
    image[..., 0] = cls * 30
    image[..., 1:] = np.round((np.moveaxis(hv, 0, -1) + 1.0) / 2.0 * 255.0).astype(np.uint8)
    return image, inst, cls


def item(shape, n, seed, image_id):
    image, inst, cls = scene(shape, n, seed)
    return {
        "image": torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0))),
        "instances": torch.from_numpy(inst),
        "classes": torch.from_numpy(cls),
        "image_id": image_id,
        "mpp": 0.25,
    }


@pytest.fixture(scope="module")
def dataset():
    # a PanNuke-sized tile, a larger MoNuSAC-like image (several tiles), a small odd-sized one
    return [item((256, 256), 9, 0, "p0"), item((300, 280), 14, 1, "m0"), item((100, 120), 3, 2, "s0"), item((256, 256), 5, 3, "p1")]


# -- tiled inference ----------------------------------------------------------------------------


def test_tiled_inference_equals_direct_inference():
    image, _, _ = scene((300, 280), 10, 5)
    model = Oracle()
    tiled = infer_tiled(model, image, tile=128, overlap=32, batch_size=3)
    with torch.inference_mode():
        direct = model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0)
    np.testing.assert_allclose(tiled["np"], torch.softmax(direct["np"], 1)[0, 1].numpy(), atol=1e-5)
    np.testing.assert_allclose(tiled["hv"], direct["hv"][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(tiled["tp"], torch.softmax(direct["tp"], 1)[0].numpy(), atol=1e-5)


def test_tiles_passed_to_the_model_are_multiples_of_32():
    seen = []

    class Spy(Empty):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return super().forward(x)

    out = infer_tiled(Spy(), np.zeros((70, 300, 3), np.uint8), tile=256, overlap=64)
    assert out["np"].shape == (70, 300)
    assert set(seen) == {(96, 256)}


@pytest.mark.parametrize(
    "kwargs, match",
    [({"tile": 100}, "multiple of 32"), ({"overlap": 256}, "overlap"), ({"batch_size": 0}, "batch_size")],
)
def test_infer_tiled_rejects_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        infer_tiled(Empty(), np.zeros((32, 32, 3), np.uint8), **kwargs)


def test_model_breaking_the_contract_is_reported():
    class Bad(torch.nn.Module):
        def forward(self, x):
            return {"np": x[:, :2]}

    with pytest.raises(ModelError, match="'np', 'hv' and 'tp'"):
        infer_tiled(Bad(), np.zeros((32, 32, 3), np.uint8))


# -- prediction ----------------------------------------------------------------------------------


def test_predict_image_recovers_the_truth():
    image, inst, cls = scene((200, 230), 8, 7)
    pred = predict_image(Oracle(), image)
    assert len(pred.nuclei) == inst.max()
    assert ((pred.instances > 0) == (inst > 0)).all()
    assert (pred.class_map() == cls).all()
    assert pred.nuclei["class_name"].isin(CLASSES[1:]).all()
    assert np.allclose(pred.nuclei[[f"prob_{c}" for c in CLASSES[1:]]].sum(axis=1), 1.0, atol=1e-5)


def test_predict_image_resamples_to_the_model_pixel_size():
    image, inst, _ = scene((128, 128), 5, 8)
    seen = []

    class Spy(Oracle):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return super().forward(x)

    pred = predict_image(Spy(), image, mpp=0.2, tile=256)  # model at 0.25: image shrinks to 102 px
    assert seen == [(128, 128)] and pred.instances.shape == (128, 128)
    assert abs(len(pred.nuclei) - inst.max()) <= 1
    inter = ((pred.instances > 0) & (inst > 0)).sum()
    assert inter / ((pred.instances > 0) | (inst > 0)).sum() > 0.8


def test_save_prediction_and_read_image(tmp_path):
    import pandas as pd
    import tifffile
    from PIL import Image

    image, inst, _ = scene((64, 96), 3, 9)
    png = tmp_path / "img.png"
    Image.fromarray(image).save(png)
    rgba = tmp_path / "img_rgba.png"
    Image.fromarray(np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])).save(rgba)
    assert (read_image(png) == image).all() and (read_image(rgba) == image).all()
    pred = predict_image(Oracle(), read_image(png))
    paths = save_prediction(pred, tmp_path / "out", "img")
    assert (tifffile.imread(paths["instances"]) == pred.instances).all()
    table = pd.read_parquet(paths["nuclei"])
    assert len(table) == inst.max() and len(json.loads(table["polygon"][0])) >= 4


@pytest.mark.parametrize(
    "name, data, error",
    [
        ("missing.png", None, "not found"),
        ("notes.txt", b"hello", "unsupported image type"),
        ("broken.png", b"\x89PNG garbage", "cannot read image"),
    ],
)
def test_read_image_errors(tmp_path, name, data, error):
    path = tmp_path / name
    if data is not None:
        path.write_bytes(data)
    with pytest.raises((InputFormatError, FileNotFoundError), match=error):
        read_image(path)


def test_read_image_rejects_grayscale(tmp_path):
    from PIL import Image

    path = tmp_path / "gray.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)
    with pytest.raises(InputFormatError, match="RGB"):
        read_image(path)


# -- evaluation ------------------------------------------------------------------------------------


def test_oracle_scores_one_and_empty_scores_zero(dataset):
    res = evaluate_models({"oracle": Oracle(), "empty": Empty()}, dataset, tile=128, overlap=32, progress=False)
    assert res["n_images"] == 4 and res["image_ids"] == ["p0", "m0", "s0", "p1"]
    o, e = res["models"]["oracle"], res["models"]["empty"]
    for key in ("PQ", "SQ", "DQ", "bPQ", "mPQ", "mPQ+", "AJI", "AJI+", "Dice", "F1_detection", "F1_classification",
                "type_accuracy"):
        assert o[key] == pytest.approx(1.0), key
    assert o["R2_counts"] == pytest.approx(1.0)
    assert o["counts"]["true"] == o["counts"]["pred"]
    assert sum(map(sum, o["counts"]["true"])) == 9 + 14 + 3 + 5
    for key in ("PQ", "bPQ", "mPQ", "mPQ+", "AJI", "AJI+", "F1_detection"):
        assert e[key] == 0.0, key
    assert math.isnan(e["type_accuracy"])  # no pairs
    assert math.isnan(e["Dice"]) is False and e["Dice"] == 0.0


def test_models_must_agree_on_classes(dataset):
    other = Empty()
    other.meta = {"classes": ["Background", "A", "B"]}
    with pytest.raises(ModelError, match="cannot compare"):
        evaluate_models({"a": Empty(), "b": other}, dataset[:1], progress=False)


@pytest.mark.slow
def test_report_files(dataset, tmp_path):
    res = evaluate_models({"oracle": Oracle(), "empty": Empty()}, dataset[2:], tile=128, overlap=32, progress=False)
    paths = write_report(res, tmp_path / "report")
    assert sorted(p.name for p in paths.values()) == ["counts.png", "metrics.json", "metrics.md", "pq_per_class.png"]
    doc = json.loads(paths["json"].read_text())  # strict JSON: NaN became null
    assert doc["models"]["oracle"]["mPQ"] == 1.0
    # the empty model: F1 0 for a class with true nuclei, undefined (NaN -> null) for one without
    empty = doc["models"]["empty"]["per_class"]
    want = {c: (0.0 if empty[c]["n_true"] > 0 else None) for c in empty}
    assert {c: empty[c]["F1"] for c in empty} == want
    assert 0.0 in want.values() and None in want.values()  # both cases are exercised
    md = paths["markdown"].read_text()
    assert "| metric | oracle | empty | definition |" in md
    assert "| mPQ | 1.0000 | 0.0000 |" in md
    for png in (paths["pq_plot"], paths["counts_plot"]):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert md == metrics_markdown(res)


# -- commands ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return export_torchscript(Oracle(), d / "oracle.pt"), export_torchscript(Empty(), d / "empty.pt")


def test_cli_predict_writes_maps_tables_and_geojson(exported, tmp_path):
    import shapely.geometry
    import tifffile
    from PIL import Image

    from cellcurate.cli.predict import command
    from cellcurate.curation.qupath import geometry_mask

    images = []
    for i, shape in enumerate([(128, 160), (64, 64)]):
        image, inst, _ = scene(shape, 4, 20 + i)
        images.append((tmp_path / f"img{i}.png", inst))
        Image.fromarray(image).save(images[-1][0])
    out = tmp_path / "pred"
    res = CliRunner().invoke(command, [str(exported[0]), *(str(p) for p, _ in images), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    for path, inst in images:
        stem = path.stem
        assert (out / f"{stem}_instances.tif").is_file() and (out / f"{stem}_nuclei.parquet").is_file()
        doc = json.loads((out / f"{stem}.geojson").read_text())
        assert doc["type"] == "FeatureCollection" and len(doc["features"]) == inst.max()
        f = doc["features"][0]
        assert f["properties"]["objectType"] == "detection"
        assert f["properties"]["classification"]["name"] in CLASSES[1:]
        assert len(f["properties"]["classification"]["color"]) == 3
        ring = np.array(f["geometry"]["coordinates"][0])
        assert (ring[0] == ring[-1]).all() and ring[:, 0].max() <= inst.shape[1] and ring[:, 1].max() <= inst.shape[0]
        assert {"area_px", "nucleus_prob", "prob_Neoplastic"} <= set(f["properties"]["measurements"])
        # the polygons rasterise back to the predicted instance map exactly (pixel-edge tracing)
        pred_inst = tifffile.imread(out / f"{stem}_instances.tif")
        for feat in doc["features"]:
            iid = feat["properties"]["metadata"]["instance_id"]
            mask = geometry_mask(shapely.geometry.shape(feat["geometry"]), inst.shape, window=(0, 0, *inst.shape))
            assert (mask == (pred_inst == int(iid))).all()
    # ids are stable across reruns
    first = json.loads((out / "img0.geojson").read_text())["features"][0]["id"]
    CliRunner().invoke(command, [str(exported[0]), str(images[0][0]), "--out", str(out), "--device", "cpu"])
    assert json.loads((out / "img0.geojson").read_text())["features"][0]["id"] == first


def test_cli_evaluate_side_by_side(exported, dataset, tmp_path, monkeypatch):
    import cellcurate.datasets.release as release

    from cellcurate.cli.evaluate import command

    seen = {}

    def fake_load_release(path, split):
        seen["split"] = split
        return dataset

    monkeypatch.setattr(release, "load_release", fake_load_release)
    (tmp_path / "rel").mkdir()
    out = tmp_path / "eval"
    res = CliRunner().invoke(
        command,
        [str(exported[0]), str(exported[1]), "--release", str(tmp_path / "rel"), "--out", str(out), "--device", "cpu",
         "--limit", "2", "--tile", "128", "--overlap", "32"],
    )
    assert res.exit_code == 0, res.output
    assert seen["split"] == "test"
    doc = json.loads((out / "metrics.json").read_text())
    assert list(doc["models"]) == ["oracle", "empty"] and doc["n_images"] == 2
    assert doc["models"]["oracle"]["PQ"] == 1.0
    assert "| PQ | 1.0000 | 0.0000 |" in res.output


@pytest.mark.slow
def test_cli_evaluate_on_a_real_release(exported, tmp_path):
    """The whole chain: synthetic sample -> store -> release -> `curate evaluate` student + empty."""
    from cellcurate.cli.evaluate import command
    from cellcurate.curation.release import export_release
    from cellcurate.datasets.ingest import ingest_monusac, ingest_pannuke
    from cellcurate.datasets.store import Store
    from cellcurate.datasets.synthetic import write_sample
    from cellcurate.models.checkpoint import save_checkpoint
    from cellcurate.models.student import Student

    info = write_sample(tmp_path / "sample", preset="tiny", seed=0)
    with Store.create(tmp_path / "store") as store:
        ingest_pannuke(store, info.pannuke_root)
        ingest_monusac(store, info.monusac_root)
        export_release(store, "v1", out=tmp_path / "rel", allow_unreviewed=True, progress=False)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "student", Student(channels=(8, 16, 32, 64, 64)).eval(),
                           config={"seed": 0}, epoch=0, metrics={})
    out = tmp_path / "eval"
    res = CliRunner().invoke(command, [str(ckpt), str(exported[1]), "--release", str(tmp_path / "rel" / "v1"),
                                       "--split", "test", "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "metrics.json").read_text())
    assert list(doc["models"]) == ["student", "empty"] and doc["n_images"] == 9
    assert doc["split"] == "test"
    for model in doc["models"].values():
        for key in ("PQ", "bPQ", "mPQ", "AJI", "Dice", "F1_detection"):
            assert model[key] is None or 0.0 <= model[key] <= 1.0
    assert sum(map(sum, doc["models"]["empty"]["counts"]["true"])) > 0
    assert doc["models"]["empty"]["F1_detection"] == 0.0
    # PanNuke's per-tissue table: the release's tissues (MoNuSAC images have none)
    import pandas as pd

    images = pd.read_parquet(tmp_path / "rel" / "v1" / "images.parquet")
    test_tissues = images.loc[images["split"].isin(["fold3", "test"]), "tissue"]
    want = {("(none)" if pd.isna(t) else t) for t in test_tissues}
    assert set(doc["models"]["empty"]["per_tissue"]) == want
    assert doc["settings"]["pairing"] == "hovernet" and "per tissue (PanNuke)" in res.output


def test_model_names_are_short_and_unique(tmp_path):
    from cellcurate.models.predict import model_names

    for d in ("teacher", "student"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text("{}")
        (tmp_path / d / "model.pt").write_bytes(b"")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "student.onnx").write_bytes(b"")
    paths = [tmp_path / "teacher", tmp_path / "student" / "model.pt", tmp_path / "x" / "student.onnx"]
    assert model_names(paths) == ["teacher", "student", "student-2"]


def test_saved_instance_tiff_carries_the_pixel_size(tmp_path):
    """Predicted instance TIFFs have their pixel size (before: no resolution tags), readable by
    tifffile (and QuPath) as pixels per centimetre, and are mode 0644."""
    import stat

    import pandas as pd
    import tifffile

    from cellcurate.models.predict import Prediction

    inst = np.zeros((8, 10), np.int32)
    inst[2:5, 3:6] = 1
    pred = Prediction(inst, pd.DataFrame({"id": [1]}), ["A"], ["#ff0000"], mpp=0.5)
    paths = save_prediction(pred, tmp_path, "x")
    with tifffile.TiffFile(paths["instances"]) as tf:
        page = tf.pages[0]
        num, den = page.tags["XResolution"].value
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert 1e4 / (num / den) == pytest.approx(0.5)
        assert np.array_equal(page.asarray(), inst)
    assert stat.S_IMODE(paths["instances"].stat().st_mode) == 0o644

"""Validation during training, best checkpoint and early stopping; curation-aware targets (rejected
nuclei are background); distillation with unlabelled tiles (issue 9 items 2 and 6, issue 19 item 1)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_models_train import SMALL, TILE, Discs, _cfg

from cellcurate.errors import ConfigError, InputFormatError
from cellcurate.models.checkpoint import load_model
from cellcurate.models.data import (
    StrippedLabels,
    TileDataset,
    UnlabelledImages,
    rejected_instances,
)
from cellcurate.models.losses import (
    LossConfig,
    distillation_loss,
    teacher_confidence,
    teacher_pseudo_types,
)
from cellcurate.models.student import TINY_STUDENT_CHANNELS, StudentConfig
from cellcurate.models.targets import IGNORE
from cellcurate.models.train import (
    TrainConfig,
    _stopped,
    _teacher_mask,
    distill,
    plot_curves,
    train_teacher,
)

TINY = StudentConfig(channels=TINY_STUDENT_CHANNELS, tile_size=TILE)


# -- curation-aware targets --------------------------------------------------------------------------


class _Release(torch.utils.data.Dataset):
    """A release-like dataset: items plus a ``nuclei`` table with ``ignore_reason``."""

    def __init__(self) -> None:
        inst = np.zeros((8, 8), np.int32)
        inst[1:3, 1:3], inst[1:3, 5:7], inst[5:7, 1:3] = 1, 2, 3
        cls = np.zeros((8, 8), np.uint8)
        cls[inst == 1] = 2
        cls[inst == 2] = IGNORE  # rejected in review: not a nucleus
        cls[inst == 3] = IGNORE  # unresolved
        self.item = {"image": torch.full((3, 8, 8), 200, dtype=torch.uint8), "instances": torch.from_numpy(inst),
                     "classes": torch.from_numpy(cls), "image_id": "im", "mpp": 0.25}
        self.nuclei = pd.DataFrame({"image_id": ["im", "im", "im"], "instance_id": [1, 2, 3],
                                    "ignore_reason": ["", "rejected", "unresolved"]})

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> dict:
        return self.item


def test_rejected_nuclei_become_background_unresolved_stay_ignored():
    base = _Release()
    assert rejected_instances(torch.utils.data.Subset(base, [0])) == {"im": {2}}
    t = TileDataset(base, tile_size=32)[0]
    np_t, tp, valid = t["np"].numpy(), t["tp"].numpy(), t["valid"].numpy()
    assert (np_t[1:3, 1:3] == 1).all() and (tp[1:3, 1:3] == 2).all()  # a labelled nucleus
    assert (np_t[1:3, 5:7] == 0).all() and (tp[1:3, 5:7] == 0).all() and valid[1:3, 5:7].all()  # negative
    assert (np_t[5:7, 1:3] == IGNORE).all() and not valid[5:7, 1:3].any()  # still ignored
    old = TileDataset(base, tile_size=32, rejected_as_background=False)[0]
    assert not old["valid"][1:3, 5:7].any()


# -- validation, best checkpoint, early stopping -------------------------------------------------------


def test_stopping_rule():
    cfg = TrainConfig(patience=2)
    hist = [{"epoch": e} for e in (1, 2, 3)]
    assert not _stopped(hist[:2], {"epoch": 1}, cfg)
    assert _stopped(hist, {"epoch": 1}, cfg)
    assert not _stopped(hist, {"epoch": 1}, TrainConfig(patience=0))
    with pytest.raises(ConfigError, match="val_metric"):
        TrainConfig(val_metric="accuracy")


def test_cli_metric_names_match_the_metrics_module():
    from cellcurate.cli.train import VAL_METRICS
    from cellcurate.models.metrics import SUMMARY_METRICS

    assert set(VAL_METRICS) == set(SUMMARY_METRICS)


def test_curves_png(tmp_path):
    hist = [{"epoch": 1, "loss": 2.0, "tp_ce": 1.0, "seconds": 1.0, "lr": 1e-3, "val_PQ": 0.2, "val_mPQ": 0.1},
            {"epoch": 2, "loss": 1.0, "tp_ce": 0.5, "seconds": 1.0, "lr": 1e-3, "val_PQ": 0.4, "val_mPQ": float("nan")}]
    path = plot_curves(hist, tmp_path / "c.png", val_metric="mPQ")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100


@pytest.mark.slow
def test_validation_selects_best_epoch_and_stops_early(tmp_path):
    torch.manual_seed(0)
    cfg = _cfg(epochs=4, val_metric="PQ", patience=1)
    res = train_teacher(Discs(), out_dir=tmp_path / "t", encoder="micro-vit", teacher_config=SMALL, config=cfg,
                        val=Discs(sizes=((64, 64),) * 2, seed=5))
    hist = res.history
    assert all("val_PQ" in h and "val_F1_classification" in h for h in hist)
    scores = [h["val_PQ"] if np.isfinite(h["val_PQ"]) else -np.inf for h in hist]
    best_epoch = int(np.argmax(scores)) + 1
    assert res.best["epoch"] == best_epoch and res.best["metric"] == "PQ"
    # stopped as soon as `patience` epochs passed without a new best, or ran to the end
    assert len(hist) == 4 or len(hist) == best_epoch + 1
    doc = json.loads((tmp_path / "t" / "best" / "config.json").read_text())
    assert doc["epoch"] == best_epoch and doc["metrics"]["best"]["epoch"] == best_epoch
    with Image.open(tmp_path / "t" / "curves.png") as im:
        assert im.format == "PNG"
    best = load_model(tmp_path / "t" / "best")
    x = torch.rand(1, 3, TILE, TILE)
    with torch.no_grad():
        torch.testing.assert_close(best(x)["tp"], res.model(x)["tp"])


# -- unlabelled data -------------------------------------------------------------------------------------


def test_teacher_mask_weights_unlabelled_pixels_by_confidence():
    valid = torch.zeros(2, 4, 4, dtype=torch.bool)
    valid[0] = True
    valid[0, 0, 0] = False  # an ignore pixel of the labelled tile
    inside = torch.ones(2, 4, 4, dtype=torch.bool)
    inside[1, :, 3] = False  # padding of the unlabelled tile
    batch = {"valid": valid, "inside": inside, "labelled": torch.tensor([True, False])}
    t = {"np": torch.zeros(2, 2, 4, 4), "hv": torch.zeros(2, 2, 4, 4), "tp": torch.zeros(2, 8, 4, 4)}
    t["np"][:, 1] = 5.0
    t["tp"][:, 3] = 5.0
    conf = teacher_confidence(t)
    assert conf.shape == (2, 4, 4) and 0.8 < float(conf[0, 0, 0]) < 1.0
    assert (teacher_pseudo_types(t) == 3).all()
    mask, weight, pseudo = _teacher_mask(batch, t, teacher_on_ignore=False)
    assert torch.equal(mask[0], valid[0]) and torch.equal(mask[1], inside[1])
    assert (weight[0] == 1).all() and torch.allclose(weight[1][inside[1]], conf[1][inside[1]])
    assert not pseudo[0].any() and torch.equal(pseudo[1], inside[1])
    mask2, _, pseudo2 = _teacher_mask(batch, t, teacher_on_ignore=True)
    assert bool(mask2[0, 0, 0]) and bool(pseudo2[0, 0, 0]) and int(pseudo2[0].sum()) == 1


def test_distillation_loss_weights():
    s = {"np": torch.zeros(1, 2, 2, 2), "hv": torch.zeros(1, 2, 2, 2), "tp": torch.zeros(1, 8, 2, 2)}
    t = {"np": torch.zeros(1, 2, 2, 2), "hv": torch.ones(1, 2, 2, 2), "tp": torch.zeros(1, 8, 2, 2)}
    t["hv"][0, :, 0, 0] = 3.0
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    cfg = LossConfig()
    _, plain = distillation_loss(s, t, valid, cfg)
    assert plain["kd_hv"] == pytest.approx((9 + 1 + 1 + 1) / 4)
    w = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    _, weighted = distillation_loss(s, t, valid, cfg, weight=w)
    assert weighted["kd_hv"] == pytest.approx(1.0)
    assert "kd_tp_fg" not in weighted
    t["np"][0, 1] = 4.0
    t["tp"][0, 5] = 4.0
    _, pseudo = distillation_loss(s, t, valid, cfg, weight=w, pseudo=valid)
    assert pseudo["kd_tp_fg"] == pytest.approx(float(np.log(7)), rel=1e-5)


def test_unlabelled_images_from_a_folder(tmp_path):
    Image.fromarray(np.full((40, 50, 3), 180, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("x")
    ds = UnlabelledImages([tmp_path])
    item = ds[0]
    assert len(ds) == 1 and item["image"].shape == (3, 40, 50) and item["labelled"] is False
    assert (item["classes"] == IGNORE).all() and item["image_id"] == "unlabelled:a.png"
    tile = TileDataset(ds, tile_size=64)[0]
    assert not tile["valid"].any() and not bool(tile["labelled"])
    assert tile["inside"][:40, :50].all() and not tile["inside"][40:].any()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputFormatError, match="holds no images"):
        UnlabelledImages([empty])
    stripped = StrippedLabels(Discs(sizes=((64, 64),)))[0]
    assert (np.asarray(stripped["classes"]) == IGNORE).all() and stripped["labelled"] is False


@pytest.mark.slow
def test_distill_with_unlabelled_tiles_and_ground_truth_only(tmp_path):
    train_teacher(Discs(), out_dir=tmp_path / "t", encoder="micro-vit", teacher_config=SMALL, config=_cfg(epochs=1))
    teacher = load_model(tmp_path / "t")
    labelled = torch.utils.data.Subset(Discs(), [0, 1])
    unl = StrippedLabels(torch.utils.data.Subset(Discs(), [2, 3, 4, 5]))
    res = distill(teacher, labelled, out_dir=tmp_path / "s", student_config=TINY, config=_cfg(epochs=1),
                  unlabelled=unl)
    doc = json.loads((tmp_path / "s" / "config.json").read_text())
    assert doc["training"]["labelled_tiles"] == 2 and doc["training"]["unlabelled_tiles"] == 4
    # the unlabelled tiles train: every distillation term is there (kd_tp_fg is 0 while the barely
    # trained teacher calls no pixel a nucleus: no confident pseudo-label yet)
    assert {"kd_tp", "kd_hv", "kd_np", "kd_tp_fg"} <= set(res.history[0]) and res.history[0]["kd_tp"] > 0
    gt = distill(None, labelled, out_dir=tmp_path / "g", student_config=TINY, config=_cfg(epochs=1))
    assert "kd_tp" not in gt.history[0] and "tp_fg_ce" in gt.history[0]
    assert json.loads((tmp_path / "g" / "config.json").read_text())["training"]["stage"] == "student"
    with pytest.raises(ConfigError, match="need a teacher"):
        distill(None, labelled, out_dir=tmp_path / "x", student_config=TINY, config=_cfg(epochs=1), unlabelled=unl)


@pytest.mark.slow
def test_cli_distill_with_an_unlabelled_folder(tmp_path, monkeypatch):
    import sys
    import types

    from click.testing import CliRunner

    from cellcurate.cli import distill as distill_cli

    train_teacher(Discs(), out_dir=tmp_path / "t", encoder="micro-vit", teacher_config=SMALL, config=_cfg(epochs=1))
    fake = types.ModuleType("cellcurate.datasets.release")
    fake.load_release = lambda path, split="train", transform=None: Discs(sizes=((64, 64),) * 2)
    monkeypatch.setitem(sys.modules, "cellcurate.datasets.release", fake)
    folder = tmp_path / "unl"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((64, 64, 3), 200 + i, np.uint8)).save(folder / f"u{i}.png")
    args = ["--teacher", str(tmp_path / "t"), "--release", str(tmp_path), "--out", str(tmp_path / "s"), "--tiny",
            "--epochs", "1", "--tile-size", "64", "--device", "cpu", "--unlabelled", str(folder), "--val-metric", "PQ"]
    res = CliRunner().invoke(distill_cli.command, args)
    assert res.exit_code == 0, res.output
    assert "best epoch 1: validation PQ" in res.output
    doc = json.loads((tmp_path / "s" / "config.json").read_text())
    assert doc["training"]["unlabelled_tiles"] == 2 and doc["training"]["labelled_tiles"] == 2
    assert (tmp_path / "s" / "curves.png").is_file() and (tmp_path / "s" / "best" / "model.pt").is_file()
    res = CliRunner().invoke(distill_cli.command, [*args[:5], str(tmp_path / "s2"), "--tiny", "--unlabelled",
                                                   str(tmp_path / "missing")])
    assert res.exit_code != 0

"""Classification end to end (issue 9): a perfect model scores perfectly through predict →
post-process → evaluate, the class-balanced foreground type loss, and an over-fit on 4 tiles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cellcurate.models.data import TileDataset, collate_tiles
from cellcurate.models.evaluate import evaluate_models
from cellcurate.models.losses import LossConfig, foreground_type_loss, supervised_loss
from cellcurate.models.student import TINY_STUDENT_CHANNELS, Student
from cellcurate.models.targets import IGNORE, hover_targets
from cellcurate.models.teacher import model_meta

#: One colour per class 1..7 (a model can tell the classes apart from colour alone).
COLOURS = {1: (200, 40, 60), 2: (40, 160, 60), 3: (50, 80, 200), 4: (230, 200, 20),
           5: (240, 120, 40), 6: (60, 200, 230), 7: (220, 50, 220)}


def _image(rng: np.random.Generator, size: int, image_id: str, *, n: int = 40, touching: bool = True,
           p: tuple[float, ...] = (0.3, 0.25, 0.15, 0.1, 0.08, 0.07, 0.05)) -> dict:
    """Discs of 7 colour-coded classes on a pale background; some pairs touch."""
    yy, xx = np.mgrid[:size, :size]
    image = np.full((3, size, size), 235, np.uint8)
    inst = np.zeros((size, size), np.int32)
    cls = np.zeros((size, size), np.uint8)
    k = 0
    for _ in range(n * 4):
        if k >= n:
            break
        r = int(rng.integers(4, 8))
        cy, cx = (int(v) for v in rng.integers(r + 1, size - r - 1, 2))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if (inst[max(cy - r - 2, 0) : cy + r + 3, max(cx - r - 2, 0) : cx + r + 3] > 0).any():
            continue
        c = int(rng.choice(7, p=np.asarray(p) / sum(p))) + 1
        k += 1
        inst[disc], cls[disc] = k, c
        image[:, disc] = np.array(COLOURS[c], np.uint8)[:, None]
        if touching and k < n and cx + 2 * r + 1 < size - 1 and rng.random() < 0.3:
            # a neighbour of another class sharing a border (the watershed must split them)
            nx = cx + 2 * r
            d2 = (yy - cy) ** 2 + (xx - nx) ** 2 <= r * r
            d2 &= inst == 0
            if (inst[max(cy - r - 2, 0) : cy + r + 3, cx + r + 1 : nx + r + 3] > 0).any():
                continue
            c2 = c % 7 + 1
            k += 1
            inst[d2], cls[d2] = k, c2
            image[:, d2] = np.array(COLOURS[c2], np.uint8)[:, None]
    return {"image": torch.from_numpy(image), "instances": torch.from_numpy(inst),
            "classes": torch.from_numpy(cls), "image_id": image_id, "mpp": 0.25}


class Oracle(torch.nn.Module):
    """Returns, for an image it was given, logits whose argmax is exactly the ground truth."""

    def __init__(self, items: list[dict]) -> None:
        super().__init__()
        self.maps = {}
        for it in items:
            tg = hover_targets(it["instances"].numpy(), it["classes"].numpy())
            self.maps[it["image"].numpy().tobytes()] = tg
        self.meta = model_meta(kind="oracle", architecture="oracle", mpp=0.25, input_size=96,
                               mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        nps, hvs, tps = [], [], []
        for xi in x:
            tg = self.maps[(xi * 255).round().to(torch.uint8).numpy().tobytes()]
            nuc = torch.from_numpy((tg["np"] == 1).astype(np.float32))
            nps.append(torch.stack([1 - nuc, nuc]) * 20 - 10)
            hvs.append(torch.from_numpy(tg["hv"]))
            tp = torch.from_numpy(tg["tp"].astype(np.int64))
            tp[tp == IGNORE] = 0
            tps.append(F.one_hot(tp, 8).permute(2, 0, 1).float() * 20)
        return {"np": torch.stack(nps), "hv": torch.stack(hvs), "tp": torch.stack(tps)}


def test_ground_truth_maps_score_one_through_the_whole_path():
    rng = np.random.default_rng(3)
    items = [_image(rng, 96, f"img{i}", n=int(rng.integers(12, 30))) for i in range(6)]
    items[0]["classes"][:10, :10] = IGNORE  # an ignore corner: left out of truth and prediction alike
    res = evaluate_models({"oracle": Oracle(items)}, items, progress=False)["models"]["oracle"]
    per = res["per_class"]
    assert all(per[c]["n_true"] > 0 for c in per), "every class must occur for the test to mean anything"
    assert res["PQ"] == pytest.approx(1.0) and res["mPQ"] == pytest.approx(1.0)
    assert res["F1_classification"] == 1.0
    assert res["R2_counts"] == 1.0
    assert all(per[c]["F1"] == 1.0 and per[c]["R2_counts"] == 1.0 for c in per)
    assert res["counts"]["true"] == res["counts"]["pred"]


def test_foreground_type_loss_hand_computed():
    # two classes: 3 pixels of class 1, 1 pixel of class 2; uniform logits -> -log(1/7) each
    target = torch.tensor([[[1, 1, 1, 2, 0, IGNORE]]])
    logits = torch.zeros(1, 8, 1, 6)
    assert float(foreground_type_loss(logits, target)) == pytest.approx(math.log(7))
    # class 2's one pixel weighs as much as class 1's three: a wrong class-2 pixel costs half
    logits[0, 1, 0, :4] = 10.0  # everything predicted class 1
    nll1 = -float(torch.log_softmax(logits[0, 1:, 0, 0], 0)[0])
    nll2 = -float(torch.log_softmax(logits[0, 1:, 0, 3], 0)[1])
    assert float(foreground_type_loss(logits, target)) == pytest.approx((nll1 + nll2) / 2, rel=1e-5)
    # background and ignore pixels do not count; no labelled nucleus pixel -> 0 with a graph
    logits.requires_grad_(True)
    empty = foreground_type_loss(logits, torch.tensor([[[0, 0, IGNORE, 0, 0, 0]]]))
    assert float(empty.detach()) == 0.0 and empty.requires_grad
    # per-pixel weights (a teacher's confidence) scale each pixel's share
    w = torch.tensor([[[1.0, 1.0, 1.0, 0.0, 1.0, 1.0]]])
    assert float(foreground_type_loss(logits.detach(), target, weight=w)) == pytest.approx(nll1, rel=1e-5)


def test_supervised_loss_trains_the_foreground_vote():
    rng = np.random.default_rng(0)
    tiles = TileDataset([_image(rng, 64, "a", n=8)], tile_size=64)
    batch = collate_tiles([tiles[0]])
    out = {"np": torch.zeros(1, 2, 64, 64), "hv": torch.zeros(1, 2, 64, 64), "tp": torch.zeros(1, 8, 64, 64)}
    _, parts = supervised_loss(out, batch, LossConfig())
    assert parts["tp_fg_ce"] == pytest.approx(math.log(7), rel=1e-5)
    total_off, _ = supervised_loss(out, batch, LossConfig(tp_fg_ce=0.0))
    total_on, _ = supervised_loss(out, batch, LossConfig())
    assert float(total_on - total_off) == pytest.approx(math.log(7), rel=1e-5)


@pytest.mark.slow
def test_overfit_four_tiles_learns_every_class():
    """A tiny student trained on 4 tiles must classify their nuclei (class F1 >= 0.9); with the type
    loss of before issue 9 (CE + Dice over all pixels) the rare classes were lost."""
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rng = np.random.default_rng(0)
    items = [_image(rng, 64, f"t{i}", n=12, touching=False) for i in range(4)]
    tiles = TileDataset(items, tile_size=64)
    batch = collate_tiles([tiles[i] for i in range(4)])
    x = batch["image"].float() / 255.0
    model = Student(channels=TINY_STUDENT_CHANNELS, dropout=0.0, mean=(0.5,) * 3, std=(0.25,) * 3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cfg = LossConfig()
    for _ in range(60):
        model.train()
        opt.zero_grad()
        loss, _ = supervised_loss(model(x), batch, cfg)
        loss.backward()
        opt.step()
    res = evaluate_models({"s": model}, items, progress=False)["models"]["s"]
    assert res["PQ"] > 0.8
    assert res["F1_classification"] >= 0.9, res["per_class"]

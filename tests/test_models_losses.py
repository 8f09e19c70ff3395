"""Losses: hand-computed values on tiny tensors, ignore masking, distillation and consistency zeros."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cellcurate.errors import ConfigError
from cellcurate.models.losses import (
    LossConfig,
    bce_loss,
    consistency_loss,
    dice_loss,
    distillation_loss,
    kd_kl_loss,
    masked_ce_loss,
    supervised_loss,
    tversky_loss,
)
from cellcurate.models.targets import IGNORE


def _np_logits(probs: list[float]) -> torch.Tensor:
    """(1, 2, 1, n) logits whose softmax channel 1 equals ``probs``."""
    p = torch.tensor(probs, dtype=torch.float64)
    return torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))])[None, :, None, :]


P = [0.8, 0.3, 0.6]
T = torch.tensor([[[1, 0, 0]]])
ALL = torch.ones(1, 1, 3, dtype=torch.bool)


@pytest.mark.parametrize(
    "alpha, beta, smooth, expected",
    [
        (0.3, 0.7, 0.0, 1 - 0.8 / (0.8 + 0.3 * 0.9 + 0.7 * 0.2)),  # TP 0.8, FP 0.9, FN 0.2
        (0.3, 0.7, 1.0, 1 - 1.8 / (1.8 + 0.3 * 0.9 + 0.7 * 0.2)),
        (0.5, 0.5, 0.0, 1 - 0.8 / (0.8 + 0.45 + 0.1)),  # = binary Dice
    ],
)
def test_tversky_hand_computed(alpha, beta, smooth, expected):
    got = tversky_loss(_np_logits(P), T.float(), ALL, alpha=alpha, beta=beta, smooth=smooth)
    assert float(got) == pytest.approx(expected, abs=1e-6)


def test_dice_and_bce_hand_computed():
    # class 1: inter 0.8, Σp 1.7, Σt 1 -> 1.6/2.7; class 0: inter 1.1, Σp 1.3, Σt 2 -> 2.2/3.3
    got = dice_loss(_np_logits(P), T, smooth=0.0)
    assert float(got) == pytest.approx(1 - (1.6 / 2.7 + 2.2 / 3.3) / 2, abs=1e-6)
    bce = bce_loss(_np_logits(P), T.float(), ALL)
    assert float(bce) == pytest.approx(-(math.log(0.8) + math.log(0.7) + math.log(0.4)) / 3, abs=1e-6)
    # one pixel ignored: only the other two count
    partial = bce_loss(_np_logits(P), T.float(), torch.tensor([[[True, False, True]]]))
    assert float(partial) == pytest.approx(-(math.log(0.8) + math.log(0.4)) / 2, abs=1e-6)


def test_all_ignored_gives_zero_not_nan():
    logits = torch.randn(1, 8, 4, 4)
    tgt = torch.full((1, 4, 4), IGNORE)
    assert float(masked_ce_loss(logits, tgt)) == 0.0
    assert float(dice_loss(logits, tgt)) == 0.0
    none = torch.zeros(1, 4, 4, dtype=torch.bool)
    assert float(tversky_loss(logits[:, :2], torch.zeros(1, 4, 4), none, smooth=0.0)) == 0.0


def _batch(seed: int = 0, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(2, size, size, dtype=torch.bool)
    valid[:, 3:9, 2:7] = False
    valid[1, 10:, 10:] = False
    np_t = (torch.rand(2, size, size, generator=g) > 0.6).long()
    tp_t = torch.randint(1, 8, (2, size, size), generator=g) * np_t
    batch = {
        "np": torch.where(valid, np_t, IGNORE),
        "tp": torch.where(valid, tp_t, IGNORE),
        "hv": torch.rand(2, 2, size, size, generator=g) * 2 - 1,
        "valid": valid,
    }
    out = {
        "np": torch.randn(2, 2, size, size, generator=g),
        "hv": torch.tanh(torch.randn(2, 2, size, size, generator=g)),
        "tp": torch.randn(2, 8, size, size, generator=g),
    }
    return batch, out


def _scramble_ignored(batch, out, seed: int):
    g = torch.Generator().manual_seed(seed)
    inv = ~batch["valid"]
    b2 = {k: v.clone() for k, v in batch.items()}
    o2 = {k: v.clone() for k, v in out.items()}
    b2["hv"][:, :, inv[0]] = 0.7  # targets inside ignore regions change
    for k in o2:  # and so do the predictions there
        noise = torch.randn(o2[k].shape, generator=g) * 5
        o2[k] = torch.where(inv[:, None], noise, o2[k])
    return b2, o2


def test_every_loss_ignores_ignore_pixels():
    cfg = LossConfig()
    batch, out = _batch()
    teacher = {k: v + 0.3 * torch.randn_like(v) for k, v in out.items()}
    base_total, base_parts = supervised_loss(out, batch, cfg)
    kd_total, kd_parts = distillation_loss(out, teacher, batch["valid"], cfg)
    b2, o2 = _scramble_ignored(batch, out, 1)
    _, t2 = _scramble_ignored(batch, teacher, 2)
    total, parts = supervised_loss(o2, b2, cfg)
    kd2, kd2_parts = distillation_loss(o2, t2, b2["valid"], cfg)
    assert parts == pytest.approx(base_parts, rel=1e-5, abs=1e-6)
    assert kd2_parts == pytest.approx(kd_parts, rel=1e-5, abs=1e-6)
    assert float(total) == pytest.approx(float(base_total), rel=1e-5)
    assert float(kd2) == pytest.approx(float(kd_total), rel=1e-5)
    assert all(v > 0 for v in base_parts.values())


def test_distillation_zero_when_student_equals_teacher():
    _, out = _batch(3)
    valid = torch.ones(2, 16, 16, dtype=torch.bool)
    for t in (1.0, 2.0, 4.0):
        assert float(kd_kl_loss(out["tp"], out["tp"], valid, temperature=t)) == pytest.approx(0.0, abs=1e-6)
    cfg = LossConfig()
    _, parts = distillation_loss(out, {k: v.clone() for k, v in out.items()}, valid, cfg)
    assert parts["kd_tp"] == pytest.approx(0.0, abs=1e-6)
    assert parts["kd_hv"] == 0.0 and parts["kd_np"] == pytest.approx(0.0, abs=1e-7)
    other = {**out, "tp": out["tp"].flip(1)}
    assert distillation_loss(out, other, valid, cfg)[1]["kd_tp"] > 0.01


def test_kd_kl_hand_computed_with_temperature():
    s = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1)
    t = torch.tensor([math.log(3.0) * 2, 0.0]).view(1, 2, 1, 1)  # at T=2: teacher (0.75, 0.25)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    got = kd_kl_loss(s, t, torch.ones(1, 1, 1, dtype=torch.bool), temperature=2.0)
    assert float(got) == pytest.approx(4 * kl, abs=1e-6)


class PixelModel(nn.Module):
    """Per-pixel (1×1 conv) nuclear/type maps and zero distance maps: dihedral-equivariant."""

    def __init__(self) -> None:
        super().__init__()
        self.np_conv = nn.Conv2d(3, 2, 1)
        self.tp_conv = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return {"np": self.np_conv(x), "hv": torch.zeros_like(x[:, :2]), "tp": self.tp_conv(x)}


class ShiftModel(PixelModel):
    """Looks at a neighbour and writes x into h: not equivariant."""

    def forward(self, x):
        out = super().forward(torch.roll(x, 1, dims=-1))
        return {**out, "hv": x[:, :2] * 2 - 1}


@pytest.mark.parametrize("k, flip", [(0, True), (1, False), (2, True), (3, False)])
def test_consistency_zero_for_equivariant_model(k, flip):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    assert float(consistency_loss(PixelModel(), x, valid, k=k, flip=flip)) == pytest.approx(0.0, abs=1e-10)
    assert float(consistency_loss(ShiftModel(), x, valid, k=k, flip=flip)) > 1e-3


def test_consistency_sees_stain_jitter():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 8, 8)
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    loss = consistency_loss(PixelModel(), x, valid, k=0, flip=False, perturb=lambda z: z * 0.5)
    assert float(loss) > 0


@pytest.mark.parametrize(
    "options, message",
    [({"tversky_alpha": -1.0}, "tversky_alpha"), ({"temperature": 0.0}, "temperature"), ({"nope": 1}, "unknown")],
)
def test_bad_loss_options(options, message):
    with pytest.raises(ConfigError, match=message):
        LossConfig.from_dict(options)

"""Losses of the teacher and the student, all masked by ignore regions.

Dimensions: B tiles, H×W pixels, K = 8 type channels.

Model outputs are dicts ``{"np": (B, 2, H, W) logits, "hv": (B, 2, H, W) in [-1, 1],
"tp": (B, K, H, W) logits}``. Targets follow :mod:`cellcurate.models.targets`: ``np`` and ``tp``
(B, H, W) int64 with 255 = ignore, ``hv`` (B, 2, H, W) float, ``valid`` (B, H, W) bool.

- nuclear map: BCE + Tversky (α weighs false positives, β false negatives) + Dice;
- types: cross-entropy + Dice over every valid pixel, plus a class-balanced cross-entropy over the
  foreground classes on nucleus pixels only (:func:`foreground_type_loss`): without it the type map
  is dominated by background pixels and the frequent classes, and every nucleus ends up with one or
  two classes (issue 9);
- distance maps: MSE + MSE of their gradients (on nuclei only, as in HoVer-Net);
- distillation: temperature-scaled KL on type logits (× T²), MSE on the teacher's distance maps and
  soft nuclear map, and BCE + Tversky against the teacher's soft nuclear map;
- consistency: predictions must commute with flips/90° rotations and not move under stain jitter.

Every term is a mean over valid pixels only (a pixel with class 255 changes no loss), and is 0 when
a batch has no valid pixel.

>>> logits = torch.zeros(1, 2, 1, 2); target = torch.tensor([[[1, 0]]])
>>> round(float(tversky_loss(logits, target.float(), target >= 0, alpha=0.5, beta=0.5, smooth=0.0)), 4)
0.5
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .targets import IGNORE, dihedral, inverse_dihedral, inverse_dihedral_hv

__all__ = [
    "LossConfig",
    "bce_loss",
    "consistency_loss",
    "dice_loss",
    "distillation_loss",
    "foreground_type_loss",
    "gradient_mse_loss",
    "kd_kl_loss",
    "masked_ce_loss",
    "masked_mse",
    "supervised_loss",
    "teacher_confidence",
    "teacher_pseudo_types",
    "tversky_loss",
]

Outputs = dict[str, torch.Tensor]


@dataclass
class LossConfig:
    """Weights and parameters of every loss term (saved in each checkpoint's config.json)."""

    tversky_alpha: float = 0.3
    tversky_beta: float = 0.7
    smooth: float = 1.0
    np_bce: float = 1.0
    np_tversky: float = 1.0
    np_dice: float = 1.0
    tp_ce: float = 1.0
    tp_dice: float = 1.0
    tp_fg_ce: float = 1.0  # class-balanced CE over the foreground classes on nucleus pixels
    hv_mse: float = 1.0
    hv_msge: float = 1.0
    # distillation (student only)
    temperature: float = 2.0
    kd_tp: float = 1.0
    kd_hv: float = 1.0
    kd_np: float = 1.0
    kd_np_bt: float = 0.5
    kd_tp_fg: float = 1.0  # class-balanced CE on the teacher's pseudo-labels (unlabelled pixels only)
    consistency: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"loss option {f.name} must be a number >= 0, got {value!r}")
        if self.temperature <= 0:
            raise ConfigError(f"loss option temperature must be > 0, got {self.temperature}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LossConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown loss options {unknown}; expected some of {sorted(names)}")
        return cls(**d)


def _zero(ref: torch.Tensor) -> torch.Tensor:
    return ref.sum() * 0.0  # keeps the graph and device


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (B, H, W) over ``mask`` (B, H, W) bool; 0 when the mask is empty."""
    m = mask.to(x.dtype)
    n = m.sum()
    return (x * m).sum() / n.clamp_min(1.0)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE of (B, C, H, W) maps over the pixels of ``mask`` (B, H, W), averaged over channels."""
    return masked_mean(((pred - target) ** 2).mean(dim=1), mask)


def bce_loss(np_logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of a 2-channel nuclear logit map against (soft) targets in [0, 1].

    Parameters
    ----------
    np_logits
        (B, 2, H, W) logits (channel 1 = nucleus).
    target
        (B, H, W) float probability of "nucleus" (hard 0/1 or a teacher's soft map).
    valid
        (B, H, W) bool.
    """
    logp = F.log_softmax(np_logits.float(), dim=1)
    t = torch.where(valid, target.float(), torch.zeros_like(target, dtype=torch.float32))
    return masked_mean(-(t * logp[:, 1] + (1 - t) * logp[:, 0]), valid)


def tversky_loss(
    np_logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    *,
    alpha: float = 0.3,
    beta: float = 0.7,
    smooth: float = 1.0,
) -> torch.Tensor:
    """1 − Tversky index of the soft nuclear map, over all valid pixels of the batch.

    ``TI = (TP + s) / (TP + α·FP + β·FN + s)`` with ``TP = Σ p·t``, ``FP = Σ p·(1−t)``,
    ``FN = Σ (1−p)·t``, p = softmax(np_logits)[:, 1]. α = β = 0.5 is the Dice loss.
    """
    p = F.softmax(np_logits.float(), dim=1)[:, 1]
    m = valid.float()
    t = torch.where(valid, target.float(), torch.zeros_like(p))
    tp = (p * t * m).sum()
    fp = (p * (1 - t) * m).sum()
    fn = ((1 - p) * t * m).sum()
    denom = tp + alpha * fp + beta * fn + smooth
    if float(denom.detach()) == 0.0:
        return _zero(p)
    return 1 - (tp + smooth) / denom


def dice_loss(logits: torch.Tensor, target: torch.Tensor, *, smooth: float = 1.0) -> torch.Tensor:
    """Soft multi-class Dice loss, 1 − mean over classes of ``(2Σp·t + s) / (Σp + Σt + s)``.

    Parameters
    ----------
    logits
        (B, C, H, W).
    target
        (B, H, W) int64 class ids; 255 = ignore.
    """
    valid = target != IGNORE
    p = F.softmax(logits.float(), dim=1) * valid[:, None]
    onehot = F.one_hot(torch.where(valid, target, torch.zeros_like(target)).long(), logits.shape[1])
    onehot = onehot.permute(0, 3, 1, 2).float() * valid[:, None]
    inter = (p * onehot).sum(dim=(0, 2, 3))
    denom = p.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    if not bool(valid.any()):
        return _zero(p)
    return 1 - ((2 * inter + smooth) / (denom + smooth).clamp_min(1e-12)).mean()


def masked_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over (B, C, H, W) logits and (B, H, W) targets, ignoring 255; 0 if all ignored."""
    if not bool((target != IGNORE).any()):
        return _zero(logits)
    return F.cross_entropy(logits.float(), target.long(), ignore_index=IGNORE)


def foreground_type_loss(logits: torch.Tensor, target: torch.Tensor, *, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Class-balanced cross-entropy over the foreground type channels, on labelled nucleus pixels.

    The instance class is a vote among the foreground channels (background never votes), so this
    term trains exactly the decision the vote makes: channels 1..K-1 only, pixels whose target is a
    class (not background, not 255). Each class present in the batch weighs the same in total
    (weights ∝ 1 / its pixel count), so a frequent class cannot win by default.

    Parameters
    ----------
    logits
        (B, K, H, W) type logits (channel 0 = background).
    target
        (B, H, W) int64 type targets: 0 background, 1..K-1 classes, 255 ignore.
    weight
        (B, H, W) optional per-pixel weights in [0, 1] (e.g. a teacher's confidence).

    Returns 0 (with a graph) when the batch has no labelled nucleus pixel.
    """
    k = logits.shape[1]
    fg = (target >= 1) & (target < k)
    if not bool(fg.any()):
        return _zero(logits)
    t = (target[fg] - 1).long()
    logp = F.log_softmax(logits.float()[:, 1:].permute(0, 2, 3, 1)[fg], dim=1)
    nll = -logp.gather(1, t[:, None])[:, 0]
    counts = torch.bincount(t, minlength=k - 1).float()
    w = (1.0 / counts.clamp_min(1.0))[t]
    if weight is not None:
        w = w * weight[fg].float()
    return (w * nll).sum() / w.sum().clamp_min(1e-12)


_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


def _grad(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Sobel derivative of (B, 1, H, W) along x (axis=1) or y (axis=0), replicate padding."""
    k = _SOBEL.to(x.device, x.dtype)
    k = (k if axis == 1 else k.T).reshape(1, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)


def gradient_mse_loss(
    hv_pred: torch.Tensor, hv_target: torch.Tensor, focus: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE between the x-derivative of the h maps and the y-derivative of the v maps, on ``focus``.

    Parameters
    ----------
    hv_pred, hv_target
        (B, 2, H, W).
    focus
        (B, H, W) bool: nucleus pixels that are not ignored.
    valid
        (B, H, W) bool; when given, pixels next to an invalid one are left out too, because their
        3×3 derivative reads the invalid pixel.
    """
    pred, tgt = hv_pred.float(), hv_target.float()
    if valid is not None:
        inner = -F.max_pool2d(-valid[:, None].float(), 3, stride=1, padding=1)
        focus = focus & (inner[:, 0] > 0.5)
    dh = _grad(pred[:, :1], 1) - _grad(tgt[:, :1], 1)
    dv = _grad(pred[:, 1:], 0) - _grad(tgt[:, 1:], 0)
    return masked_mean(((dh**2 + dv**2) / 2)[:, 0], focus)


def supervised_loss(out: Outputs, batch: dict[str, torch.Tensor], cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Ground-truth loss of one batch; returns (total, {term: value})."""
    valid = batch["valid"]
    np_t = batch["np"]
    nuclear = (np_t == 1) & valid
    target = nuclear.float()
    parts = {
        "np_bce": bce_loss(out["np"], target, valid),
        "np_tversky": tversky_loss(
            out["np"], target, valid, alpha=cfg.tversky_alpha, beta=cfg.tversky_beta, smooth=cfg.smooth
        ),
        "np_dice": dice_loss(out["np"], np_t, smooth=cfg.smooth),
        "tp_ce": masked_ce_loss(out["tp"], batch["tp"]),
        "tp_dice": dice_loss(out["tp"], batch["tp"], smooth=cfg.smooth),
        "tp_fg_ce": foreground_type_loss(out["tp"], batch["tp"]),
        "hv_mse": masked_mse(out["hv"].float(), batch["hv"].float(), valid),
        "hv_msge": gradient_mse_loss(out["hv"], batch["hv"], nuclear, valid),
    }
    total = sum(getattr(cfg, k) * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}  # type: ignore[return-value]


def kd_kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """T² · mean over valid pixels of KL(softmax(t/T) ‖ softmax(s/T)); (B, K, H, W) logits."""
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=1)
    return masked_mean(kl, valid) * t * t


def teacher_confidence(teacher: Outputs) -> torch.Tensor:
    """(B, H, W) confidence of a teacher's prediction in [0, 1]: the product of its nuclear-map and
    type-map maximum probabilities (1 = certain of both, low where it hesitates)."""
    p_np = F.softmax(teacher["np"].float(), dim=1).amax(dim=1)
    p_tp = F.softmax(teacher["tp"].float(), dim=1).amax(dim=1)
    return p_np * p_tp


def teacher_pseudo_types(teacher: Outputs) -> torch.Tensor:
    """(B, H, W) int64 hard type labels from a teacher: its foreground class argmax where its
    nuclear probability is >= 0.5, else 0 (background)."""
    nucleus = F.softmax(teacher["np"].float(), dim=1)[:, 1] >= 0.5
    fg_class = teacher["tp"].float()[:, 1:].argmax(dim=1) + 1
    return torch.where(nucleus, fg_class, torch.zeros_like(fg_class))


def _wmean(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    m = mask.to(torch.float32) if weight is None else mask.to(torch.float32) * weight.float()
    return (x * m).sum() / m.sum().clamp_min(1e-6 if weight is not None else 1.0)


def distillation_loss(
    student: Outputs,
    teacher: Outputs,
    valid: torch.Tensor,
    cfg: LossConfig,
    *,
    weight: torch.Tensor | None = None,
    pseudo: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Distillation terms against a teacher's outputs (same layout as the student's).

    Parameters
    ----------
    valid
        (B, H, W) bool: pixels where the teacher's soft targets count.
    weight
        (B, H, W) per-pixel weights in [0, 1] (1 on labelled pixels, the teacher's confidence on
        unlabelled ones); None = 1 everywhere.
    pseudo
        (B, H, W) bool: pixels without ground truth where the teacher's hard types also train the
        class-balanced foreground type loss (``kd_tp_fg``), weighted by ``weight``.
    """
    t = cfg.temperature
    s_np = F.softmax(student["np"].float(), dim=1)
    t_np = F.softmax(teacher["np"].float(), dim=1)
    log_s = F.log_softmax(student["tp"].float() / t, dim=1)
    log_t = F.log_softmax(teacher["tp"].float() / t, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=1)
    soft = t_np[:, 1]
    logp = F.log_softmax(student["np"].float(), dim=1)
    bce = -(soft * logp[:, 1] + (1 - soft) * logp[:, 0])
    m = valid.float() if weight is None else valid.float() * weight.float()
    tp_ = (s_np[:, 1] * soft * m).sum()
    fp_ = (s_np[:, 1] * (1 - soft) * m).sum()
    fn_ = ((1 - s_np[:, 1]) * soft * m).sum()
    den = tp_ + cfg.tversky_alpha * fp_ + cfg.tversky_beta * fn_ + cfg.smooth
    tversky = _zero(den) if float(den.detach()) == 0.0 else 1 - (tp_ + cfg.smooth) / den
    parts = {
        "kd_tp": _wmean(kl, valid, weight) * t * t,
        "kd_hv": _wmean(((student["hv"].float() - teacher["hv"].float()) ** 2).mean(dim=1), valid, weight),
        "kd_np": _wmean((s_np[:, 1] - soft) ** 2, valid, weight),
        "kd_np_bt": _wmean(bce, valid, weight) + tversky,
    }
    if pseudo is not None and cfg.kd_tp_fg > 0:
        target = torch.where(pseudo & valid, teacher_pseudo_types(teacher), torch.full_like(valid, IGNORE, dtype=torch.int64))
        w = weight if weight is not None else torch.ones_like(valid, dtype=torch.float32)
        parts["kd_tp_fg"] = foreground_type_loss(student["tp"], target, weight=w)
    total = sum(getattr(cfg, k) * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}  # type: ignore[return-value]


def consistency_loss(
    model: nn.Module | Callable[[torch.Tensor], Outputs],
    images: torch.Tensor,
    valid: torch.Tensor,
    *,
    k: int,
    flip: bool,
    perturb: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reference: Outputs | None = None,
) -> torch.Tensor:
    """Disagreement between ``model(images)`` and ``g⁻¹(model(g(perturb(images))))``.

    ``g`` is the dihedral transform (rotate ``k``×90°, then flip when ``flip``); ``perturb`` is
    e.g. a stain jitter. The reference predictions are detached (a stop-gradient target). The
    terms are the MSE of nuclear and type probabilities and of the distance maps (with their
    components transformed back), over valid pixels. It is 0 for a model that is equivariant.

    Parameters
    ----------
    images
        (B, 3, H, W) float in [0, 1], H == W when ``k`` is odd.
    valid
        (B, H, W) bool.
    reference
        The model's outputs on ``images`` if already computed.
    """
    if reference is None:
        reference = model(images)
    x = perturb(images) if perturb is not None else images
    out = model(dihedral(x, k, flip))
    np_b = inverse_dihedral(F.softmax(out["np"].float(), dim=1), k, flip)
    tp_b = inverse_dihedral(F.softmax(out["tp"].float(), dim=1), k, flip)
    hv_b = inverse_dihedral_hv(out["hv"].float(), k, flip)
    ref_np = F.softmax(reference["np"].float(), dim=1).detach()
    ref_tp = F.softmax(reference["tp"].float(), dim=1).detach()
    ref_hv = reference["hv"].float().detach()
    return masked_mse(np_b, ref_np, valid) + masked_mse(tp_b, ref_tp, valid) + masked_mse(hv_b, ref_hv, valid)

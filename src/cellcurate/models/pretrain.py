"""Supervised pre-training of a small teacher encoder on curated tiles: the demo's stand-in for
H-Optimus-0.

H-Optimus-0 arrives with weights that already encode tissue; its random-weight ``tiny-vit``
substitute does not, so a teacher built on it (frozen encoder + trained decoder) learns little
more than the decoder alone could. :func:`pretrain_encoder` gives the small encoder information
before it is frozen: it trains the encoder (every layer) with a 1×1 linear head on its deepest
feature map to predict, for each encoder patch, the fractions of its pixels that are background
and each class (the curated type map averaged over the patch; ignore pixels left out), by soft
cross-entropy. The head is then dropped and the encoder frozen as usual by
:class:`~cellcurate.models.teacher.Teacher`. This is supervised pre-training on the same curated
labels, so it is a stand-in for a foundation model, not one: it says nothing about tissue the
labels do not cover.

Dimensions: B tiles of T×T pixels, K = 8 type channels, h×w encoder patches.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from .data import TileDataset, augment_batch, collate_tiles
from .targets import IGNORE

__all__ = ["patch_type_fractions", "pretrain_encoder"]


def patch_type_fractions(tp: torch.Tensor, size: tuple[int, int], n_types: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch class fractions of (B, T, T) type targets on an (h, w) patch grid.

    Returns ``fractions`` (B, K, h, w) summing to 1 over K where a patch has labelled pixels, and
    ``has`` (B, h, w) bool (False for a fully ignored patch).
    """
    valid = tp != IGNORE
    onehot = F.one_hot(torch.where(valid, tp, torch.zeros_like(tp)).long(), n_types).permute(0, 3, 1, 2).float()
    onehot = onehot * valid[:, None].float()
    sums = F.adaptive_avg_pool2d(onehot, size)
    total = sums.sum(dim=1)
    has = total > 1e-6
    return sums / total.clamp_min(1e-6)[:, None], has


def pretrain_encoder(
    teacher: Any,
    base: Dataset,
    *,
    epochs: int = 4,
    batch_size: int = 8,
    lr: float = 1e-3,
    tile_size: int = 256,
    seed: int = 0,
    augment: bool = True,
) -> list[dict[str, float]]:
    """Train ``teacher.encoder`` in place on the grid tiles of ``base`` (see the module docstring),
    then freeze it again. Returns one record per epoch (``loss``, ``seconds``).

    ``teacher`` is a :class:`~cellcurate.models.teacher.Teacher` (its ``normalise``,
    ``encoder_size`` and ``scale`` define the encoder's input, as in ``Teacher.encode``).
    """
    if epochs < 1:
        raise ConfigError(f"pre-training epochs must be >= 1, got {epochs}")
    enc: nn.Module = teacher.encoder
    n_types = int(teacher.config.n_types)
    device = next(teacher.parameters()).device
    tiles = TileDataset(base, tile_size=tile_size, mode="grid", mpp=teacher.config.data_mpp, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc_channels: Any = getattr(enc, "channels", None)
    channels = enc_channels[-1] if enc_channels is not None else None
    if channels is None:
        raise ConfigError("the teacher's encoder does not report its feature channels")
    head = nn.Conv2d(int(channels), n_types, 1).to(device)
    enc.requires_grad_(True)
    params = list(enc.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    history: list[dict[str, float]] = []
    try:
        for epoch in range(epochs):
            enc.train()
            t0 = time.perf_counter()
            total, n = 0.0, 0
            loader = DataLoader(tiles, batch_size=batch_size, shuffle=True, generator=gen, collate_fn=collate_tiles)
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * epoch / epochs)).item())
            for batch in loader:
                if augment:
                    batch, _ = augment_batch(batch, generator=gen, stain=True)
                    x = batch["image"].to(device)
                else:
                    x = batch["image"].to(device).float() / 255.0
                size = teacher.encoder_size(int(x.shape[-2]), int(x.shape[-1]))
                z = teacher.normalise(x)
                if teacher.scale < 0.75:
                    z = F.conv2d(F.pad(z, (1, 1, 1, 1), mode="replicate"), teacher.blur, groups=3)
                z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
                feat = enc(z)[-1]
                logits = head(feat)
                target, has = patch_type_fractions(batch["tp"].to(device), tuple(logits.shape[-2:]), n_types)
                nll = -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
                # fractions of foreground classes are what the frozen features must carry
                weight = has.float() * (1.0 + 4.0 * (1.0 - target[:, 0]))
                loss = (nll * weight).sum() / weight.sum().clamp_min(1.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                b = int(x.shape[0])
                total += float(loss.detach()) * b
                n += b
            history.append({"epoch": epoch + 1, "loss": total / max(n, 1), "seconds": time.perf_counter() - t0})
    finally:
        enc.requires_grad_(False)
        enc.eval()
    return history

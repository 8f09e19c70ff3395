"""Synthetic slides and models for the slide-path tests and benchmark.

``oracle_scene`` encodes nuclei in the pixels (R = 30 × class, G/B = h/v maps) so the
:class:`ContextOracle` reads them back; unlike a per-pixel oracle it smooths its nuclear logits
with a 3×3 zero-padded convolution, so like a CNN it sees the tile's edge, which makes stitching
differences visible. ``tissue_slide`` renders stained nuclei from the synthetic generator on
tissue blobs over a white background.
"""

from __future__ import annotations

import numpy as np
import torch

from cellcurate.models.targets import hover_targets

CLASSES = ["Background", "Neoplastic", "Lymphocyte", "Connective", "Dead", "Epithelial", "Macrophage", "Neutrophil"]


class ContextOracle(torch.nn.Module):
    def __init__(self, mpp: float = 0.25) -> None:
        super().__init__()
        self.meta = {"kind": "oracle", "architecture": "oracle", "classes": CLASSES, "mpp": mpp, "input_size": 64}
        self.register_buffer("k", torch.ones(1, 1, 3, 3) / 9.0)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cls = torch.round(x[:, 0] * 255.0 / 30.0).clamp(0, 7).long()
        fg = (cls > 0).float()
        soft = torch.nn.functional.conv2d(fg[:, None], self.k, padding=1)[:, 0]
        np_logits = torch.stack([10.0 - 20.0 * soft, 20.0 * soft - 10.0], dim=1)
        hv = (x[:, 1:3] * 2.0 - 1.0) * fg[:, None]
        tp = torch.nn.functional.one_hot(cls, 8).permute(0, 3, 1, 2).float() * 20.0 - 10.0
        return {"np": np_logits, "hv": hv, "tp": tp}


def oracle_scene(shape: tuple[int, int], seed: int, *, spacing: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 oracle-encoded image with disks (radius 4-8) on a jittered grid, and its
    (H, W) int32 instance map."""
    rng = np.random.default_rng(seed)
    h, w = shape
    inst = np.zeros(shape, np.int32)
    cls = np.zeros(shape, np.uint8)
    yy, xx = np.mgrid[-9:10, -9:10]
    k = 0
    for cy in range(12, h - 12, spacing):
        for cx in range(12, w - 12, spacing):
            if rng.random() < 0.25:
                continue
            r = int(rng.integers(4, 9))
            y, x = cy + int(rng.integers(-2, 3)), cx + int(rng.integers(-2, 3))
            disk = yy**2 + xx**2 <= r * r
            k += 1
            sl = (slice(y - 9, y + 10), slice(x - 9, x + 10))
            inst[sl][disk] = k
            cls[sl][disk] = int(rng.integers(1, 8))
    hv = hover_targets(inst, cls)["hv"]
    image = np.zeros(shape + (3,), np.uint8)
    image[..., 0] = cls * 30
    image[..., 1:] = np.round((np.moveaxis(hv, 0, -1) + 1.0) / 2.0 * 255.0).astype(np.uint8)
    return image, inst


def tissue_slide(shape: tuple[int, int], seed: int, *, block: int = 384) -> np.ndarray:
    """(H, W, 3) uint8: white background, a few elliptic tissue blobs filled with stained nuclei
    from the synthetic MoNuSAC generator (a handful of rendered blocks, tiled)."""
    from cellcurate.datasets import synthetic

    rng = np.random.default_rng(seed)
    h, w = shape
    blocks = []
    for i in range(3):
        img, _mpp, _regions = synthetic._monusac_image(
            np.random.default_rng(seed * 10 + i), mix=np.array([1, 1, 0, 0, 1, 1, 1]) / 5.0, neo_share=0.5, size=(block, block),
            test=False, flip_fraction=0.0, floats=False,
        )
        blocks.append(img[:block, :block])
    out = np.full((h, w, 3), 245, np.uint8)
    yy, xx = np.ogrid[0:h, 0:w]
    mask = np.zeros((h, w), bool)
    for _ in range(3):
        cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
        ry, rx = rng.uniform(0.12, 0.25) * h, rng.uniform(0.12, 0.25) * w
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    for by in range(0, h, block):
        for bx in range(0, w, block):
            sub = mask[by : by + block, bx : bx + block]
            if not sub.any():
                continue
            b = blocks[(by // block + bx // block) % len(blocks)][: sub.shape[0], : sub.shape[1]]
            out[by : by + block, bx : bx + block][sub] = b[sub]
    return out

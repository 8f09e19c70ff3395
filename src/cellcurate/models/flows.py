"""Cellpose-style flows: training targets from instance maps, and instances from predicted flows.

Dimensions: H×W pixels, n instances, B tiles of T×T pixels.

The flow dynamics are Cellpose's own (Stringer et al. 2021, ``cellpose.dynamics``; BSD-3), not a
re-implementation:

- :func:`flow_targets`: heat diffusion from each nucleus' centre (the pixel nearest its median)
  inside the nucleus, whose normalised gradient is the flow; (2, H, W) float32, channel 0 = x
  (column) and channel 1 = y (row) component (the order of the HoVer ``hv`` maps, so flips and
  rotations transform both alike), unit length inside nuclei, 0 outside.
- :func:`instances_from_flows`: Euler integration of the pixels with nucleus probability ≥
  ``threshold`` along the flow (``niter`` steps), seeds at the histogram peaks of the final
  positions, masks grown from them, and masks whose flows disagree with the flows recomputed from
  the mask (error > ``flow_threshold``) dropped; then instances under ``min_area`` px are removed
  and ids made contiguous 1..n. Cellpose scales network flows by 5; :func:`instances_from_flows`
  takes unit flows and scales them.

Training a flow student (:class:`FlowTileDataset`) replaces the ``hv`` target of every tile by
its flows (cached per tile, grid tiles being deterministic). Distilling it from a HoVer teacher
(:func:`teacher_flows`) turns the teacher's maps into instances (HoVer watershed) and those into
flows, once per tile.

>>> inst = np.zeros((9, 9), np.int32); inst[2:7, 2:7] = 1
>>> f = flow_targets(inst)
>>> f.shape, bool(f[0, 4, 2] > 0.9), bool(f[0, 4, 6] < -0.9)   # x-flow points to the centre
((2, 9, 9), True, True)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from skimage import segmentation

from ..errors import ConfigError
from .data import TileDataset
from .targets import IGNORE

__all__ = [
    "FLOW_SCALE",
    "FlowConfig",
    "FlowTileDataset",
    "flow_targets",
    "instances_from_flows",
    "teacher_flows",
]

#: Cellpose's network flows are 5× the unit flows.
FLOW_SCALE = 5.0


@dataclass(frozen=True)
class FlowConfig:
    """Knobs of :func:`instances_from_flows` (sizes in pixels at the model's resolution)."""

    threshold: float = 0.5
    flow_threshold: float = 0.4
    niter: int = 200
    min_area: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"flow threshold must be in (0, 1), got {self.threshold}")
        if self.flow_threshold < 0:
            raise ConfigError(f"flow_threshold must be >= 0 (0 disables the check), got {self.flow_threshold}")
        if self.niter < 1 or self.min_area < 0:
            raise ConfigError(f"niter must be >= 1 and min_area >= 0, got {self.niter}, {self.min_area}")


def _dynamics() -> Any:
    from cellpose import dynamics  # heavy (opencv, torch): imported on first use

    return dynamics


def flow_targets(instances: np.ndarray) -> np.ndarray:
    """Cellpose flows of an instance map.

    Parameters
    ----------
    instances
        (H, W) integer ids, 0 = background (ids need not be contiguous).

    Returns
    -------
    (2, H, W) float32: x then y component, unit length inside nuclei, 0 outside.
    """
    inst = np.asarray(instances)
    if inst.ndim != 2:
        raise ConfigError(f"instances must be (H, W), got {inst.shape}")
    out = np.zeros((2,) + inst.shape, np.float32)
    if not (inst > 0).any():
        return out
    lab, _, _ = segmentation.relabel_sequential(np.where(inst > 0, inst, 0).astype(np.int64))
    mu, _ = _dynamics().masks_to_flows_gpu(lab, device=torch.device("cpu"))  # (dy, dx)
    out[0], out[1] = mu[1], mu[0]
    return out


def instances_from_flows(np_prob: np.ndarray, flow: np.ndarray, *, config: FlowConfig | None = None) -> np.ndarray:
    """Nucleus instances by following predicted flows (Cellpose's ``compute_masks``).

    Parameters
    ----------
    np_prob
        (H, W) float nucleus probability.
    flow
        (2, H, W) float unit flows, x then y component (a model's ``hv`` output with the flow head).
    config
        Thresholds; :class:`FlowConfig` defaults when ``None``.

    Returns
    -------
    (H, W) int32 instance map, 0 = background, ids 1..n contiguous.
    """
    cfg = config or FlowConfig()
    prob = np.asarray(np_prob, dtype=np.float32)
    flow = np.asarray(flow, dtype=np.float32)
    if prob.ndim != 2 or flow.shape != (2,) + prob.shape:
        raise ConfigError(f"np_prob must be (H, W) and flow (2, H, W); got {prob.shape} and {flow.shape}")
    if not (prob >= cfg.threshold).any():
        return np.zeros(prob.shape, np.int32)
    dp = FLOW_SCALE * np.stack([flow[1], flow[0]])  # cellpose order (dy, dx), network scale
    # cellpose keeps pixels with cellprob > threshold; nudge so that ">= threshold" holds as documented
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's sparse-invariant notice inside cellpose
        masks = _dynamics().compute_masks(
            dp, prob, niter=cfg.niter,
            cellprob_threshold=float(np.nextafter(np.float32(cfg.threshold), np.float32(0))),
            flow_threshold=cfg.flow_threshold, max_size_fraction=1.0, device=torch.device("cpu"),
        )
    labels = np.asarray(masks).astype(np.int64)
    if cfg.min_area > 1 and labels.max() > 0:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= cfg.min_area
        keep[0] = False
        labels = np.where(keep[labels], labels, 0)
    relabelled, _, _ = segmentation.relabel_sequential(labels)
    return relabelled.astype(np.int32)


class FlowTileDataset(TileDataset):
    """:class:`~cellcurate.models.data.TileDataset` whose ``hv`` target holds Cellpose flows of the
    tile's nuclei (ignored pixels excluded) instead of HoVer distance maps. Grid tiles are
    deterministic, so their flows are computed once and kept in memory as float16 (keyed by the
    tile key)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._flows: dict[str, torch.Tensor] = {}

    def tile_instances(self, idx: int) -> np.ndarray:
        """The (T, T) instance ids of tile ``idx`` (0 outside nuclei, on padding and on ignore)."""
        i, y, x = self.index[idx]
        item = self._load(i)
        t = self.tile_size
        h, w = item["instances"].shape
        if y < 0:  # the random crop of TileDataset.__getitem__
            rng = np.random.default_rng([self.seed, self.epoch, i])
            y = int(rng.integers(0, max(h - t, 0) + 1))
            x = int(rng.integers(0, max(w - t, 0) + 1))
        inst = np.zeros((t, t), np.int64)
        cls = np.full((t, t), IGNORE, np.uint8)
        ch, cw = min(t, h - y), min(t, w - x)
        inst[:ch, :cw] = item["instances"][y : y + ch, x : x + cw]
        cls[:ch, :cw] = item["classes"][y : y + ch, x : x + cw]
        return np.where(cls != IGNORE, inst, 0)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        out = super().__getitem__(idx)
        key = out["key"]
        kept = self._flows.get(key) if self.mode == "grid" else None
        if kept is not None:
            return {**out, "hv": kept.float()}
        flows = torch.from_numpy(flow_targets(self.tile_instances(idx)))
        if self.mode == "grid":
            self._flows[key] = flows.half()  # 2 bytes a value: 256 KiB per 256-px tile
        return {**out, "hv": flows}


def teacher_flows(np_logits: torch.Tensor, hv: torch.Tensor) -> torch.Tensor:
    """Flows of a HoVer teacher's predicted nuclei: (B, 2, H, W) np logits and hv maps →
    (B, 2, H, W) flows (watershed of the teacher's maps, then :func:`flow_targets`)."""
    from .postprocess import instances_from_maps

    prob = torch.softmax(np_logits.float(), dim=1)[:, 1].cpu().numpy()
    maps = hv.float().cpu().numpy()
    out = [flow_targets(instances_from_maps(prob[j], maps[j])) for j in range(prob.shape[0])]
    return torch.from_numpy(np.stack(out)).to(hv.device)

"""HoVer-Net training targets from an instance map and a class map, and their dihedral transforms.

Dimensions: H×W pixels, n instances, K = 8 type channels (0 background + 7 classes).

Targets (all (H, W) unless said otherwise):

- ``np``: uint8, 1 inside a nucleus, 0 outside, 255 where ignored.
- ``hv``: float32 (2, H, W); channel 0 = horizontal (x) and channel 1 = vertical (y) distance of
  each nucleus pixel to its instance's centroid, normalised per instance and per sign so the
  negative side spans [-1, 0] and the positive side [0, 1]; 0 outside nuclei. The centroid is
  the exact (float) centre of mass, so the maps are exactly equivariant under flips and 90°
  rotations (see :func:`dihedral`).
- ``tp``: uint8 type map 0..7, 255 where ignored or unknown (a nucleus pixel with class 0, or a
  class pixel outside every instance).
- ``valid``: bool, False on ignore regions (class 255); every loss masks these pixels out.

>>> inst = np.zeros((5, 5), np.int32); inst[1:4, 1:4] = 1
>>> t = hover_targets(inst, np.where(inst > 0, 2, 0).astype(np.uint8))
>>> t["hv"][0, 2].tolist()
[0.0, -1.0, 0.0, 1.0, 0.0]
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from ..errors import ConfigError

__all__ = ["IGNORE", "dihedral", "dihedral_hv", "hover_targets", "inverse_dihedral", "inverse_dihedral_hv"]

IGNORE = 255


def hover_targets(
    instances: np.ndarray, classes: np.ndarray, *, n_types: int = 8, ignore_index: int = IGNORE
) -> dict[str, np.ndarray]:
    """Nuclear, distance and type targets of one image.

    Parameters
    ----------
    instances
        (H, W) integer instance ids, 0 = background.
    classes
        (H, W) uint8 class map: 0 background, 1..n_types-1 classes, ``ignore_index`` ignore.
    n_types
        Number of type channels (background included).

    Returns
    -------
    dict
        ``np`` (H, W) uint8, ``hv`` (2, H, W) float32, ``tp`` (H, W) uint8, ``valid`` (H, W) bool.
    """
    instances = np.asarray(instances)
    classes = np.asarray(classes)
    if instances.ndim != 2 or classes.shape != instances.shape:
        raise ConfigError(
            f"instances and classes must be (H, W) of one shape, got {instances.shape} and {classes.shape}"
        )
    valid = classes != ignore_index
    inst = np.where(valid, instances, 0).astype(np.int64)
    nuclear = inst > 0

    hv = np.zeros((2,) + inst.shape, np.float32)
    ids = np.unique(inst[nuclear])
    if ids.size:
        # Relabel to 1..n so per-label lookups are plain indexing.
        lut = np.zeros(int(inst.max()) + 1, np.int64)
        lut[ids] = np.arange(1, ids.size + 1)
        lab = lut[inst]
        index = np.arange(1, ids.size + 1)
        cy, cx = (np.asarray(c) for c in zip(*ndimage.center_of_mass(nuclear, lab, index)))
        yy, xx = np.indices(inst.shape, dtype=np.float64)
        for ch, (coord, centre) in enumerate(((xx, cx), (yy, cy))):
            d = np.zeros(inst.shape, np.float64)
            d[nuclear] = coord[nuclear] - centre[lab[nuclear] - 1]
            lo = np.asarray(ndimage.minimum(d, lab, index))
            hi = np.asarray(ndimage.maximum(d, lab, index))
            lo_px = np.concatenate([[1.0], np.where(lo < 0, -lo, 1.0)])[lab]
            hi_px = np.concatenate([[1.0], np.where(hi > 0, hi, 1.0)])[lab]
            hv[ch] = np.where(d < 0, d / lo_px, d / hi_px).astype(np.float32)

    in_range = (classes >= 1) & (classes < n_types)
    tp = np.where(nuclear, np.where(in_range, classes, ignore_index), np.where(classes == 0, 0, ignore_index))
    tp = np.where(valid, tp, ignore_index).astype(np.uint8)
    np_map = np.where(valid, nuclear, ignore_index).astype(np.uint8)
    return {"np": np_map, "hv": hv, "tp": tp, "valid": valid}


# -- dihedral group on (…, H, W) tensors ---------------------------------------------------------
# A transform is (k, flip): rotate by k×90° counter-clockwise (torch.rot90 on the last two dims),
# then flip left-right when ``flip``. Distance maps also change sign/channel (dihedral_hv).


def dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Apply rotation by ``k``×90° then an optional left-right flip to the last two dims."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def inverse_dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Undo :func:`dihedral` on the last two dims."""
    if flip:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, -(k % 4), dims=(-2, -1))


def _remix_hv(hv: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    h, v = hv[..., 0, :, :], hv[..., 1, :, :]
    for _ in range(k % 4):  # a counter-clockwise quarter turn maps (dx, dy) to (dy, -dx)
        h, v = v, -h
    if flip:
        h = -h
    return torch.stack([h, v], dim=-3)


def dihedral_hv(hv: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Transform (…, 2, H, W) distance maps: move the pixels and fix the vector components."""
    return _remix_hv(dihedral(hv, k, flip), k, flip)


def inverse_dihedral_hv(hv: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Undo :func:`dihedral_hv`."""
    x = hv
    if flip:
        x = _remix_hv(torch.flip(x, dims=(-1,)), 0, True)
    k = k % 4
    x = torch.rot90(x, -k, dims=(-2, -1))
    return _remix_hv(x, (4 - k) % 4, False)

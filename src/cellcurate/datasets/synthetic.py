"""A synthetic PanNuke + MoNuSAC sample written in the real release formats, with ground truth.

The sample is the project's demo data and the ground truth for testing the converters and the
relabeling: every nucleus has a *true* fine class (e.g. PanNuke ``Inflammatory`` nuclei are really
Lymphocyte, Macrophage or Neutrophil; MoNuSAC ``Epithelial`` nuclei are really Neoplastic or
Epithelial), and ``flip_fraction`` plants label noise whose every flip is recorded.

Dimensions: N tiles of a PanNuke fold, H×W pixels, C = 6 PanNuke mask channels (Neoplastic,
Inflammatory, Connective, Dead, Epithelial, Background), V vertices of one MoNuSAC polygon.

Layout written by :func:`write_sample` (``out`` is created atomically: temp folder + rename)::

    out/pannuke/Fold 1/images/fold1/images.npy   (N, 256, 256, 3) float64, 0-255
    out/pannuke/Fold 1/images/fold1/types.npy    (N,) <U13 tissue names
    out/pannuke/Fold 1/masks/fold1/masks.npy     (N, 256, 256, 6) float64 instance ids / background
    out/monusac/MoNuSAC_images_and_annotations/<TCGA barcode>/<stem>.{tif,svs,xml}
    out/monusac/MoNuSAC Testing Data and Annotations/<TCGA barcode>/<stem>.{tif,svs,xml}
    out/truth.parquet                            one row per nucleus / region, TRUTH_COLUMNS

Truth join keys: PanNuke ``(split, origin_index, origin_channel, origin_instance)``; MoNuSAC
``(origin_file, written_label, origin_region)`` -- as in the real XML, Region ``Id`` restarts
at 1 in every ``<Annotation>`` block, so the Region Id alone is unique only within its class.
Ambiguous (ignore) regions have ``kind="ignore"`` and ``true_class`` 255 (the ignore id).

>>> info = write_sample("/tmp/sample", preset="tiny", seed=0)   # doctest: +SKIP
>>> info.n_nuclei > 0                                           # doctest: +SKIP
True
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pandas as pd

from ..core.constants import IGNORE_VALUE
from ..errors import ConfigError, StateError

__all__ = [
    "CLASS_NAMES",
    "DEMO_INSTANCE_RATES",
    "INSTANCE_ISSUES",
    "INSTANCE_TRUTH_COLUMNS",
    "MONUSAC_LABELS",
    "MONUSAC_TEST_DIR",
    "MONUSAC_TRAIN_DIR",
    "PANNUKE_LABELS",
    "PANNUKE_MPP",
    "PANNUKE_TISSUES",
    "PRESETS",
    "TRUTH_COLUMNS",
    "Preset",
    "SampleInfo",
    "write_monusac",
    "write_pannuke",
    "write_pannuke_planted",
    "write_sample",
]

# --------------------------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------------------------
#: Unified classes, id = position + 1 (same as ``default_taxonomy.json``).
CLASS_NAMES: tuple[str, ...] = (
    "Neoplastic", "Lymphocyte", "Connective", "Dead", "Epithelial", "Macrophage", "Neutrophil",
)
_NEO, _LYM, _CON, _DEAD, _EPI, _MAC, _NEU = 1, 2, 3, 4, 5, 6, 7
IGNORE_CLASS = IGNORE_VALUE  # the class-map ignore id (cellcurate.core.constants)

#: PanNuke mask channels 0-4 (channel 5 is the background mask).
PANNUKE_LABELS: tuple[str, ...] = ("Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial")
#: MoNuSAC classes a nucleus can carry (``Ambiguous`` marks ignore regions in the test set).
MONUSAC_LABELS: tuple[str, ...] = ("Epithelial", "Lymphocyte", "Macrophage", "Neutrophil")
AMBIGUOUS = "Ambiguous"

MONUSAC_TRAIN_DIR = "MoNuSAC_images_and_annotations"
MONUSAC_TEST_DIR = "MoNuSAC Testing Data and Annotations"
PANNUKE_MPP = 0.25
PANNUKE_TILE = 256

#: The 19 tissue names of PanNuke's ``types.npy``, with (square roots of) their Fold 1 counts as
#: sampling weights, so Breast and Colon are common without swamping a small sample.
PANNUKE_TISSUES: tuple[str, ...] = (
    "Adrenal_gland", "Bile-duct", "Bladder", "Breast", "Cervix", "Colon", "Esophagus", "HeadNeck",
    "Kidney", "Liver", "Lung", "Ovarian", "Pancreatic", "Prostate", "Skin", "Stomach", "Testis",
    "Thyroid", "Uterus",
)
_TISSUE_COUNTS = (134, 159, 21, 827, 155, 478, 155, 70, 37, 65, 80, 54, 78, 77, 59, 50, 60, 80, 17)
_NO_EPITHELIAL = frozenset({"Lung", "Stomach"})
_NO_DEAD = frozenset({"HeadNeck", "Kidney", "Liver", "Ovarian", "Testis", "Thyroid", "Uterus"})

_PANNUKE_OF: dict[int, str] = {
    _NEO: "Neoplastic", _LYM: "Inflammatory", _CON: "Connective", _DEAD: "Dead",
    _EPI: "Epithelial", _MAC: "Inflammatory", _NEU: "Inflammatory",
}
_MONUSAC_OF: dict[int, str] = {
    _NEO: "Epithelial", _EPI: "Epithelial", _LYM: "Lymphocyte", _MAC: "Macrophage", _NEU: "Neutrophil",
}

#: Columns of ``truth.parquet`` and of the frames the writers return, with their dtypes.
TRUTH_COLUMNS: dict[str, str] = {
    "source": "object",  # "pannuke" | "monusac"
    "split": "object",  # "fold1".."fold3" | "train" | "test"
    "origin_file": "object",  # annotation file relative to the source root, "/" separators
    "origin_index": "int64",  # PanNuke tile index; -1
    "origin_channel": "int64",  # PanNuke channel 0-4; -1
    "origin_instance": "int64",  # PanNuke raw mask id as written; -1
    "origin_region": "object",  # MoNuSAC Region Id as written; ""
    "written_label": "object",  # source label in the files
    "true_label": "object",  # true label in the source's vocabulary
    "true_class": "int64",  # unified class id 1-7; 255 for ignore regions
    "flipped": "bool",  # written_label != true_label
    "kind": "object",  # "nucleus" | "ignore"
}

#: Instance-level errors :func:`write_sample` / :func:`write_pannuke` can plant in the PanNuke
#: annotation (the image keeps every nucleus): a nucleus left out of the mask, an annotated object
#: on background, an outline shifted or grown/shrunk, two nearby nuclei drawn as one outline (their
#: convex hull), one nucleus drawn as two pieces.
INSTANCE_ISSUES: tuple[str, ...] = ("missing_annotation", "spurious_annotation", "bad_outline", "merged", "split")

#: Columns of ``instance_truth.parquet``: one row per planted instance error. The annotated
#: nuclei concerned are ``(origin_file, origin_index, origin_channel, origin_instance)`` (and
#: ``origin_instance2`` for the second piece of a split); a missing nucleus has no annotation
#: (-1) and is located by its true centroid and bounding box (pixels, half-open).
INSTANCE_TRUTH_COLUMNS: dict[str, str] = {
    "source": "object", "split": "object", "origin_file": "object", "origin_index": "int64",
    "issue": "object", "origin_channel": "int64", "origin_instance": "int64", "origin_instance2": "int64",
    "centroid_y": "float64", "centroid_x": "float64", "bbox_y0": "int64", "bbox_x0": "int64",
    "bbox_y1": "int64", "bbox_x1": "int64", "area": "int64", "iou_to_true": "float64",
}

#: Planting rates of ``curate demo`` (fraction of a tile's nuclei per issue).
DEMO_INSTANCE_RATES: dict[str, float] = {"missing_annotation": 0.03, "spurious_annotation": 0.02,
                                         "bad_outline": 0.03, "merged": 0.02, "split": 0.02}

Preset = Literal["tiny", "demo"]
PRESETS: tuple[str, ...] = ("tiny", "demo")

_STREAM_PANNUKE, _STREAM_MONUSAC, _STREAM_NAMES, _STREAM_INSTANCES = 1, 2, 3, 4
_CHUNK = 32  # PanNuke tiles mapped at a time while writing (~150 MB of float64)


# --------------------------------------------------------------------------------------------
# stains and per-class appearance
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Stain:
    """Beer-Lambert stain model: RGB = 255 * exp(-(h * H + e * E))."""

    hema: tuple[float, float, float]
    eosin: tuple[float, float, float]
    bg_eosin: float
    bg_hema: float

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        h = np.asarray(self.hema, dtype=np.float32)
        e = np.asarray(self.eosin, dtype=np.float32)
        return h / np.linalg.norm(h), e / np.linalg.norm(e)


_STAIN_PANNUKE = _Stain(hema=(0.65, 0.70, 0.29), eosin=(0.07, 0.99, 0.11), bg_eosin=0.34, bg_hema=0.06)
# MoNuSAC: a bluer haematoxylin and a redder, stronger eosin (small domain shift).
_STAIN_MONUSAC = _Stain(hema=(0.58, 0.72, 0.38), eosin=(0.16, 0.96, 0.18), bg_eosin=0.40, bg_hema=0.08)


@dataclass(frozen=True)
class _Look:
    """How one class is stained. Concentrations are haematoxylin / eosin optical densities."""

    hema: float  # mean haematoxylin of the nucleus (darkness)
    eosin: float  # eosin inside the nucleus
    fine: float  # amplitude of fine chromatin texture (relative)
    coarse: float  # amplitude of coarse chromatin clumps (relative)
    rim: float  # extra haematoxylin on the nuclear membrane (relative)
    rim_um: float  # membrane thickness
    nucleoli: tuple[int, int]  # min, max number of nucleoli
    cyto_um: float  # cytoplasm radius beyond the nucleus (0: none)
    cyto_eosin: float
    cyto_hema: float


_LOOKS: dict[int, _Look] = {
    _NEO: _Look(1.15, 0.10, 0.10, 0.30, 0.25, 0.5, (1, 3), 2.0, 0.48, 0.12),
    _LYM: _Look(1.40, 0.08, 0.04, 0.03, 0.0, 0.0, (0, 0), 0.6, 0.22, 0.14),
    _CON: _Look(1.20, 0.10, 0.05, 0.06, 0.0, 0.0, (0, 0), 0.0, 0.0, 0.0),
    _DEAD: _Look(1.75, 0.20, 0.03, 0.02, 0.0, 0.0, (0, 0), 2.2, 0.75, 0.03),
    _EPI: _Look(0.80, 0.10, 0.07, 0.08, 0.15, 0.4, (0, 1), 2.6, 0.46, 0.08),
    _MAC: _Look(0.55, 0.12, 0.15, 0.03, 0.25, 0.35, (0, 0), 4.0, 0.22, 0.10),
    _NEU: _Look(1.05, 0.10, 0.06, 0.05, 0.0, 0.0, (0, 0), 1.4, 0.34, 0.06),
}


# --------------------------------------------------------------------------------------------
# nucleus shapes
# --------------------------------------------------------------------------------------------
@dataclass
class _Shape:
    """A nucleus outline around the origin, in pixels, and its rasterised mask.

    ``polys`` hold (V, 2) x, y vertices relative to the nucleus centre; ``mask[0, 0]`` lies at
    (centre_y + oy, centre_x + ox); ``halo`` is ``mask`` dilated by ``pad`` pixels, with its own
    origin at (oy - pad, ox - pad).
    """

    fine: int
    polys: list[np.ndarray]
    mask: np.ndarray
    oy: int
    ox: int
    halo: np.ndarray
    pad: int
    radius: float  # mean radius (px), for texture and cytoplasm
    extent: float  # max distance of a vertex from the centre (px)
    area: int = 0


def _harmonics(rng: np.random.Generator, ks: range, amp: float) -> Callable[[np.ndarray], np.ndarray]:
    amps = amp * rng.uniform(0.5, 1.0, len(ks))
    phases = rng.uniform(0, 2 * np.pi, len(ks))

    def mod(t: np.ndarray) -> np.ndarray:
        out = np.ones_like(t)
        for k, a, p in zip(ks, amps, phases):
            out += a * np.cos(k * t + p)
        return out

    return mod


def _outline(
    a: float, b: float, rot: float, n: int, mod: Callable[[np.ndarray], np.ndarray] | None = None
) -> np.ndarray:
    """(n, 2) x, y of an ellipse with semi-axes a (x) and b (y), radially modulated, rotated."""
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    r = a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2)
    if mod is not None:
        r = r * np.maximum(mod(t), 0.35)
    x, y = r * np.cos(t), r * np.sin(t)
    c, s = np.cos(rot), np.sin(rot)
    return np.stack([c * x - s * y, s * x + c * y], axis=1)


def _n_vertices(a_px: float) -> int:
    return int(max(16, min(96, 2 * np.pi * a_px / 2.5)))


def _shape_polys(fine: int, rng: np.random.Generator, ppu: float) -> tuple[list[np.ndarray], float]:
    """Outline polygons (px, relative to the centre) and mean radius (px) of one nucleus.

    Sizes are in µm and converted with ``ppu`` (pixels per µm), so the same class has the same
    physical size at every pixel size.
    """
    rot = rng.uniform(0, np.pi)
    if fine == _LYM:  # small, round
        d = rng.normal(6.5, 0.35) * ppu
        asp = rng.uniform(1.0, 1.12)
        a, b = d / 2 * np.sqrt(asp), d / 2 / np.sqrt(asp)
        return [_outline(a, b, rot, _n_vertices(a), _harmonics(rng, range(2, 5), 0.02))], d / 2
    if fine == _NEU:  # 3-4 lobes
        r0 = rng.normal(3.3, 0.2) * ppu
        k = int(rng.integers(3, 5))
        lobe_amp, phase = rng.uniform(0.32, 0.45), rng.uniform(0, 2 * np.pi)
        small = _harmonics(rng, range(1, 3), 0.04)

        def lobes(t: np.ndarray) -> np.ndarray:
            return small(t) + lobe_amp * np.cos(k * t + phase)

        asp = rng.uniform(1.0, 1.2)
        a, b = r0 * np.sqrt(asp), r0 / np.sqrt(asp)
        return [_outline(a, b, rot, _n_vertices(a * 1.4), lobes)], r0
    if fine == _MAC:  # large, kidney-shaped (indented on one long side)
        a = rng.uniform(12.0, 14.0) / 2 * ppu
        b = a / rng.uniform(1.35, 1.6)
        depth, width = rng.uniform(0.25, 0.38), rng.uniform(0.40, 0.55)
        small = _harmonics(rng, range(2, 4), 0.02)

        def bean(t: np.ndarray) -> np.ndarray:
            dt = np.angle(np.exp(1j * (t - np.pi / 2)))
            return small(t) - depth * np.exp(-(dt**2) / (2 * width**2))

        return [_outline(a, b, rot, _n_vertices(a), bean)], np.sqrt(a * b)
    if fine == _NEO:  # large, irregular
        d = rng.uniform(11.0, 16.0) * ppu
        asp = rng.uniform(1.1, 1.5)
        a, b = d / 2 * np.sqrt(asp), d / 2 / np.sqrt(asp)
        return [_outline(a, b, rot, _n_vertices(a), _harmonics(rng, range(2, 7), 0.07))], d / 2
    if fine == _EPI:  # medium, oval, regular
        a = rng.uniform(8.0, 10.0) / 2 * ppu
        b = a / rng.uniform(1.3, 1.6)
        return [_outline(a, b, rot, _n_vertices(a), _harmonics(rng, range(2, 4), 0.015))], np.sqrt(a * b)
    if fine == _CON:  # thin elongated spindle, slightly bent
        b = rng.uniform(2.6, 3.4) / 2 * ppu
        a = b * rng.uniform(3.0, 5.0)
        n = _n_vertices(a)
        t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
        x = a * np.cos(t)
        y = b * np.sin(t) * (0.6 + 0.4 * np.abs(np.sin(t)))
        y = y + rng.uniform(-0.8, 0.8) * b * ((x / a) ** 2 - 0.5)
        c, s = np.cos(rot), np.sin(rot)
        return [np.stack([c * x - s * y, s * x + c * y], axis=1)], np.sqrt(a * b)
    if fine == _DEAD:
        if rng.random() < 0.5:  # pyknotic: small, round, very dark
            d = rng.uniform(4.0, 5.5) * ppu
            return [_outline(d / 2, d / 2 * rng.uniform(0.85, 1.0), rot, _n_vertices(d / 2),
                             _harmonics(rng, range(2, 4), 0.03))], d / 2
        # karyorrhexis: a cluster of small dark fragments, outlined as ONE nucleus. Each fragment
        # overlaps one placed before it, so the outline (the union's exterior) is a single
        # connected polygon, as an annotator draws it: a nucleus whose id covered separate pieces
        # would be counted several times by any model that sees pixels (issue 9: it capped the
        # ground-truth oracle's count R2 at ~0.87).
        return [_fragment_cluster(rng, ppu)], 2.5 * ppu
    raise ConfigError(f"unknown fine class {fine}")


def _fragment_cluster(rng: np.random.Generator, ppu: float) -> np.ndarray:
    """(V, 2) x, y outline of a karyorrhectic nucleus: 3-6 round fragments (0.55-1 µm radius),
    each centred at 0.7 × the sum of its radius and a random earlier fragment's radius from that
    one (in a random direction), so consecutive fragments overlap and the cluster is connected;
    the outline is the exterior of their union (its convex hull if rounding ever disconnects it),
    re-centred on the cluster's mean."""
    from shapely.geometry import Polygon
    from shapely.ops import unary_union

    centres: list[tuple[float, float]] = []
    radii: list[float] = []
    for i in range(int(rng.integers(3, 7))):
        pick = rng.random()  # which earlier fragment this one leans on
        phi = rng.uniform(0, 2 * np.pi)
        fr = rng.uniform(0.55, 1.0) * ppu
        if i == 0:
            cx, cy = 0.0, 0.0
        else:
            j = int(pick * i)
            d = 0.7 * (radii[j] + fr)
            cx, cy = centres[j][0] + d * np.cos(phi), centres[j][1] + d * np.sin(phi)
        centres.append((cx, cy))
        radii.append(fr)
    discs = [Polygon(_outline(r, r, 0.0, 16) + [cx, cy]) for (cx, cy), r in zip(centres, radii)]
    union = unary_union(discs)
    if union.geom_type != "Polygon":
        union = union.convex_hull
    xy = np.asarray(union.exterior.coords, dtype=np.float64)[:-1]
    return xy - xy.mean(axis=0)


def _make_shape(
    fine: int, rng: np.random.Generator, ppu: float, *, quantum: float | None = None, pad: int = 2
) -> _Shape:
    """Outline + mask of one nucleus; ``quantum`` rounds vertices (e.g. 1.0 for integer XML)."""
    from scipy import ndimage
    from skimage.draw import polygon as draw_polygon

    polys, radius = _shape_polys(fine, rng, ppu)
    if quantum is not None:
        polys = [np.round(p / quantum) * quantum for p in polys]
    allv = np.concatenate(polys)
    oy = int(np.floor(allv[:, 1].min())) - 1
    ox = int(np.floor(allv[:, 0].min())) - 1
    h = int(np.ceil(allv[:, 1].max())) - oy + 2
    w = int(np.ceil(allv[:, 0].max())) - ox + 2
    mask = np.zeros((h, w), dtype=bool)
    for p in polys:
        rr, cc = draw_polygon(p[:, 1] - oy, p[:, 0] - ox, shape=(h, w))
        mask[rr, cc] = True
    if not mask.any():  # degenerate (never for the sizes above); keep one pixel
        mask[-oy, -ox] = True
    halo = ndimage.binary_dilation(np.pad(mask, pad), structure=_DISK[pad]) if pad else mask
    extent = float(np.hypot(allv[:, 0], allv[:, 1]).max())
    return _Shape(fine, polys, mask, oy, ox, halo, pad, float(radius), extent, int(mask.sum()))


def _disk(r: int) -> np.ndarray:
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return (x * x + y * y) <= r * r + 0.5


_DISK = {r: _disk(r) for r in range(0, 6)}


# --------------------------------------------------------------------------------------------
# a canvas: place nuclei, then render H&E
# --------------------------------------------------------------------------------------------
@dataclass
class _Placed:
    shape: _Shape
    cy: int
    cx: int
    tag: Any  # caller's payload (e.g. the nucleus record)
    group: int  # nuclei of different groups may overlap a little (PanNuke channels); -1 never
    hema_scale: float = 1.0


def _clip(y0: int, x0: int, h: int, w: int, height: int, width: int) -> tuple[slice, slice, slice, slice] | None:
    """Image and local slices of a (h, w) box at (y0, x0) clipped to the image; None if outside."""
    ya, xa = max(y0, 0), max(x0, 0)
    yb, xb = min(y0 + h, height), min(x0 + w, width)
    if ya >= yb or xa >= xb:
        return None
    return slice(ya, yb), slice(xa, xb), slice(ya - y0, yb - y0), slice(xa - x0, xb - x0)


class _Canvas:
    """One image being composed: placement with an owner map, then stain rendering.

    ``partial=True`` lets nuclei be cut by the border (PanNuke tiles); otherwise every nucleus
    lies fully inside with a 2 px margin (MoNuSAC polygons).
    """

    def __init__(self, rng: np.random.Generator, height: int, width: int, *, partial: bool) -> None:
        self.rng = rng
        self.height, self.width = height, width
        self.partial = partial
        # index + 1 of the nucleus last placed on a pixel; -1 keeps nuclei out (ignore regions)
        self.owner = np.zeros((height, width), dtype=np.int32)
        self.placed: list[_Placed] = []
        self._no_target: set[int] = set()

    # -- placement ----------------------------------------------------------------------------
    def _inside(self, s: _Shape, cy: int, cx: int) -> bool:
        """PanNuke: ≥ 35 % of the nucleus inside the tile; MoNuSAC: all of it, 2 px from the border."""
        y0, x0 = cy + s.oy, cx + s.ox
        h, w = s.mask.shape
        if not self.partial:
            return y0 >= 2 and x0 >= 2 and y0 + h <= self.height - 2 and x0 + w <= self.width - 2
        cl = _clip(y0, x0, h, w, self.height, self.width)
        return cl is not None and int(s.mask[cl[2], cl[3]].sum()) >= 0.35 * s.area

    def _fits(self, s: _Shape, cy: int, cx: int, *, halo: bool) -> bool:
        if not self._inside(s, cy, cx):
            return False
        m = s.halo if halo else s.mask
        off = s.pad if halo else 0
        cl = _clip(cy + s.oy - off, cx + s.ox - off, m.shape[0], m.shape[1], self.height, self.width)
        if cl is None:
            return False
        ys, xs, ly, lx = cl
        return not self.owner[ys, xs][m[ly, lx]].any()

    def stamp(self, s: _Shape, cy: int, cx: int) -> tuple[slice, slice, np.ndarray] | None:
        cl = _clip(cy + s.oy, cx + s.ox, s.mask.shape[0], s.mask.shape[1], self.height, self.width)
        if cl is None:
            return None
        ys, xs, ly, lx = cl
        return ys, xs, s.mask[ly, lx]

    def _commit(self, s: _Shape, cy: int, cx: int, tag: Any, group: int) -> _Placed:
        p = _Placed(s, cy, cx, tag, group)
        self.placed.append(p)
        st = self.stamp(s, cy, cx)
        if st is not None:
            ys, xs, sub = st
            self.owner[ys, xs][sub] = len(self.placed)
        return p

    def _random_centre(self, s: _Shape) -> tuple[int, int]:
        if self.partial:
            m = int(s.extent * 0.5)
            return int(self.rng.integers(-m, self.height + m)), int(self.rng.integers(-m, self.width + m))
        e = int(np.ceil(s.extent)) + 3
        if 2 * e >= min(self.height, self.width):
            return self.height // 2, self.width // 2
        return int(self.rng.integers(e, self.height - e)), int(self.rng.integers(e, self.width - e))

    def place(self, s: _Shape, tag: Any, *, group: int = -1, mode: str = "gap", tries: int = 40) -> _Placed | None:
        """Place ``s`` where it overlaps nothing: ``mode`` "gap" keeps ≥ ``pad`` px free around
        it, "touch" allows adjacency, "overlap" makes it overlap a nucleus of another group by a
        few pixels (falls back to "touch"). Returns None when no place was found."""
        if mode == "overlap":
            p = self._place_overlapping(s, tag, group)
            if p is not None:
                return p
            mode = "touch"
        for _ in range(tries):
            cy, cx = self._random_centre(s)
            if self._fits(s, cy, cx, halo=mode == "gap"):
                return self._commit(s, cy, cx, tag, group)
        return None

    def _place_overlapping(self, s: _Shape, tag: Any, group: int) -> _Placed | None:
        targets = [
            i for i, p in enumerate(self.placed)
            if p.group >= 0 and p.group != group and i not in self._no_target
        ]
        if not targets or group < 0:
            return None
        for _ in range(6):
            ti = targets[int(self.rng.integers(len(targets)))]
            t = self.placed[ti]
            phi = self.rng.uniform(0, 2 * np.pi)
            dy, dx = np.sin(phi), np.cos(phi)
            dist = t.shape.extent + s.extent + 2
            hit = None
            while dist > 0:
                cy, cx = int(round(t.cy + dy * dist)), int(round(t.cx + dx * dist))
                st = self.stamp(s, cy, cx)
                if st is not None and self.owner[st[0], st[1]][st[2]].any():
                    hit = dist
                    break
                dist -= 1.0
            if hit is None:
                continue
            cy, cx = int(round(t.cy + dy * (hit - 1))), int(round(t.cx + dx * (hit - 1)))
            st = self.stamp(s, cy, cx)
            if st is None or not self._inside(s, cy, cx):
                continue
            under = self.owner[st[0], st[1]][st[2]]
            owners = set(np.unique(under[under != 0]).tolist())
            if owners != {ti + 1} or int((under != 0).sum()) > 0.08 * s.area:
                continue
            # nothing else within the halo (other than the target)
            y0, x0 = cy + s.oy - s.pad, cx + s.ox - s.pad
            cl = _clip(y0, x0, s.halo.shape[0], s.halo.shape[1], self.height, self.width)
            if cl is None:
                continue
            near = self.owner[cl[0], cl[1]][s.halo[cl[2], cl[3]]]
            if set(np.unique(near[near != 0]).tolist()) - {ti + 1}:
                continue
            self._no_target.update({ti, len(self.placed)})
            return self._commit(s, cy, cx, tag, group)
        return None

    # -- rendering ------------------------------------------------------------------------------
    def render(self, stain: _Stain, ppu: float, *, lumen: bool) -> np.ndarray:
        """Compose H&E: (H, W, 3) uint8."""
        from scipy import ndimage
        from skimage.draw import disk as draw_disk

        rng, hgt, wid = self.rng, self.height, self.width
        shape = (hgt, wid)

        def noise(sigma: float | tuple[float, float]) -> np.ndarray:
            n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
            return n / (n.std() + 1e-6)

        fine = noise(0.2 * ppu)
        coarse = noise(0.45 * ppu)
        fibre_sigma = (0.4 * ppu, 2.0 * ppu) if rng.random() < 0.5 else (2.0 * ppu, 0.4 * ppu)
        fibre = noise(fibre_sigma)
        eos = stain.bg_eosin * rng.uniform(0.85, 1.15) * (1 + 0.28 * fibre + 0.08 * fine)
        hem = stain.bg_hema * (1 + 0.3 * fine)
        if lumen:  # white spaces (fat, lumina)
            blob = noise(6.0 * ppu)
            holes = blob > np.quantile(blob, rng.uniform(0.8, 0.95))
            eos[holes] *= 0.08
            hem[holes] *= 0.2
        eos = np.clip(eos, 0, None).astype(np.float32)
        hem = np.clip(hem, 0, None).astype(np.float32)

        # cytoplasm first (nuclei are painted over it)
        for p in self.placed:
            look = _LOOKS[p.shape.fine]
            if look.cyto_um <= 0:
                continue
            r = p.shape.radius + look.cyto_um * ppu
            if p.shape.fine == _NEU:
                r = max(r, 5.0 * ppu)  # a ~10 µm cell
            rr, cc = draw_disk((p.cy, p.cx), r, shape=shape)
            if rr.size == 0:
                continue
            eos[rr, cc] = look.cyto_eosin * (1 + 0.15 * fine[rr, cc])
            hem[rr, cc] = look.cyto_hema * (1 + 0.3 * coarse[rr, cc])

        for p in self.placed:
            self._paint_nucleus(p, hem, eos, fine, coarse, ppu)

        hem = ndimage.gaussian_filter(hem, 0.12 * ppu)
        eos = ndimage.gaussian_filter(eos, 0.12 * ppu)
        hvec, evec = stain.vectors()
        hvec = hvec * rng.uniform(0.95, 1.05, 3).astype(np.float32)
        od = hem[..., None] * hvec + eos[..., None] * evec
        rgb = 250.0 * np.exp(-od) + rng.normal(0.0, 1.8, od.shape).astype(np.float32)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)

    def _paint_nucleus(self, p: _Placed, hem: np.ndarray, eos: np.ndarray, fine: np.ndarray,
                       coarse: np.ndarray, ppu: float) -> None:
        from scipy import ndimage

        rng, s = self.rng, p.shape
        look = _LOOKS[s.fine]
        cl = _clip(p.cy + s.oy, p.cx + s.ox, s.mask.shape[0], s.mask.shape[1], self.height, self.width)
        if cl is None:
            return
        ys, xs, ly, lx = cl
        m = s.mask
        level = np.full(m.shape, look.hema * p.hema_scale, dtype=np.float32)
        if look.rim > 0:
            k = max(1, int(round(look.rim_um * ppu)))
            inner = ndimage.binary_erosion(m, iterations=k)
            level[m & ~inner] *= 1 + look.rim
        yy, xx = np.mgrid[0 : m.shape[0], 0 : m.shape[1]]
        dist = np.hypot(yy + s.oy, xx + s.ox)
        if s.fine == _NEU:  # lobes dark, the strands between them paler
            level *= 0.72 + 0.4 * np.clip(dist / (1.2 * s.radius), 0, 1)
        lo, hi = look.nucleoli
        n_nuc = int(rng.integers(lo, hi + 1)) if hi > 0 else 0
        if n_nuc:
            cand = np.argwhere(m & (dist < 0.45 * s.radius))
            for _ in range(n_nuc if len(cand) else 0):
                cy, cx = cand[int(rng.integers(len(cand)))]
                rad = rng.uniform(0.45, 0.85) * ppu
                blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= rad * rad
                level[blob & m] += 0.55 if s.fine == _NEO else 0.25
        sub = m[ly, lx]
        tex = 1 + look.fine * fine[ys, xs][sub] + look.coarse * coarse[ys, xs][sub]
        hem[ys, xs][sub] = np.clip(level[ly, lx][sub] * tex, 0.05, None)
        eos[ys, xs][sub] = look.eosin * (1 + 0.3 * fine[ys, xs][sub])


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


def _flip_plan(rng: np.random.Generator, n: int, fraction: float) -> np.ndarray:
    """(n,) bool: which of n nuclei get a wrong written label (stochastic rounding of n*fraction)."""
    out = np.zeros(n, dtype=bool)
    if n == 0 or fraction <= 0:
        return out
    k = int(np.floor(n * fraction + rng.random()))
    out[rng.choice(n, size=min(k, n), replace=False)] = True
    return out


def _other(rng: np.random.Generator, label: str, labels: tuple[str, ...]) -> str:
    others = [x for x in labels if x != label]
    return others[int(rng.integers(len(others)))]


def _sample_classes(rng: np.random.Generator, weights: np.ndarray, n: int) -> np.ndarray:
    w = weights * rng.gamma(3.0, 1 / 3.0, len(weights))
    if w.sum() <= 0:
        w = weights
    return rng.choice(np.arange(1, 8), size=n, p=w / w.sum())


# --------------------------------------------------------------------------------------------
# PanNuke
# --------------------------------------------------------------------------------------------
#: Base mix of true fine classes in PanNuke tiles (index = class id - 1).
_PANNUKE_MIX = np.array([0.20, 0.12, 0.16, 0.14, 0.18, 0.10, 0.10])


def _tissue_mix(tissue: str) -> np.ndarray:
    w = _PANNUKE_MIX.copy()
    if tissue in _NO_EPITHELIAL:
        w[_EPI - 1] = 0.0
    if tissue in _NO_DEAD:
        w[_DEAD - 1] = 0.0
    return w / w.sum()


@dataclass
class _Tile:
    tissue: str
    image: np.ndarray  # (256, 256, 3) uint8
    inst: np.ndarray  # (256, 256, 5) int32 raw ids per channel
    rows: list[tuple[int, int, str, int, bool]]  # channel, raw id, written label, true class, flipped


def _pannuke_tile(rng: np.random.Generator, *, empty: bool, flip_fraction: float) -> _Tile:
    size, ppu = PANNUKE_TILE, 1.0 / PANNUKE_MPP
    weights = np.sqrt(np.asarray(_TISSUE_COUNTS, dtype=float))
    tissue = PANNUKE_TISSUES[int(rng.choice(len(PANNUKE_TISSUES), p=weights / weights.sum()))]
    canvas = _Canvas(rng, size, size, partial=True)
    if not empty:
        n = int(rng.integers(16, 44))
        fines = _sample_classes(rng, _tissue_mix(tissue), n)
        flips = _flip_plan(rng, n, flip_fraction)
        # big nuclei first: they are the hardest to fit
        order = np.argsort([-{_NEO: 3, _MAC: 2, _CON: 2}.get(int(f), 1) for f in fines], kind="stable")
        for j in order:
            fine = int(fines[j])
            true_label = _PANNUKE_OF[fine]
            written = _other(rng, true_label, PANNUKE_LABELS) if flips[j] else true_label
            channel = PANNUKE_LABELS.index(written)
            u = rng.random()
            mode = "overlap" if u < 0.03 else ("touch" if u < 0.09 else "gap")
            shape = _make_shape(fine, rng, ppu)
            p = canvas.place(shape, (channel, written, fine, bool(flips[j])), group=channel, mode=mode)
            if p is not None:
                p.hema_scale = float(rng.normal(1.0, 0.10))
    image = canvas.render(_STAIN_PANNUKE, ppu, lumen=empty or rng.random() < 0.3)

    inst = np.zeros((size, size, 5), dtype=np.int32)
    by_channel: dict[int, list[_Placed]] = {}
    for p in canvas.placed:
        by_channel.setdefault(p.tag[0], []).append(p)
    rows = []
    for channel in sorted(by_channel):
        members = by_channel[channel]
        # non-contiguous raw ids, drawn per channel from overlapping ranges: ids collide across
        # channels, as in the real masks
        ids = rng.choice(np.arange(1, 2 * len(members) + 12), size=len(members), replace=False)
        for p, raw in zip(members, ids):
            st = canvas.stamp(p.shape, p.cy, p.cx)
            if st is None or not st[2].any():  # cannot happen: placement keeps ≥ 35 % inside
                continue
            ys, xs, sub = st
            inst[ys, xs, channel][sub] = int(raw)
            _, written, fine, flipped = p.tag
            rows.append((channel, int(raw), written, fine, flipped))
    return _Tile(tissue, image, inst, rows)


def _vary(tile: _Tile, rng: np.random.Generator, copy: int) -> _Tile:
    """A cheap variant of a rendered tile: a dihedral transform and a small brightness change."""
    t = copy % 8
    img, inst = np.rot90(tile.image, t % 4), np.rot90(tile.inst, t % 4)
    if t >= 4:
        img, inst = img[:, ::-1], inst[:, ::-1]
    scale = rng.uniform(0.95, 1.05)
    img = np.clip(np.rint(img.astype(np.float32) * scale), 0, 255).astype(np.uint8)
    return _Tile(tile.tissue, img, np.ascontiguousarray(inst), tile.rows)


# --------------------------------------------------------------------------------------------
# planted instance errors (PanNuke annotation only; the image is never touched)
# --------------------------------------------------------------------------------------------
def check_instance_rates(rates: dict[str, float] | None) -> dict[str, float]:
    """Validated planting rates (issue -> fraction in [0, 1]); ``None`` or ``{}`` plants nothing."""
    if rates is None:
        return {}
    if not isinstance(rates, dict):
        raise ConfigError(f"instance_errors must be a mapping issue -> rate, got {type(rates).__name__}")
    unknown = sorted(set(rates) - set(INSTANCE_ISSUES))
    if unknown:
        raise ConfigError(f"unknown instance issue(s) {unknown}; expected some of {', '.join(INSTANCE_ISSUES)}")
    out = {k: _check_fraction(f"instance_errors[{k!r}]", v) for k, v in rates.items()}
    if sum(out.values()) > 0.5:
        raise ConfigError(f"instance error rates add up to {sum(out.values()):.2f}; at most 0.5 of the nuclei")
    return {k: v for k, v in out.items() if v > 0}


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else 0.0


def _plant_instances(rng: np.random.Generator, tile: _Tile, rates: dict[str, float]
                     ) -> tuple[_Tile, list[dict[str, Any]]]:
    """Plant instance errors into ``tile.inst`` (a copy) and its rows; return the planted truth.

    Each nucleus takes part in at most one error. Rows (the class truth) follow the annotation: a
    missing nucleus loses its row, a merged pair keeps the first nucleus' row, a split nucleus'
    second piece gets a row of the same class; a spurious object gets no row (it has no class).
    """
    from scipy import ndimage
    from skimage.morphology import convex_hull_image, disk

    inst = tile.inst.copy()
    size = inst.shape[0]
    rows = list(tile.rows)
    if not rows:
        return tile, []
    masks = {(c, r): inst[..., c] == r for c, r, *_ in rows}
    every = inst.any(axis=2)  # every annotated pixel before planting (the image shows them all)
    issues = list(rates)
    p = np.array([rates[k] for k in issues] + [max(0.0, 1.0 - sum(rates.values()))])
    draw = rng.choice(len(p), size=len(rows), p=p / p.sum())
    used: set[tuple[int, int]] = set()
    planted: list[dict[str, Any]] = []
    next_id = {c: int(inst[..., c].max()) + 1 for c in range(inst.shape[2])}
    drop: set[tuple[int, int]] = set()
    extra_rows: list[tuple[int, int, str, int, bool]] = []

    def record(issue: str, key: tuple[int, int] | None, mask: np.ndarray, **kw: Any) -> None:
        y0, x0, y1, x1 = _bbox(mask)
        ys, xs = np.nonzero(mask)
        planted.append({"issue": issue, "origin_channel": -1 if key is None else key[0],
                        "origin_instance": -1 if key is None else key[1], "origin_instance2": -1,
                        "centroid_y": float(ys.mean()), "centroid_x": float(xs.mean()), "bbox_y0": y0,
                        "bbox_x0": x0, "bbox_y1": y1, "bbox_x1": x1, "area": int(mask.sum()),
                        "iou_to_true": np.nan, **kw})

    for j, (c, raw, written, fine, flipped) in enumerate(rows):
        if draw[j] == len(issues) or (c, raw) in used:
            continue
        issue, key, mask = issues[draw[j]], (c, raw), masks[(c, raw)]
        area = int(mask.sum())
        if area < 40:
            continue
        if issue == "missing_annotation":
            inst[..., c][mask] = 0
            drop.add(key)
            record(issue, None, mask)
        elif issue == "spurious_annotation":
            r = float(np.sqrt(area / np.pi))
            ry, rx = r * rng.uniform(0.8, 1.2), r * rng.uniform(0.8, 1.2)
            free = ndimage.distance_transform_edt(~every) > max(ry, rx) + 4
            ys, xs = np.nonzero(free)
            if not len(ys):
                continue
            k = int(rng.integers(len(ys)))
            yy, xx = np.mgrid[0:size, 0:size]
            blob = ((yy - ys[k]) / ry) ** 2 + ((xx - xs[k]) / rx) ** 2 <= 1.0
            new = next_id[c]
            next_id[c] += 1
            inst[..., c][blob] = new
            every |= ndimage.binary_dilation(blob, iterations=3)
            record(issue, (c, new), blob)
        elif issue == "bad_outline":
            r = float(np.sqrt(area / np.pi))
            mode = int(rng.integers(3))
            if mode == 0:  # shifted by ~35 % of the diameter
                ang = rng.uniform(0, 2 * np.pi)
                d = 0.7 * r
                new = ndimage.shift(mask.astype(np.uint8), (d * np.sin(ang), d * np.cos(ang)), order=0) > 0
            elif mode == 1:  # grown
                new = ndimage.binary_dilation(mask, disk(max(2, int(round(0.45 * r)))))
            else:  # shrunk
                new = ndimage.binary_erosion(mask, disk(max(2, int(round(0.35 * r)))))
            new &= (inst[..., c] == 0) | mask
            if new.sum() < 20:
                continue
            inst[..., c][mask] = 0
            inst[..., c][new] = raw
            record(issue, key, new, iou_to_true=_iou(new, mask))
        elif issue == "merged":
            cy, cx = np.argwhere(mask).mean(axis=0)
            best, best_d = None, np.inf
            grown = ndimage.binary_dilation(mask, iterations=6)
            for c2, r2, *_ in rows:
                k2 = (c2, r2)
                if k2 == key or k2 in used or k2 in drop:
                    continue
                m2 = masks[k2]
                if not (grown & m2).any() or m2.sum() < 40:
                    continue
                d = float(np.hypot(*(np.argwhere(m2).mean(axis=0) - (cy, cx))))
                if d < best_d:
                    best, best_d = k2, d
            if best is None:
                continue
            hull = convex_hull_image(mask | masks[best])
            hull &= (inst[..., c] == 0) | mask | (inst[..., best[0]] == best[1])
            inst[..., best[0]][masks[best]] = 0
            inst[..., c][hull] = raw
            drop.add(best)
            used.add(best)
            record(issue, key, hull, origin_instance2=-1)
            planted[-1]["partner_channel"], planted[-1]["partner_instance"] = best
        elif issue == "split":
            if area < 120:
                continue
            ys, xs = np.nonzero(mask)
            cy, cx = ys.mean(), xs.mean()
            cov = np.cov(np.stack([ys - cy, xs - cx]))
            w, v = np.linalg.eigh(cov)
            major = v[:, int(np.argmax(w))]
            side = (ys - cy) * major[0] + (xs - cx) * major[1] > 0
            if side.sum() < 30 or (~side).sum() < 30:
                continue
            new = next_id[c]
            next_id[c] += 1
            inst[..., c][ys[side], xs[side]] = new
            extra_rows.append((c, new, written, fine, flipped))
            record(issue, key, mask, origin_instance2=new)
        used.add(key)
    rows = [r for r in rows if (r[0], r[1]) not in drop] + extra_rows
    for t in planted:  # a merged record keeps its partner for the truth table only
        t.pop("partner_channel", None)
        t.pop("partner_instance", None)
    return _Tile(tile.tissue, tile.image, inst, rows), planted


def _check_fraction(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:
        raise ConfigError(f"{name} must be in [0, 1], got {value!r}")
    return v


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _fresh_dir(target: Path) -> None:
    if target.exists():
        raise StateError(f"{target}: already exists; the synthetic writer never overwrites")


def _truth_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(TRUTH_COLUMNS))
    return df.astype(TRUTH_COLUMNS)


def write_pannuke(
    root: str | os.PathLike[str],
    *,
    tiles_per_fold: tuple[int, int, int] = (6, 6, 6),
    seed: int = 0,
    flip_fraction: float = 0.0,
    empty_fraction: float = 0.05,
    unique_tiles: int | None = None,
    instance_errors: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Write PanNuke folds ``<root>/Fold k/{images,masks}/foldk/*.npy`` in the release format.

    Parameters
    ----------
    root
        Folder to write into (created if missing); ``Fold k`` must not exist yet.
    tiles_per_fold
        Number of tiles N of folds 1, 2, 3; a fold with 0 tiles is not written.
    seed
        Same seed, same bytes.
    flip_fraction
        Fraction of nuclei whose written channel is a wrong label (recorded in the truth).
    empty_fraction
        Fraction of tiles with no nucleus (at least one per fold of ≥ 4 tiles when > 0).
    unique_tiles
        Fast path for large folds: render only this many tiles per fold and fill the rest with
        cheap variants of them (dihedral transform + brightness), keeping memory flat.
    instance_errors
        Planting rates per issue of :data:`INSTANCE_ISSUES` (fraction of each tile's nuclei); off
        (None) by default, so the same seed gives the same bytes as before. What was planted is in
        :func:`write_pannuke_planted`'s second frame.

    Returns
    -------
    pandas.DataFrame
        Truth, one row per instance written, columns :data:`TRUTH_COLUMNS`.

    Notes
    -----
    Arrays are streamed to disk with ``numpy.lib.format.open_memmap``; each fold is written to a
    hidden temp folder and renamed into place, so a crash never leaves a complete-looking fold.
    """
    return write_pannuke_planted(root, tiles_per_fold=tiles_per_fold, seed=seed, flip_fraction=flip_fraction,
                                 empty_fraction=empty_fraction, unique_tiles=unique_tiles,
                                 instance_errors=instance_errors)[0]


def write_pannuke_planted(
    root: str | os.PathLike[str],
    *,
    tiles_per_fold: tuple[int, int, int] = (6, 6, 6),
    seed: int = 0,
    flip_fraction: float = 0.0,
    empty_fraction: float = 0.05,
    unique_tiles: int | None = None,
    instance_errors: dict[str, float] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`write_pannuke`, returning also the planted instance errors (columns
    :data:`INSTANCE_TRUTH_COLUMNS`, empty when ``instance_errors`` is None)."""
    from numpy.lib.format import open_memmap
    from tqdm import tqdm

    seed = _check_seed(seed)
    rates = check_instance_rates(instance_errors)
    planted_rows: list[dict[str, Any]] = []
    flip_fraction = _check_fraction("flip_fraction", flip_fraction)
    empty_fraction = _check_fraction("empty_fraction", empty_fraction)
    tiles = tuple(tiles_per_fold)
    if len(tiles) != 3 or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0 for n in tiles):
        raise ConfigError(f"tiles_per_fold must be three non-negative integers, got {tiles_per_fold!r}")
    if unique_tiles is not None and (not isinstance(unique_tiles, (int, np.integer)) or unique_tiles < 1):
        raise ConfigError(f"unique_tiles must be a positive integer or None, got {unique_tiles!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for k, n in enumerate(tiles, start=1):
        if n:
            _fresh_dir(root / f"Fold {k}")

    rows: list[dict[str, Any]] = []
    for k, n in enumerate(tiles, start=1):
        if not n:
            continue
        n = int(n)
        final = root / f"Fold {k}"
        tmp = root / f".Fold {k}.partial-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            img_dir = tmp / "images" / f"fold{k}"
            mask_dir = tmp / "masks" / f"fold{k}"
            img_dir.mkdir(parents=True)
            mask_dir.mkdir(parents=True)
            n_unique = n if unique_tiles is None else min(n, int(unique_tiles))
            fold_rng = _rng(seed, _STREAM_PANNUKE, k)
            n_empty = int(round(n_unique * empty_fraction))
            if empty_fraction > 0 and n_empty == 0 and n_unique >= 4:
                n_empty = 1
            empties = set(fold_rng.choice(n_unique, size=min(n_empty, n_unique), replace=False).tolist())
            img_path, mask_path = img_dir / "images.npy", mask_dir / "masks.npy"
            # header + (sparse) file of the final size; then chunks are mapped one at a time, so
            # resident memory stays flat however large the fold is
            for path, channels in ((img_path, 3), (mask_path, 6)):
                mm = open_memmap(path, mode="w+", dtype=np.float64,
                                 shape=(n, PANNUKE_TILE, PANNUKE_TILE, channels))
                del mm
            images = masks = None
            types = np.empty(n, dtype="<U13")
            cache: list[_Tile] = []
            origin = f"Fold {k}/masks/fold{k}/masks.npy"
            for i in tqdm(range(n), desc=f"PanNuke fold {k}", unit="tile", disable=None, leave=False):
                tile_rng = _rng(seed, _STREAM_PANNUKE, k, i)
                if i < n_unique:
                    tile = _pannuke_tile(tile_rng, empty=i in empties, flip_fraction=flip_fraction)
                    if n_unique < n:
                        cache.append(tile)
                else:
                    tile = _vary(cache[i % n_unique], tile_rng, i // n_unique)
                if rates:
                    tile, planted = _plant_instances(_rng(seed, _STREAM_INSTANCES, k, i), tile, rates)
                    planted_rows += [{"source": "pannuke", "split": f"fold{k}", "origin_file": origin,
                                      "origin_index": i, **t} for t in planted]
                if images is None or masks is None:
                    images = open_memmap(img_path, mode="r+")
                    masks = open_memmap(mask_path, mode="r+")
                images[i] = tile.image
                masks[i, :, :, :5] = tile.inst
                masks[i, :, :, 5] = ~tile.inst.any(axis=2)
                types[i] = tile.tissue
                for channel, raw, written, fine, flipped in tile.rows:
                    rows.append({
                        "source": "pannuke", "split": f"fold{k}", "origin_file": origin,
                        "origin_index": i, "origin_channel": channel, "origin_instance": raw,
                        "origin_region": "", "written_label": written, "true_label": _PANNUKE_OF[fine],
                        "true_class": fine, "flipped": flipped, "kind": "nucleus",
                    })
                if i % _CHUNK == _CHUNK - 1 or i == n - 1:
                    images.flush()
                    masks.flush()
                    images = masks = None
            np.save(img_dir / "types.npy", types)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    planted_frame = pd.DataFrame(planted_rows, columns=list(INSTANCE_TRUTH_COLUMNS)).astype(INSTANCE_TRUTH_COLUMNS)
    return _truth_frame(rows), planted_frame


# --------------------------------------------------------------------------------------------
# MoNuSAC
# --------------------------------------------------------------------------------------------
_MONUSAC_MIX = np.array([0.20, 0.30, 0.0, 0.0, 0.13, 0.18, 0.19])  # no Connective/Dead annotated
_LINE_COLOR = {"Epithelial": 255, "Lymphocyte": 65535, "Neutrophil": 16711680, "Macrophage": 65280,
               AMBIGUOUS: 16776960}
_BLOCK_ORDER = ("Epithelial", "Lymphocyte", "Neutrophil", "Macrophage")
_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def _barcodes(seed: int, n: int) -> list[str]:
    rng = _rng(seed, _STREAM_NAMES)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        tss = "".join(rng.choice(list(_ALNUM), 2))
        pid = "".join(rng.choice(list(_ALNUM), 4))
        code = f"TCGA-{tss}-{pid}-01Z-00-DX1"
        if code not in seen:
            seen.add(code)
            out.append(code)
    return out


def _stem(barcode: str, style: int, number: int) -> str:
    return (f"{barcode}_{number}", f"{barcode}-{number}", f"{barcode}_{number:03d}")[style % 3]


@dataclass
class _Region:
    label: str  # written label (Annotation class)
    vertices: np.ndarray  # (V, 2) x, y as written
    truth: dict[str, Any]


def _fmt_coord(v: float, floats: bool) -> str:
    return f"{v:.6f}" if floats else str(int(round(v)))


def _xml_text(regions: list[_Region], *, mpp: float, rng: np.random.Generator, floats: bool,
              test: bool, layer4: bool, empty_block: str | None) -> tuple[str, dict[int, str]]:
    """ImageScope XML mirroring the real MoNuSAC files; returns the text (LF) and the Region Id
    written for each region (by position in ``regions``)."""
    labels = list(_BLOCK_ORDER) + ([AMBIGUOUS] if test else [])
    zoom = f"{rng.uniform(2.0, 8.5):.6f}"
    ids: dict[int, str] = {}
    lines = [f'<Annotations MicronsPerPixel="{mpp:.6f}">']
    selected_block = int(rng.integers(len(labels)))
    for bi, label in enumerate(labels, start=1):
        name = "Layer 4" if (layer4 and label == "Macrophage") else ""
        lines.append(
            f'\t<Annotation Id="{bi}" Name="{name}" ReadOnly="0" NameReadOnly="0" LineColorReadOnly="0" '
            f'Incremental="0" Type="4" LineColor="{_LINE_COLOR[label]}" Visible="1" '
            f'Selected="{int(bi - 1 == selected_block)}" MarkupImagePath="" MacroName="">'
        )
        lines += ["\t\t<Attributes>", f'\t\t\t<Attribute Name="{label}" Id="0" Value=""/>', "\t\t</Attributes>"]
        lines += [
            "\t\t<Regions>",
            "\t\t\t<RegionAttributeHeaders>",
            '\t\t\t\t<AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/>',
            '\t\t\t\t<AttributeHeader Id="9997" Name="Length" ColumnWidth="-1"/>',
            '\t\t\t\t<AttributeHeader Id="9996" Name="Area" ColumnWidth="-1"/>',
            '\t\t\t\t<AttributeHeader Id="9998" Name="Text" ColumnWidth="-1"/>',
            '\t\t\t\t<AttributeHeader Id="1" Name="Description" ColumnWidth="-1"/>',
            "\t\t\t</RegionAttributeHeaders>",
        ]
        members = [i for i, r in enumerate(regions) if r.label == label] if label != empty_block else []
        for rid, i in enumerate(members, start=1):
            v = regions[i].vertices
            area, length = _shoelace(v), _perimeter(v)
            ids[i] = str(rid)
            lines.append(
                f'\t\t\t<Region Id="{rid}" Type="0" Zoom="{zoom}" Selected="{int(rid == len(members))}" '
                f'ImageLocation="" ImageFocus="-1" Length="{length:.1f}" Area="{area:.1f}" '
                f'LengthMicrons="{length * mpp:.1f}" AreaMicrons="{area * mpp * mpp:.1f}" Text="" '
                f'NegativeROA="0" InputRegionId="0" Analyze="1" DisplayId="{rid}">'
            )
            lines += ["\t\t\t\t<Attributes/>", "\t\t\t\t<Vertices>"]
            lines += [
                f'\t\t\t\t\t<Vertex X="{_fmt_coord(x, floats)}" Y="{_fmt_coord(y, floats)}" Z="0"/>'
                for x, y in v
            ]
            lines += ["\t\t\t\t</Vertices>", "\t\t\t</Region>"]
        lines += ["\t\t</Regions>", "\t\t<Plots/>", "\t</Annotation>"]
    lines.append("</Annotations>")
    return "\n".join(lines) + "\n", ids


def _shoelace(v: np.ndarray) -> float:
    x, y = v[:, 0], v[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def _perimeter(v: np.ndarray) -> float:
    d = np.roll(v, -1, axis=0) - v
    return float(np.hypot(d[:, 0], d[:, 1]).sum())


def _dedupe(v: np.ndarray) -> np.ndarray:
    keep = np.ones(len(v), dtype=bool)
    keep[1:] = np.any(v[1:] != v[:-1], axis=1)
    if len(v) > 1 and np.array_equal(v[-1], v[0]):
        keep[-1] = False
    return v[keep]


def _ambiguous_clump(canvas: _Canvas, rng: np.random.Generator, ppu: float, quantum: float) -> np.ndarray | None:
    """Draw a clump of 3-5 overlapping nuclei and return the ignore polygon around it (V, 2)."""
    from scipy import ndimage
    from scipy.spatial import ConvexHull
    from skimage.draw import polygon as draw_polygon

    kinds = rng.choice([_LYM, _EPI, _NEO, _NEU], int(rng.integers(3, 6)))
    shapes = [_make_shape(int(f), rng, ppu, pad=0) for f in kinds]
    spread = 4.0 * ppu
    offsets = [(int(rng.normal(0, spread)), int(rng.normal(0, spread))) for _ in shapes]
    reach = max(abs(o[0]) + s.extent for o, s in zip(offsets, shapes)) + 4 * ppu + 6
    reach = max(reach, max(abs(o[1]) + s.extent for o, s in zip(offsets, shapes)) + 4 * ppu + 6)
    r = int(np.ceil(reach))
    if 2 * r + 8 >= min(canvas.height, canvas.width):
        return None
    box = np.ones((2 * r + 1, 2 * r + 1), dtype=bool)
    for _ in range(40):
        cy = int(rng.integers(r + 3, canvas.height - r - 3))
        cx = int(rng.integers(r + 3, canvas.width - r - 3))
        if not canvas.owner[cy - r : cy + r + 1, cx - r : cx + r + 1][box].any():
            break
    else:
        return None
    pts = []
    for (dy, dx), s in zip(offsets, shapes):
        p = _Placed(s, cy + dy, cx + dx, None, -1, float(rng.normal(1.0, 0.07)))
        canvas.placed.append(p)
        for poly in s.polys:
            pts.append(poly + [cx + dx, cy + dy])
    allp = np.concatenate(pts)
    hull = allp[ConvexHull(allp).vertices]
    centre = hull.mean(axis=0)
    vec = hull - centre
    norm = np.linalg.norm(vec, axis=1, keepdims=True)
    grown = centre + vec * (norm + 1.5 * ppu) / np.maximum(norm, 1e-6)
    grown = np.round(grown / quantum) * quantum
    grown[:, 0] = np.clip(grown[:, 0], 1, canvas.width - 2)
    grown[:, 1] = np.clip(grown[:, 1], 1, canvas.height - 2)
    grown = _dedupe(grown)
    # keep other nuclei out of the ignore polygon and 2 px around it
    y0, x0 = max(cy - r, 0), max(cx - r, 0)
    y1, x1 = min(cy + r + 1, canvas.height), min(cx + r + 1, canvas.width)
    local = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    rr, cc = draw_polygon(grown[:, 1] - y0, grown[:, 0] - x0, shape=local.shape)
    local[rr, cc] = True
    local = ndimage.binary_dilation(local, structure=_DISK[2])
    canvas.owner[y0:y1, x0:x1][local & (canvas.owner[y0:y1, x0:x1] == 0)] = -1
    return grown


def _monusac_image(
    rng: np.random.Generator, *, mix: np.ndarray, neo_share: float, size: tuple[int, int], test: bool,
    flip_fraction: float, floats: bool, absent: str | None = None, planted_dups: float = 0.15,
) -> tuple[np.ndarray, float, list[_Region]]:
    """Render one MoNuSAC image: (H, W, 3) uint8, its MicronsPerPixel, and its regions.

    ``absent`` names a class with no nucleus in this image (its XML block stays empty)."""
    mpp = round(float(rng.uniform(0.24, 0.26)), 6)
    ppu = 1.0 / mpp
    quantum = 0.25 if floats else 1.0

    def side() -> int:
        s = int(rng.integers(size[0], size[1] + 1))
        return s + 1 if s % 256 == 0 else s

    height, width = side(), side()
    canvas = _Canvas(rng, height, width, partial=False)
    regions: list[_Region] = []
    if test:
        for _ in range(int(rng.integers(1, 3))):
            poly = _ambiguous_clump(canvas, rng, ppu, quantum)
            if poly is not None:
                regions.append(_Region(AMBIGUOUS, poly, {
                    "written_label": AMBIGUOUS, "true_label": AMBIGUOUS, "true_class": IGNORE_CLASS,
                    "flipped": False, "kind": "ignore"}))
    area_um2 = height * width * mpp * mpp
    n = max(4, int(round(area_um2 * rng.uniform(0.0040, 0.0060))))
    if absent is not None:
        mix = np.where([_MONUSAC_OF.get(c) == absent for c in range(1, 8)], 0.0, mix)
    fines = _sample_classes(rng, mix, n)
    fines = np.where((fines == _NEO) | (fines == _EPI), np.where(rng.random(n) < neo_share, _NEO, _EPI), fines)
    flips = _flip_plan(rng, n, flip_fraction)
    targets = tuple(x for x in MONUSAC_LABELS if x != absent)
    order = np.argsort([-{_NEO: 3, _MAC: 2}.get(int(f), 1) for f in fines], kind="stable")
    for j in order:
        fine = int(fines[j])
        true_label = _MONUSAC_OF[fine]
        written = _other(rng, true_label, targets) if flips[j] else true_label
        shape = _make_shape(fine, rng, ppu, quantum=quantum)
        mode = "touch" if rng.random() < 0.05 else "gap"
        p = canvas.place(shape, None, mode=mode)
        if p is None:
            continue
        p.hema_scale = float(rng.normal(1.0, 0.10))
        v = _dedupe(shape.polys[0] + [p.cx, p.cy])
        if rng.random() < planted_dups:  # consecutive duplicate vertices, as in the real files
            at = int(rng.integers(len(v)))
            v = np.insert(v, at, v[at], axis=0)
        regions.append(_Region(written, v, {
            "written_label": written, "true_label": true_label, "true_class": fine,
            "flipped": bool(flips[j]), "kind": "nucleus"}))
    image = canvas.render(_STAIN_MONUSAC, ppu, lumen=rng.random() < 0.3)
    return image, mpp, regions


def _write_tiff(path: Path, rgb: np.ndarray, kind: str, mpp: float) -> None:
    import tifffile

    if kind == "rgba":
        rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
        tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=["unassalpha"], metadata=None)
    elif kind == "svs":
        h, w = rgb.shape[:2]
        desc = (f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] (256x256) RAW|AppMag = 40"
                f"|MPP = {mpp:.4f}")
        half = rgb[: h // 2 * 2, : w // 2 * 2].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
        with tifffile.TiffWriter(path) as tw:
            tw.write(rgb, photometric="rgb", tile=(256, 256), description=desc, metadata=None)
            thumb = rgb[::4, ::4]
            tw.write(np.ascontiguousarray(thumb), photometric="rgb", description=desc, metadata=None)
            # like real SVS: pyramid levels are tiled and not flagged "reduced"
            tw.write(np.rint(half).astype(np.uint8), photometric="rgb", tile=(256, 256), description=desc,
                     metadata=None)
    else:
        tifffile.imwrite(path, rgb, photometric="rgb", metadata=None)


def write_monusac(
    root: str | os.PathLike[str],
    *,
    train_patients: int = 6,
    test_patients: int = 3,
    images_per_patient: tuple[int, int] = (1, 2),
    seed: int = 0,
    flip_fraction: float = 0.0,
    image_size: tuple[int, int] = (300, 900),
) -> pd.DataFrame:
    """Write both MoNuSAC release folders under ``root``.

    ``<root>/MoNuSAC_images_and_annotations/<barcode>/<stem>.{tif|svs}+.xml`` (train) and
    ``<root>/MoNuSAC Testing Data and Annotations/...`` (test, with ``Ambiguous`` ignore regions).
    Stems use the three real styles ``<barcode>_1``, ``<barcode>-1``, ``<barcode>_001``. Per
    release: the second image is stored only as a tiled ``.svs`` (with a thumbnail and a half-size
    level), every third image starting at the third is an RGBA ``.tif``, the other images RGB
    ``.tif``; the second XML of every four is written with CRLF line endings; the first XML names
    its Macrophage block ``Layer 4`` and has one class block with zero regions.

    Parameters
    ----------
    root
        Folder to write into; the two release folders must not exist yet.
    train_patients, test_patients
        Patients per release (distinct TCGA barcodes across both).
    images_per_patient
        Inclusive (min, max) number of images per patient.
    seed, flip_fraction
        As in :func:`write_pannuke`.
    image_size
        Inclusive (min, max) side length in pixels (sides that are multiples of 256 get +1).

    Returns
    -------
    pandas.DataFrame
        Truth, one row per written Region, columns :data:`TRUTH_COLUMNS`.
    """
    from tqdm import tqdm

    seed = _check_seed(seed)
    flip_fraction = _check_fraction("flip_fraction", flip_fraction)
    for name, val, lo in (("train_patients", train_patients, 1), ("test_patients", test_patients, 0)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo:
            raise ConfigError(f"{name} must be an integer ≥ {lo}, got {val!r}")
    ipp = tuple(images_per_patient)
    if len(ipp) != 2 or not all(isinstance(x, (int, np.integer)) for x in ipp) or not 1 <= ipp[0] <= ipp[1]:
        raise ConfigError(f"images_per_patient must be (min, max) with 1 ≤ min ≤ max, got {images_per_patient!r}")
    sz = tuple(image_size)
    if len(sz) != 2 or not all(isinstance(x, (int, np.integer)) for x in sz) or not 64 <= sz[0] <= sz[1]:
        raise ConfigError(f"image_size must be (min, max) with 64 ≤ min ≤ max, got {image_size!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    releases = [(MONUSAC_TRAIN_DIR, "train", int(train_patients))]
    if test_patients:
        releases.append((MONUSAC_TEST_DIR, "test", int(test_patients)))
    for name, _, _ in releases:
        _fresh_dir(root / name)
    codes = _barcodes(seed, int(train_patients) + int(test_patients))

    rows: list[dict[str, Any]] = []
    for ri, (name, split, n_pat) in enumerate(releases):
        final = root / name
        tmp = root / f".{name}.partial-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            tmp.mkdir(parents=True)
            pat_codes = codes[:n_pat] if split == "train" else codes[int(train_patients):]
            j = 0  # image counter within the release
            for pi, code in enumerate(tqdm(pat_codes, desc=f"MoNuSAC {split}", unit="patient",
                                           disable=None, leave=False)):
                prng = _rng(seed, _STREAM_MONUSAC, ri, pi)
                mix = _MONUSAC_MIX * prng.gamma(4.0, 0.25, 7)
                neo_share = float(prng.uniform(0.4, 0.8))
                n_img = int(prng.integers(ipp[0], ipp[1] + 1))
                first = int(prng.integers(1, 6))
                folder = tmp / code
                folder.mkdir()
                for ii in range(n_img):
                    irng = _rng(seed, _STREAM_MONUSAC, ri, pi, 1000 + ii)
                    stem = _stem(code, pi, first + ii)
                    empty_block = _BLOCK_ORDER[int(irng.integers(4))] if j == 0 else None
                    image, mpp, regions = _monusac_image(
                        irng, mix=mix, neo_share=neo_share, size=sz, test=split == "test",
                        flip_fraction=flip_fraction, floats=j % 3 == 2, absent=empty_block,
                    )
                    kind = "svs" if j == 1 else ("rgba" if j % 3 == 2 else "rgb")
                    _write_tiff(folder / f"{stem}.{'svs' if kind == 'svs' else 'tif'}", image, kind, mpp)
                    text, ids = _xml_text(regions, mpp=mpp, rng=irng, floats=j % 3 == 2,
                                          test=split == "test", layer4=j == 0, empty_block=empty_block)
                    data = text.replace("\n", "\r\n") if j % 4 == 1 else text
                    (folder / f"{stem}.xml").write_bytes(data.encode("ascii"))
                    origin = f"{code}/{stem}.xml"
                    for i, reg in enumerate(regions):
                        rows.append({
                            "source": "monusac", "split": split, "origin_file": origin,
                            "origin_index": -1, "origin_channel": -1, "origin_instance": -1,
                            "origin_region": ids[i], **reg.truth,
                        })
                    j += 1
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _truth_frame(rows)


# --------------------------------------------------------------------------------------------
# the whole sample
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleInfo:
    """What :func:`write_sample` wrote."""

    root: Path
    pannuke_root: Path  # holds "Fold 1".."Fold 3"
    monusac_root: Path  # holds both MoNuSAC release folders
    truth_path: Path
    preset: str
    seed: int
    flip_fraction: float
    n_tiles: int  # PanNuke tiles over all folds
    n_images: int  # MoNuSAC images over both releases
    n_nuclei: int  # truth rows of kind "nucleus"
    n_ignore: int  # truth rows of kind "ignore"
    n_flipped: int
    class_counts: dict[str, int] = field(default_factory=dict)  # true unified class -> nuclei
    seconds: float = 0.0
    instance_truth_path: Path | None = None  # planted instance errors (None when none were planted)
    instance_errors: dict[str, int] = field(default_factory=dict)  # issue -> number planted


_PRESET_ARGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "tiny": (
        {"tiles_per_fold": (6, 6, 6), "empty_fraction": 0.1},
        {"train_patients": 3, "test_patients": 2, "images_per_patient": (1, 2), "image_size": (300, 420)},
    ),
    "demo": (
        {"tiles_per_fold": (40, 40, 40), "empty_fraction": 0.05},
        {"train_patients": 10, "test_patients": 4, "images_per_patient": (1, 2), "image_size": (300, 900)},
    ),
}


def write_sample(
    out: str | os.PathLike[str],
    *,
    preset: Preset = "demo",
    seed: int = 0,
    flip_fraction: float = 0.10,
    instance_errors: dict[str, float] | None = None,
) -> SampleInfo:
    """Write ``<out>/pannuke/``, ``<out>/monusac/`` and ``<out>/truth.parquet``.

    ``instance_errors`` (off by default) plants instance-level annotation errors in the PanNuke
    tiles at the given rates (:data:`INSTANCE_ISSUES`, e.g. :data:`DEMO_INSTANCE_RATES`) and writes
    what it planted to ``<out>/instance_truth.parquet`` (:data:`INSTANCE_TRUTH_COLUMNS`).

    ``out`` must not exist or be an empty folder; everything is written into a hidden sibling
    temp folder that is renamed to ``out`` at the end, so a crash leaves no half sample.

    Presets: ``"tiny"`` (3 folds × 6 tiles, 3 + 2 patients; for unit tests, ~2 s) and ``"demo"``
    (3 folds × 40 tiles, 10 + 4 patients; several hundred nuclei of every true class).
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    seed = _check_seed(seed)
    flip_fraction = _check_fraction("flip_fraction", flip_fraction)
    rates = check_instance_rates(instance_errors)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StateError(f"{out}: already exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()  # unlike mkdtemp, honours the umask (the folder becomes ``out``)
    try:
        pk_args, mo_args = _PRESET_ARGS[preset]
        pk, planted = write_pannuke_planted(tmp / "pannuke", seed=seed, flip_fraction=flip_fraction,
                                            instance_errors=rates or None, **pk_args)
        if rates:
            planted.to_parquet(tmp / "instance_truth.parquet", index=False)
        mo = write_monusac(tmp / "monusac", seed=seed, flip_fraction=flip_fraction, **mo_args)
        truth = pd.concat([pk, mo], ignore_index=True).astype(TRUTH_COLUMNS)
        truth.to_parquet(tmp / "truth.parquet", index=False)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    nuc = truth[truth["kind"] == "nucleus"]
    counts = nuc["true_class"].value_counts()
    return SampleInfo(
        root=out,
        pannuke_root=out / "pannuke",
        monusac_root=out / "monusac",
        truth_path=out / "truth.parquet",
        preset=preset,
        seed=seed,
        flip_fraction=flip_fraction,
        n_tiles=int(sum(pk_args["tiles_per_fold"])),
        n_images=int(mo.loc[mo["source"] == "monusac", "origin_file"].nunique()),
        n_nuclei=int(len(nuc)),
        n_ignore=int((truth["kind"] == "ignore").sum()),
        n_flipped=int(truth["flipped"].sum()),
        class_counts={CLASS_NAMES[c - 1]: int(counts.get(c, 0)) for c in range(1, 8)},
        seconds=round(time.perf_counter() - t0, 3),
        instance_truth_path=out / "instance_truth.parquet" if rates else None,
        instance_errors={str(k): int(v) for k, v in planted["issue"].value_counts().items()},
    )

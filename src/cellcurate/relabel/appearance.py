"""Appearance ranking of the probability-map missing flags (``InstanceConfig.appearance``,
``curate instances --appearance``; off by default).

A blob of the probability map that no annotation covers (:func:`cellcurate.relabel.instances._blob_flags`)
is either a nucleus the annotator missed or something the pixel model mistakes for one (on real
H&E mostly purple gaps between the nuclei of a dense cluster). The blob rule scores it from the map
alone (mean probability × size × solidity). This module adds what the image says: a random forest
learns, on the store itself, how the blob *an annotated nucleus would leave if it were deleted*
looks (shape, haematoxylin against the image's own nuclei and background, the map inside and around
it, how much of its surroundings is annotated), against the unannotated blobs; its out-of-fold
probability that a blob looks like an annotated nucleus ranks the flags (score
``0.5 + 0.5 × sqrt(p × s)``; the flags themselves do not change).

This is positive-unlabelled learning: the unannotated blobs, labelled 0, hold the missed nuclei
too; a classifier of labelled against unlabelled ranks the unlabelled ones as one of real against
not (Elkan & Noto, 2008), and the folds (blocks of ``BLOCK_UM`` µm, grouped K-fold) keep every
blob's own label out of its score. Measured on the real CoNSeP and MoNuSeg fixtures with planted
deletions (docs/INSTANCES.md, 3 planting seeds): the best recall at precision ≥ 0.5 for missing
nuclei rises from 0.627 to 0.660 on CoNSeP and from 0.593 to 0.639 on MoNuSeg.

Dimensions: H×W pixels of one image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Names of :func:`features`' values, in order (the evidence and the docs use them).
FEATURES: tuple[str, ...] = (
    "relative_area", "solidity", "eccentricity", "extent", "relative_thickness",
    "prob_mean", "prob_vs_nuclei", "prob_ring",
    "haem_mean", "haem_vs_nuclei", "haem_std", "haem_contrast", "haem_contrast_vs_nuclei",
    "eosin_mean", "red", "green", "blue", "rgb_std", "ring_annotated", "roundness",
)
#: Side of the blocks that are the folds' groups (µm).
BLOCK_UM = 48.0
#: Positive examples (simulated deletions) per image and in all; blobs are never capped.
MAX_POSITIVES_PER_IMAGE = 1000
MAX_POSITIVES = 4000
#: Unflagged blobs (below the rule's score) kept as examples per image; the forest trains on at
#: most MAX_TRAIN_BLOBS unlabelled examples per fold (a sample, the same on every run).
MAX_UNFLAGGED_PER_IMAGE = 500
MAX_TRAIN_BLOBS = 4000
#: Fewer examples than these and the ranking is left as the blob rule made it.
MIN_POSITIVES, MIN_BLOBS, FOLDS = 30, 5, 5

_S3 = np.ones((3, 3), bool)


@dataclass
class ImageContext:
    """What :func:`features` reads of one image: RGB (H, W, 3) uint8, probability (H, W) float in
    [0, 1], annotation (H, W) int, the image's median annotated area (px) and radius, and its
    references (haematoxylin of the annotated nuclei and of the unannotated background, from a
    subsample of pixels; mean probability of the annotated nuclei). The stain densities are
    computed per window (:meth:`hed`), not for the whole image."""

    image: np.ndarray
    prob: np.ndarray
    ann: np.ndarray
    median_area: float
    radius: float
    haem_nuclei: float
    haem_background: float
    prob_nuclei: float

    @classmethod
    def build(cls, image: np.ndarray, ann: np.ndarray, prob: np.ndarray, median_area: float) -> "ImageContext":
        rgb = np.asarray(image)
        if rgb.ndim == 2:
            rgb = np.repeat(rgb[..., None], 3, axis=2)
        rgb = rgb[..., :3]
        step = max(1, int(np.sqrt(rgb.shape[0] * rgb.shape[1] / 65536)))  # references from <= ~64k pixels
        h = _hed(rgb[::step, ::step])[..., 0]
        fg = np.asarray(ann)[::step, ::step] > 0
        hn = float(h[fg].mean()) if fg.any() else float(h.mean())
        hb = float(np.median(h[~fg])) if (~fg).any() else float(h.min())
        pn = float(prob[ann > 0].mean()) if (ann > 0).any() else 1.0
        return cls(rgb, prob, ann, median_area=float(median_area), radius=float(np.sqrt(median_area / np.pi)),
                   haem_nuclei=hn, haem_background=hb, prob_nuclei=max(pn, 1e-3))

    def hed(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Haematoxylin, eosin and DAB optical densities (skimage's ``rgb2hed``) of a window."""
        return _hed(self.image[y0:y1, x0:x1])


def _hed(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2hed

    return rgb2hed(rgb).astype(np.float32)


def features(ctx: ImageContext, y0: int, x0: int, mask: np.ndarray, *, exclude: int = 0) -> list[float]:
    """The :data:`FEATURES` of the region ``mask`` placed at row ``y0``, column ``x0`` (it may reach
    outside the image: that part is dropped); ``exclude``: an annotated id not counted as annotated
    around the region (the nucleus whose deletion is simulated)."""
    from scipy import ndimage
    from skimage.measure import regionprops

    H, W = ctx.ann.shape
    pad = max(3, int(np.ceil(ctx.radius)))
    h, w = mask.shape
    Y0, X0 = max(0, y0 - pad), max(0, x0 - pad)
    Y1, X1 = min(H, y0 + h + pad), min(W, x0 + w + pad)
    M = np.zeros((Y1 - Y0, X1 - X0), bool)
    sy0, sx0 = max(0, Y0 - y0), max(0, X0 - x0)
    sy1, sx1 = min(h, Y1 - y0), min(w, X1 - x0)
    M[y0 + sy0 - Y0:y0 + sy1 - Y0, x0 + sx0 - X0:x0 + sx1 - X0] = mask[sy0:sy1, sx0:sx1]
    if not M.any():
        return [0.0] * len(FEATURES)
    ring = ndimage.binary_dilation(M, _S3, iterations=3) & ~M
    wide = ndimage.binary_dilation(M, _S3, iterations=max(2, int(ctx.radius * 0.6))) & ~M
    A = ctx.ann[Y0:Y1, X0:X1]
    hed = ctx.hed(Y0, Y1, X0, X1)
    hw, ew, pw = hed[..., 0], hed[..., 1], ctx.prob[Y0:Y1, X0:X1]
    rgb = ctx.image[Y0:Y1, X0:X1][M].astype(np.float32) / 255.0
    rp = regionprops(M.astype(np.uint8))[0]
    thick = float(ndimage.distance_transform_edt(M).max()) / max(ctx.radius, 1e-6)
    hm = float(hw[M].mean())
    hr = float(hw[ring].mean()) if ring.any() else hm
    span = ctx.haem_nuclei - ctx.haem_background
    span = span if abs(span) > 1e-6 else 1e-6
    annotated = (A[wide] > 0) & (A[wide] != exclude) if wide.any() else np.zeros(0, bool)
    return [float(rp.area) / max(ctx.median_area, 1.0), float(rp.solidity), float(rp.eccentricity), float(rp.extent),
            thick, float(pw[M].mean()), float(pw[M].mean()) / ctx.prob_nuclei,
            float(pw[ring].mean()) if ring.any() else 0.0,
            hm, (hm - ctx.haem_background) / span, float(hw[M].std()), hm - hr, (hm - hr) / span,
            float(ew[M].mean()), *(float(v) for v in rgb.mean(axis=0)), float(rgb.std(axis=0).mean()),
            float(annotated.mean()) if annotated.size else 0.0,
            float(rp.perimeter) ** 2 / max(float(rp.area), 1.0) / (4 * np.pi)]


def deletion_examples(ctx: ImageContext, foreground: np.ndarray, disk: np.ndarray | None, ids: Any
                      ) -> list[tuple[list[float], float, float]]:
    """For each annotated id in ``ids``: the blob it would leave if deleted (the component of
    ``foreground`` (the map above the blob threshold) on its own and unannotated pixels, opened by
    ``disk`` as the blob rule does, that overlaps it most), as (features, centre row, centre
    column); ids whose pixels the map does not reach give none."""
    from scipy import ndimage

    from .instances import _opening

    H, W = ctx.ann.shape
    slices = ndimage.find_objects(ctx.ann)
    pad = int(np.ceil(2 * ctx.radius)) + 1
    out = []
    for a in ids:
        a = int(a)
        sl = slices[a - 1] if 0 < a <= len(slices) else None
        if sl is None:
            continue
        y0, x0 = max(0, sl[0].start - pad), max(0, sl[1].start - pad)
        y1, x1 = min(H, sl[0].stop + pad), min(W, sl[1].stop + pad)
        A = ctx.ann[y0:y1, x0:x1]
        m = foreground[y0:y1, x0:x1] & ((A == 0) | (A == a))
        if disk is not None:
            m = _opening(m, disk)
        lab, k = ndimage.label(m)
        if not k:
            continue
        count = np.bincount(lab[A == a], minlength=k + 1)
        count[0] = 0
        if count.max() == 0:
            continue
        comp = lab == int(count.argmax())
        ys, xs = np.nonzero(comp)
        out.append((features(ctx, y0, x0, comp, exclude=a), float(ys.mean() + y0), float(xs.mean() + x0)))
    return out


def block_group(image_id: str, cy: float, cx: float, mpp: float) -> str:
    """The fold group of a region centred at (cy, cx) px of an image of ``mpp`` µm/px."""
    b = BLOCK_UM / max(mpp, 1e-6)
    return f"{image_id}|{int(cy // b)}|{int(cx // b)}"


def out_of_fold_probability(pos: np.ndarray, pos_groups: np.ndarray, blobs: np.ndarray, blob_groups: np.ndarray,
                            *, seed: int = 0) -> np.ndarray | None:
    """P(looks like an annotated nucleus) of every blob, each from a forest that never saw its
    group (grouped K-fold over the positives and the blobs together); None when there are too few
    examples or groups to fold (the caller keeps its ranking)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import GroupKFold

    if len(pos) < MIN_POSITIVES or len(blobs) < MIN_BLOBS:
        return None
    X = np.vstack([pos, blobs]).astype(np.float32)
    y = np.r_[np.ones(len(pos), np.int8), np.zeros(len(blobs), np.int8)]
    groups = np.r_[pos_groups, blob_groups].astype(str)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        return None
    X = np.nan_to_num(X, nan=0.0, posinf=0.0, neginf=0.0)
    p = np.full(len(X), np.nan)
    rng = np.random.default_rng(seed)
    for train, test in GroupKFold(n_splits=min(FOLDS, n_groups)).split(X, y, groups):
        unl = train[y[train] == 0]
        if len(unl) > MAX_TRAIN_BLOBS:
            train = np.r_[train[y[train] == 1], np.sort(rng.choice(unl, size=MAX_TRAIN_BLOBS, replace=False))]
        if y[train].min() == y[train].max():
            continue  # one class only in this training set: those blobs keep the rule's ranking
        clf = RandomForestClassifier(n_estimators=200, min_samples_leaf=3, random_state=seed, n_jobs=1)
        clf.fit(X[train], y[train])
        p[test] = clf.predict_proba(X[test])[:, 1]
    return p[len(pos):]

"""Nucleus segmentation, detection and classification metrics.

Dimensions: H×W pixels; n true and m predicted instances in one image; K foreground classes
(ids 1..K, 0 = background, 255 = ignore in class maps); N images in a split.

Definitions (every one is checked against hand-computed cases in ``tests/test_metrics.py``):

Matching
    Segmentation: a true and a predicted instance match when IoU > 0.5; at that threshold a
    match is unique (two instances cannot both overlap one by more than half).
    Detection: centroids match within ``radius`` pixels (12 px at 0.25 µm/px; distance <= radius
    counts), one-to-one. Two pairings (``pairing=``):

    - ``"hovernet"`` (default; the numbers the field publishes): HoVer-Net's
      ``pair_coordinates`` - Hungarian assignment on the raw distances (least total distance over
      all points), then the pairs farther than ``radius`` are dropped;
    - ``"maximum"``: a maximum matching - Hungarian assignment where pairs beyond the radius
      cost more than any feasible assignment, so it has the most pairs within the radius and,
      among those, the least total distance.

    They differ when the least-distance assignment spends a point on a far partner: true
    (0, 0), (0, 12) and predicted (0, 0), (10, 5) give 1 pair with ``hovernet`` (t0-p0, and
    t1-p1 at 12.2 px is dropped) and 2 with ``maximum`` (t0-p1 at 11.2 px, t1-p0 at 12 px).

PQ, DQ, SQ
    ``DQ = TP / (TP + FP/2 + FN/2)``, ``SQ = sum of matched IoUs / TP``, ``PQ = DQ * SQ``;
    NaN when ``TP + FP + FN == 0``. ``PQ`` in a summary is the *dataset-level binary* PQ: all
    classes merged, TP/FP/FN/IoU sums accumulated over the whole split.
bPQ (PanNuke)
    PanNuke's binary PQ (the official ``PanNuke-metrics`` ``run.py``): PQ per image with all
    classes merged (an image without any true nucleus is skipped), mean over the images of each
    tissue, then the mean over tissues. Images without a tissue (MoNuSAC) form one group.
mPQ (PanNuke)
    PanNuke's multi-class PQ: per image, PQ_c of each class c whose truth holds an instance in
    that image (a class absent from the image's truth is skipped, even if predicted), their mean
    is the image's mPQ; mean over the images of each tissue, then over tissues.
    ``per_tissue`` holds each tissue's mPQ and bPQ (PanNuke's per-tissue table).
mPQ+ (CoNIC)
    Multi-class PQ accumulated over the split (CoNIC 2022): for each class c, match true
    instances of class c against predicted instances of class c (IoU > 0.5), sum TP/FP/FN/IoU
    over all images, compute PQ_c from the sums; mPQ+ = mean of PQ_c over the classes with
    ``TP + FP + FN > 0`` over the split (a class only predicted scores 0).
AJI
    Aggregated Jaccard Index (Kumar et al. 2017), per image: each true instance takes the
    predicted instance with the highest IoU (a predicted instance may be taken by several true
    ones); ``C += |G ∩ S|``, ``U += |G ∪ S|`` (``U += |G|`` when nothing overlaps); the areas of
    predicted instances never taken are added to U; ``AJI = C / U``. Mean over images with at
    least one true nucleus.
AJI+
    HoVer-Net's ``get_fast_aji_plus``, per image: true and predicted instances are paired one to
    one by Hungarian assignment maximising IoU, pairs without overlap dropped; ``C`` sums the
    pairs' intersections, ``U`` their unions plus the areas of every unpaired true and predicted
    instance; ``AJI+ = C / U``. Mean over images with at least one true nucleus.
Dice
    Pixel foreground Dice ``2|T ∩ P| / (|T| + |P|)`` per image, mean over images that have
    true or predicted foreground.
Detection F1
    ``F1_d = 2 TP_d / (2 TP_d + FP_d + FN_d)`` with centroid matching, counts summed over the
    split; also precision and recall.
Classification F1 (HoVer-Net, Graham et al. 2019, eq. 10 with TN_c = 0 as in its code)
    Over the split, with paired = centroid-matched pairs and unpaired = unmatched nuclei:
    ``TP_c`` pairs with true = pred = c, ``FP_c`` pairs with pred = c != true, ``FN_c`` pairs with
    true = c != pred, ``FP_u`` unpaired predictions of class c, ``FN_u`` unpaired true nuclei of
    class c; ``F1_c = 2 TP_c / (2 TP_c + 2 FP_c + 2 FN_c + FP_u + FN_u)``.
Type accuracy
    HoVer-Net's ``acc_type``: the fraction of centroid-paired nuclei whose predicted class equals
    the true class, over the split.
R² of counts
    Per class, ``sklearn.metrics.r2_score`` of the N per-image predicted counts against the N true
    counts; NaN when N < 2 or the true counts are constant; the summary is the mean over classes
    with a finite value.
Ignore regions
    Pixels with class 255 in the true class map: a true instance with more than
    ``ignore_overlap`` (0.5) of its area there is removed from the truth, a predicted instance
    with more than that fraction there is removed from the prediction, and ignore pixels are left
    out of Dice. The class of a true instance is the majority of its class-map pixels (0 and 255
    do not vote; 0 when none is left); the class of a predicted instance likewise.
Instance ids
    Any non-negative integers; nothing is sized by the largest id (a map whose ids exceed its
    pixel count is renumbered 1..n first), so an id of 2**31 - 1 costs what an id of 1 costs.

>>> import numpy as np
>>> true = np.array([[1, 1, 1, 1, 0, 2, 2, 2, 2, 0, 0, 0]])
>>> pred = np.array([[1, 1, 1, 0, 0, 2, 2, 2, 2, 2, 3, 3]])
>>> c = pq_counts(true, pred)
>>> (c.tp, c.fp, c.fn), round(c.pq, 4), round(aji(true, pred), 4)
((2, 1, 0), 0.62, 0.6364)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from ..core.constants import IGNORE_VALUE
from ..errors import ConfigError
from .postprocess import majority_vote

IGNORE_CLASS = IGNORE_VALUE
Pairing = Literal["hovernet", "maximum"]
PAIRINGS: tuple[str, ...] = ("hovernet", "maximum")


@dataclass
class PQCounts:
    """Running sums for panoptic quality."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0

    def __add__(self, other: "PQCounts") -> "PQCounts":
        return PQCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.iou_sum + other.iou_sum)

    @property
    def dq(self) -> float:
        den = self.tp + 0.5 * self.fp + 0.5 * self.fn
        return self.tp / den if den > 0 else math.nan

    @property
    def sq(self) -> float:
        if self.tp + self.fp + self.fn == 0:
            return math.nan
        return self.iou_sum / self.tp if self.tp > 0 else 0.0

    @property
    def pq(self) -> float:
        dq = self.dq
        return math.nan if math.isnan(dq) else dq * self.sq

    def as_dict(self) -> dict[str, float]:
        return {"PQ": self.pq, "DQ": self.dq, "SQ": self.sq, "TP": self.tp, "FP": self.fp, "FN": self.fn}


# -- segmentation --------------------------------------------------------------------------------


def pairwise_overlap(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Intersections of every true with every predicted instance.

    Parameters
    ----------
    true, pred
        (H, W) int instance maps, 0 = background; ids need not be contiguous.

    Returns
    -------
    true_ids
        (n,) sorted ids present in ``true``.
    pred_ids
        (m,) sorted ids present in ``pred``.
    inter
        (n, m) int64 pixel counts of ``true == true_ids[i] & pred == pred_ids[j]``.
    true_area, pred_area
        (n,) and (m,) int64 areas.
    """
    t = np.asarray(true).ravel()
    p = np.asarray(pred).ravel()
    if t.shape != p.shape or np.shape(true) != np.shape(pred):
        raise ConfigError(f"true and pred differ in shape: {np.shape(true)} != {np.shape(pred)}")
    true_ids = np.unique(t[t > 0])
    pred_ids = np.unique(p[p > 0])
    n, m = len(true_ids), len(pred_ids)
    ti = np.where(t > 0, np.searchsorted(true_ids, t) + 1, 0)
    pi = np.where(p > 0, np.searchsorted(pred_ids, p) + 1, 0)
    joint = np.bincount(ti * (m + 1) + pi, minlength=(n + 1) * (m + 1)).reshape(n + 1, m + 1)
    return true_ids, pred_ids, joint[1:, 1:], joint[1:, :].sum(axis=1), joint[:, 1:].sum(axis=0)


def pairwise_iou(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, m) IoU matrix with the ids of its rows and columns; see :func:`pairwise_overlap`."""
    true_ids, pred_ids, inter, ta, pa = pairwise_overlap(true, pred)
    union = ta[:, None] + pa[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros(inter.shape, np.float64), where=union > 0)
    return iou, true_ids, pred_ids


def match_iou(iou: np.ndarray, *, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Unique pairs (row, column) of an IoU matrix with IoU > ``threshold`` (>= 0.5)."""
    if not 0.5 <= threshold < 1.0:
        raise ConfigError(f"IoU threshold must be in [0.5, 1) so that matches are unique, got {threshold}")
    rows, cols = np.nonzero(iou > threshold)
    return rows, cols


def pq_counts(true: np.ndarray, pred: np.ndarray, *, threshold: float = 0.5) -> PQCounts:
    """TP/FP/FN/IoU sum of one image's instance maps (binary: classes ignored)."""
    iou, true_ids, pred_ids = pairwise_iou(true, pred)
    rows, cols = match_iou(iou, threshold=threshold)
    tp = len(rows)
    return PQCounts(tp, len(pred_ids) - tp, len(true_ids) - tp, float(iou[rows, cols].sum()))


def aji(true: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index of one image (see the module docstring); NaN when both are empty,
    0 when only one is."""
    return _aggregated_jaccard(true, pred, one_to_one=False)


def aji_plus(true: np.ndarray, pred: np.ndarray) -> float:
    """AJI+ of one image (HoVer-Net's ``get_fast_aji_plus``; see the module docstring); NaN when
    both maps are empty, 0 when only one is."""
    return _aggregated_jaccard(true, pred, one_to_one=True)


def _aggregated_jaccard(true: np.ndarray, pred: np.ndarray, *, one_to_one: bool) -> float:
    """AJI (each truth paired with its best-IoU prediction, which may serve several truths) or
    AJI+ (``one_to_one``: pairs by maximum total IoU). Either way: intersections of the pairs over
    their unions plus the areas of unpaired truths and of predictions in no pair."""
    true_ids, pred_ids, inter, ta, pa = pairwise_overlap(true, pred)
    if len(true_ids) == 0 and len(pred_ids) == 0:
        return math.nan
    if len(true_ids) == 0 or len(pred_ids) == 0:
        return 0.0
    union = ta[:, None] + pa[None, :] - inter
    iou = inter / union
    if one_to_one:
        rows, cols = linear_sum_assignment(-iou)
    else:
        rows, cols = np.arange(len(true_ids)), iou.argmax(axis=1)
    keep = inter[rows, cols] > 0
    rows, cols = rows[keep], cols[keep]
    c = int(inter[rows, cols].sum())
    u = int(union[rows, cols].sum())
    paired_t = np.zeros(len(true_ids), bool)
    paired_t[rows] = True
    paired_p = np.zeros(len(pred_ids), bool)
    paired_p[cols] = True
    u += int(ta[~paired_t].sum()) + int(pa[~paired_p].sum())
    return c / u


def dice(true_fg: np.ndarray, pred_fg: np.ndarray, *, valid: np.ndarray | None = None) -> float:
    """Pixel Dice of two (H, W) foreground masks, over ``valid`` pixels only; NaN when both empty."""
    t = np.asarray(true_fg, bool)
    p = np.asarray(pred_fg, bool)
    if t.shape != p.shape:
        raise ConfigError(f"true and pred differ in shape: {t.shape} != {p.shape}")
    if valid is not None:
        t = t & valid
        p = p & valid
    den = int(t.sum()) + int(p.sum())
    return 2.0 * int((t & p).sum()) / den if den else math.nan


# -- detection ------------------------------------------------------------------------------------


def centroids(instances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids present in an (H, W) instance map and their (n, 2) float64 centroids (row, column)."""
    flat = np.asarray(instances).ravel().astype(np.int64)
    ids = np.unique(flat[flat > 0])
    if len(ids) == 0:
        return ids, np.zeros((0, 2))
    rows, cols = np.indices(np.shape(instances))
    idx = np.where(flat > 0, np.searchsorted(ids, flat) + 1, 0)
    area = np.bincount(idx, minlength=len(ids) + 1)[1:]
    cy = np.bincount(idx, weights=rows.ravel(), minlength=len(ids) + 1)[1:] / area
    cx = np.bincount(idx, weights=cols.ravel(), minlength=len(ids) + 1)[1:] / area
    return ids, np.column_stack([cy, cx])


def match_centroids(true_pts: np.ndarray, pred_pts: np.ndarray, *, radius: float = 12.0,
                    pairing: Pairing = "hovernet") -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs of points within ``radius``.

    Parameters
    ----------
    true_pts, pred_pts
        (n, 2) and (m, 2) float coordinates.
    radius
        Largest distance of a pair (inclusive).
    pairing
        ``"hovernet"`` (HoVer-Net's ``pair_coordinates``: least total distance over all points,
        then pairs beyond ``radius`` dropped) or ``"maximum"`` (the most pairs within ``radius``,
        then the least total distance). See the module docstring.

    Returns
    -------
    Two (p,) int arrays: indices into ``true_pts`` and ``pred_pts``.

    >>> t = np.array([[0.0, 0.0], [0.0, 12.0]]); p = np.array([[0.0, 0.0], [10.0, 5.0]])
    >>> [len(match_centroids(t, p, radius=12, pairing=k)[0]) for k in ("hovernet", "maximum")]
    [1, 2]
    """
    if pairing not in PAIRINGS:
        raise ConfigError(f"unknown pairing {pairing!r}; expected one of {', '.join(PAIRINGS)}")
    true_pts = np.asarray(true_pts, float).reshape(-1, 2)
    pred_pts = np.asarray(pred_pts, float).reshape(-1, 2)
    if radius <= 0:
        raise ConfigError(f"matching radius must be > 0, got {radius}")
    if len(true_pts) == 0 or len(pred_pts) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    dist = cdist(true_pts, pred_pts)
    if pairing == "hovernet":
        rows, cols = linear_sum_assignment(dist)
        ok = dist[rows, cols] <= radius
        return rows[ok].astype(np.int64), cols[ok].astype(np.int64)
    feasible = dist <= radius
    if not feasible.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    big = radius * (min(dist.shape) + 1) + 1.0
    rows, cols = linear_sum_assignment(np.where(feasible, dist, big))
    ok = feasible[rows, cols]
    return rows[ok].astype(np.int64), cols[ok].astype(np.int64)


def classification_f1(
    paired_true: np.ndarray,
    paired_pred: np.ndarray,
    unpaired_true: np.ndarray,
    unpaired_pred: np.ndarray,
    class_id: int,
) -> float:
    """HoVer-Net's per-class F1 (see the module docstring); NaN when its denominator is 0.

    Parameters
    ----------
    paired_true, paired_pred
        (p,) int classes of the matched true and predicted nuclei.
    unpaired_true, unpaired_pred
        (a,) and (b,) int classes of the unmatched true and predicted nuclei.
    """
    pt, pp = np.asarray(paired_true), np.asarray(paired_pred)
    tp = int(((pt == class_id) & (pp == class_id)).sum())
    fp = int(((pt != class_id) & (pp == class_id)).sum())
    fn = int(((pt == class_id) & (pp != class_id)).sum())
    fpu = int((np.asarray(unpaired_pred) == class_id).sum())
    fnu = int((np.asarray(unpaired_true) == class_id).sum())
    den = 2 * tp + 2 * fp + 2 * fn + fpu + fnu
    return 2 * tp / den if den else math.nan


def r2_counts(true_counts: np.ndarray, pred_counts: np.ndarray) -> np.ndarray:
    """(K,) R² per class of (N, K) per-image counts; NaN where undefined (N < 2, constant truth)."""
    from sklearn.metrics import r2_score

    t = np.asarray(true_counts, float)
    p = np.asarray(pred_counts, float)
    if t.shape != p.shape or t.ndim != 2:
        raise ConfigError(f"count tables must both be (N, K), got {t.shape} and {p.shape}")
    out = np.full(t.shape[1], math.nan)
    if t.shape[0] < 2:
        return out
    for k in range(t.shape[1]):
        if np.ptp(t[:, k]) > 0:
            out[k] = float(r2_score(t[:, k], p[:, k]))
    return out


# -- ignore regions -------------------------------------------------------------------------------


def compact_ids(instances: np.ndarray) -> np.ndarray:
    """An (H, W) instance map whose ids are bounded by its pixel count: returned as is when they
    already are, otherwise renumbered 1..n in id order (0 stays background).

    >>> compact_ids(np.array([[0, 2**31 - 1], [7, 7]])).tolist()
    [[0, 2], [1, 1]]
    """
    inst = np.asarray(instances)
    if inst.size == 0:
        return inst
    if not np.issubdtype(inst.dtype, np.integer):
        if not np.all(np.mod(inst, 1) == 0):
            raise ConfigError(f"instance ids must be integers, got dtype {inst.dtype} with fractions")
        inst = inst.astype(np.int64)
    lo, hi = int(inst.min()), int(inst.max())
    if lo < 0:
        raise ConfigError(f"instance ids must be >= 0, got {lo}")
    if hi <= inst.size:
        return inst
    ids, inverse = np.unique(inst.ravel(), return_inverse=True)
    if ids[0] != 0:
        inverse = inverse + 1
    return inverse.reshape(inst.shape).astype(np.int64)


def drop_ignored(instances: np.ndarray, ignore: np.ndarray, *, max_overlap: float = 0.5) -> np.ndarray:
    """Copy of an (H, W) instance map without the instances whose area lies in the (H, W) bool
    ``ignore`` mask by more than ``max_overlap``."""
    inst = np.asarray(instances)
    if not ignore.any():
        return inst
    flat = inst.ravel().astype(np.int64)
    n = int(flat.max(initial=0))
    area = np.bincount(flat, minlength=n + 1)
    inside = np.bincount(flat[ignore.ravel()], minlength=n + 1)
    drop = inside > max_overlap * np.maximum(area, 1)
    drop[0] = False
    return np.where(drop[inst], 0, inst)


# -- a whole split ---------------------------------------------------------------------------------


@dataclass
class SplitMetrics:
    """Accumulates every metric over the images of a split; call :meth:`add` per image, then
    :meth:`result`.

    >>> import numpy as np
    >>> inst = np.zeros((32, 32), np.int32); inst[2:10, 2:10] = 1; inst[20:28, 20:28] = 2
    >>> cls = np.where(inst == 1, 1, np.where(inst == 2, 3, 0)).astype(np.uint8)
    >>> acc = SplitMetrics(class_names=["A", "B", "C"])
    >>> _ = acc.add(inst, cls, inst, cls, image_id="x")
    >>> r = acc.result(); r["PQ"], r["mPQ"], r["mPQ+"], r["F1_detection"], r["type_accuracy"]
    (1.0, 1.0, 1.0, 1.0, 1.0)
    """

    class_names: Sequence[str]
    iou_threshold: float = 0.5
    radius: float = 12.0
    ignore_overlap: float = 0.5
    pairing: Pairing = "hovernet"
    binary: PQCounts = field(default_factory=PQCounts)
    per_class: list[PQCounts] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    _paired: list[np.ndarray] = field(default_factory=list)
    _unpaired_true: list[np.ndarray] = field(default_factory=list)
    _unpaired_pred: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.class_names = list(self.class_names)
        self.per_class = [PQCounts() for _ in self.class_names]
        match_iou(np.zeros((0, 0)), threshold=self.iou_threshold)
        if self.pairing not in PAIRINGS:
            raise ConfigError(f"unknown pairing {self.pairing!r}; expected one of {', '.join(PAIRINGS)}")

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def add(
        self,
        true_instances: np.ndarray,
        true_classes: np.ndarray,
        pred_instances: np.ndarray,
        pred_classes: np.ndarray,
        *,
        image_id: str = "",
        tissue: str | None = None,
    ) -> dict[str, Any]:
        """Add one image.

        Parameters
        ----------
        true_instances, pred_instances
            (H, W) int instance maps, 0 = background; ids any non-negative integers.
        true_classes
            (H, W) int class map: 0 background, 1..K, 255 ignore.
        pred_classes
            (H, W) int class map of the prediction (0 background, 1..K).
        image_id
            Name of the image in the per-image records.
        tissue
            The image's tissue (PanNuke averages mPQ and bPQ per tissue); None: no tissue.

        Returns
        -------
        The per-image record (also kept for :meth:`result`): bPQ, mPQ, AJI, AJI+, Dice and
        per-class counts.
        """
        shapes = {np.shape(a) for a in (true_instances, true_classes, pred_instances, pred_classes)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ConfigError(f"image {image_id!r}: all four maps must be the same (H, W) shape, got {sorted(shapes)}")
        true_classes = np.asarray(true_classes)
        ignore = true_classes == IGNORE_CLASS
        true_inst = drop_ignored(compact_ids(true_instances), ignore, max_overlap=self.ignore_overlap)
        pred_inst = drop_ignored(compact_ids(pred_instances), ignore, max_overlap=self.ignore_overlap)
        k = self.n_classes

        t_cls_of = majority_vote(true_inst, true_classes, n_labels=k + 1)
        p_cls_of = majority_vote(pred_inst, np.asarray(pred_classes), n_labels=k + 1)

        true_ids, pred_ids, inter, ta, pa = pairwise_overlap(true_inst, pred_inst)
        union = ta[:, None] + pa[None, :] - inter
        iou = np.divide(inter, union, out=np.zeros(inter.shape, np.float64), where=union > 0)
        rows, cols = match_iou(iou, threshold=self.iou_threshold)
        img_counts = PQCounts(len(rows), len(pred_ids) - len(rows), len(true_ids) - len(rows), float(iou[rows, cols].sum()))
        self.binary = self.binary + img_counts
        t_cls = t_cls_of[true_ids] if len(true_ids) else np.zeros(0, np.int64)
        p_cls = p_cls_of[pred_ids] if len(pred_ids) else np.zeros(0, np.int64)
        same = t_cls[rows] == p_cls[cols]
        pq_img: list[float] = []
        for c in range(1, k + 1):
            in_t = int((t_cls == c).sum())
            in_p = int((p_cls == c).sum())
            hit = same & (t_cls[rows] == c)
            tp = int(hit.sum())
            counts_c = PQCounts(tp, in_p - tp, in_t - tp, float(iou[rows[hit], cols[hit]].sum()))
            self.per_class[c - 1] = self.per_class[c - 1] + counts_c
            pq_img.append(counts_c.pq if in_t else math.nan)  # PanNuke: a class absent from the truth is skipped

        _, t_pts = centroids(true_inst)
        _, p_pts = centroids(pred_inst)
        ti, pj = match_centroids(t_pts, p_pts, radius=self.radius, pairing=self.pairing)
        self._paired.append(np.column_stack([t_cls[ti], p_cls[pj]]))
        self._unpaired_true.append(np.delete(t_cls, ti))
        self._unpaired_pred.append(np.delete(p_cls, pj))

        record: dict[str, Any] = {
            "image_id": str(image_id),
            "tissue": None if tissue is None or (isinstance(tissue, float) and math.isnan(tissue)) else str(tissue),
            "bPQ": img_counts.pq if len(true_ids) else math.nan,
            "mPQ": _nanmean(pq_img),
            "AJI": aji(true_inst, pred_inst) if len(true_ids) else math.nan,
            "AJI+": aji_plus(true_inst, pred_inst) if len(true_ids) else math.nan,
            "Dice": dice(true_inst > 0, pred_inst > 0, valid=~ignore),
            "n_true": len(true_ids),
            "n_pred": len(pred_ids),
            "detection_tp": len(ti),
            "PQ_class": pq_img,
            "true_counts": np.bincount(t_cls, minlength=k + 1)[1 : k + 1].tolist(),
            "pred_counts": np.bincount(p_cls, minlength=k + 1)[1 : k + 1].tolist(),
        }
        self.images.append(record)
        return record

    def per_tissue(self) -> dict[str, dict[str, float]]:
        """PanNuke's per-tissue table: tissue -> mPQ and bPQ (means over its images), images,
        and PQ per class (mean over its images whose truth holds the class). Images without a
        tissue are grouped under ``"(none)"``."""
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in self.images:
            groups.setdefault(r["tissue"] or "(none)", []).append(r)
        out: dict[str, dict[str, Any]] = {}
        for tissue in sorted(groups):
            rs = groups[tissue]
            entry: dict[str, Any] = {"n_images": len(rs), "mPQ": _nanmean([r["mPQ"] for r in rs]),
                                     "bPQ": _nanmean([r["bPQ"] for r in rs])}
            for c, name in enumerate(self.class_names):
                entry[f"PQ_{name}"] = _nanmean([r["PQ_class"][c] for r in rs])
            out[tissue] = entry
        return out

    def result(self) -> dict[str, Any]:
        """Summary metrics, per-class and per-tissue metrics, per-image records and the count tables."""
        k = self.n_classes
        paired = np.concatenate(self._paired) if self._paired else np.zeros((0, 2), np.int64)
        un_t = np.concatenate(self._unpaired_true) if self._unpaired_true else np.zeros(0, np.int64)
        un_p = np.concatenate(self._unpaired_pred) if self._unpaired_pred else np.zeros(0, np.int64)
        tp_d, fp_d, fn_d = len(paired), len(un_p), len(un_t)
        det_den = 2 * tp_d + fp_d + fn_d
        true_counts = np.array([r["true_counts"] for r in self.images], float).reshape(-1, k)
        pred_counts = np.array([r["pred_counts"] for r in self.images], float).reshape(-1, k)
        r2 = r2_counts(true_counts, pred_counts)
        tissues = self.per_tissue()

        per_class: dict[str, dict[str, float]] = {}
        for c, name in enumerate(self.class_names, start=1):
            entry: dict[str, float] = dict(self.per_class[c - 1].as_dict())
            entry["PQ_pannuke"] = _nanmean([r["PQ_class"][c - 1] for r in self.images])
            entry["F1"] = classification_f1(paired[:, 0], paired[:, 1], un_t, un_p, c)
            entry["R2_counts"] = float(r2[c - 1])
            entry["n_true"] = int(true_counts[:, c - 1].sum())
            entry["n_pred"] = int(pred_counts[:, c - 1].sum())
            per_class[name] = entry

        pq_c = [self.per_class[c].pq for c in range(k) if self.per_class[c].tp + self.per_class[c].fp + self.per_class[c].fn > 0]
        f1_c = [v["F1"] for v in per_class.values() if not math.isnan(v["F1"])]
        return {
            "n_images": len(self.images),
            "PQ": self.binary.pq,
            "DQ": self.binary.dq,
            "SQ": self.binary.sq,
            "bPQ": _nanmean([t["bPQ"] for t in tissues.values()]),
            "mPQ": _nanmean([t["mPQ"] for t in tissues.values()]),
            "mPQ+": _nanmean(pq_c),
            "AJI": _nanmean([r["AJI"] for r in self.images]),
            "AJI+": _nanmean([r["AJI+"] for r in self.images]),
            "Dice": _nanmean([r["Dice"] for r in self.images]),
            "F1_detection": 2 * tp_d / det_den if det_den else math.nan,
            "precision_detection": tp_d / (tp_d + fp_d) if tp_d + fp_d else math.nan,
            "recall_detection": tp_d / (tp_d + fn_d) if tp_d + fn_d else math.nan,
            "F1_classification": _nanmean(f1_c),
            "type_accuracy": float((paired[:, 0] == paired[:, 1]).mean()) if tp_d else math.nan,
            "R2_counts": _nanmean(r2.tolist()),
            "pairing": self.pairing,
            "per_class": per_class,
            "per_tissue": tissues,
            "per_image": [{key: v for key, v in r.items() if not key.endswith("_counts")} for r in self.images],
            "counts": {"true": true_counts.astype(int).tolist(), "pred": pred_counts.astype(int).tolist()},
        }


#: Summary metrics in report order, with one-line descriptions (used by the evaluation report).
SUMMARY_METRICS: dict[str, str] = {
    "PQ": "binary PQ, sums over the split",
    "DQ": "binary detection quality",
    "SQ": "binary segmentation quality",
    "bPQ": "binary PQ per image, mean per tissue, mean over tissues (PanNuke)",
    "mPQ": "per-class PQ per image, mean per tissue, mean over tissues (PanNuke)",
    "mPQ+": "per-class PQ from split sums, mean over classes (CoNIC)",
    "AJI": "aggregated Jaccard index, mean over images",
    "AJI+": "AJI with one-to-one pairs (HoVer-Net), mean over images",
    "Dice": "pixel foreground Dice, mean over images",
    "F1_detection": "centroid F1 within the radius (pairing in settings)",
    "precision_detection": "centroid precision",
    "recall_detection": "centroid recall",
    "F1_classification": "HoVer-Net per-class F1, mean over classes",
    "type_accuracy": "class agreement of centroid-paired nuclei (HoVer-Net acc_type)",
    "R2_counts": "R² of per-image counts, mean over classes",
}


def _nanmean(values: Sequence[float]) -> float:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else math.nan

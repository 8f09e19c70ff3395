"""Instance-level label issues: missed, spurious and badly drawn nuclei (``curate instances``).

Per image, the annotation (the store's instance map) is matched with an out-of-sample prediction
(:mod:`cellcurate.relabel.instance_predict`: instance ids and a nucleus probability per pixel) by one
pixel-overlap table, and five issue types are flagged:

==================== ===================================================================== ==========
issue                rule (thresholds: :class:`InstanceConfig`)                             proposal
==================== ===================================================================== ==========
missing_annotation   a confident predicted nucleus of which at most ``missing_max_overlap``  add
                     is annotated (and at most half lies in an ignore region); or an
                     unannotated blob of the probability map, nucleus-sized and solid
                     (``blob_*``, :func:`_blob_flags`)
spurious_annotation  an annotated object overlapping no prediction (IoU < ``spurious_max_iou``) delete
                     whose pixels the model calls background (mean ≥ ``spurious_min_background``)
bad_outline          a one-to-one match (mutual best IoU ≥ ``match_iou``) with IoU below          replace
                     ``bad_outline_iou``, or whose IoU rises by ≥ ``min_shift_gain`` when
                     the outline is moved (``shift_gain``), while the model is confident;
                     or an annotation that gains probability mass when moved on the
                     probability map (``registration*``, :func:`registration_gains`)
merged               one annotation holding ≥ 2 confident predictions (each ≥ ``part_cover``     split
                     inside it, each ≥ ``min_part_um2``)
split                one confident prediction holding ≥ 2 annotations (each ≥ ``part_cover``     merge
                     inside it)
==================== ===================================================================== ==========

"Confident" = the predicted object's mean nucleus probability ≥ ``min_confidence``. Scores lie in
[0, 1], higher = more likely a real error (the model's confidence times how clear the geometric
evidence is). The two probability-map rules (on by default) do not depend on the predicted
instances, which merge and split touching real nuclei; their flags score in [0.5, 1] and, while
they are on, the prediction rules' missing / bad-outline flags score half (unless a map rule
backs them), so the map evidence ranks first. Every flag carries its evidence (IoU, overlaps, confidence, areas) and, where it
applies, cleanlab's object-detection score of the annotated nucleus' box (``cleanlab_badloc``,
computed on mask IoUs), cleanlab's pooled score of the image (``cleanlab_image_quality``) and
cleanlab's segmentation label quality of the image (``cleanlab_pixel_quality``).

A round (:func:`run_instance_round`) writes ``STORE/rounds/instances-<K>/`` (config.json,
flags.parquet, summary.json; a temp folder renamed into place *before* the ledger commit) and one
``instance_flag`` ledger event per flag, in one transaction (the contract in docs/INSTANCES.md).

Dimensions: H×W pixels, n annotated objects and m predicted objects of one image.

>>> ann = np.zeros((8, 12), np.int32); ann[1:7, 1:11] = 1           # one annotation ...
>>> pred = np.zeros((8, 12), np.int32); pred[1:7, 1:5] = 1; pred[1:7, 7:11] = 2  # ... two nuclei
>>> [f.issue for f in match_image(ann, pred, (pred > 0).astype(float), config=InstanceConfig(min_part_um2=1))]
['merged']
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from ..core.atomic import atomic_write_json, fsync_dir, remove_tree, replace_dir
from ..errors import ConfigError, StateError, StoreError

if TYPE_CHECKING:  # pragma: no cover
    from ..datasets.store import Store
    from .instance_predict import PredictionCache

InstanceIssue = Literal["missing_annotation", "spurious_annotation", "bad_outline", "merged", "split"]
ISSUES: tuple[str, ...] = ("missing_annotation", "spurious_annotation", "bad_outline", "merged", "split")
#: The geometry change each issue proposes (payload ``proposed.action``).
PROPOSED_ACTION: dict[str, str] = {"missing_annotation": "add", "spurious_annotation": "delete",
                                   "bad_outline": "replace", "merged": "split", "split": "merge"}
ACTOR = "cellcurate-instances"
FLAG_COLUMNS: tuple[str, ...] = ("flag_id", "image_id", "issue", "score", "nucleus_ids", "proposed_action",
                                 "proposed_wkb", "evidence", "run")


@dataclass(frozen=True)
class InstanceConfig:
    """Thresholds of the issue rules (module docstring); defaults measured on the demo sample
    (docs/INSTANCES.md, ``benchmarks/bench_instances.py``)."""

    min_confidence: float = 0.6
    missing_max_overlap: float = 0.2
    spurious_min_background: float = 0.6
    spurious_max_iou: float = 0.2
    match_iou: float = 0.2
    bad_outline_iou: float = 0.6
    shift_check_iou: float = 0.85  # matches below this IoU are also tried moved (shift_gain)
    min_shift_gain: float = 0.15  # a moved outline gaining this much IoU is a bad outline too
    part_cover: float = 0.6
    min_part_um2: float = 6.0
    cleanlab: bool = True
    # evidence from the probability map alone (robust to the model's merged / split instances);
    # defaults chosen on the CoNSeP fixture with planted errors (docs/INSTANCES.md)
    registration: bool = True  # bad_outline by registering each annotation on the probability map
    registration_max_shift: float = 0.8  # offsets tried, as a fraction of the nucleus' radius
    min_registration_score: float = 0.08  # gain of the best offset × mean probability there
    blob_missing: bool = True  # missing_annotation from unannotated blobs of the probability map
    blob_threshold: float = 0.5  # probability of a blob pixel
    blob_open: float = 0.4  # opening radius, as a fraction of the image's median annotated radius
    min_blob_score: float = 0.5  # mean probability × size plausibility × solidity
    # ranking of the blob flags by how the image looks there, learnt out of fold on the store's own
    # annotated nuclei (relabel.appearance; changes scores, not which flags there are). Off by
    # default: +0.03-0.05 best recall on the real fixtures, for half again the round time on
    # 200,000 nuclei (53 -> 79 s; docs/INSTANCES.md)
    appearance: bool = False

    def validate(self) -> "InstanceConfig":
        for name in ("min_confidence", "missing_max_overlap", "spurious_min_background", "spurious_max_iou",
                     "match_iou", "bad_outline_iou", "shift_check_iou", "min_shift_gain", "part_cover",
                     "min_registration_score", "blob_threshold", "blob_open", "min_blob_score"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
                raise ConfigError(f"{name} must be a number in [0, 1], got {v!r}")
        if self.match_iou > self.bad_outline_iou:
            raise ConfigError(f"match_iou ({self.match_iou}) must not exceed bad_outline_iou ({self.bad_outline_iou})")
        if not self.min_part_um2 >= 0:
            raise ConfigError(f"min_part_um2 must be >= 0, got {self.min_part_um2!r}")
        v = self.registration_max_shift
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 2.0:
            raise ConfigError(f"registration_max_shift must be a number in (0, 2], got {v!r}")
        return self


@dataclass
class ImageFlag:
    """One issue found in one image (instance ids are the image's own maps' ids)."""

    issue: str
    score: float
    ann_ids: list[int]
    pred_ids: list[int]
    evidence: dict[str, Any] = field(default_factory=dict)
    #: The proposed geometry when it is not a predicted object: (y0, x0, boolean mask) placed at
    #: row y0, column x0 of the image (a moved annotation, a probability blob); may reach outside.
    region: tuple[int, int, np.ndarray] | None = None


def _r(v: Any) -> float:
    return float(round(float(v), 4))


def match_image(ann: np.ndarray, pred: np.ndarray, prob: np.ndarray, *, config: InstanceConfig | None = None,
                mpp: float = 1.0, ignore_ids: Any = ()) -> list[ImageFlag]:
    """The issues of one image (:func:`match_image_tables` without its tables)."""
    return match_image_tables(ann, pred, prob, config=config, mpp=mpp, ignore_ids=ignore_ids)[0]


def match_image_tables(ann: np.ndarray, pred: np.ndarray, prob: np.ndarray, *, config: InstanceConfig | None = None,
                       mpp: float = 1.0, ignore_ids: Any = (), slices: tuple[list[Any], list[Any]] | None = None,
                       blobs: list[tuple[int, int, np.ndarray, ImageFlag | None]] | None = None
                       ) -> tuple[list[ImageFlag], np.ndarray, np.ndarray]:
    """The issues of one image, with the (n, m) mask IoU table and the (m,) confidence of the
    predicted objects they were found on (the cleanlab evidence reuses both). ``slices``: the
    :func:`object_slices` of ``ann`` and ``pred`` when the caller has them (else found when needed).

    Parameters
    ----------
    ann
        (H, W) integer annotated instance map, ids 1..n (0 = background).
    pred
        (H, W) integer predicted instance map, ids 1..m.
    prob
        (H, W) float nucleus probability in [0, 1].
    config
        Thresholds; defaults when None.
    mpp
        Microns per pixel (``min_part_um2`` is converted with it).
    ignore_ids
        Annotated ids that are ignore regions (never flagged; predictions inside them are not missing).
    blobs
        When a list: every blob of the probability-map rule is appended to it as (y0, x0, mask, its
        flag or None when it scored below ``min_blob_score``) (the appearance ranking's examples).

    Returns
    -------
    Flags, in a deterministic order (issue order of :data:`ISSUES`, then annotated / predicted id);
    the IoU of annotated id a + 1 with predicted id p + 1 at ``[a, p]``; the mean probability of
    predicted id p + 1 at ``[p]``.
    """
    cfg = config or InstanceConfig()
    if ann.shape != pred.shape or ann.shape != prob.shape:
        raise ConfigError(f"annotation {ann.shape}, prediction {pred.shape} and probability {prob.shape} differ in shape")
    ann = np.asarray(ann).astype(np.int64, copy=False)
    pred = np.asarray(pred).astype(np.int64, copy=False)
    n, m = int(ann.max(initial=0)), int(pred.max(initial=0))
    flat_a, flat_p = ann.ravel(), pred.ravel()
    pr = np.asarray(prob, np.float64).ravel()
    ov = np.bincount(flat_a * (m + 1) + flat_p, minlength=(n + 1) * (m + 1)).reshape(n + 1, m + 1)
    A, P = ov.sum(axis=1), ov.sum(axis=0)
    fg_a = np.bincount(flat_a, weights=pr, minlength=n + 1) / np.maximum(A, 1)
    conf = np.bincount(flat_p, weights=pr, minlength=m + 1) / np.maximum(P, 1)
    ignore = np.zeros(n + 1, bool)
    ig = [int(i) for i in ignore_ids if 0 < int(i) <= n]
    ignore[ig] = True
    min_px = cfg.min_part_um2 / max(mpp, 1e-6) ** 2
    ovi = ov[1:, 1:].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = ovi / (A[1:, None] + P[None, 1:] - ovi)
        p_in_a = ovi / P[None, 1:]  # share of prediction p inside annotation a
        a_in_p = ovi / A[1:, None]  # share of annotation a inside prediction p
    iou = np.nan_to_num(iou)
    p_in_a, a_in_p = np.nan_to_num(p_in_a), np.nan_to_num(a_in_p)
    confident = conf[1:] >= cfg.min_confidence  # (m,)
    real_a = (A[1:] > 0) & ~ignore[1:]  # (n,)
    flags: list[ImageFlag] = []
    taken = np.zeros(n, bool)

    # merged: one annotation, several confident predictions inside it
    merged = []
    if n and m:
        part = (p_in_a >= cfg.part_cover) & confident[None, :] & (P[None, 1:] >= min_px)
        for a in np.flatnonzero((part.sum(axis=1) >= 2) & real_a):
            ps = np.flatnonzero(part[a])
            cover = float(ovi[a, ps].sum() / A[a + 1])
            if cover < 0.5:
                continue
            shares = np.sort(ovi[a, ps] / A[a + 1])[::-1]
            score = float(np.mean(conf[ps + 1])) * float(p_in_a[a, ps].min()) * min(1.0, 3.0 * float(shares[1]))
            merged.append(ImageFlag("merged", score, [int(a + 1)], [int(p + 1) for p in ps], {
                "n_predicted": int(len(ps)), "cover": _r(cover), "confidence": _r(np.mean(conf[ps + 1])),
                "inside": [_r(v) for v in p_in_a[a, ps]], "area": int(A[a + 1])}))
            taken[a] = True
    # split: one confident prediction holding several annotations
    split = []
    if n and m:
        part = (a_in_p >= cfg.part_cover) & real_a[:, None] & (A[1:, None] >= min_px)
        for p in np.flatnonzero((part.sum(axis=0) >= 2) & confident):
            as_ = np.flatnonzero(part[:, p] & ~taken)
            if len(as_) < 2:
                continue
            cover = float(ovi[as_, p].sum() / P[p + 1])
            contact = _contact(ann, [int(a + 1) for a in as_])
            shares = np.sort(A[as_ + 1] / A[as_ + 1].sum())
            score = float(conf[p + 1]) * float(a_in_p[as_, p].min()) * min(1.0, cover / 0.8) * min(1.0, 3 * float(shares[0]))
            split.append(ImageFlag("split", score, [int(a + 1) for a in as_], [int(p + 1)], {
                "n_annotated": int(len(as_)), "cover": _r(cover), "confidence": _r(conf[p + 1]),
                "inside": [_r(v) for v in a_in_p[as_, p]], "contact_px": int(contact), "area": int(P[p + 1])}))
            taken[as_] = True
    # spurious: annotated, overlaps no prediction, the model sees background
    spurious = []
    best_iou = iou.max(axis=1) if m else np.zeros(n)
    for a in np.flatnonzero(real_a & ~taken & (best_iou < cfg.spurious_max_iou) & (1 - fg_a[1:] >= cfg.spurious_min_background)):
        bg = 1.0 - float(fg_a[a + 1])
        score = bg * (1.0 - float(best_iou[a]) / max(cfg.spurious_max_iou, 1e-6) * 0.5)
        spurious.append(ImageFlag("spurious_annotation", score, [int(a + 1)], [], {
            "background_prob": _r(bg), "best_iou": _r(best_iou[a]), "area": int(A[a + 1])}))
        taken[a] = True
    # bad outline: mutual best match, IoU low (or much higher once the outline is moved), model confident
    bad = []
    objs = slices
    if n and m:
        best_p = iou.argmax(axis=1)
        best_a_of_p = iou.argmax(axis=0)
        for a in np.flatnonzero(real_a & ~taken):
            q = int(best_p[a])
            v = float(iou[a, q])
            if best_a_of_p[q] != a or not cfg.match_iou <= v < cfg.shift_check_iou or not confident[q]:
                continue
            if objs is None:
                objs = (object_slices(ann, n), object_slices(pred, m))
            y0, x0, y1, x1 = _window([objs[0][a], objs[1][q]])
            gain, (dy, dx) = _shift_gain(ann[y0:y1, x0:x1] == a + 1, pred[y0:y1, x0:x1] == q + 1,
                                         max_shift=max(2, int(np.sqrt(A[a + 1] / np.pi))))
            if v >= cfg.bad_outline_iou and gain < cfg.min_shift_gain:
                continue
            low = (1.0 - min(v, cfg.bad_outline_iou) / max(cfg.bad_outline_iou, 1e-6)) ** 0.5
            score = float(conf[q + 1]) * max(low, min(1.0, gain / 0.3))
            bad.append(ImageFlag("bad_outline", score, [int(a + 1)], [q + 1], {
                "iou": _r(v), "confidence": _r(conf[q + 1]), "area": int(A[a + 1]), "predicted_area": int(P[q + 1]),
                "inside": _r(a_in_p[a, q]), "covered": _r(p_in_a[a, q]), "shift_gain": _r(gain),
                "best_shift": [int(dx), int(dy)]}))
    # missing: confident prediction, (almost) nothing annotated there
    missing = []
    if m:
        ig_px = np.bincount(flat_p[np.isin(flat_a, ig)], minlength=m + 1) if ig else np.zeros(m + 1)
        annotated = 1.0 - (ov[0] + ig_px) / np.maximum(P, 1)
        in_ignore = ig_px / np.maximum(P, 1)
        ok = confident & (annotated[1:] <= cfg.missing_max_overlap) & (in_ignore[1:] <= 0.5) & (P[1:] >= min_px)
        for p in np.flatnonzero(ok):
            score = float(conf[p + 1]) * (1.0 - float(annotated[p + 1]))
            missing.append(ImageFlag("missing_annotation", score, [], [int(p + 1)], {
                "confidence": _r(conf[p + 1]), "annotated_share": _r(annotated[p + 1]), "area": int(P[p + 1])}))
    if cfg.registration and n:
        _registration_flags(bad, ann, pr.reshape(ann.shape), A, real_a, cfg, None if objs is None else objs[0])
        moved = {f.ann_ids[0] for f in bad if f.region is not None}
        spurious = [f for f in spurious if f.ann_ids[0] not in moved]  # a moved outline, not a spurious one
    if cfg.blob_missing:
        _blob_flags(missing, bad, ann, pred, pr.reshape(ann.shape), A, real_a, cfg, blobs)
    flags = missing + spurious + bad + merged + split
    for f in flags:
        f.score = float(min(1.0, max(0.0, f.score)))
    return flags, iou, conf[1:]


def registration_gains(ann: np.ndarray, prob: np.ndarray, ids: Any, *, max_shift: float, min_gain: float = 0.0,
                       force: Any = (), slices: list[Any] | None = None) -> dict[int, tuple[float, float, int, int]]:
    """Register annotated nuclei on the probability map: for each id ``a`` of ``ids``, the
    probability mass inside its mask moved by every integer offset (dy, dx) with |(dy, dx)| ≤
    ``max_shift`` × its radius (at least 2 px), with the *other* annotated objects' pixels counted
    as 0 (a move onto a neighbour gains nothing); FFT correlation on the object's window.

    Returns ``{a: (gain, mean_prob, dy, dx)}``: the best offset's gain in mean probability over
    offset 0, the mean probability of the moved mask, and the offset (0 gain and offset (0, 0)
    when no move helps). Ids whose gain cannot reach ``min_gain`` are left out unless in
    ``force``, by exact bounds (no FFT): a move that uncovers L of the mask's pixels covers L
    others (free pixels, or 0 on other objects), so the gain is at most (a) the largest free
    probability of the window (first the image's) less the mask's smallest, and (b) (mass of the
    window's free pixels ≥ ρ) / area + ρ, with ρ = 0.75 × ``min_gain``.
    """
    from scipy.signal import fftconvolve

    ann = np.asarray(ann)
    H, W = ann.shape
    n = int(ann.max(initial=0))
    ids = [int(a) for a in ids if 0 < int(a) <= n]
    force = {int(a) for a in force}
    if not ids:
        return {}
    sl = object_slices(ann, n) if slices is None else slices
    q = np.asarray(prob, np.float64)
    area = np.bincount(ann.ravel(), minlength=n + 1)
    rho = 0.75 * float(min_gain)
    free_q = np.where(ann == 0, q, 0.0)
    present = [a for a in ids if sl[a - 1] is not None and area[a] > 0]
    if not present:
        return {}
    ida = np.asarray(present)
    box = np.array([(sl[a - 1][0].start, sl[a - 1][0].stop, sl[a - 1][1].start, sl[a - 1][1].stop) for a in present])
    ks = np.maximum(2, np.ceil(max_shift * np.sqrt(area[ida] / np.pi))).astype(np.int64)
    wy0, wy1 = np.maximum(0, box[:, 0] - ks), np.minimum(H, box[:, 1] + ks)
    wx0, wx1 = np.maximum(0, box[:, 2] - ks), np.minimum(W, box[:, 3] + ks)
    forced = np.isin(ida, list(force)) if force else np.zeros(len(ida), bool)
    lowest = np.full(n + 1, np.inf)  # smallest probability inside each object
    np.minimum.at(lowest, ann.ravel(), q.ravel())
    low = lowest[ida]
    go = forced | (float(free_q.max()) - low >= min_gain)
    out: dict[int, tuple[float, float, int, int]] = {}
    for i in np.flatnonzero(go):
        a, k = int(ida[i]), int(ks[i])
        y0, y1, x0, x1 = (int(v) for v in box[i])
        if not forced[i]:
            w = free_q[wy0[i]:wy1[i], wx0[i]:wx1[i]]
            if float(w.max()) - low[i] < min_gain or float(w[w >= rho].sum()) / area[a] + rho < min_gain:
                continue
        wy0_, wy1_, wx0_, wx1_ = int(wy0[i]), int(wy1[i]), int(wx0[i]), int(wx1[i])
        mask = ann[y0:y1, x0:x1] == a
        # the window padded to its full extent (outside the image: probability 0)
        g = np.zeros((y1 - y0 + 2 * k, x1 - x0 + 2 * k))
        aw = ann[wy0_:wy1_, wx0_:wx1_]
        g[wy0_ - (y0 - k):wy1_ - (y0 - k), wx0_ - (x0 - k):wx1_ - (x0 - k)] = np.where((aw == 0) | (aw == a),
                                                                                       q[wy0_:wy1_, wx0_:wx1_], 0.0)
        c = fftconvolve(g, mask[::-1, ::-1].astype(np.float64), mode="valid")  # (2k + 1, 2k + 1)
        yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
        c = np.where(yy * yy + xx * xx <= k * k, c, -np.inf)
        j = np.unravel_index(int(np.argmax(c)), c.shape)
        base = float(c[k, k])
        best = float(c[j])
        if best <= base + 1e-9:
            out[a] = (0.0, base / area[a], 0, 0)
        else:
            out[a] = ((best - base) / area[a], best / area[a], int(j[0]) - k, int(j[1]) - k)
    return out


def _registration_flags(bad: list[ImageFlag], ann: np.ndarray, prob: np.ndarray, A: np.ndarray, cand: np.ndarray,
                        cfg: InstanceConfig, slices: list[Any] | None) -> None:
    """bad_outline by registration (:func:`registration_gains`), in place on ``bad``.

    A nucleus whose best offset gains ``gain`` with mean probability ``p`` there has the evidence
    ``s = gain × p``; ``s ≥ min_registration_score`` flags it (proposal: the annotation moved by
    that offset) with score 0.5 + 0.5 × min(1, s / 0.2). Flags of the matching rule keep their
    place but score half their score, or the registration score if that is higher: on real
    images the registration ranks the displaced outlines above the model's own instance errors."""
    old = {f.ann_ids[0]: f for f in bad}
    sl = object_slices(ann, int(ann.max(initial=0))) if slices is None else slices
    gains = registration_gains(ann, prob, np.flatnonzero(cand) + 1, max_shift=cfg.registration_max_shift,
                               min_gain=cfg.min_registration_score, force=old, slices=sl)
    for f in bad:
        f.score *= 0.5
    for a, (gain, mean_p, dy, dx) in sorted(gains.items()):
        s = gain * mean_p
        ev = {"registration_gain": _r(gain), "registration_mean_prob": _r(mean_p), "registration_shift": [dx, dy]}
        score = 0.5 + 0.5 * min(1.0, s / 0.2)
        known = old.get(a)
        if known is not None:
            known.evidence.update(ev)
            if s >= cfg.min_registration_score:
                known.score = max(known.score, score)
        elif s >= cfg.min_registration_score and (dy or dx):
            y, x = sl[a - 1]
            bad.append(ImageFlag("bad_outline", score, [int(a)], [], {**ev, "area": int(A[a]), "rule": "registration"},
                                 region=(y.start + dy, x.start + dx, ann[y, x] == a)))
    bad.sort(key=lambda f: f.ann_ids[0])


def _opening(m: np.ndarray, disk: np.ndarray) -> np.ndarray:
    """Binary opening of ``m`` by ``disk``, one connected component at a time on its own window
    (the same result: separate components' erosions never meet), skipping components smaller
    than the disc (their erosion is empty)."""
    from scipy import ndimage

    lab, k = ndimage.label(m)
    out = np.zeros(m.shape, bool)
    if not k:
        return out
    sizes = np.bincount(lab.ravel(), minlength=k + 1)
    need, R = int(disk.sum()), disk.shape[0] // 2
    H, W = m.shape
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None or sizes[i] < need:
            continue
        y0, y1 = max(0, sl[0].start - R), min(H, sl[0].stop + R)
        x0, x1 = max(0, sl[1].start - R), min(W, sl[1].stop + R)
        out[y0:y1, x0:x1] |= ndimage.binary_opening(lab[y0:y1, x0:x1] == i, structure=disk)
    return out


def _blob_flags(missing: list[ImageFlag], bad: list[ImageFlag], ann: np.ndarray, pred: np.ndarray, prob: np.ndarray,
                A: np.ndarray, real_a: np.ndarray, cfg: InstanceConfig,
                blobs: list[tuple[int, int, np.ndarray, ImageFlag | None]] | None = None) -> None:
    """missing_annotation from the probability map, in place on ``missing``: connected blobs of
    unannotated pixels with probability ≥ ``blob_threshold`` after an opening by a disc of
    ``blob_open`` × the image's median annotated radius (rims along annotated outlines go), scored
    ``s = mean probability × size × solidity`` (size: 1 between half and three times the image's
    median annotated area, falling off outside), flagged when ``s ≥ min_blob_score`` with score
    0.5 + 0.5 × s (proposal: the blob). A blob mostly inside a flagged missing prediction raises
    that flag (the blob is the sharper proposal; its evidence names the prediction); one mostly
    under a moved-outline proposal (:func:`_registration_flags`) is that outline's nucleus. Flags
    of the prediction rule without a blob score half their score."""
    from scipy import ndimage
    from skimage.measure import regionprops

    for f in missing:
        f.score *= 0.5
    areas = A[1:][real_a]
    if not len(areas):
        return
    med = float(np.median(areas))
    m = (prob >= cfg.blob_threshold) & (ann == 0)
    if not m.any():
        return
    dk = blob_disk(med, cfg)
    if dk is not None:
        m = _opening(m, dk)
        if not m.any():
            return
    lab, k = ndimage.label(m)
    if not k:
        return
    H, W = ann.shape
    claimed = np.zeros(ann.shape, bool)  # where the bad_outline proposals put their nuclei
    for f in bad:
        if f.region is not None:
            y0, x0, rm = f.region
            ys, xs = np.nonzero(rm)
            ys, xs = ys + y0, xs + x0
            ok = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
            claimed[ys[ok], xs[ok]] = True
    by_pred = {f.pred_ids[0]: f for f in missing if f.pred_ids}
    replaced: set[int] = set()
    for rp in regionprops(lab, intensity_image=prob):
        ys, xs = rp.coords[:, 0], rp.coords[:, 1]
        if claimed[ys, xs].mean() >= 0.5:
            continue
        rel = rp.area / med
        size = min(1.0, rel / 0.5) * (3.0 / rel if rel > 3.0 else 1.0)
        mean_p = float(prob[ys, xs].mean())
        s = mean_p * size * float(rp.solidity)
        if s < cfg.min_blob_score:
            if blobs is not None:
                y0, x0, y1, x1 = rp.bbox
                blobs.append((int(y0), int(x0), lab[y0:y1, x0:x1] == rp.label, None))
            continue
        score = 0.5 + 0.5 * s
        ev: dict[str, Any] = {"blob_mean_prob": _r(mean_p), "blob_area": int(rp.area), "blob_relative_area": _r(rel),
              "blob_solidity": _r(rp.solidity), "blob_score": _r(s)}
        under = pred[ys, xs]
        ids, counts = np.unique(under[under > 0], return_counts=True)
        host = by_pred.get(int(ids[np.argmax(counts)])) if len(ids) and counts.max() >= 0.5 * rp.area else None
        if host is not None:  # the blob is the sharper proposal: it replaces the predicted object's flag
            ev["replaces_pred_id"] = int(host.pred_ids[0])
            ev["pred_confidence"] = host.evidence.get("confidence")
            replaced.add(id(host))
        y0, x0, y1, x1 = rp.bbox
        flag = ImageFlag("missing_annotation", score, [], [], {**ev, "confidence": _r(mean_p), "rule": "probability_blob"},
                         region=(int(y0), int(x0), lab[y0:y1, x0:x1] == rp.label))
        missing.append(flag)
        if blobs is not None:
            blobs.append((int(y0), int(x0), lab[y0:y1, x0:x1] == rp.label, flag))
    missing[:] = [f for f in missing if id(f) not in replaced]


def blob_disk(median_area: float, cfg: InstanceConfig) -> np.ndarray | None:
    """The blob rule's opening disc for an image of median annotated area ``median_area`` px
    (None: too small to open)."""
    from skimage.morphology import disk

    r = cfg.blob_open * np.sqrt(median_area / np.pi)
    return disk(max(int(round(r)), 0)).astype(bool) if r >= 0.5 else None


def _shift_gain(ann_mask: np.ndarray, pred_mask: np.ndarray, *, max_shift: int) -> tuple[float, tuple[int, int]]:
    """How much the IoU of two masks rises when the annotation is moved by up to ``max_shift``
    pixels each way (cross-correlation by FFT on the crop), and the best (dy, dx)."""
    from scipy.signal import fftconvolve

    both = ann_mask | pred_mask
    ys, xs = np.nonzero(both)
    if not len(ys):
        return 0.0, (0, 0)
    y0, x0, y1, x1 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
    a = ann_mask[y0:y1, x0:x1].astype(np.float64)
    p = pred_mask[y0:y1, x0:x1].astype(np.float64)
    na, np_ = a.sum(), p.sum()
    # c[dy, dx] = sum over pixels of a(y, x) p(y + dy, x + dx): the overlap with a moved by (dy, dx)
    c = fftconvolve(p, a[::-1, ::-1], mode="full")
    cy, cx = a.shape[0] - 1, a.shape[1] - 1
    k = int(max_shift)
    win = c[max(0, cy - k):cy + k + 1, max(0, cx - k):cx + k + 1]
    inter = np.clip(np.rint(win), 0, None)
    ious = inter / np.maximum(na + np_ - inter, 1)
    j = np.unravel_index(int(np.argmax(ious)), ious.shape)
    base = float(np.clip(np.rint(c[cy, cx]), 0, None) / max(na + np_ - np.rint(c[cy, cx]), 1))
    dy, dx = int(j[0] + max(0, cy - k) - cy), int(j[1] + max(0, cx - k) - cx)
    return max(0.0, float(ious[j]) - base), (dy, dx)


def object_slices(labels: np.ndarray, k: int) -> list[Any]:
    """``scipy.ndimage.find_objects`` of ids 1..k (None for an absent id)."""
    from scipy import ndimage

    return list(ndimage.find_objects(np.asarray(labels), max_label=k)) if k else []


def _window(slices: list[Any]) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) bounding the given (y, x) slices (absent ones, None, skipped; an empty
    window when none is present)."""
    sl = [s for s in slices if s is not None]
    if not sl:
        return 0, 0, 0, 0
    return (min(s[0].start for s in sl), min(s[1].start for s in sl),
            max(s[0].stop for s in sl), max(s[1].stop for s in sl))


def _contact(ann: np.ndarray, ids: list[int]) -> int:
    """Pixel edges (4-neighbours) between two different ids of ``ids`` in ``ann``."""
    sel = np.isin(ann, ids)
    h = sel[:, 1:] & sel[:, :-1] & (ann[:, 1:] != ann[:, :-1])
    v = sel[1:, :] & sel[:-1, :] & (ann[1:, :] != ann[:-1, :])
    return int(h.sum() + v.sum())


# -- geometry of the proposals --------------------------------------------------------------------
def _polygon(mask: np.ndarray) -> list[list[float]] | None:
    """Outer ring (pixel edges, not closed) of the largest component of a full-image mask."""
    from ..core.geometry import mask_to_polygon

    ys, xs = np.nonzero(mask)
    if not len(ys):
        return None
    y0, x0, y1, x1 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
    ring = mask_to_polygon(mask[y0:y1, x0:x1], offset=(int(y0), int(x0)))
    if len(ring) < 4:
        return None
    return [[float(x), float(y)] for x, y in ring[:-1]]


def proposed_polygons(flag: ImageFlag, ann: np.ndarray, pred: np.ndarray, *,
                      slices: tuple[list[Any], list[Any]] | None = None) -> list[list[list[float]]]:
    """The proposal's polygons (image pixel edges): ``add``/``replace`` the predicted outline
    (never over another annotated nucleus), ``split`` the predicted parts inside the annotation,
    ``merge`` the union of the annotated parts and the prediction's unannotated pixels between them.

    ``slices``: (:func:`object_slices` of ``ann``, of ``pred``) when the caller has them; the masks
    are then built on the window of the objects involved only (the same polygons, less work)."""
    action = PROPOSED_ACTION[flag.issue]
    if action == "delete":
        return []
    if flag.region is not None:  # a moved annotation or a probability blob, on unannotated pixels
        y0, x0, rm = flag.region
        H, W = ann.shape
        cy0, cx0 = max(0, y0), max(0, x0)
        cy1, cx1 = min(H, y0 + rm.shape[0]), min(W, x0 + rm.shape[1])
        if cy1 <= cy0 or cx1 <= cx0:
            return []
        part = rm[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
        aw = ann[cy0:cy1, cx0:cx1]
        allowed = (aw == 0) | (aw == flag.ann_ids[0]) if flag.ann_ids else (aw == 0)
        poly = _polygon(part & allowed)
        return [] if poly is None else [[[x + cx0, y + cy0] for x, y in poly]]
    if slices is not None:
        parts = [slices[1][p - 1] for p in flag.pred_ids if 0 < p <= len(slices[1])]
        if action == "merge":
            parts += [slices[0][a - 1] for a in flag.ann_ids if 0 < a <= len(slices[0])]
        y0, x0, y1, x1 = _window(parts)
        crop = ImageFlag(flag.issue, flag.score, flag.ann_ids, flag.pred_ids)
        local = proposed_polygons(crop, ann[y0:y1, x0:x1], pred[y0:y1, x0:x1])
        return [[[x + x0, y + y0] for x, y in poly] for poly in local]
    masks: list[np.ndarray] = []
    if action == "add":
        masks = [(pred == flag.pred_ids[0]) & (ann == 0)]
    elif action == "replace":
        masks = [(pred == flag.pred_ids[0]) & ((ann == 0) | (ann == flag.ann_ids[0]))]
    elif action == "split":
        a = flag.ann_ids[0]
        masks = [(pred == p) & ((ann == 0) | (ann == a)) for p in flag.pred_ids]
    elif action == "merge":
        masks = [np.isin(ann, flag.ann_ids) | ((pred == flag.pred_ids[0]) & (ann == 0))]
    polys = [_polygon(m) for m in masks]
    return [p for p in polys if p is not None]


# -- cleanlab evidence ----------------------------------------------------------------------------
def _boxes(labels: np.ndarray, k: int, slices: list[Any] | None = None) -> np.ndarray:
    """(k, 4) x1, y1, x2, y2 boxes of ids 1..k (zeros for an absent id)."""
    out = np.zeros((k, 4), np.float64)
    if k == 0:
        return out
    for i, sl in enumerate(object_slices(labels, k) if slices is None else slices):
        if sl is not None:
            out[i] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
    return out


def _aux_inputs(ann: np.ndarray, pred: np.ndarray, prob: np.ndarray, alpha: float, euc: float, *,
                tables: tuple[np.ndarray, np.ndarray] | None = None,
                slices: tuple[list[Any], list[Any]] | None = None) -> dict[str, Any]:
    """cleanlab's per-image auxiliary inputs, with the *mask* IoU of annotated and predicted
    nuclei as ``iou_matrix`` and cleanlab's own similarity formula (alpha × IoU + (1 − alpha) ×
    exp(−euc × centre distance)) on it, instead of cleanlab's box overlaps (pure-Python loops).

    ``tables``: the (n, m) IoU and (m,) confidence of :func:`match_image_tables` when the caller
    has them; ``slices``: the :func:`object_slices` of ``ann`` and ``pred``."""
    n, m = int(ann.max(initial=0)), int(pred.max(initial=0))
    if tables is None:
        fa, fp = ann.ravel().astype(np.int64), pred.ravel().astype(np.int64)
        ov = np.bincount(fa * (m + 1) + fp, minlength=(n + 1) * (m + 1)).reshape(n + 1, m + 1)[1:, 1:].astype(np.float64)
        A = np.bincount(fa, minlength=n + 1)[1:]
        P = np.bincount(fp, minlength=m + 1)[1:]
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.nan_to_num(ov / (A[:, None] + P[None, :] - ov))
            conf = np.nan_to_num(np.bincount(fp, weights=prob.ravel(), minlength=m + 1)[1:] / P)
    else:
        iou, conf = tables
    lb = _boxes(ann, n, None if slices is None else slices[0])
    pb = _boxes(pred, m, None if slices is None else slices[1])
    lc = np.stack([(lb[:, 0] + lb[:, 2]) / 2, (lb[:, 1] + lb[:, 3]) / 2], axis=1)
    pc = np.stack([(pb[:, 0] + pb[:, 2]) / 2, (pb[:, 1] + pb[:, 3]) / 2], axis=1)
    dist = np.exp(-np.linalg.norm(lc[:, None, :] - pc[None, :, :], axis=2) * euc) if n and m else np.zeros((n, m))
    sim = iou * alpha + (1 - alpha) * dist
    return {"pred_labels": np.zeros(m, np.int64), "pred_label_probs": conf, "pred_bboxes": pb,
            "lab_labels": np.zeros(n, np.int64), "lab_bboxes": lb, "similarity_matrix": sim, "iou_matrix": iou}


def badloc_box_scores(aux: dict[str, Any], low_probability_threshold: float) -> np.ndarray:
    """cleanlab's badly-located score of every annotated box of one image
    (``cleanlab.object_detection.rank.compute_badloc_box_scores`` for one class, which loops over
    the boxes in Python), computed on whole arrays: the best similarity among the predictions
    more probable than ``low_probability_threshold`` that overlap the box (IoU > 0); 1.0 when there
    is none, or when no prediction of the image is that probable. The same numbers (the test
    compares them with cleanlab's function)."""
    sim, iou = aux["similarity_matrix"], aux["iou_matrix"]
    probs = np.asarray(aux["pred_label_probs"], np.float64)
    n = sim.shape[0]
    if not len(probs) or np.max(probs) <= low_probability_threshold:
        return np.ones(n)
    ok = (probs > low_probability_threshold)[None, :] & (iou > 0)
    best = np.where(ok, sim, -np.inf).max(axis=1)
    return np.where(ok.any(axis=1), best, 1.0)


def pool_box_scores(box_scores: list[np.ndarray], temperature: float) -> np.ndarray:
    """cleanlab's ``pool_box_scores_per_image`` (a softmin of each image's non-NaN box scores at
    ``temperature``; 1.0 for an image with none) for all images at once (segment sums instead of
    one call per image)."""
    from cleanlab.internal.constants import EPSILON

    out = np.ones(len(box_scores))
    if not box_scores:
        return out
    lens = np.array([len(b) for b in box_scores], np.int64)
    seg = np.repeat(np.arange(len(box_scores)), lens)
    vals = np.concatenate([np.asarray(b, np.float64).ravel() for b in box_scores]) if lens.sum() else np.zeros(0)
    keep = ~np.isnan(vals)
    vals, seg = vals[keep], seg[keep]
    if not vals.size:
        return out
    img, start = np.unique(seg, return_index=True)
    x = -vals / max(temperature, EPSILON)
    x = x - np.repeat(np.maximum.reduceat(x, start), np.diff(np.append(start, len(x))))
    e = np.exp(x)
    den = np.add.reduceat(e, start)
    out[img] = np.add.reduceat(e * vals, start) / den
    return out


def cleanlab_evidence(items: list[tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                      tables: list[tuple[np.ndarray, np.ndarray]] | None = None,
                      slices: list[tuple[list[Any], list[Any]]] | None = None) -> list[dict[str, Any]]:
    """cleanlab's scores per image of ``(annotation, prediction, probability)`` items: the
    object-detection ``badloc`` score (n,) of every annotated nucleus (lower = more likely badly
    located; its bounding box against the predicted ones, with mask IoUs, :func:`_aux_inputs`),
    pooled into ``image_quality`` (cleanlab's softmin), and the segmentation label quality
    ``pixel_quality`` of the image's foreground/background labelling.

    The badloc scores and their pooling are cleanlab's formulas with cleanlab's constants, computed
    on whole arrays (:func:`badloc_box_scores`, :func:`pool_box_scores`: cleanlab's own functions
    loop over boxes and images in Python and were a third of a 200,000-nucleus round); the pixel
    quality is cleanlab's ``segmentation.rank.get_label_quality_scores``, one call per image size.
    ``tables`` / ``slices``: per item, what :func:`match_image_tables` / :func:`object_slices`
    already computed (optional).

    cleanlab's ``overlooked`` scorer is not used: it recomputes box overlaps pair by pair in Python
    whatever the inputs (about 10 ms per PanNuke tile, which would dominate a 200,000-nucleus
    round); ``missing_annotation`` is its mask-based counterpart.
    """
    import warnings

    from cleanlab.internal.constants import ALPHA, EUC_FACTOR, LOW_PROBABILITY_THRESHOLD, TEMPERATURE
    from cleanlab.segmentation.rank import get_label_quality_scores as seg_quality

    aux = [_aux_inputs(a, p, q, ALPHA, EUC_FACTOR, tables=None if tables is None else tables[i],
                       slices=None if slices is None else slices[i]) for i, (a, p, q) in enumerate(items)]
    badloc = [badloc_box_scores(x, LOW_PROBABILITY_THRESHOLD) for x in aux]
    quality = pool_box_scores(badloc, TEMPERATURE)
    pixel = np.zeros(len(items))
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, (ann, _pred, _prob) in enumerate(items):
        by_shape.setdefault(ann.shape, []).append(i)
    for idx in by_shape.values():  # one call per image size (cleanlab's per-call overhead dominates a tile)
        lab = np.stack([(items[i][0] > 0) for i in idx]).astype(np.int64)
        prob = np.stack([items[i][2] for i in idx]).astype(np.float32)
        pp = np.stack([1.0 - prob, prob], axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q, _ = seg_quality(lab, pp, verbose=False)
        pixel[idx] = q
    return [{"image_quality": float(quality[i]), "pixel_quality": float(pixel[i]),
             "badloc": np.asarray(badloc[i], np.float64)} for i in range(len(items))]


# -- the whole store ------------------------------------------------------------------------------
@dataclass
class _Pending:
    """An image with flags, waiting for its batch's cleanlab evidence and proposals."""

    image_id: str
    ann: np.ndarray
    pred: np.ndarray
    prob: np.ndarray
    flags: list[ImageFlag]
    nid_of: dict[int, int]
    tables: tuple[np.ndarray, np.ndarray]
    slices: tuple[list[Any], list[Any]]


def _nuclei_by_image(nuclei: pd.DataFrame) -> dict[str, tuple[list[int], dict[int, int]]]:
    """Per image: its ignore regions' instance ids and instance id -> nucleus id of its nuclei
    (one sort of the whole table rather than a pandas selection per image)."""
    if nuclei.empty:
        return {}
    img = nuclei["image_id"].astype(str).to_numpy(dtype=object)
    order = np.argsort(img, kind="stable")
    img = img[order]
    kind = nuclei["kind"].astype(str).to_numpy(dtype=object)[order]
    inst = nuclei["instance_id"].to_numpy(np.int64)[order]
    nid = nuclei["nucleus_id"].to_numpy(np.int64)[order]
    cut = np.flatnonzero(img[1:] != img[:-1]) + 1
    out: dict[str, tuple[list[int], dict[int, int]]] = {}
    for a, b in zip(np.r_[0, cut], np.r_[cut, len(img)]):
        k, i, d = kind[a:b], inst[a:b], nid[a:b]
        nuc = k == "nucleus"
        out[str(img[a])] = (i[k == "ignore"].tolist(), dict(zip(i[nuc].tolist(), d[nuc].tolist())))
    return out


def image_hash8(image_id: str) -> str:
    return hashlib.sha256(image_id.encode("utf-8")).hexdigest()[:8]


def flag_id(round: int, h8: str, k: int) -> str:
    """The id of flag ``k`` (its place in :func:`match_image_tables`' list) of the image whose
    :func:`image_hash8` is ``h8``, in round ``round``."""
    return f"i{round}-{h8}-{k}"


def find_instance_issues(store: "Store", predictions: "PredictionCache", *, config: InstanceConfig | None = None,
                         round: int = 1, progress: bool | None = None, geometry: Any = None) -> pd.DataFrame:
    """Flags of every store image, one row each: flag_id, image_id, issue, score, nucleus_ids
    (list of int), instance_ids, pred_ids, proposed_action, polygons (list of [[x, y], ...]),
    evidence (dict), centroid_x, centroid_y (of the first proposed polygon or the annotation).

    ``geometry``: the store's geometry fold (``cellcurate.curation.geometry.store_geometry(store)``,
    passed in: ``relabel`` may not import ``curation``); the images it changed are matched as the
    review left them (``geometry.paint``). None: the ingested maps."""
    from tqdm import tqdm

    cfg = (config or InstanceConfig()).validate()
    images = store.images()
    nuclei = store.nuclei()
    mpp = dict(zip(images["image_id"].astype(str), images["mpp"].astype(float)))
    per_image = _nuclei_by_image(nuclei)
    rows: list[dict[str, Any]] = []
    known = set(mpp)
    ids = [i for i in predictions.image_ids() if i in known]
    pending: list[_Pending] = []
    ranking = _AppearanceRanking(store, cfg, round)

    def finish() -> None:
        slices = [x.slices for x in pending]
        ev = (cleanlab_evidence([(x.ann, x.pred, x.prob) for x in pending], tables=[x.tables for x in pending],
                                slices=slices) if cfg.cleanlab and pending else None)
        for j, x in enumerate(pending):
            h8 = image_hash8(x.image_id)
            for k, f in enumerate(x.flags):
                evidence = dict(f.evidence)
                if ev is not None:
                    e = ev[j]
                    evidence["cleanlab_image_quality"] = _r(e["image_quality"])
                    evidence["cleanlab_pixel_quality"] = _r(e["pixel_quality"])
                    if f.ann_ids:
                        v = e["badloc"][f.ann_ids[0] - 1]
                        evidence["cleanlab_badloc"] = None if np.isnan(v) else _r(v)
                polys = proposed_polygons(f, x.ann, x.pred, slices=slices[j])
                if polys:
                    c = np.asarray(polys[0], np.float64).mean(axis=0)
                else:
                    sl = slices[j][0][f.ann_ids[0] - 1]
                    ys, xs = np.nonzero(x.ann[sl] == f.ann_ids[0])
                    c = np.array([xs.mean() + sl[1].start + 0.5, ys.mean() + sl[0].start + 0.5])
                rows.append({
                    "flag_id": flag_id(round, h8, k), "image_id": x.image_id, "issue": f.issue, "score": f.score,
                    "nucleus_ids": [x.nid_of[a] for a in f.ann_ids if a in x.nid_of], "instance_ids": list(f.ann_ids),
                    "pred_ids": list(f.pred_ids), "proposed_action": PROPOSED_ACTION[f.issue], "polygons": polys,
                    "evidence": evidence, "centroid_x": float(c[0]), "centroid_y": float(c[1]),
                })
        pending.clear()

    # the annotation as it stands after geometry review (the geometry fold), not as ingested: a
    # nucleus added in review is annotated, a deleted one is gone, a replaced outline is the new one
    reviewed = set(geometry.images) if geometry is not None and not geometry.empty else set()
    nuc_of_image = {k: g for k, g in nuclei[nuclei["image_id"].isin(reviewed)].groupby("image_id")} if reviewed else {}
    for image_id, ann in tqdm(store.iter_instances(ids), total=len(ids), desc="instance matching", unit="image",
                              leave=False, disable=None if progress is None else not progress):
        pred, prob = predictions.maps(image_id)
        ignore_ids, nid_of = per_image.get(image_id, ([], {}))
        if image_id in reviewed:
            ann, now = geometry.paint(image_id, ann, nuc_of_image.get(image_id, nuclei.iloc[:0]))
            ignore_ids, nid_of = _nuclei_by_image(now.assign(image_id=image_id)).get(image_id, ([], {}))
        sl = (object_slices(ann, int(ann.max(initial=0))), object_slices(pred, int(pred.max(initial=0))))
        blobs: list[tuple[int, int, np.ndarray, ImageFlag | None]] | None = (
            [] if cfg.appearance and cfg.blob_missing else None)
        flags, iou, conf = match_image_tables(ann, pred, prob, config=cfg, mpp=mpp[image_id], ignore_ids=ignore_ids,
                                              slices=sl, blobs=blobs)
        if blobs:
            ranking.add(image_id, ann, prob, flags, blobs, nid_of, mpp[image_id])
        if flags:
            pending.append(_Pending(image_id, ann, pred, prob, flags, nid_of, (iou, conf), sl))
            if len(pending) >= 64:
                finish()
    finish()
    ranking.apply(rows)
    cols = ["flag_id", "image_id", "issue", "score", "nucleus_ids", "instance_ids", "pred_ids", "proposed_action",
            "polygons", "evidence", "centroid_x", "centroid_y"]
    return pd.DataFrame(rows, columns=cols)


class _AppearanceRanking:
    """The appearance ranking of the blob flags (:mod:`cellcurate.relabel.appearance`), gathered
    image by image during :func:`find_instance_issues` and applied to its rows at the end. Only the
    images with a blob flag are read (RGB) and give examples."""

    def __init__(self, store: "Store", cfg: InstanceConfig, round: int) -> None:
        self.store, self.cfg, self.round = store, cfg, round
        self.pos: list[list[float]] = []
        self.pos_groups: list[str] = []
        self.blobs: list[list[float]] = []
        self.blob_groups: list[str] = []
        self.blob_flag_ids: list[str] = []

    def add(self, image_id: str, ann: np.ndarray, prob: np.ndarray, flags: list[ImageFlag],
            blobs: list[tuple[int, int, np.ndarray, ImageFlag | None]], nid_of: dict[int, int], mpp: float) -> None:
        from . import appearance as ap

        index = {id(f): k for k, f in enumerate(flags)}
        flagged = [(y0, x0, m, f) for y0, x0, m, f in blobs if f is not None and id(f) in index]
        if not flagged or not nid_of:
            return  # an image without a blob flag gives no examples (and is not read)
        A = np.bincount(np.asarray(ann, np.int64).ravel())
        areas = A[[a for a in nid_of if a < len(A)]]
        areas = areas[areas > 0]
        if not len(areas):
            return
        med = float(np.median(areas))
        ctx = ap.ImageContext.build(self.store.read_image(image_id), np.asarray(ann), prob, med)
        h8 = image_hash8(image_id)
        # every blob of the rule (its flags and, a few per image, the blobs below its score) is an
        # unlabelled example; only the flags get a score
        below = [(y0, x0, m, f) for y0, x0, m, f in blobs if f is None][:ap.MAX_UNFLAGGED_PER_IMAGE]
        for y0, x0, m, f in flagged + below:
            ys, xs = np.nonzero(m)
            self.blobs.append(ap.features(ctx, y0, x0, m))
            self.blob_groups.append(ap.block_group(image_id, ys.mean() + y0, xs.mean() + x0, mpp))
            self.blob_flag_ids.append(flag_id(self.round, h8, index[id(f)]) if f is not None else "")
        room = min(ap.MAX_POSITIVES_PER_IMAGE, ap.MAX_POSITIVES - len(self.pos))
        if room <= 0:
            return
        ids = np.array(sorted(nid_of), np.int64)
        if len(ids) > room:  # a sample, the same on every run (seeded by the image id)
            rng = np.random.default_rng(int(h8, 16))
            ids = np.sort(rng.choice(ids, size=room, replace=False))
        for feats, cy, cx in ap.deletion_examples(ctx, prob >= self.cfg.blob_threshold, blob_disk(med, self.cfg), ids):
            self.pos.append(feats)
            self.pos_groups.append(ap.block_group(image_id, cy, cx, mpp))

    def apply(self, rows: list[dict[str, Any]]) -> None:
        """Rescore the blob flags among ``rows`` in place (score 0.5 + 0.5 × sqrt(p × blob score);
        evidence ``appearance_p``); nothing when there are too few examples to fold."""
        from . import appearance as ap

        if not self.blobs:
            return
        p = ap.out_of_fold_probability(np.asarray(self.pos, np.float64).reshape(-1, len(ap.FEATURES)),
                                       np.asarray(self.pos_groups, dtype=object),
                                       np.asarray(self.blobs, np.float64), np.asarray(self.blob_groups, dtype=object))
        if p is None:
            return
        by_id = {r["flag_id"]: r for r in rows}
        for fid, v in zip(self.blob_flag_ids, p):
            r = by_id.get(fid) if fid else None
            if r is None or np.isnan(v):
                continue
            r["evidence"]["appearance_p"] = _r(v)
            s = float(r["evidence"]["blob_score"])  # every blob flag carries it (_blob_flags)
            r["score"] = float(min(1.0, max(0.0, 0.5 + 0.5 * np.sqrt(max(0.0, float(v) * s)))))


# -- scoring against planted truth ----------------------------------------------------------------
#: Columns of a planted-truth table in store terms (:func:`planted_for_store` builds it from the
#: synthetic sample's ``instance_truth.parquet``; the real-fixture benchmark builds its own).
PLANTED_COLUMNS = ("image_id", "issue", "nucleus_id", "nucleus_id2", "centroid_x", "centroid_y", "radius")


def planted_for_store(store: "Store", instance_truth: pd.DataFrame) -> pd.DataFrame:
    """The synthetic sample's planted instance errors (:data:`~cellcurate.datasets.synthetic.INSTANCE_TRUTH_COLUMNS`)
    joined to the store's image and nucleus ids (:data:`PLANTED_COLUMNS`)."""
    nuc = store.nuclei()
    key = lambda f, i, c, r: (str(f), int(i), int(c), int(r))  # noqa: E731
    nid = {key(*t[:4]): int(t[4]) for t in zip(nuc["origin_file"], nuc["origin_index"], nuc["origin_channel"],
                                               nuc["origin_instance"], nuc["nucleus_id"])}
    img_of = {(str(f), int(i)): str(im) for f, i, im in zip(nuc["origin_file"], nuc["origin_index"], nuc["image_id"])}
    imgs = store.images()
    img_of.update({(str(f), int(i)): str(im) for f, i, im in zip(imgs["annotation_file"], imgs["origin_index"],
                                                                imgs["image_id"])})
    rows = []
    for t in instance_truth.itertuples(index=False):
        image_id = img_of.get((str(t.origin_file), int(t.origin_index)))
        if image_id is None:
            continue
        rows.append({
            "image_id": image_id, "issue": t.issue,
            "nucleus_id": nid.get(key(t.origin_file, t.origin_index, t.origin_channel, t.origin_instance), -1),
            "nucleus_id2": nid.get(key(t.origin_file, t.origin_index, t.origin_channel, t.origin_instance2), -1),
            "centroid_x": float(t.centroid_x) + 0.5, "centroid_y": float(t.centroid_y) + 0.5,
            "radius": float(np.sqrt(max(int(t.area), 1) / np.pi)),
        })
    return pd.DataFrame(rows, columns=list(PLANTED_COLUMNS))


def _match_issue(f: pd.DataFrame, t: pd.DataFrame, issue: str) -> tuple[np.ndarray, np.ndarray]:
    """(planted errors hit, flags hitting one) for the flags ``f`` and planted errors ``t`` of one type."""
    t = t.reset_index(drop=True)
    hit_truth = np.zeros(len(t), bool)
    hit_flag = np.zeros(len(f), bool)
    by_img: dict[str, list[int]] = {}
    for j, im in enumerate(t["image_id"].astype(str)):
        by_img.setdefault(im, []).append(j)
    for i, r in enumerate(f.itertuples(index=False)):
        for j in by_img.get(str(r.image_id), []):
            tr = t.iloc[j]
            if issue == "missing_annotation":
                ok = float(np.hypot(r.centroid_x - tr.centroid_x, r.centroid_y - tr.centroid_y)) <= max(tr.radius, 3.0)
            else:
                ids = set(int(v) for v in r.nucleus_ids)
                ok = int(tr.nucleus_id) in ids or (issue == "split" and int(tr.nucleus_id2) in ids)
            if ok:
                hit_truth[j] = True
                hit_flag[i] = True
    return hit_truth, hit_flag


def flag_hits(flags: pd.DataFrame, planted: pd.DataFrame) -> np.ndarray:
    """For each row of ``flags`` (in order), whether it hits a planted error of its own type (the rule
    of :func:`score_flags`); what a simulated annotator who knows the truth would accept."""
    out = np.zeros(len(flags), bool)
    pos = np.arange(len(flags))
    for issue in ISSUES:
        sel = (flags["issue"] == issue).to_numpy()
        if sel.any():
            out[pos[sel]] = _match_issue(flags[sel], planted[planted["issue"] == issue], issue)[1]
    return out


def score_flags(flags: pd.DataFrame, planted: pd.DataFrame, *, image_ids: Any = None) -> dict[str, dict[str, Any]]:
    """Recall and precision per issue type of ``flags`` against ``planted`` (:data:`PLANTED_COLUMNS`).

    A flag hits a planted error of its own type on the same image: by nucleus id (spurious,
    bad_outline, merged: the annotated nucleus; split: either piece), and for missing nuclei by the
    flag's centroid lying within the planted nucleus' radius of its centroid. Only flags on
    ``image_ids`` (default: every image) count; recall = planted errors hit / planted, precision =
    flags hitting one / flags.
    """
    if image_ids is not None:
        keep = set(map(str, image_ids))
        flags = flags[flags["image_id"].astype(str).isin(keep)]
        planted = planted[planted["image_id"].astype(str).isin(keep)]
    out: dict[str, dict[str, Any]] = {}
    for issue in ISSUES:
        f = flags[flags["issue"] == issue]
        t = planted[planted["issue"] == issue]
        hit_truth, hit_flag = _match_issue(f, t, issue)
        n_t, n_f = len(t), len(f)
        out[issue] = {"planted": n_t, "flags": n_f, "hit": int(hit_truth.sum()),
                      "recall": float(hit_truth.mean()) if n_t else float("nan"),
                      "precision": float(hit_flag.mean()) if n_f else float("nan")}
    return out


def format_scores(scores: dict[str, dict[str, Any]], *, title: str = "", targets: tuple[float, float] = (0.8, 0.5)) -> str:
    """A table: issue, planted, flags, recall, precision, and whether the targets are met."""
    lines = [title] if title else []
    lines.append(f"  {'issue':<21}{'planted':>8}{'flags':>7}{'recall':>8}{'precision':>11}  target (recall >= "
                 f"{targets[0]}, precision >= {targets[1]})")
    for issue, s in scores.items():
        rec, pre = s["recall"], s["precision"]
        ok = (rec >= targets[0]) and (pre >= targets[1]) if s["planted"] else None
        mark = "n/a (none planted)" if ok is None else ("ok" if ok else "MISSED")
        lines.append(f"  {issue:<21}{s['planted']:>8}{s['flags']:>7}{rec:>8.3f}{pre:>11.3f}  {mark}")
    return "\n".join(lines)


# -- the round ------------------------------------------------------------------------------------
@dataclass
class InstanceRoundResult:
    round: int
    folder: Path
    run: str
    flags: pd.DataFrame
    counts: dict[str, int]
    seconds: float
    cached: bool
    predictor: str
    event_seqs: list[int] = field(default_factory=list)
    truth: dict[str, dict[str, Any]] | None = None

    def summary(self) -> str:
        by = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        lines = [f"instance round {self.round} finished in {self.seconds:.1f} s (run {self.run}); {self.folder}",
                 f"  predictions: {self.predictor} ({'cached' if self.cached else 'computed and cached'})",
                 f"  flags: {len(self.flags)}" + (f" ({by})" if by else "")]
        if self.truth:
            lines.append(format_scores(self.truth, title="  against the planted truth:"))
        return "\n".join(lines)


def instance_round_dir(store: "Store", round: int) -> Path:
    return store.path / "rounds" / f"instances-{round}"


def existing_runs(store: "Store", round: int) -> list[str]:
    """Run tokens of the ``instance_flag`` events of round ``round`` (oldest first)."""
    return [str(r) for r in store.ledger.payload_values("instance_flag", "run", round=round) if r]


def _wkb(polys: list[list[list[float]]]) -> list[bytes]:
    import shapely

    return [shapely.to_wkb(shapely.Polygon(p)) for p in polys]


def run_instance_round(store: "Store", round: int, *, predictions: "PredictionCache", cached: bool = False,
                       config: InstanceConfig | None = None, overwrite: bool = False,
                       planted: pd.DataFrame | None = None, truth_images: Any = None,
                       progress: bool | None = None, extra_config: dict[str, Any] | None = None,
                       geometry: Any = None) -> InstanceRoundResult:
    """Find the instance issues of every image and record them as round ``round``.

    Writes ``STORE/rounds/instances-<K>/`` (config.json, flags.parquet, summary.json) in place first,
    then the ``instance_flag`` events in one ledger transaction. A round that exists (folder or
    events) needs ``overwrite``; its events stay in the history and the new run's token tells them
    apart. Any error before the commit leaves the ledger unchanged and the previous folder back.
    ``geometry``: the store's geometry fold, to match the annotation as geometry review left it
    (:func:`find_instance_issues`; ``curate instances`` passes it).
    """
    t0 = time.perf_counter()
    cfg = (config or InstanceConfig()).validate()
    if isinstance(round, bool) or not isinstance(round, (int, np.integer)) or round < 1:
        raise ConfigError(f"--round must be an integer >= 1, got {round!r}")
    round = int(round)
    if store.readonly:
        raise StoreError("the store is open read-only", path=store.path)
    final = instance_round_dir(store, round)
    with store.write_lock("instances"):
        prior = existing_runs(store, round)
        if (prior or final.exists()) and not overwrite:
            raise StateError(f"{store.path}: instance round {round} already exists"
                             f"{f' (run {prior[-1]})' if prior else ''}; pass --overwrite to run it again "
                             "(its events stay in the history)")
        flags = find_instance_issues(store, predictions, config=cfg, round=round, progress=progress, geometry=geometry)
        run = f"{round}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"
        flags["run"] = run
        flags = flags.sort_values(["score", "flag_id"], ascending=[False, True], kind="stable").reset_index(drop=True)
        counts = {k: int((flags["issue"] == k).sum()) for k in ISSUES}
        truth = score_flags(flags, planted, image_ids=truth_images) if planted is not None else None
        config_doc = {"round": round, "run": run, **asdict(cfg), "predictor": predictions.predictor_id,
                      "geometry_changes": None if geometry is None else geometry.counts(),
                      "predictor_config": predictions.meta.get("config"), "supersedes": prior[-1] if prior else None,
                      **(extra_config or {})}
        events = []
        for f in flags.itertuples(index=False):
            ids = [int(v) for v in f.nucleus_ids]
            events.append({
                "kind": "instance_flag", "round": round, "actor": ACTOR, "action": f.issue,
                "nucleus_id": ids[0] if ids else None, "score": float(round_f(f.score)), "label": 0, "ref": None,
                "payload": {"flag_id": f.flag_id, "image_id": f.image_id, "nucleus_ids": ids,
                            "proposed": {"action": f.proposed_action, "polygons": f.polygons},
                            "evidence": f.evidence, "run": run},
            })
        rounds_dir = store.path / "rounds"
        rounds_dir.mkdir(exist_ok=True)
        tmp = rounds_dir / f".tmp-instances-{round}-{secrets.token_hex(4)}"
        tmp.mkdir()
        aside: Path | None = None
        placed = False
        try:
            table = pd.DataFrame({
                "flag_id": flags["flag_id"].astype(str), "image_id": flags["image_id"].astype(str),
                "issue": flags["issue"].astype(str), "score": flags["score"].astype(np.float64),
                "nucleus_ids": [[int(v) for v in x] for x in flags["nucleus_ids"]],
                "proposed_action": flags["proposed_action"].astype(str),
                "proposed_wkb": [_wkb(p) for p in flags["polygons"]],
                "evidence": [json.dumps(e, sort_keys=True, default=_json) for e in flags["evidence"]],
                "run": flags["run"].astype(str),
            }, columns=list(FLAG_COLUMNS))
            _write_flags(table, tmp / "flags.parquet")
            atomic_write_json(tmp / "config.json", config_doc)
            summary = {"counts": counts, "n_flags": int(len(flags)), "run": run, "truth": truth,
                       "seconds": round_f(time.perf_counter() - t0), "predictions_cached": cached}
            atomic_write_json(tmp / "summary.json", summary, default=_json)
            if final.exists():
                aside = rounds_dir / f".instances-{round}-superseded-{secrets.token_hex(3)}"
                os.replace(final, aside)
            replace_dir(tmp, final)
            placed = True
            _before_commit(final)
            seqs = store.ledger.append(events)  # commit point
        except BaseException:
            if placed:
                remove_tree(final)
            if aside is not None:
                os.replace(aside, final)
                fsync_dir(rounds_dir)
            remove_tree(tmp)
            raise
        if aside is not None:
            remove_tree(aside)
    return InstanceRoundResult(round, final, run, flags, counts, time.perf_counter() - t0, cached,
                               predictions.predictor_id, seqs, truth)


def _write_flags(table: pd.DataFrame, path: Path) -> None:
    """flags.parquet with an explicit schema (``nucleus_ids`` list<int64>, ``proposed_wkb`` list<binary>)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("flag_id", pa.string()), ("image_id", pa.string()), ("issue", pa.string()),
                        ("score", pa.float64()), ("nucleus_ids", pa.list_(pa.int64())),
                        ("proposed_action", pa.string()), ("proposed_wkb", pa.list_(pa.binary())),
                        ("evidence", pa.string()), ("run", pa.string())])
    # from Python lists, not pandas: a round without flags has empty columns whose pandas dtype
    # (float64) pyarrow cannot convert to list<int64>
    pq.write_table(pa.Table.from_pydict({c: table[c].tolist() for c in schema.names}, schema=schema), path)


def _before_commit(folder: Path) -> None:
    """Hook between putting the round folder in place and the ledger commit (tests crash here)."""


def round_f(v: float) -> float:
    return float(round(float(v), 6))


def _json(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)

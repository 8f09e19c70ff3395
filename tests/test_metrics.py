"""Metrics against exact hand-computed cases, then invariants."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cellcurate.errors import ConfigError
from cellcurate.models.metrics import (
    PQCounts,
    SplitMetrics,
    aji,
    centroids,
    classification_f1,
    dice,
    drop_ignored,
    match_centroids,
    match_iou,
    pairwise_iou,
    pq_counts,
    r2_counts,
)

# One row of 12 pixels:
#   true  1 1 1 1 . 2 2 2 2 . . .
#   pred  1 1 1 . . 2 2 2 2 2 3 3
# IoU(t1, p1) = 3/4, IoU(t2, p2) = 4/5, p3 overlaps nothing.
TRUE = np.array([[1, 1, 1, 1, 0, 2, 2, 2, 2, 0, 0, 0]])
PRED = np.array([[1, 1, 1, 0, 0, 2, 2, 2, 2, 2, 3, 3]])


def test_pairwise_iou_exact():
    iou, tids, pids = pairwise_iou(TRUE, PRED)
    assert tids.tolist() == [1, 2] and pids.tolist() == [1, 2, 3]
    np.testing.assert_allclose(iou, [[0.75, 0, 0], [0, 0.8, 0]])


def test_pq_exact():
    c = pq_counts(TRUE, PRED)
    assert (c.tp, c.fp, c.fn) == (2, 1, 0)
    assert c.iou_sum == pytest.approx(1.55)
    assert c.dq == pytest.approx(2 / 2.5)  # 0.8
    assert c.sq == pytest.approx(0.775)
    assert c.pq == pytest.approx(0.62)


def test_pq_half_overlap_is_not_a_match():
    true = np.array([[1, 1, 1, 1]])
    pred = np.array([[1, 1, 0, 0]])  # IoU exactly 0.5: not > 0.5
    c = pq_counts(true, pred)
    assert (c.tp, c.fp, c.fn) == (0, 1, 1)
    assert c.pq == 0.0


def test_pq_ids_need_not_be_contiguous():
    c = pq_counts(TRUE * 7, np.where(PRED > 0, PRED + 40, 0))
    assert (c.tp, c.fp, c.fn) == (2, 1, 0)


def test_pq_empty_is_nan_and_counts_add():
    c = pq_counts(np.zeros((3, 3), int), np.zeros((3, 3), int))
    assert math.isnan(c.pq) and math.isnan(c.dq)
    total = PQCounts(1, 0, 1, 0.9) + PQCounts(1, 2, 0, 0.7)
    assert (total.tp, total.fp, total.fn) == (2, 2, 1)
    assert total.pq == pytest.approx(2 / 3.5 * 0.8)


def test_match_iou_rejects_ambiguous_threshold():
    with pytest.raises(ConfigError, match="unique"):
        match_iou(np.zeros((1, 1)), threshold=0.3)


def test_aji_exact():
    # C = 3 + 4, U = 4 + 5 + 2 (unused p3)
    assert aji(TRUE, PRED) == pytest.approx(7 / 11)


def test_aji_reuses_a_prediction_for_several_truths():
    true = np.array([[1, 1, 2, 2]])
    pred = np.array([[1, 1, 1, 1]])
    # t1 -> p1: C 2, U 4; t2 -> p1: C 2, U 4 (Kumar: a prediction may be taken twice)
    assert aji(true, pred) == pytest.approx(0.5)


def test_aji_unmatched_truth_and_empty_cases():
    true = np.array([[1, 1, 0, 2, 2]])
    pred = np.array([[1, 1, 1, 0, 0]])
    # t1 -> p1: C 2, U 3; t2 has no overlap: U += 2
    assert aji(true, pred) == pytest.approx(2 / 5)
    assert math.isnan(aji(np.zeros((2, 2), int), np.zeros((2, 2), int)))
    assert aji(np.zeros((1, 2), int), np.array([[0, 1]])) == 0.0


def test_dice_exact_and_valid_mask():
    assert dice(TRUE > 0, PRED > 0) == pytest.approx(2 * 7 / (8 + 10))
    valid = np.ones_like(TRUE, bool)
    valid[0, 9:] = False  # hide p2's extra pixel and p3
    assert dice(TRUE > 0, PRED > 0, valid=valid) == pytest.approx(2 * 7 / (8 + 7))
    assert math.isnan(dice(np.zeros((2, 2)), np.zeros((2, 2))))


def test_centroids_exact():
    inst = np.zeros((5, 5), int)
    inst[0, 0:2] = 3
    inst[2:5, 4] = 9
    ids, pts = centroids(inst)
    assert ids.tolist() == [3, 9]
    np.testing.assert_allclose(pts, [[0, 0.5], [3, 4]])


def test_match_centroids_radius_inclusive():
    true = np.array([[0.0, 0.0], [100.0, 100.0]])
    pred = np.array([[0.0, 12.0], [100.0, 112.5]])
    ti, pj = match_centroids(true, pred, radius=12)
    assert ti.tolist() == [0] and pj.tolist() == [0]


def test_match_centroids_prefers_more_pairs_over_shorter_distance():
    # t0-p0 5, t1-p0 12, t0-p1 11.5, t1-p1 12.5 (beyond the radius). The least-distance full
    # assignment {t0-p0, t1-p1} (17.5) would keep one pair after filtering; the matching must find
    # both feasible pairs {t0-p1, t1-p0} (23.5).
    y = 265 / 34
    x = math.sqrt(132.25 - y * y)
    true = np.array([[0.0, 0.0], [0.0, 17.0]])
    pred = np.array([[0.0, 5.0], [x, y]])
    dist = np.linalg.norm(true[:, None] - pred[None], axis=-1)
    np.testing.assert_allclose(dist, [[5, 11.5], [12, 12.5]])
    ti, pj = match_centroids(true, pred, radius=12, pairing="maximum")
    assert sorted(zip(ti.tolist(), pj.tolist())) == [(0, 1), (1, 0)]
    ti, pj = match_centroids(true, pred, radius=12)  # HoVer-Net: least total distance, then drop
    assert sorted(zip(ti.tolist(), pj.tolist())) == [(0, 0)]


@pytest.mark.parametrize("seed", range(8))
def test_match_centroids_is_a_maximum_matching(seed):
    rng = np.random.default_rng(seed)
    true = rng.uniform(0, 30, size=(rng.integers(1, 6), 2))
    pred = rng.uniform(0, 30, size=(rng.integers(1, 6), 2))
    radius = 10.0
    ti, pj = match_centroids(true, pred, radius=radius, pairing="maximum")
    assert len(set(ti)) == len(ti) and len(set(pj)) == len(pj)
    dist = np.linalg.norm(true[:, None] - pred[None], axis=-1)
    assert (dist[ti, pj] <= radius).all()
    best = 0
    small, large = (true, pred) if len(true) <= len(pred) else (pred, true)
    d = dist if len(true) <= len(pred) else dist.T
    for perm in itertools.permutations(range(len(large)), len(small)):
        best = max(best, sum(d[i, j] <= radius for i, j in enumerate(perm)))
    assert len(ti) == best


def test_classification_f1_exact():
    paired_true = np.array([1, 1, 2, 2])
    paired_pred = np.array([1, 2, 2, 2])
    unpaired_true = np.array([1])
    unpaired_pred = np.array([2, 3])
    # class 1: TP 1, FP 0, FN 1, FPu 0, FNu 1 -> 2 / (2 + 0 + 2 + 0 + 1)
    assert classification_f1(paired_true, paired_pred, unpaired_true, unpaired_pred, 1) == pytest.approx(2 / 5)
    # class 2: TP 2, FP 1, FN 0, FPu 1, FNu 0 -> 4 / (4 + 2 + 0 + 1 + 0)
    assert classification_f1(paired_true, paired_pred, unpaired_true, unpaired_pred, 2) == pytest.approx(4 / 7)
    # class 3: only an unpaired prediction -> 0; class 4: absent -> NaN
    assert classification_f1(paired_true, paired_pred, unpaired_true, unpaired_pred, 3) == 0.0
    assert math.isnan(classification_f1(paired_true, paired_pred, unpaired_true, unpaired_pred, 4))


def test_r2_counts_exact():
    true = np.array([[1, 5, 0], [2, 5, 0], [3, 5, 0]])
    pred = np.array([[1, 4, 1], [2, 5, 0], [4, 6, 0]])
    r2 = r2_counts(true, pred)
    assert r2[0] == pytest.approx(1 - 1 / 2)  # SSres 1, SStot 2
    assert math.isnan(r2[1]) and math.isnan(r2[2])  # constant truth: undefined
    assert np.isnan(r2_counts(true[:1], pred[:1])).all()


def test_drop_ignored():
    inst = np.array([[1, 1, 1, 2, 2, 3]])
    ignore = np.array([[False, False, True, True, True, False]])
    # 1 has 1/3 inside (kept); 2 has 2/2 (dropped); 3 none
    assert drop_ignored(inst, ignore).tolist() == [[1, 1, 1, 0, 0, 3]]


# -- the split accumulator -------------------------------------------------------------------------


def boxes(shape, specs):
    """Instance and class maps from boxes (r0, r1, c0, c1, class)."""
    inst = np.zeros(shape, np.int32)
    cls = np.zeros(shape, np.uint8)
    for i, (r0, r1, c0, c1, k) in enumerate(specs, start=1):
        inst[r0:r1, c0:c1] = i
        cls[r0:r1, c0:c1] = k
    return inst, cls


def test_split_metrics_two_images_exact():
    acc = SplitMetrics(["A", "B", "C"])
    # image 1: truth A(4x4) and B(4x4); prediction A exact, B shifted by 1 column but labelled A
    t1, c1 = boxes((20, 20), [(0, 4, 0, 4, 1), (10, 14, 10, 14, 2)])
    p1, q1 = boxes((20, 20), [(0, 4, 0, 4, 1), (10, 14, 11, 15, 1)])
    # image 2: truth B; prediction B exact plus a spurious C far away
    t2, c2 = boxes((20, 20), [(2, 6, 2, 6, 2)])
    p2, q2 = boxes((20, 20), [(2, 6, 2, 6, 2), (15, 19, 15, 19, 3)])
    acc.add(t1, c1, p1, q1, image_id="one")
    acc.add(t2, c2, p2, q2, image_id="two")
    r = acc.result()
    iou_shift = 12 / 20
    # binary: TP 3 (1 + 0.6 + 1), FP 1, FN 0
    assert r["DQ"] == pytest.approx(3 / 3.5)
    assert r["SQ"] == pytest.approx((2 + iou_shift) / 3)
    assert r["PQ"] == pytest.approx(3 / 3.5 * (2 + iou_shift) / 3)
    # per class over the split: A TP1 FP1(the mislabelled B) FN0; B TP1 FP0 FN1; C TP0 FP1 FN0
    pc = r["per_class"]
    assert (pc["A"]["TP"], pc["A"]["FP"], pc["A"]["FN"]) == (1, 1, 0)
    assert (pc["B"]["TP"], pc["B"]["FP"], pc["B"]["FN"]) == (1, 0, 1)
    assert (pc["C"]["TP"], pc["C"]["FP"], pc["C"]["FN"]) == (0, 1, 0)
    assert pc["A"]["PQ"] == pytest.approx(1 / 1.5)
    assert pc["B"]["PQ"] == pytest.approx(1 / 1.5)
    assert pc["C"]["PQ"] == 0.0
    assert r["mPQ+"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)  # CoNIC: split sums per class
    # PanNuke: image 1 A 2/3, B 0 (C absent from its truth) -> 1/3; image 2 B 1 (A, C absent) -> 1
    assert [im["mPQ"] for im in r["per_image"]] == pytest.approx([1 / 3, 1.0])
    assert r["mPQ"] == pytest.approx((1 / 3 + 1) / 2)
    assert r["type_accuracy"] == pytest.approx(2 / 3)  # pairs (A,A) (B,A) (B,B)
    # bPQ per image: image 1 TP 2 -> DQ 1, SQ 0.8 -> 0.8; image 2 TP1 FP1 -> DQ 2/3, SQ 1
    assert r["bPQ"] == pytest.approx((0.8 + 2 / 3) / 2)
    # AJI image 1: C 16 + 12, U 16 + 20 -> 28/36; image 2: C 16, U 16 + 16 -> 0.5
    assert r["AJI"] == pytest.approx((28 / 36 + 0.5) / 2)
    # Dice image 1: 2*28/(32+32); image 2: 2*16/(16+32)
    assert r["Dice"] == pytest.approx((56 / 64 + 32 / 48) / 2)
    # detection: 3 pairs, 1 unpaired prediction -> F1 6/7
    assert r["F1_detection"] == pytest.approx(6 / 7)
    assert r["precision_detection"] == pytest.approx(3 / 4) and r["recall_detection"] == 1.0
    # classification F1: pairs (A,A), (B,A), (B,B); unpaired pred C
    assert pc["A"]["F1"] == pytest.approx(2 / (2 + 2))  # TP1 FP1
    assert pc["B"]["F1"] == pytest.approx(2 / (2 + 2))  # TP1 FN1
    assert pc["C"]["F1"] == 0.0
    # counts: true A [1,0], B [1,1]; pred A [2,0], B [0,1], C [0,1]
    assert r["counts"]["true"] == [[1, 1, 0], [0, 1, 0]]
    assert r["counts"]["pred"] == [[2, 0, 0], [0, 1, 1]]
    assert pc["A"]["R2_counts"] == pytest.approx(1 - 1 / 0.5)  # SSres 1, SStot 0.5
    assert math.isnan(pc["B"]["R2_counts"])
    assert r["R2_counts"] == pytest.approx(-1.0)
    assert [im["image_id"] for im in r["per_image"]] == ["one", "two"]


def test_split_metrics_ignore_regions():
    acc = SplitMetrics(["A"])
    t, c = boxes((20, 20), [(0, 4, 0, 4, 1), (10, 16, 10, 16, 1)])
    c[9:17, 9:17] = 255  # the second true nucleus lies in an ignore region
    p, q = boxes((20, 20), [(0, 4, 0, 4, 1), (11, 15, 11, 15, 1)])  # a prediction inside it too
    acc.add(t, c, p, q)
    r = acc.result()
    assert (r["per_class"]["A"]["TP"], r["per_class"]["A"]["FP"], r["per_class"]["A"]["FN"]) == (1, 0, 0)
    assert r["PQ"] == 1.0 and r["Dice"] == 1.0 and r["AJI"] == 1.0
    assert r["counts"]["true"] == [[1]] and r["counts"]["pred"] == [[1]]


def test_split_metrics_class_zero_truth_counts_for_binary_only():
    acc = SplitMetrics(["A"])
    t, c = boxes((10, 10), [(0, 4, 0, 4, 0)])  # nucleus of unknown class
    acc.add(t, c, t, np.where(t > 0, 1, 0))
    r = acc.result()
    assert r["PQ"] == 1.0
    assert (r["per_class"]["A"]["TP"], r["per_class"]["A"]["FP"]) == (0, 1)


def test_split_metrics_empty_image_is_skipped_in_per_image_means():
    acc = SplitMetrics(["A"])
    t, c = boxes((10, 10), [(0, 4, 0, 4, 1)])
    acc.add(t, c, t, c)
    acc.add(np.zeros((10, 10), int), np.zeros((10, 10), np.uint8), np.zeros((10, 10), int), np.zeros((10, 10), int))
    r = acc.result()
    assert r["bPQ"] == 1.0 and r["AJI"] == 1.0 and r["Dice"] == 1.0
    assert math.isnan(r["per_image"][1]["bPQ"])


def test_split_metrics_rejects_mismatched_shapes():
    acc = SplitMetrics(["A"])
    with pytest.raises(ConfigError, match="same"):
        acc.add(np.zeros((4, 4)), np.zeros((4, 4)), np.zeros((4, 5)), np.zeros((4, 5)), image_id="x")


@pytest.mark.parametrize("seed", range(3))
def test_split_metrics_perfect_prediction_scores_one(seed):
    rng = np.random.default_rng(seed)
    acc = SplitMetrics(["A", "B", "C"])
    for n in (3, 5, 8):
        specs = []
        for i in range(n):
            r0, c0 = 12 * (i // 4), 12 * (i % 4)
            specs.append((r0, r0 + int(rng.integers(4, 10)), c0, c0 + int(rng.integers(4, 10)), int(rng.integers(1, 4))))
        t, c = boxes((48, 48), specs)
        acc.add(t, c, t, c)
    r = acc.result()
    for key in ("PQ", "bPQ", "mPQ", "AJI", "Dice", "F1_detection", "F1_classification"):
        assert r[key] == pytest.approx(1.0), key


# -- conventions that differ (issue 10), computed by hand ----------------------------------------
def _squares(shape, centres, *, half=1, classes=None):
    inst = np.zeros(shape, np.int64)
    cls = np.zeros(shape, np.uint8)
    for i, (r, c) in enumerate(centres, start=1):
        inst[r - half:r + half + 1, c - half:c + half + 1] = i
        cls[r - half:r + half + 1, c - half:c + half + 1] = 1 if classes is None else classes[i - 1]
    return inst, cls


def test_issue_case_hovernet_pairing_versus_maximum_matching():
    true = np.array([[0.0, 0.0], [0.0, 12.0]])
    pred = np.array([[0.0, 0.0], [10.0, 5.0]])
    ti, pj = match_centroids(true, pred, radius=12)  # default: HoVer-Net pair_coordinates
    assert list(zip(ti.tolist(), pj.tolist())) == [(0, 0)]  # t1-p1 is 12.21 px: dropped
    ti, pj = match_centroids(true, pred, radius=12, pairing="maximum")
    assert sorted(zip(ti.tolist(), pj.tolist())) == [(0, 1), (1, 0)]  # 11.18 px and 12 px
    # the same scene as instance maps: detection F1 1/2 (HoVer-Net) vs 1 (maximum matching)
    t, tc = _squares((48, 48), [(20, 20), (20, 32)])
    p, pc = _squares((48, 48), [(20, 20), (30, 25)])
    for pairing, f1 in (("hovernet", 0.5), ("maximum", 1.0)):
        acc = SplitMetrics(["A"], pairing=pairing)
        acc.add(t, tc, p, pc)
        r = acc.result()
        assert r["F1_detection"] == pytest.approx(f1) and r["pairing"] == pairing
    with pytest.raises(ConfigError, match="unknown pairing"):
        SplitMetrics(["A"], pairing="greedy")


def test_pannuke_mpq_and_bpq_average_per_tissue_conic_mpq_plus_accumulates():
    acc = SplitMetrics(["A", "B", "C"])
    t1, c1 = boxes((20, 20), [(0, 4, 0, 4, 1), (10, 14, 10, 14, 2)])
    p1, q1 = boxes((20, 20), [(0, 4, 0, 4, 1), (10, 14, 11, 15, 1)])
    t2, c2 = boxes((20, 20), [(2, 6, 2, 6, 2)])
    p2, q2 = boxes((20, 20), [(2, 6, 2, 6, 2), (15, 19, 15, 19, 3)])
    t3, c3 = boxes((20, 20), [(2, 6, 2, 6, 3)])
    acc.add(t1, c1, p1, q1, image_id="one", tissue="Breast")  # mPQ 1/3, bPQ 0.8
    acc.add(t2, c2, p2, q2, image_id="two", tissue="Colon")  # mPQ 1, bPQ 2/3
    acc.add(t3, c3, t3, c3, image_id="three", tissue="Colon")  # mPQ 1, bPQ 1
    r = acc.result()
    assert r["per_tissue"]["Breast"]["mPQ"] == pytest.approx(1 / 3)
    assert r["per_tissue"]["Colon"]["mPQ"] == pytest.approx(1.0)
    assert r["per_tissue"]["Colon"]["bPQ"] == pytest.approx((2 / 3 + 1) / 2)
    assert r["per_tissue"]["Colon"]["n_images"] == 2
    assert r["mPQ"] == pytest.approx((1 / 3 + 1) / 2)  # per tissue, not (1/3 + 1 + 1) / 3 per image
    assert r["bPQ"] == pytest.approx((0.8 + 5 / 6) / 2)  # not (0.8 + 2/3 + 1) / 3
    # CoNIC mPQ+: A TP1 FP1 -> 2/3; B TP1 FN1 -> 2/3; C TP1 FP1 -> 2/3
    assert r["mPQ+"] == pytest.approx(2 / 3)


def test_aji_plus_pairs_one_to_one_where_aji_lets_two_truths_share_a_prediction():
    from cellcurate.models.metrics import aji_plus

    true = np.array([[1, 1, 1, 1, 2, 2, 2, 2]])
    pred = np.array([[1, 1, 1, 1, 1, 1, 1, 1]])
    # AJI: both truths take the prediction: C 4 + 4, U 8 + 8
    assert aji(true, pred) == pytest.approx(0.5)
    # AJI+: one pair (C 4, U 8) and the other truth unpaired (U + 4)
    assert aji_plus(true, pred) == pytest.approx(4 / 12)
    assert aji_plus(true, true) == 1.0 and math.isnan(aji_plus(np.zeros((2, 2)), np.zeros((2, 2))))
    acc = SplitMetrics(["A"])
    acc.add(true, (true > 0).astype(np.uint8), pred, (pred > 0).astype(np.uint8))
    r = acc.result()
    assert r["AJI"] == pytest.approx(0.5) and r["AJI+"] == pytest.approx(4 / 12)


@pytest.mark.parametrize("big", [10**7, 2**31 - 1, 2**40])
def test_cost_does_not_grow_with_the_largest_instance_id(big):
    """Issue 10: one nucleus with id 10^7 took 5.5 s, id 2^31 - 1 raised MemoryError."""
    t, c = boxes((16, 16), [(2, 6, 2, 6, 1), (8, 12, 8, 12, 2)])
    ref = SplitMetrics(["A", "B"])
    ref.add(t, c, t, c)
    renamed = np.where(t == 2, big, t).astype(np.int64)
    acc = SplitMetrics(["A", "B"])
    acc.add(renamed, c, renamed, c)
    a, b = acc.result(), ref.result()
    for key in ("PQ", "mPQ", "mPQ+", "bPQ", "AJI", "AJI+", "F1_detection", "F1_classification"):
        assert a[key] == b[key] == 1.0, key
    with pytest.raises(ConfigError, match=">= 0"):
        SplitMetrics(["A"]).add(-t, c, t, c)

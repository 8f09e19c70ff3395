"""The appearance ranking of the probability-blob flags (relabel.appearance): its features on
hand-made regions, its out-of-fold forest, and the conditions under which it steps aside."""

from __future__ import annotations

import numpy as np
import pytest

from cellcurate.relabel import appearance as ap
from cellcurate.relabel.instances import InstanceConfig, blob_disk


def _scene():
    """A 64 × 64 pink image with two dark-purple 10 × 10 nuclei (ids 1, 2) side by side (2 px
    apart) and the probability map 1 on both."""
    img = np.full((64, 64, 3), (230, 180, 210), np.uint8)
    ann = np.zeros((64, 64), np.int32)
    ann[20:30, 10:20] = 1
    ann[20:30, 22:32] = 2
    img[ann > 0] = (70, 40, 120)
    prob = (ann > 0).astype(np.float32)
    return img, ann, prob


def test_features_of_a_square_by_hand():
    img, ann, prob = _scene()
    ctx = ap.ImageContext.build(img, ann, prob, median_area=100.0)
    m = np.ones((10, 10), bool)
    f = dict(zip(ap.FEATURES, ap.features(ctx, 20, 10, m)))
    assert f["relative_area"] == pytest.approx(1.0)
    assert f["solidity"] == pytest.approx(1.0)
    assert f["extent"] == pytest.approx(1.0)
    assert f["prob_mean"] == pytest.approx(1.0) and f["prob_vs_nuclei"] == pytest.approx(1.0)
    assert f["haem_vs_nuclei"] == pytest.approx(1.0, abs=1e-5)  # as dark as the image's nuclei
    assert (f["red"], f["green"], f["blue"]) == pytest.approx((70 / 255, 40 / 255, 120 / 255), abs=1e-6)
    assert f["rgb_std"] == pytest.approx(0.0, abs=1e-6)
    # its wide ring (3 px: int(0.6 × the 5.64 px radius), 2 at least) reaches nucleus 2, 2 px away:
    # some of it is annotated, none once nucleus 2 is the one excluded
    assert 0 < f["ring_annotated"] < 0.5
    f2 = dict(zip(ap.FEATURES, ap.features(ctx, 20, 22, m, exclude=2)))
    assert f2["ring_annotated"] > 0  # nucleus 1 is still there
    f3 = dict(zip(ap.FEATURES, ap.features(ctx, 20, 10, m, exclude=2)))
    assert f3["ring_annotated"] == 0.0
    # a region reaching outside the image keeps only its inside part
    g = dict(zip(ap.FEATURES, ap.features(ctx, -5, -5, np.ones((10, 10), bool))))
    assert g["relative_area"] == pytest.approx(0.25)


def test_a_deleted_nucleus_leaves_its_own_blob():
    img, ann, prob = _scene()
    ctx = ap.ImageContext.build(img, ann, prob, median_area=100.0)
    ex = ap.deletion_examples(ctx, prob >= 0.5, blob_disk(100.0, InstanceConfig()), [1, 2, 7])
    assert len(ex) == 2  # id 7 does not exist
    (f1, cy1, cx1), (f2, cy2, cx2) = ex
    assert (cy1, cx1) == pytest.approx((24.5, 14.5)) and (cy2, cx2) == pytest.approx((24.5, 26.5))
    # the rule's opening (disc of radius round(0.4 × 5.64) = 2) cuts 3 pixels off each corner
    assert dict(zip(ap.FEATURES, f1))["relative_area"] == pytest.approx(0.88)
    # a nucleus the map does not reach gives no example
    assert ap.deletion_examples(ctx, np.zeros_like(prob, bool), None, [1]) == []


def test_the_forest_ranks_nucleus_like_blobs_first_out_of_fold():
    rng = np.random.default_rng(0)
    n_feat = len(ap.FEATURES)
    pos = rng.normal(1.0, 0.3, (200, n_feat))
    groups = np.array([f"g{i % 10}" for i in range(200)], dtype=object)
    like = rng.normal(1.0, 0.3, (20, n_feat))  # missed nuclei: look like the annotated ones
    unlike = rng.normal(-1.0, 0.3, (40, n_feat))  # gaps between nuclei
    blobs = np.vstack([like, unlike])
    bgroups = np.array([f"g{i % 10}" for i in range(60)], dtype=object)
    p = ap.out_of_fold_probability(pos, groups, blobs, bgroups)
    assert p is not None and p.shape == (60,)
    assert p[:20].min() > p[20:].max()


def test_a_blob_is_scored_by_a_forest_that_never_saw_its_group():
    # class = sign of feature 0; group "odd" alone holds positives with feature 0 = -1 (negative-
    # looking) and feature 1 = 5 (seen nowhere else), and one blob exactly like them
    rng = np.random.default_rng(2)
    n_feat = len(ap.FEATURES)
    pos = rng.normal(0.0, 0.3, (200, n_feat))
    pos[:, 0] = 1.0
    odd = np.zeros((12, n_feat))
    odd[:, 0], odd[:, 1] = -1.0, 5.0
    blobs = rng.normal(0.0, 0.3, (60, n_feat))
    blobs[:, 0] = -1.0
    blobs[0] = odd[0]
    pg = np.array([f"g{i % 5}" for i in range(200)] + ["odd"] * 12, dtype=object)
    bg = np.array(["odd"] + [f"g{i % 5}" for i in range(59)], dtype=object)
    p = ap.out_of_fold_probability(np.vstack([pos, odd]), pg, blobs, bg)
    assert p is not None and p[0] < 0.3
    # a forest that had seen the group would call it a nucleus
    from sklearn.ensemble import RandomForestClassifier

    X = np.vstack([pos, odd, blobs[1:]])
    y = np.r_[np.ones(212), np.zeros(59)]
    seen = RandomForestClassifier(100, min_samples_leaf=3, random_state=0).fit(X, y)
    assert seen.predict_proba(blobs[:1])[0, 1] > 0.7


@pytest.mark.parametrize("n_pos, n_blobs, one_group", [(ap.MIN_POSITIVES - 1, 20, False),
                                                        (50, ap.MIN_BLOBS - 1, False), (50, 20, True)])
def test_too_few_examples_or_one_group_leave_the_ranking(n_pos, n_blobs, one_group):
    rng = np.random.default_rng(1)
    n_feat = len(ap.FEATURES)
    g = (lambda n: np.array(["a"] * n, dtype=object)) if one_group else (
        lambda n: np.array([f"g{i % 4}" for i in range(n)], dtype=object))
    assert ap.out_of_fold_probability(rng.normal(size=(n_pos, n_feat)), g(n_pos),
                                      rng.normal(size=(n_blobs, n_feat)), g(n_blobs)) is None


def test_block_groups_follow_the_pixel_size():
    # 48 µm blocks: 192 px at 0.25 µm/px, 96 px at 0.5 µm/px
    assert ap.block_group("x", 191.0, 0.0, 0.25) == ap.block_group("x", 0.0, 0.0, 0.25)
    assert ap.block_group("x", 193.0, 0.0, 0.25) != ap.block_group("x", 0.0, 0.0, 0.25)
    assert ap.block_group("x", 100.0, 0.0, 0.5) != ap.block_group("x", 0.0, 0.0, 0.5)
    assert ap.block_group("x", 0.0, 0.0, 0.25) != ap.block_group("y", 0.0, 0.0, 0.25)

"""Instance-level issues: hand-computed matching cases, proposals, cleanlab evidence, scoring."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellcurate.errors import ConfigError
from cellcurate.relabel.instances import (ISSUES, flag_hits, ImageFlag, InstanceConfig, cleanlab_evidence, match_image,
                                          proposed_polygons, score_flags)

#: The matching rules alone (their hand-computed scores); the probability-map rules, which also
#: rescale the matching rules' scores, have their own tests (test_registration_*, test_blob_*).
CFG = InstanceConfig(min_part_um2=1.0, registration=False, blob_missing=False)


def _grid(h: int = 12, w: int = 16) -> np.ndarray:
    return np.zeros((h, w), np.int32)


def _flags(ann, pred, prob=None, **kw):
    prob = (pred > 0).astype(float) if prob is None else prob
    return match_image(ann, pred, prob, config=kw.pop("config", CFG), **kw)


def test_one_annotation_two_predictions_is_merged():
    ann, pred = _grid(), _grid()
    ann[2:10, 2:14] = 1  # 8 x 12 = 96 px drawn as one nucleus
    pred[2:10, 2:7] = 1  # 40 px, inside
    pred[2:10, 9:14] = 2  # 40 px, inside
    (f,) = _flags(ann, pred)
    assert f.issue == "merged" and f.ann_ids == [1] and f.pred_ids == [1, 2]
    assert f.evidence["cover"] == pytest.approx(80 / 96, abs=1e-4)
    assert f.evidence["inside"] == [1.0, 1.0]
    # confidence 1, both parts fully inside, the smaller part holds 40/96 of it (>= 1/3): score 1
    assert f.score == pytest.approx(1.0)


def test_two_annotations_one_prediction_is_split():
    ann, pred = _grid(), _grid()
    ann[2:10, 2:8] = 1  # 48 px
    ann[2:10, 8:14] = 2  # 48 px, touching along a column of 8 px
    pred[2:10, 2:14] = 1  # 96 px
    prob = np.where(pred > 0, 0.9, 0.0)
    (f,) = _flags(ann, pred, prob)
    assert f.issue == "split" and f.ann_ids == [1, 2] and f.pred_ids == [1]
    assert f.evidence["contact_px"] == 8
    assert f.evidence["cover"] == pytest.approx(1.0)
    assert f.score == pytest.approx(0.9)  # confidence x inside (1) x cover (1) x balance (1)


def test_prediction_without_annotation_is_missing_and_needs_confidence():
    ann, pred = _grid(), _grid()
    pred[3:7, 3:8] = 1  # 20 px, nothing annotated
    (f,) = _flags(ann, pred, np.where(pred > 0, 0.8, 0.1))
    assert f.issue == "missing_annotation" and f.ann_ids == [] and f.score == pytest.approx(0.8)
    assert f.evidence == {"confidence": 0.8, "annotated_share": 0.0, "area": 20}
    assert _flags(ann, pred, np.where(pred > 0, 0.5, 0.1)) == []  # below min_confidence 0.6


def test_prediction_in_an_ignore_region_is_not_missing():
    ann, pred = _grid(), _grid()
    ann[2:9, 2:9] = 1  # an ignore region (ambiguous)
    pred[3:7, 3:7] = 1
    assert _flags(ann, pred, ignore_ids=[1]) == []


def test_annotation_the_model_calls_background_is_spurious():
    ann, pred = _grid(), _grid()
    ann[4:8, 4:8] = 1
    prob = np.full(ann.shape, 0.05)
    (f,) = _flags(ann, pred, prob)
    assert f.issue == "spurious_annotation" and f.ann_ids == [1]
    assert f.evidence["background_prob"] == pytest.approx(0.95)
    assert f.score == pytest.approx(0.95)
    # the model unsure there (nucleus probability 0.5): not flagged
    assert _flags(ann, pred, np.full(ann.shape, 0.5)) == []


def test_shifted_outline_is_bad_outline_with_its_iou_and_shift():
    ann, pred = _grid(), _grid()
    pred[2:10, 2:8] = 1  # 48 px
    ann[2:10, 5:11] = 1  # shifted right by 3 px: overlap 8 x 3 = 24, union 72, IoU 1/3
    (f,) = _flags(ann, pred)
    assert f.issue == "bad_outline" and f.ann_ids == [1] and f.pred_ids == [1]
    assert f.evidence["iou"] == pytest.approx(1 / 3, abs=1e-4)
    # moved back by 3 px the outline fits exactly: gain 2/3, best shift (dx, dy) = (-3, 0)
    assert f.evidence["shift_gain"] == pytest.approx(2 / 3, abs=1e-4)
    assert f.evidence["best_shift"] == [-3, 0]
    assert f.score == pytest.approx(1.0)


def test_grown_outline_is_bad_outline_without_shift_gain():
    ann, pred = _grid(20, 20), _grid(20, 20)
    pred[6:14, 6:14] = 1  # 64 px
    ann[3:17, 3:17] = 1  # 196 px around it: IoU 64/196
    (f,) = _flags(ann, pred, np.where(pred > 0, 0.8, 0.0))
    assert f.issue == "bad_outline" and f.evidence["iou"] == pytest.approx(64 / 196, abs=1e-4)
    assert f.evidence["shift_gain"] == 0.0
    assert f.score == pytest.approx(0.8 * (1 - (64 / 196) / 0.6) ** 0.5, abs=1e-4)


def test_small_offsets_of_a_large_nucleus_are_not_flagged():
    ann, pred = _grid(30, 30), _grid(30, 30)
    pred[4:24, 4:24] = 1
    ann[4:24, 5:25] = 1  # 1 px: IoU 380/420 = 0.905
    assert _flags(ann, pred) == []


def test_exact_match_has_no_flag_and_thresholds_are_options():
    ann, pred = _grid(), _grid()
    ann[2:10, 2:8] = 1
    pred[2:10, 2:8] = 1
    assert _flags(ann, pred) == []
    pred2 = _grid()
    pred2[2:10, 3:9] = 1  # IoU 0.714
    assert [f.issue for f in _flags(ann, pred2, config=InstanceConfig(bad_outline_iou=0.8, min_part_um2=1, registration=False,
                                                                     blob_missing=False))] == \
        ["bad_outline"]


def test_shapes_and_thresholds_are_validated():
    with pytest.raises(ConfigError, match="differ in shape"):
        match_image(_grid(), _grid(10, 10), np.zeros((12, 16)))
    with pytest.raises(ConfigError, match="min_confidence"):
        InstanceConfig(min_confidence=1.5).validate()
    with pytest.raises(ConfigError, match="match_iou"):
        InstanceConfig(match_iou=0.7, bad_outline_iou=0.5).validate()


def test_proposed_polygons_rasterise_to_the_masks():
    import shapely

    from cellcurate.curation.qupath import geometry_mask

    ann, pred = _grid(), _grid()
    ann[2:10, 2:14] = 1
    pred[2:10, 2:7] = 1
    pred[2:10, 9:14] = 2
    (merged,) = _flags(ann, pred)
    polys = proposed_polygons(merged, ann, pred)
    assert len(polys) == 2
    for poly, pid in zip(polys, (1, 2)):
        g = shapely.Polygon(poly)
        assert g.is_valid and g.area == (pred == pid).sum()
        assert poly[0] != poly[-1]  # not closed (the contract)
        np.testing.assert_array_equal(geometry_mask(g, ann.shape, window=(0, 0, *ann.shape)), pred == pid)
    missing = ImageFlag("missing_annotation", 1.0, [], [2])
    (poly,) = proposed_polygons(missing, ann * 0, pred)
    assert shapely.Polygon(poly).area == 40
    assert proposed_polygons(ImageFlag("spurious_annotation", 1.0, [1], []), ann, pred) == []


def test_cleanlab_evidence_scores_the_bad_box_lowest():
    ann, pred = np.zeros((40, 40), np.int32), np.zeros((40, 40), np.int32)
    ann[2:10, 2:10] = 1
    pred[2:10, 2:10] = 1  # exact
    ann[20:28, 20:28] = 2
    pred[20:28, 25:33] = 2  # shifted
    (ev,) = cleanlab_evidence([(ann, pred, (pred > 0).astype(float))])
    assert ev["badloc"].shape == (2,)
    assert ev["badloc"][0] > ev["badloc"][1]
    assert 0 <= ev["image_quality"] <= 1 and 0 <= ev["pixel_quality"] <= 1


def test_score_flags_counts_hits_per_issue_type():
    flags = pd.DataFrame({
        "image_id": ["a", "a", "a", "b"], "issue": ["missing_annotation", "spurious_annotation", "split", "merged"],
        "nucleus_ids": [[], [7], [9, 10], [11]], "centroid_x": [10.0, 0, 0, 0], "centroid_y": [10.0, 0, 0, 0],
    })
    planted = pd.DataFrame({
        "image_id": ["a", "a", "a", "a"], "issue": ["missing_annotation", "spurious_annotation", "split", "merged"],
        "nucleus_id": [-1, 8, 10, 11], "nucleus_id2": [-1, -1, 12, -1], "centroid_x": [12.0, 0, 0, 0],
        "centroid_y": [11.0, 0, 0, 0], "radius": [4.0, 1, 1, 1],
    })
    s = score_flags(flags, planted)
    assert set(s) == set(ISSUES)
    assert s["missing_annotation"] == {"planted": 1, "flags": 1, "hit": 1, "recall": 1.0, "precision": 1.0}
    assert s["spurious_annotation"]["hit"] == 0 and s["spurious_annotation"]["precision"] == 0.0
    assert s["split"]["recall"] == 1.0  # either piece counts
    assert s["merged"]["recall"] == 0.0 and s["merged"]["precision"] == 0.0  # other image
    assert s["bad_outline"]["planted"] == 0
    assert score_flags(flags, planted, image_ids=["b"])["merged"]["flags"] == 1
    # per flag, in the flags' order (what the demo's simulated annotator accepts)
    assert flag_hits(flags, planted).tolist() == [True, False, True, False]
    assert flag_hits(flags.iloc[:0], planted).tolist() == []


def test_cleanlab_pixel_quality_is_the_same_batched_or_one_by_one():
    rng = np.random.default_rng(0)
    items = []
    for k in range(4):
        shape = (40, 40) if k % 2 else (30, 50)
        ann, pred = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        ann[2:10, 2:10] = 1
        ann[15:25, 12:22] = 2
        pred[2:10, 3:11] = 1
        pred[15:25, 12 + k:22 + k] = 2
        items.append((ann, pred, np.clip((pred > 0) * 0.9 + rng.random(shape) * 0.1, 0, 1)))
    batched = cleanlab_evidence(items)
    for b, item in zip(batched, items):
        (one,) = cleanlab_evidence([item])
        assert b["pixel_quality"] == pytest.approx(one["pixel_quality"], abs=1e-9)
        np.testing.assert_allclose(b["badloc"], one["badloc"])


def test_badloc_and_pooling_equal_cleanlabs_own_functions():
    """The vectorised badloc scores and their pooling give cleanlab's numbers on hand-made images:
    an exact box, a shifted one, one with no overlapping prediction, predictions under cleanlab's
    probability threshold, an image without predictions, an image without annotations, NaN scores."""
    from cleanlab.internal.constants import ALPHA, EUC_FACTOR, LOW_PROBABILITY_THRESHOLD, TEMPERATURE
    from cleanlab.object_detection.rank import compute_badloc_box_scores, pool_box_scores_per_image

    from cellcurate.relabel.instances import _aux_inputs, badloc_box_scores, match_image_tables, pool_box_scores

    ann, pred = np.zeros((40, 40), np.int32), np.zeros((40, 40), np.int32)
    ann[2:10, 2:10] = 1
    pred[2:10, 2:10] = 1  # exact
    ann[20:28, 20:28] = 2
    pred[20:28, 25:33] = 2  # shifted
    ann[30:36, 2:8] = 3  # nothing predicted there
    pred[12:16, 30:34] = 3  # a prediction on background
    prob = np.where(pred > 0, 0.9, 0.05)
    prob[pred == 2] = 0.55  # just above cleanlab's threshold
    low = prob.copy()
    low[pred > 0] = 0.3  # every prediction under it
    items = [(ann, pred, prob), (ann, pred, low), (ann, pred * 0, prob * 0), (ann * 0, pred, prob)]
    aux = [_aux_inputs(a, p, q, ALPHA, EUC_FACTOR) for a, p, q in items]
    theirs = compute_badloc_box_scores(auxiliary_inputs=[dict(x) for x in aux])
    ours = [badloc_box_scores(x, LOW_PROBABILITY_THRESHOLD) for x in aux]
    assert [len(v) for v in ours] == [3, 3, 3, 0]
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
    assert ours[0][0] > ours[0][1] and ours[0][2] == 1.0 and ours[1].tolist() == [1.0, 1.0, 1.0]
    # the tables match_image_tables hands over give the same auxiliary inputs
    _, iou, conf = match_image_tables(ann, pred, prob, config=CFG)
    reused = _aux_inputs(ann, pred, prob, ALPHA, EUC_FACTOR, tables=(iou, conf))
    for key in ("similarity_matrix", "iou_matrix", "pred_label_probs", "lab_bboxes", "pred_bboxes"):
        np.testing.assert_array_equal(reused[key], aux[0][key])
    scores = ours + [np.array([0.2, np.nan, 0.9]), np.array([np.nan]), np.array([0.7])]
    np.testing.assert_allclose(pool_box_scores(scores, TEMPERATURE), pool_box_scores_per_image(scores), rtol=1e-12)
    np.testing.assert_allclose(pool_box_scores(scores, 0.5), pool_box_scores_per_image(scores, temperature=0.5),
                               rtol=1e-12)
    assert pool_box_scores([], TEMPERATURE).shape == (0,)


def test_proposals_on_a_window_equal_the_full_image_ones():
    from cellcurate.relabel.instances import object_slices

    rng = np.random.default_rng(1)
    ann, pred = _grid(40, 48), _grid(40, 48)
    ann[3:15, 4:30] = 1
    pred[3:15, 4:15] = 1
    pred[4:14, 17:31] = 2
    ann[20:30, 5:12] = 2
    ann[20:30, 12:20] = 3
    pred[19:31, 4:21] = 3
    pred[32:38, 30:40] = 4
    ann[22:30, 30:38] = 4
    pred[23:31, 33:41] = 5
    pred[(rng.random(pred.shape) < 0.05) & (pred > 0)] = 0  # ragged outlines
    flags = [ImageFlag("merged", 1.0, [1], [1, 2]), ImageFlag("split", 1.0, [2, 3], [3]),
             ImageFlag("missing_annotation", 1.0, [], [4]), ImageFlag("bad_outline", 1.0, [4], [5]),
             ImageFlag("spurious_annotation", 1.0, [4], [])]
    slices = (object_slices(ann, 4), object_slices(pred, 5))
    for f in flags:
        assert proposed_polygons(f, ann, pred, slices=slices) == proposed_polygons(f, ann, pred)
    assert proposed_polygons(flags[0], ann, pred, slices=slices)


# -- the probability-map rules: registration (bad_outline) and blobs (missing_annotation) ----------
def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_registration_flags_a_shifted_disc_with_the_offset_back():
    import shapely

    from cellcurate.curation.qupath import geometry_mask

    shape = (64, 64)
    nucleus = _disc(shape, 32, 30, 8)  # where the model sees the nucleus
    prob = np.where(nucleus, 0.9, 0.05)
    ann = _disc(shape, 32, 35, 8).astype(np.int32)  # drawn 5 px to the right
    pred = np.zeros(shape, np.int32)  # no predicted instances: the map alone is the evidence
    (f,) = match_image(ann, pred, prob, config=InstanceConfig(min_part_um2=1.0))
    assert f.issue == "bad_outline" and f.ann_ids == [1] and f.pred_ids == []
    assert f.evidence["rule"] == "registration" and f.evidence["registration_shift"] == [-5, 0]
    assert f.evidence["registration_mean_prob"] == pytest.approx(0.9)
    assert 0.5 < f.score <= 1.0
    (poly,) = proposed_polygons(f, ann, pred)  # the annotation moved back onto the nucleus
    np.testing.assert_array_equal(geometry_mask(shapely.Polygon(poly), shape, window=(0, 0, *shape)), nucleus)
    # the crescent the annotation left uncovered is that outline's nucleus, not a missing one
    assert not [g for g in match_image(ann, pred, prob, config=InstanceConfig(min_part_um2=1.0))
                if g.issue == "missing_annotation"]
    off = InstanceConfig(min_part_um2=1.0, registration=False)
    assert not [g for g in match_image(ann, pred, prob, config=off) if g.issue == "bad_outline"]


def test_registration_leaves_a_well_drawn_disc_on_a_noisy_map_alone():
    from cellcurate.relabel.instances import registration_gains

    rng = np.random.default_rng(3)
    shape = (64, 64)
    ann = _disc(shape, 32, 32, 8).astype(np.int32)
    prob = np.clip(np.where(ann > 0, 0.75, 0.1) + rng.uniform(-0.25, 0.25, shape), 0, 1)
    gain, mean_p, dy, dx = registration_gains(ann, prob, [1], max_shift=0.8, force=[1])[1]
    assert gain < 0.02  # noise moves the best offset by a pixel at most, for almost nothing
    assert not [f for f in match_image(ann, np.zeros(shape, np.int32), prob, config=InstanceConfig())
                if f.issue == "bad_outline"]


def test_registration_gains_nothing_by_moving_onto_a_neighbour():
    from cellcurate.relabel.instances import registration_gains

    shape = (40, 60)
    a, b = _disc(shape, 20, 20, 7), _disc(shape, 20, 35, 7)
    ann = np.zeros(shape, np.int32)
    ann[a], ann[b] = 1, 2
    prob = np.where(a, 0.6, np.where(b, 0.95, 0.02))  # A is right but paler than its neighbour
    gain, mean_p, dy, dx = registration_gains(ann, prob, [1], max_shift=1.0, force=[1])[1]
    assert (gain, dy, dx) == (0.0, 0, 0) and mean_p == pytest.approx(0.6)
    assert not [f for f in match_image(ann, np.zeros(shape, np.int32), prob) if f.issue == "bad_outline"]


def test_registration_bound_skips_only_ids_that_cannot_reach_the_gain():
    from cellcurate.relabel.instances import registration_gains

    rng = np.random.default_rng(0)
    shape = (96, 96)
    ann = np.zeros(shape, np.int32)
    prob = np.full(shape, 0.02)
    for i, (cy, cx) in enumerate([(16, 16), (16, 60), (50, 30), (70, 75), (80, 20)], start=1):
        ann[_disc(shape, cy, cx, 6)] = i
        prob[_disc(shape, cy + int(rng.integers(-4, 5)), cx + int(rng.integers(-4, 5)), 6)] = 0.9
    every = registration_gains(ann, prob, range(1, 6), max_shift=0.8, force=range(1, 6))
    kept = registration_gains(ann, prob, range(1, 6), max_shift=0.8, min_gain=0.08)
    assert {a for a, v in every.items() if v[0] >= 0.08} <= set(kept)
    assert all(kept[a] == every[a] for a in kept)


def test_blob_rule_flags_an_unannotated_nucleus_and_not_speckle_or_rims():
    shape = (80, 80)
    ann = np.zeros(shape, np.int32)
    prob = np.full(shape, 0.05)
    for i, (cy, cx) in enumerate([(15, 15), (15, 45), (45, 15)], start=1):
        ann[_disc(shape, cy, cx, 6)] = i
        prob[_disc(shape, cy, cx, 7)] = 0.9  # the model's nuclei 1 px wider than drawn: rims
    prob[_disc(shape, 55, 60, 6)] = 0.85  # a nucleus nobody drew
    prob[30:32, 70:72] = 0.95  # speckle
    cfg = InstanceConfig(min_part_um2=1.0, registration=False)
    flags = match_image(ann, np.zeros(shape, np.int32), prob, config=cfg)
    (f,) = [g for g in flags if g.issue == "missing_annotation"]
    assert f.evidence["rule"] == "probability_blob" and f.evidence["blob_mean_prob"] == pytest.approx(0.85)
    (poly,) = proposed_polygons(f, ann, np.zeros(shape, np.int32))
    cx, cy = np.asarray(poly).mean(axis=0)
    assert abs(cx - 60.5) < 1.5 and abs(cy - 55.5) < 1.5
    assert f.score == pytest.approx(0.5 + 0.5 * 0.85 * f.evidence["blob_solidity"], abs=1e-3)
    off = InstanceConfig(min_part_um2=1.0, registration=False, blob_missing=False)
    assert not [g for g in match_image(ann, np.zeros(shape, np.int32), prob, config=off)
                if g.issue == "missing_annotation"]


def test_blob_inside_a_missing_prediction_replaces_its_flag():
    shape = (60, 60)
    ann = np.zeros(shape, np.int32)
    ann[_disc(shape, 15, 15, 6)] = 1
    ann[_disc(shape, 15, 40, 6)] = 2
    pred = np.zeros(shape, np.int32)
    pred[_disc(shape, 42, 30, 7)] = 1
    prob = np.where(pred > 0, 0.9, np.where(ann > 0, 0.9, 0.05))
    (f,) = [g for g in match_image(ann, pred, prob, config=InstanceConfig(min_part_um2=1.0))
            if g.issue == "missing_annotation"]
    assert f.evidence["replaces_pred_id"] == 1 and f.evidence["pred_confidence"] == pytest.approx(0.9)
    assert f.score > 0.5

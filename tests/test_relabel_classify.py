import numpy as np
import pandas as pd
import pytest

from cellcurate.errors import StateError
from cellcurate.relabel.classify import cross_val_probs, group_folds, nucleus_groups
from cellcurate.relabel.detect import find_issues
from cellcurate.relabel.rounds import expected_calibration_error


def test_nucleus_groups_keys():
    images = pd.DataFrame({"image_id": ["p/1", "p/2", "m/1", "m/2"], "patient_id": [pd.NA, pd.NA, "TCGA-A", "TCGA-B"],
                           "split": ["fold1", "fold2", "train", "test"]})
    nuclei = pd.DataFrame({"image_id": ["p/1", "p/2", "m/1", "m/2", "m/2"],
                           "source": ["pannuke", "pannuke", "monusac", "monusac", "monusac"]})
    assert nucleus_groups(nuclei, images).tolist() == [
        "pannuke:fold1", "pannuke:fold2", "monusac:TCGA-A", "monusac:TCGA-B", "monusac:TCGA-B"]


@pytest.mark.parametrize("folds", [2, 3, 5, 8])
def test_no_group_on_both_sides(folds):
    rng = np.random.default_rng(folds)
    groups = np.array([f"g{i}" for i in rng.integers(0, 6, 300)], dtype=object)
    y = rng.integers(1, 4, 300)
    splits = group_folds(y, groups, folds=folds, seed=0)
    assert len(splits) == min(folds, 6)
    seen = np.zeros(300, int)
    for tr, te in splits:
        assert not set(groups[tr]) & set(groups[te])
        seen[te] += 1
    assert (seen == 1).all()  # every nucleus out-of-sample exactly once


def test_single_group_refused():
    with pytest.raises(StateError, match="at least 2 groups"):
        group_folds(np.array([1, 2, 1]), np.array(["a", "a", "a"], dtype=object), folds=3, seed=0)


def test_cross_val_probs_deterministic_and_separable():
    rng = np.random.default_rng(0)
    X = np.r_[rng.normal(0, 1, (90, 3)), rng.normal(5, 1, (90, 3))]
    y = np.r_[np.full(90, 2), np.full(90, 6)]
    g = np.tile(np.array(["a", "b", "c"], dtype=object), 60)
    a = cross_val_probs(X, y, g, classes=[2, 6, 7], folds=3, seed=1)
    b = cross_val_probs(X, y, g, classes=[2, 6, 7], folds=3, seed=1)
    assert np.array_equal(a.probs, b.probs)
    assert a.accuracy > 0.95 and a.confusion.sum() == 180 and a.confusion[2].sum() == 0
    assert np.allclose(a.probs.sum(axis=1), 1) and (a.probs[:, 2] == 0).all()


def test_find_issues_reasons():
    """Planted swaps must come out as likely_class_swap, isolated errors as confident_disagreement
    (issue 10: the test only checked that some issue was found)."""
    n = 300
    true = np.arange(n) % 3
    probs = np.full((n, 3), 0.02)
    probs[np.arange(n), true] = 0.96  # the model knows the true class
    y = true.copy()
    swap_01 = np.flatnonzero(true == 0)[:10]
    swap_10 = np.flatnonzero(true == 1)[:10]
    lone_20 = np.flatnonzero(true == 2)[:3]  # one direction only: not a swap
    y[swap_01], y[swap_10], y[lone_20] = 1, 0, 0
    iss = find_issues(y, probs)
    planted = np.r_[swap_01, swap_10]
    assert np.flatnonzero(iss.issue).tolist() == sorted(np.r_[planted, lone_20].tolist())
    assert (iss.reason[planted] == "likely_class_swap").all()
    assert (iss.reason[lone_20] == "confident_disagreement").all()
    assert (iss.suggested[planted] == true[planted]).all() and (iss.suggested[lone_20] == 2).all()
    assert (iss.score[iss.issue] > 0.9).all() and sorted(iss.rank[iss.issue]) == list(range(1, iss.issue.sum() + 1))
    assert not iss.issue[y == probs.argmax(axis=1)].any()


def test_ece_exact():
    conf = np.array([0.95, 0.95, 0.55, 0.55])
    corr = np.array([True, True, True, False])
    # bin 0.9-1.0: |1 - 0.95| * 0.5 ; bin 0.5-0.6: |0.5 - 0.55| * 0.5
    assert expected_calibration_error(conf, corr) == pytest.approx(0.05)

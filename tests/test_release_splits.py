"""Release splits: official folds kept, val grouped by patient, deterministic from content + seed."""

from __future__ import annotations

import pandas as pd
import pytest

from cellcurate.curation.splits import assign_splits, resolve_split
from cellcurate.errors import ConfigError


def _images(n_patients=10, per_patient=3):
    rows = [{"image_id": f"pannuke/fold{f}/{i:05d}", "source": "pannuke", "split": f"fold{f}", "patient_id": None}
            for f in (1, 2, 3) for i in range(4)]
    for p in range(n_patients):
        for k in range(per_patient):
            rows.append({"image_id": f"monusac/P{p:02d}/{k}", "source": "monusac", "split": "train",
                         "patient_id": f"P{p:02d}"})
    rows += [{"image_id": "monusac/T1/0", "source": "monusac", "split": "test", "patient_id": "T1"}]
    return pd.DataFrame(rows)


def test_official_splits_kept_and_val_by_patient():
    images = _images()
    s = assign_splits(images, seed=0, val_fraction=0.2)
    assert s["source_split"].tolist() == images["split"].tolist()
    pn = s[images["source"] == "pannuke"]
    assert (pn["split"] == pn["source_split"]).all()
    mo = s.assign(patient=images["patient_id"])[images["source"] == "monusac"]
    per_patient = mo.groupby("patient")["split"].nunique()
    assert (per_patient == 1).all()  # no patient on two sides
    assert mo[mo["split"] == "val"]["patient"].nunique() == 2  # 20 % of 10 patients
    assert mo.loc[mo["patient"] == "T1", "split"].tolist() == ["test"]


def test_deterministic_and_stable_when_a_patient_is_added():
    images = _images()
    a = assign_splits(images, seed=3)
    assert a.equals(assign_splits(images.sample(frac=1, random_state=1).sort_index(), seed=3))
    val_a = set(a.loc[a["split"] == "val", "image_id"])
    bigger = assign_splits(_images(n_patients=11), seed=3)
    val_b = set(bigger.loc[bigger["split"] == "val", "image_id"])
    # the draw order is a hash of (seed, patient): adding a patient never reshuffles the others
    assert len(val_a) == len(val_b) == 6 and len(val_a & val_b) >= 3


def test_at_least_one_val_patient_and_never_all():
    two = _images(n_patients=2)
    s = assign_splits(two, seed=0, val_fraction=0.05)
    assert (s["split"] == "val").sum() == 3  # one patient of 3 images
    one = _images(n_patients=1)
    assert (assign_splits(one, seed=0, val_fraction=0.5)["split"] == "val").sum() == 0


def test_optional_pannuke_val():
    s = assign_splits(_images(), seed=0, pannuke_val_fraction=0.25)
    pn_val = s[(s["split"] == "val") & s["image_id"].str.startswith("pannuke")]
    assert len(pn_val) == 2 and set(s.loc[pn_val.index, "source_split"]) <= {"fold1", "fold2"}


@pytest.mark.parametrize("frac", [-0.1, 1.0, 2])
def test_bad_fraction(frac):
    with pytest.raises(ConfigError, match="val_fraction"):
        assign_splits(_images(), val_fraction=frac)


def test_resolve_split_aliases():
    assert resolve_split("train") == ("fold1", "fold2", "train")
    assert resolve_split("test") == ("fold3", "test")
    assert resolve_split(["fold1", "val"]) == ("fold1", "val")
    with pytest.raises(ConfigError, match="unknown split"):
        resolve_split("holdout")

"""The geometry fold, RLE, rasterising and validation of proposed outlines (tiny exact cases)."""

import json

import numpy as np
import pandas as pd
import pytest

from cellcurate.curation.geometry import (
    check_polygon,
    fold_geometry,
    instance_flags,
    mask_polygon,
    mask_rle,
    polygon_mask,
    review_nucleus_id,
    rle_mask,
)
from cellcurate.datasets.ledger import EVENT_COLUMNS
from cellcurate.errors import ConfigError

from instance_flags_helper import flag_event, square


def frame(rows):
    """Events as the ledger returns them (seq from 1, JSON payloads)."""
    out = []
    for i, r in enumerate(rows, start=1):
        e = {c: None for c in EVENT_COLUMNS}
        e.update(r)
        e["seq"] = r.get("seq", i)
        if isinstance(e["payload"], dict):
            e["payload"] = json.dumps(e["payload"])
        out.append(e)
    df = pd.DataFrame(out, columns=list(EVENT_COLUMNS))
    for c in ("nucleus_id", "round", "label", "prev_label", "ref"):
        df[c] = df[c].astype("Int64")
    df["score"] = df["score"].astype(float)
    return df


def test_rle_is_coco_column_major():
    m = np.array([[0, 1], [1, 1]], bool)  # column-major: 0 1 | 1 1
    assert mask_rle(m) == {"size": [2, 2], "counts": [1, 3]}
    first = np.array([[1, 0], [0, 0]], bool)
    assert mask_rle(first) == {"size": [2, 2], "counts": [0, 1, 3]}
    m3 = np.array([[0, 0, 1], [1, 0, 1]], bool)  # F order: 0 1 | 0 0 | 1 1
    assert mask_rle(m3)["counts"] == [1, 1, 2, 2]
    for a in (m, first, m3, np.zeros((3, 2), bool), np.ones((2, 3), bool)):
        assert (rle_mask(mask_rle(a)) == a).all()


def test_rle_agrees_with_pycocotools_layout():
    """The layout COCO documents: counts of alternating 0/1 runs over the Fortran-ordered mask."""
    rng = np.random.default_rng(0)
    m = rng.random((7, 5)) > 0.6
    counts = mask_rle(m)["counts"]
    flat = m.ravel(order="F")
    rebuilt = np.concatenate([np.full(c, i % 2 == 1) for i, c in enumerate(counts)])
    assert (rebuilt == flat).all()


def test_polygon_mask_by_pixel_centres_and_back():
    poly = [[1, 0], [3, 0], [3, 2], [1, 2]]  # pixels (0,1) (0,2) (1,1) (1,2)
    m = polygon_mask(poly, (3, 4))
    assert m.astype(int).tolist() == [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    assert mask_polygon(m) == [[1.0, 0.0], [3.0, 0.0], [3.0, 2.0], [1.0, 2.0]]
    lshape = np.array([[1, 0], [1, 1]], bool)
    assert (polygon_mask(mask_polygon(lshape), (2, 2)) == lshape).all()


@pytest.mark.parametrize("poly, message", [
    ([[0, 0], [2, 2], [2, 0], [0, 2]], "invalid polygon (Self-intersection"),
    ([[3, 0], [6, 0], [6, 2], [3, 2]], "fall outside the 5x4 image"),
    ([[-1, 0], [2, 0], [2, 2]], "fall outside"),
    ([[0, 0], [0.4, 0], [0.4, 0.4]], "covers no pixel centre (empty)"),
    ([[0, 0], [1, 1]], "at least 3 vertices"),
    ([[0, 0], [1, "x"], [1, 1]], "expected a list of [x, y] pairs"),
    ([[0, 0], [1, float("nan")], [1, 1]], "must be finite"),
    ("[[0, 0], [1", "not JSON"),
])
def test_bad_polygons_are_one_line_errors(poly, message):
    with pytest.raises(ConfigError) as exc:
        check_polygon(poly, (4, 5), what="flag f1: polygon 0")
    text = str(exc.value)
    assert message in text and text.startswith("flag f1: polygon 0") and "\n" not in text


def test_check_polygon_accepts_a_closed_ring_and_returns_its_mask():
    poly, mask = check_polygon([[0, 0], [2, 0], [2, 1], [0, 1], [0, 0]], (2, 3))
    assert poly == [[0.0, 0.0], [2.0, 0.0], [2.0, 1.0], [0.0, 1.0]]
    assert mask.astype(int).tolist() == [[1, 1, 0], [0, 0, 0]]


def test_instance_flags_take_the_newest_run_of_the_newest_round():
    rows = [flag_event("img/a", "missing_annotation", n=0, k=1, run="r1", polygons=[square(0, 0, 2)]),
            flag_event("img/a", "missing_annotation", n=0, k=1, run="r2", polygons=[square(0, 0, 3)]),
            flag_event("img/a", "bad_outline", n=1, k=1, run="r2", nucleus_ids=[7], action="replace",
                       polygons=[square(1, 1, 2)], label=3),
            flag_event("img/b", "spurious_annotation", n=0, k=0, run="r9", nucleus_ids=[8], action="delete")]
    f = instance_flags(frame(rows))
    assert f["seq"].tolist() == [2, 3] and set(f["run"]) == {"r2"} and set(f["round"]) == {1}
    assert f["issue"].tolist() == ["missing_annotation", "bad_outline"]
    assert f["polygons"].iloc[0] == [square(0.0, 0.0, 3.0)]
    assert f["nucleus_ids"].tolist() == [[], [7]] and f["label"].tolist() == [0, 3]
    assert f["nucleus_id"].iloc[1] == 7 and pd.isna(f["nucleus_id"].iloc[0])
    rows.append(flag_event("img/a", "merged", n=0, k=2, run="r3", nucleus_ids=[7, 8], action="split"))
    f2 = instance_flags(frame(rows))
    assert f2["seq"].tolist() == [5] and f2["flag_id"].iloc[0].startswith("i2-")
    assert instance_flags(frame([{"kind": "ingest", "nucleus_id": 1, "actor": "x"}])).empty


def geo(action, nid, *, actor="ana", ref=None, label=None, poly=None, shape=(6, 6), image="img/a", flag="f"):
    payload = {"flag_id": flag, "image_id": image, "origin": "review", "group": f"g{nid}{action}"}
    if poly is not None:
        payload["polygon"] = poly
        payload["rle"] = mask_rle(polygon_mask(poly, shape))
    return {"kind": "geometry", "nucleus_id": nid, "actor": actor, "action": action, "ref": ref, "label": label,
            "payload": payload}


def test_fold_with_undo_and_latest_wins():
    ingest = {1: 1, 2: 2}
    rows = [{"kind": "ingest", "nucleus_id": 1, "actor": "i"}, {"kind": "ingest", "nucleus_id": 2, "actor": "i"},
            geo("add", 100, label=3, poly=square(4, 4, 2)),       # 3
            geo("delete", 1),                                      # 4
            geo("replace", 2, poly=square(0, 4, 2)),               # 5
            {**geo("undo", 1), "ref": 4},                          # 6: undoes the delete
            geo("keep", 2, flag="f2"),                             # 7
            {**geo("undo", 2, actor="bob"), "ref": 5}]             # 8: bob cannot undo ana's replace
    f = fold_geometry(frame(rows), ingest_seq=ingest)
    assert f.changes[["nucleus_id", "change", "label", "seq"]].values.tolist() == [[100, "added", 3, 3],
                                                                                   [2, "replaced", 0, 5]]
    assert f.counts() == {"added": 1, "deleted": 0, "replaced": 1} and f.decided_flags == {"f", "f2"}
    rows.append(geo("delete", 100))  # an added nucleus deleted again: gone, no change left
    rows.append(geo("delete", 1))
    f = fold_geometry(frame(rows), ingest_seq=ingest)
    assert f.changes[["nucleus_id", "change"]].values.tolist() == [[2, "replaced"], [1, "deleted"]]
    stale = fold_geometry(frame(rows), ingest_seq={1: 100, 2: 100})  # re-ingested after every edit
    assert stale.empty


def test_paint_clears_redraws_and_adds_with_new_instance_ids():
    ins = np.zeros((6, 6), np.int32)
    ins[0:2, 0:2] = 1
    ins[0:2, 3:5] = 2
    nuc = pd.DataFrame({"nucleus_id": [11, 22], "instance_id": [1, 2], "kind": ["nucleus", "nucleus"]})
    rows = [geo("delete", 11), geo("replace", 22, poly=square(3, 0, 3)), geo("add", 99, label=4, poly=square(0, 4, 2))]
    f = fold_geometry(frame(rows), ingest_seq={11: 0, 22: 0})
    out, table = f.paint("img/a", ins, nuc)
    want = np.zeros((6, 6), np.int32)
    want[0:3, 3:6] = 2
    want[4:6, 0:2] = 3
    assert (out == want).all() and (ins[0:2, 0:2] == 1).all()  # the input is not changed
    t = table.set_index("nucleus_id")
    assert sorted(t.index) == [22, 99]
    assert t.loc[99, ["instance_id", "origin", "change", "label", "area"]].tolist() == [3, "review", "added", 4, 4]
    assert t.loc[22, ["bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "area", "origin"]].tolist() == [0, 3, 3, 6, 9,
                                                                                                   "ingest"]
    assert t.loc[99, "centroid_y"] == 4.5 and t.loc[99, "centroid_x"] == 0.5


def test_a_later_outline_wins_and_a_nucleus_painted_over_is_gone():
    ins = np.zeros((4, 4), np.int32)
    ins[1:3, 1:3] = 1
    nuc = pd.DataFrame({"nucleus_id": [5], "instance_id": [1], "kind": ["nucleus"]})
    rows = [geo("add", 70, poly=square(0, 0, 4), shape=(4, 4))]
    out, table = fold_geometry(frame(rows), ingest_seq={5: 0}).paint("img/a", ins, nuc)
    assert (out == 2).all() and table["nucleus_id"].tolist() == [70]


def test_review_ids_are_stable_and_avoid_taken_ids():
    a = review_nucleus_id("img/a", "i1-abc-0|0")
    assert a == review_nucleus_id("img/a", "i1-abc-0|0") and 0 < a < 2**63
    assert review_nucleus_id("img/b", "i1-abc-0|0") != a
    b = review_nucleus_id("img/a", "i1-abc-0|0", {a})
    assert b != a and b == review_nucleus_id("img/a", "i1-abc-0|0", {a})

"""Geometry decisions: add, delete, replace, keep and undo as ledger events; the instance queue;
validation before anything is written; a decision survives SIGKILL and is in the next export/release."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cellcurate.curation.geometry import mask_rle, polygon_mask, rle_mask, store_geometry
from cellcurate.curation.geometry_review import (
    GeometrySession,
    decide_flag,
    geometry_events,
    instance_queue,
    undo_last,
)
from cellcurate.datasets.store import Store
from cellcurate.errors import ConfigError, StateError
from cellcurate.napari_plugin.sample import write_disc_store

from instance_flags_helper import flag_event, square, write_instance_flags

FREE = square(28, 0, 4)  # no disc reaches y < 4: 16 free pixels at x 28..31, y 0..3


def first_image(store):
    return str(store.images()["image_id"].iloc[0])


def nuclei_of(store, image_id):
    nuc = store.nuclei()
    return nuc[nuc["image_id"] == image_id].sort_values("instance_id").reset_index(drop=True)


@pytest.fixture()
def store(tmp_path):
    s = write_disc_store(tmp_path / "s", n_images=2, per_image=4, size=64, seed=5)
    img = first_image(s)
    nuc = nuclei_of(s, img)
    a, b = int(nuc.at[0, "nucleus_id"]), int(nuc.at[1, "nucleus_id"])
    bx, by = int(nuc.at[1, "bbox_x0"]), int(nuc.at[1, "bbox_y0"])
    write_instance_flags(s, [
        flag_event(img, "missing_annotation", n=0, polygons=[FREE], label=2, score=0.95),
        flag_event(img, "spurious_annotation", n=1, nucleus_ids=[a], action="delete", score=0.6),
        flag_event(img, "bad_outline", n=2, nucleus_ids=[b], action="replace", polygons=[square(bx, by, 3)],
                   score=0.8),
    ])
    yield s
    s.close()


def geo_events(store):
    return store.ledger.events(kinds=("geometry",), parse_payload=True)


def test_queue_orders_by_score_and_each_decision_is_one_event_with_polygon_and_rle(store):
    q = instance_queue(store, reviewer="ana")
    assert q["issue"].tolist() == ["missing_annotation", "bad_outline", "spurious_annotation"]
    assert q["rank"].tolist() == [0, 1, 2] and not q["decided"].any()
    d = decide_flag(store, q.iloc[0].to_dict(), "accept", reviewer="ana")
    ev = geo_events(store).iloc[-1]
    assert (ev["action"], ev["actor"], int(ev["ref"]), int(ev["label"])) == ("add", "ana", int(q.at[0, "seq"]), 2)
    p = ev["payload"]
    assert p["flag_id"] == q.at[0, "flag_id"] and p["origin"] == "review" and p["polygon"] == FREE
    h, w = 64, 64
    assert p["rle"]["size"] == [h, w] and rle_mask(p["rle"]).sum() == 16
    assert (rle_mask(p["rle"]) == polygon_mask(FREE, (h, w))).all()
    assert int(ev["nucleus_id"]) == d.nucleus_ids[0] and d.nucleus_ids[0] not in set(store.nuclei()["nucleus_id"])
    q2 = instance_queue(store, reviewer="ana")
    assert q2["decided"].tolist() == [False, False, True] and q2.at[2, "flag_id"] == q.at[0, "flag_id"]
    assert instance_queue(store, reviewer="bob")["decided"].sum() == 0


def test_the_added_id_is_the_same_in_two_stores_replaying_the_same_flags(tmp_path, store):
    other = write_disc_store(tmp_path / "t", n_images=2, per_image=4, size=64, seed=5)
    write_instance_flags(other, [flag_event(first_image(other), "missing_annotation", n=0, polygons=[FREE],
                                            label=2, score=0.95)])
    a = decide_flag(store, instance_queue(store).iloc[0].to_dict(), "add", reviewer="ana")
    b = decide_flag(other, instance_queue(other).iloc[0].to_dict(), "add", reviewer="zoe")
    assert a.nucleus_ids == b.nucleus_ids
    other.close()


def test_delete_replace_keep_and_undo_fold(store):
    q = instance_queue(store).set_index("issue")
    img = first_image(store)
    nuc = nuclei_of(store, img)
    a, b = int(nuc.at[0, "nucleus_id"]), int(nuc.at[1, "nucleus_id"])
    decide_flag(store, q.loc["spurious_annotation"].to_dict(), "accept", reviewer="ana")
    decide_flag(store, q.loc["bad_outline"].to_dict(), "accept", reviewer="ana")
    decide_flag(store, q.loc["missing_annotation"].to_dict(), "keep", reviewer="ana")
    ch = store_geometry(store).changes
    assert ch[["nucleus_id", "change"]].values.tolist() == [[a, "deleted"], [b, "replaced"]]
    assert rle_mask(ch.iloc[1]["rle"]).sum() == 9
    assert [e for e in geo_events(store)["action"]] == ["delete", "replace", "keep"]
    with pytest.raises(StateError, match="bob has no geometry decision to undo"):
        undo_last(store, "bob")
    undo_last(store, "ana")  # the keep
    undo_last(store, "ana")  # the replace
    ch = store_geometry(store).changes
    assert ch[["nucleus_id", "change"]].values.tolist() == [[a, "deleted"]]
    ev = geo_events(store)
    assert ev["action"].tolist()[-2:] == ["undo", "undo"] and int(ev["ref"].iloc[-1]) == int(ev["seq"].iloc[1])
    assert instance_queue(store, reviewer="ana")["decided"].tolist() == [False, False, True]
    with pytest.raises(StateError, match=f"nucleus {a} is not in image"):
        decide_flag(store, q.loc["spurious_annotation"].to_dict(), "delete", reviewer="bob")
    kept = decide_flag(store, q.loc["spurious_annotation"].to_dict(), "keep", reviewer="bob")  # keep touches nothing
    assert kept.actions == ["keep"] and store_geometry(store).counts()["deleted"] == 1


@pytest.mark.parametrize("decision, kw, message", [
    ("add", {"polygons": [square(60, 60, 8)]}, "fall outside the 64x64 image"),
    ("add", {"polygons": [[[30, 0], [32, 2], [32, 0], [30, 2]]]}, "Self-intersection"),
    ("add", {"polygons": [[[30, 0], [30.3, 0], [30.3, 0.3]]]}, "covers no pixel centre"),
    ("replace", {"nucleus_ids": []}, "no annotated nucleus to replace"),
    ("accept", {"label": "no such class"}, "no such class"),
    ("merge", {}, "unknown geometry decision 'merge'"),
])
def test_bad_decisions_write_nothing(store, decision, kw, message):
    flag = instance_queue(store).iloc[0].to_dict()  # missing_annotation
    before = store.ledger.count()
    with pytest.raises((ConfigError, StateError)) as exc:
        decide_flag(store, flag, decision, reviewer="ana", **kw)
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert store.ledger.count() == before


def test_edit_without_a_flag_and_a_split_accept(store, tmp_path):
    img = first_image(store)
    nuc = nuclei_of(store, img)
    c = int(nuc.at[2, "nucleus_id"])
    ev = geometry_events(store, None, "add", reviewer="ana", image_id=img, polygons=[square(0, 0, 3)], label=5)
    assert ev[0]["ref"] is None and ev[0]["payload"]["flag_id"] is None and ev[0]["label"] == 5
    write_instance_flags(store, [flag_event(img, "merged", n=9, nucleus_ids=[c], action="split",
                                            polygons=[square(28, 0, 2), square(30, 0, 2)], score=0.99)])
    flag = instance_queue(store).iloc[0].to_dict()
    d = decide_flag(store, flag, "accept", reviewer="ana")
    assert d.actions == ["replace", "add"] and d.nucleus_ids[0] == c
    groups = {p["group"] for p in geo_events(store)["payload"].iloc[-2:]}
    assert len(groups) == 1
    undo_last(store, "ana")
    assert store_geometry(store).empty


def test_session_keys_path_and_context(store):
    s = GeometrySession(store, reviewer="ana", window=32)
    first = s.current()
    assert first["issue"] == "missing_annotation"
    ctx = s.context()
    assert ctx.image.shape == (32, 32, 3) and ctx.proposed.sum() == 16 and set(np.unique(ctx.proposed)) == {0, 1}
    s.set_label(4)
    d = s.act("add")
    assert d.actions == ["add"] and int(geo_events(store)["label"].iloc[-1]) == 4 and s.label is None
    assert s.current()["issue"] == "bad_outline"
    ctx = s.context()
    assert (ctx.annotated == 2).any() and (ctx.annotated == 1).any()
    s.undo()
    assert s.current()["flag_id"] == first["flag_id"]
    s.act("keep")
    s.act("replace")
    s.act("delete")
    assert s.done and s.progress() == (3, 3)
    s.close()


def test_sigkill_right_after_a_geometry_decision(store, tmp_path):
    script = textwrap.dedent(f"""
        import time
        from cellcurate.curation.geometry_review import GeometrySession
        from cellcurate.datasets.store import Store
        s = GeometrySession(Store.open({str(store.path)!r}, mode="a"), reviewer="ana")
        d = s.act("accept")
        print(d.seqs[0], d.nucleus_ids[0], flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    seq, nid = (int(x) for x in line.split())
    again = Store.open(store.path, mode="r")
    ev = again.ledger.events(kinds=("geometry",))
    assert ev["seq"].tolist() == [seq] and int(ev["nucleus_id"].iloc[0]) == nid
    assert again.ledger.verify_chain() == []
    # in the next QuPath export (read back with geojson-pydantic) and in the next release
    from geojson_pydantic import FeatureCollection

    from cellcurate.curation.qupath import export_qupath
    from cellcurate.curation.release import export_release, verify_release

    res = export_qupath(again, tmp_path / "qp", progress=False, image_ids=[first_image(again)])
    fc = FeatureCollection.model_validate(json.loads(res.files[0].read_text()))
    ids = [f.properties["metadata"]["nucleus_id"] for f in fc.features]
    assert str(nid) in ids
    added = next(f for f in fc.features if f.properties["metadata"]["nucleus_id"] == str(nid))
    assert [list(map(float, p)) for p in added.geometry.coordinates[0]] == FREE + [FREE[0]]
    rel = export_release(again, "v1", out=tmp_path / "rel", progress=False, allow_unreviewed=True)
    assert verify_release(rel.path) == []
    import pyarrow.parquet as pq

    t = pq.read_table(rel.path / "nuclei.parquet").to_pandas().set_index("nucleus_id")
    assert t.at[nid, "origin_file"] == "review" and t.at[nid, "area"] == 16
    again.close()


def test_rle_of_the_event_matches_the_polygon(store):
    flag = instance_queue(store).iloc[0].to_dict()
    ev = geometry_events(store, flag, "accept", reviewer="ana")[0]
    assert ev["payload"]["rle"] == mask_rle(polygon_mask(FREE, (64, 64)))

"""Instance flags reviewed in QuPath: the review GeoJSON (checked with geojson-pydantic), decisions
by class and by drawing, and the round trip of geometry decisions through QuPath GeoJSON."""

from __future__ import annotations

import json

import pytest

from cellcurate.curation.geometry import polygon_mask, store_geometry
from cellcurate.curation.geometry_qupath import export_review_geojson
from cellcurate.curation.geometry_review import instance_queue
from cellcurate.curation.qupath import export_qupath, import_geojson, read_geojson
from cellcurate.errors import InputFormatError
from cellcurate.napari_plugin.sample import write_disc_store

from instance_flags_helper import flag_event, square, write_instance_flags

FREE = square(28, 0, 4)


@pytest.fixture()
def store(tmp_path):
    s = write_disc_store(tmp_path / "s", n_images=2, per_image=4, size=64, seed=5)
    img = str(s.images()["image_id"].iloc[0])
    nuc = s.nuclei()
    nuc = nuc[nuc["image_id"] == img].sort_values("instance_id").reset_index(drop=True)
    a, b = int(nuc.at[0, "nucleus_id"]), int(nuc.at[1, "nucleus_id"])
    bx, by = int(nuc.at[1, "bbox_x0"]), int(nuc.at[1, "bbox_y0"])
    write_instance_flags(s, [
        flag_event(img, "missing_annotation", n=0, polygons=[FREE], label=2, score=0.95),
        flag_event(img, "spurious_annotation", n=1, nucleus_ids=[a], action="delete", score=0.6),
        flag_event(img, "bad_outline", n=2, nucleus_ids=[b], action="replace", polygons=[square(bx, by, 3)],
                   score=0.8),
    ])
    s.test_ids = {"image": img, "a": a, "b": b, "c": int(nuc.at[2, "nucleus_id"])}
    yield s
    s.close()


def features(path):
    return json.loads(path.read_text())["features"]


def write(path, feats):
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def test_review_file_is_valid_geojson_with_the_proposals(store, tmp_path):
    from geojson_pydantic import FeatureCollection

    files, n = export_review_geojson(store, tmp_path / "review")
    assert len(files) == 1 and n == 3
    fc = FeatureCollection.model_validate(json.loads(files[0].read_text()))
    props = [f for f in fc.features if f.properties["metadata"].get("role") == "proposed"]
    assert sorted(f.properties["classification"]["name"] for f in props) == [
        "Proposed: add", "Proposed: delete", "Proposed: replace"]
    add = next(f for f in props if f.properties["metadata"]["proposed_action"] == "add")
    assert [list(map(float, p)) for p in add.geometry.coordinates[0]] == FREE + [FREE[0]]
    assert len(fc.features) == 3 + 4  # the image's 4 nuclei and the 3 proposals


def test_decisions_come_back_from_qupath_and_round_trip(store, tmp_path):
    ids = store.test_ids
    (path,) = export_review_geojson(store, tmp_path / "review")[0]
    feats = features(path)
    cname = store.taxonomy.class_name(3)
    drawn = square(40, 0, 3)  # the outline of nucleus c, redrawn in QuPath
    out = []
    for f in feats:
        meta = f["properties"].get("metadata", {})
        if meta.get("role") == "proposed":
            act = meta["proposed_action"]
            f["properties"]["classification"]["name"] = {"add": f"Accept: {cname}", "replace": "Keep",
                                                         "delete": "Proposed: delete"}[act]
        elif meta.get("nucleus_id") == str(ids["a"]):
            continue  # deleted in QuPath
        elif meta.get("nucleus_id") == str(ids["c"]):
            f["geometry"] = {"type": "Polygon", "coordinates": [drawn + [drawn[0]]]}
        out.append(f)
    write(path, out)

    plain = import_geojson(store, [path], reviewer="qp", dry_run=True)
    reasons = plain.not_applied["reason"].tolist()
    assert sum(r.startswith("proposal") for r in reasons) == 3 and any(r.startswith("deleted") for r in reasons)
    assert any(r.startswith("outline moved") for r in reasons) and plain.geometry.empty

    res = import_geojson(store, [path], reviewer="qp", geometry=True)
    assert res.applied and res.decisions.empty
    got = sorted((e["action"], e["payload"]["flag_id"] is not None) for e in res.geometry.to_dict("records"))
    assert got == [("add", True), ("delete", True), ("keep", True), ("replace", False)]
    add = res.geometry[res.geometry["action"] == "add"].iloc[0]
    assert int(add["label"]) == 3
    assert instance_queue(store, reviewer="qupath:qp")["decided"].all()
    ch = store_geometry(store).changes.set_index("nucleus_id")
    assert ch.at[ids["a"], "change"] == "deleted" and ch.at[ids["c"], "change"] == "replaced"
    assert ch.at[ids["c"], "polygon"] == drawn

    # the next export has the decisions; QuPath's file read back (shapely) rasterises to them
    res2 = export_qupath(store, tmp_path / "qp", progress=False, image_ids=[ids["image"]])
    back = read_geojson(res2.files[0]).set_index("nucleus_id")
    assert str(ids["a"]) not in back.index
    new_id = str(int(add["nucleus_id"]))
    assert back.at[new_id, "class_name"] == cname
    assert (polygon_mask(back.at[new_id, "geometry"], (64, 64)) == polygon_mask(FREE, (64, 64))).all()
    assert (polygon_mask(back.at[str(ids["c"]), "geometry"], (64, 64)) == polygon_mask(drawn, (64, 64))).all()
    # and round-trips: importing it back unchanged appends nothing, with or without --geometry
    n = store.ledger.count()
    for geo in (False, True):
        again = import_geojson(store, res2.files, reviewer="qp", geometry=geo)
        assert again.decisions.empty and again.geometry.empty and not again.applied
        assert again.not_applied.empty, again.not_applied
    assert store.ledger.count() == n


def test_an_edited_proposal_is_accepted_with_the_drawn_outline(store, tmp_path):
    (path,) = export_review_geojson(store, tmp_path / "review")[0]
    feats = features(path)
    drawn = square(27, 0, 5)
    for f in feats:
        if f["properties"].get("metadata", {}).get("proposed_action") == "add":
            f["geometry"] = {"type": "Polygon", "coordinates": [drawn + [drawn[0]]]}
    write(path, feats)
    res = import_geojson(store, [path], reviewer="qp", geometry=True)
    assert res.geometry["action"].tolist() == ["add"]
    assert res.geometry.iloc[0]["payload"]["polygon"] == drawn


@pytest.mark.parametrize("edit, message", [
    (lambda f: f["properties"]["classification"].update(name="Maybe"), "a proposal's class must be Accept"),
    (lambda f: f["properties"]["classification"].update(name="Accept: Nope"), "unknown class 'Nope'"),
    (lambda f: f.update(geometry={"type": "Polygon", "coordinates": [[[30, 0], [32, 2], [32, 0], [30, 2], [30, 0]]]}),
     "invalid polygon"),
    (lambda f: f["properties"]["metadata"].update(flag_id="i9-xxxxxxxx-0"), "not a flag of the newest instance run"),
])
def test_bad_review_files_append_nothing(store, tmp_path, edit, message):
    (path,) = export_review_geojson(store, tmp_path / "review")[0]
    feats = features(path)
    for f in feats:
        if f["properties"].get("metadata", {}).get("proposed_action") == "add":
            edit(f)
    write(path, feats)
    n = store.ledger.count()
    with pytest.raises(InputFormatError) as exc:
        import_geojson(store, [path], reviewer="qp", geometry=True)
    assert message in str(exc.value) and str(exc.value).startswith(str(path)) and "\n" not in str(exc.value)
    assert store.ledger.count() == n


def test_a_class_edit_in_qupath_on_an_added_nucleus_reaches_the_release(store, tmp_path):
    import pyarrow.parquet as pq

    from cellcurate.curation.geometry_review import decide_flag
    from cellcurate.curation.release import export_release, verify_release
    from cellcurate.datasets.checks import verify_store

    d = decide_flag(store, instance_queue(store).iloc[0].to_dict(), "add", reviewer="ana")  # class 2 (predicted)
    nid = str(d.nucleus_ids[0])
    res = export_qupath(store, tmp_path / "qp", progress=False, image_ids=[store.test_ids["image"]])
    feats = features(res.files[0])
    new = store.taxonomy.class_name(5)
    for f in feats:
        if f["properties"]["metadata"]["nucleus_id"] == nid:
            f["properties"]["classification"]["name"] = new
    write(res.files[0], feats)
    back = import_geojson(store, res.files, reviewer="qp")
    assert back.decisions["nucleus_id"].tolist() == [int(nid)] and back.decisions["label"].tolist() == [5]
    assert verify_store(store, progress=False).ok
    rel = export_release(store, "v1", out=tmp_path / "rel", progress=False, allow_unreviewed=True)
    assert verify_release(rel.path) == []
    t = pq.read_table(rel.path / "nuclei.parquet").to_pandas().set_index("nucleus_id")
    assert t.at[int(nid), "class_value"] == 5 and t.at[int(nid), "decided_by"] == "qupath:qp"

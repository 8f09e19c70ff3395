"""QuPath GeoJSON: export, the real PUMA fixture, round trip, and bad input (nothing applied)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest

from cellcurate.errors import InputFormatError
from test_release_export import add_round, build_test_store


@pytest.fixture()
def store(tmp_path):
    s = build_test_store(tmp_path / "store")
    add_round(s, flag_unreviewed=False)
    yield s
    s.close()


def _labels(store):
    from cellcurate.curation.release import fold_current_labels

    return fold_current_labels(store).set_index("nucleus_id")["label"].sort_index()


# -- tiny exact cases -------------------------------------------------------------------------------
def test_mask_to_geometry_traces_pixel_edges_and_keeps_holes():
    from cellcurate.curation.qupath import geometry_mask, mask_to_geometry

    m = np.zeros((5, 5), bool)
    m[1:4, 1:4] = True
    m[2, 2] = False  # a one-pixel hole
    g = mask_to_geometry(m, offset=(10, 20))
    assert g.geom_type == "Polygon" and g.is_valid and len(g.interiors) == 1
    assert g.area == 8 and g.bounds == (21.0, 11.0, 24.0, 14.0)
    back = geometry_mask(g, (20, 30), window=(10, 20, 15, 25))
    assert np.array_equal(back, m)
    two = np.zeros((3, 5), bool)
    two[1, 0] = two[1, 4] = True
    assert mask_to_geometry(two).geom_type == "MultiPolygon"


def test_real_puma_fixture_counts(fixtures_dir):
    from cellcurate.curation.qupath import read_geojson

    df = read_geojson(fixtures_dir / "qupath" / "puma_roi_102_nuclei.geojson")
    assert len(df) == 302
    assert df["class_name"].value_counts().to_dict() == {"nuclei_tumor": 192, "nuclei_apoptosis": 110}
    assert (df["n_holes"] > 0).sum() == 2
    holed = df[df["n_holes"] > 0]
    assert (holed["area"] < holed["geometry"].map(lambda g: g.convex_hull.area)).all()
    assert set(df["object_type"]) == {"annotation"} and df["geometry_type"].eq("Polygon").all()


def test_export_geojson_structure(store, tmp_path):
    from cellcurate.curation.qupath import export_qupath, feature_uuid

    res = export_qupath(store, tmp_path / "qp", progress=False)
    assert len(res.files) == len(store.images()) and res.n_features == len(store.nuclei())
    data = json.loads(next(p for p in res.files if "pannuke__fold1" in p.name).read_text())
    assert data["type"] == "FeatureCollection"
    f = next(f for f in data["features"] if f["properties"].get("classification", {}).get("name") == "Lymphocyte")
    p = f["properties"]
    assert p["objectType"] == "detection"
    assert p["classification"]["color"] == list(store.taxonomy.classes[1].rgb)
    assert f["id"] == feature_uuid(int(p["metadata"]["nucleus_id"]))
    assert p["measurements"]["area_px"] > 0 and p["measurements"]["prob_Lymphocyte"] == pytest.approx(0.8)
    assert p["metadata"]["status"] == "auto_accepted"
    ring = f["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) >= 4
    import shapely

    for feat in data["features"]:
        assert shapely.geometry.shape(feat["geometry"]).is_valid


def test_round_trip_is_exact_and_an_edit_becomes_a_decision(store, tmp_path):
    from cellcurate.curation.qupath import export_qupath, import_geojson

    before = _labels(store)
    n_events = store.ledger.count()
    res = export_qupath(store, tmp_path / "qp", progress=False)
    imp = import_geojson(store, res.files, reviewer="carol")
    assert imp.decisions.empty and store.ledger.count() == n_events
    assert _labels(store).equals(before)
    assert imp.per_file["unmatched"].sum() == 0

    # edit one Connective nucleus to Macrophage in the JSON (and drop its nucleus id: overlap match)
    path = next(p for p in res.files if "pannuke__fold1__00000" in p.name)
    data = json.loads(path.read_text())
    f = next(f for f in data["features"] if f["properties"].get("classification", {}).get("name") == "Connective")
    nid = int(f["properties"]["metadata"].pop("nucleus_id"))
    f["properties"]["classification"] = {"name": "macrophage", "color": [0, 0, 0]}
    path.write_text(json.dumps(data))
    imp = import_geojson(store, res.files, reviewer="carol")
    assert len(imp.decisions) == 1
    d = store.ledger.events(kinds=["decision"]).iloc[-1]
    assert (int(d["nucleus_id"]), int(d["label"]), int(d["prev_label"]), d["actor"]) == (nid, 6, 3, "qupath:carol")
    assert json.loads(d["payload"])["source"] == "qupath"
    after = _labels(store)
    assert after[nid] == 6 and (after.drop(nid) == before.drop(nid)).all()


def test_gzip_export_and_release_source(store, tmp_path):
    from cellcurate.curation.qupath import export_qupath, import_geojson, read_geojson
    from cellcurate.curation.release import export_release

    rel = export_release(store, "v1", out=tmp_path / "rel", progress=False).path
    res = export_qupath(rel, tmp_path / "qp", compress=True, object_type="cell", progress=False)
    assert all(p.name.endswith(".geojson.gz") for p in res.files)
    df = read_geojson(res.files[0])
    assert set(df["object_type"]) == {"cell"} and df["nucleus_id"].notna().all()
    assert import_geojson(store, res.files).decisions.empty


def _fc(features):
    return {"type": "FeatureCollection", "features": features}


def _feat(coords, name="Lymphocyte", gtype="Polygon"):
    return {"type": "Feature", "id": "x", "geometry": {"type": gtype, "coordinates": coords},
            "properties": {"objectType": "detection", "classification": {"name": name, "color": [1, 2, 3]}}}


SQUARE = [[[4, 4], [12, 4], [12, 12], [4, 12], [4, 4]]]
BAD_CASES = [
    ("unknown class", json.dumps(_fc([_feat(SQUARE, "Mitosis")])), "feature 0 (id x): unknown class 'Mitosis'"),
    ("point", json.dumps(_fc([_feat([5, 5], gtype="Point")])), "feature 0 (id x): geometry type 'Point' is not a Polygon"),
    ("outside", json.dumps(_fc([_feat([[[40, 4], [60, 4], [60, 12], [40, 12], [40, 4]]])])), "fall outside image"),
    ("invalid json", '{"type": "FeatureCollection", "features": [', "not valid JSON"),
    ("short ring", json.dumps(_fc([_feat([[[1, 1], [2, 2], [1, 1]]])])), "feature 0 (id x): bad Polygon coordinates"),
]


@pytest.mark.parametrize("case, text, message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_geojson_is_one_line_error_and_nothing_applied(store, tmp_path, case, text, message):
    from cellcurate.curation.qupath import import_geojson

    good = tmp_path / "good.geojson"
    good.write_text(json.dumps(_fc([_feat(SQUARE, "Macrophage")])))
    bad = tmp_path / "bad.geojson"
    bad.write_text(text)
    n = store.ledger.count()
    image = "pannuke/fold1/00000"
    with pytest.raises(InputFormatError) as info:
        import_geojson(store, [good, bad], images=[image, image])
    msg = str(info.value)
    assert message in msg and "\n" not in msg and msg.startswith(str(bad))
    assert store.ledger.count() == n


def test_class_map_for_foreign_names(store, tmp_path):
    from cellcurate.curation.qupath import import_geojson

    nuc = store.nuclei().query("image_id == 'pannuke/fold1/00000' and instance_id == 1").iloc[0]
    y0, x0, y1, x1 = int(nuc.bbox_y0), int(nuc.bbox_x0), int(nuc.bbox_y1), int(nuc.bbox_x1)
    ins = store.read_instances("pannuke/fold1/00000")
    from cellcurate.curation.qupath import mask_to_geometry

    geom = mask_to_geometry(ins[y0:y1, x0:x1] == 1, offset=(y0, x0))
    coords = [[list(c) for c in geom.exterior.coords]]
    p = tmp_path / "foreign.geojson"
    p.write_text(json.dumps(_fc([_feat(coords, "nuclei_tumor")])))
    with pytest.raises(InputFormatError, match="unknown class 'nuclei_tumor'"):
        import_geojson(store, [p], images=["pannuke/fold1/00000"])
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"nuclei_tumor": "Neoplastic", "nuclei_apoptosis": "Dead"}))
    res = import_geojson(store, [p], images=["pannuke/fold1/00000"], class_map=cmap, dry_run=True)
    assert res.per_file["matched"].tolist() == [1] and res.class_counts == {"Neoplastic": 1}


def test_write_geojson_from_frame(tmp_path):
    import shapely

    from cellcurate.curation.qupath import read_geojson, write_geojson

    frame = pd.DataFrame({"geometry": [shapely.box(0, 0, 4, 4), shapely.box(5, 5, 9, 7)],
                          "class_name": ["Neoplastic", None], "color": ["#ff0000", None],
                          "measurements": [{"area": 16.0}, {"area": 8.0}]})
    out = write_geojson(tmp_path / "pred.geojson.gz", frame)
    with gzip.open(out, "rt") as fh:
        assert json.load(fh)["type"] == "FeatureCollection"
    df = read_geojson(out)
    assert df["class_name"].tolist()[0] == "Neoplastic" and df["area"].tolist() == [16.0, 8.0]


def test_cli_export_and_ingest_qupath(store, tmp_path):
    from click.testing import CliRunner

    from cellcurate.cli.export_qupath import command as export_cmd
    from cellcurate.cli.ingest_qupath import command as ingest_cmd

    path = store.path
    store.close()
    runner = CliRunner()
    r = runner.invoke(export_cmd, [str(path), "--out", str(tmp_path / "qp")])
    assert r.exit_code == 0, r.output
    files = sorted(str(p) for p in (tmp_path / "qp").glob("*.geojson"))
    r = runner.invoke(ingest_cmd, [*files, "--store", str(path), "--reviewer", "dan"])
    assert r.exit_code == 0 and "appended 0 decisions" in r.output, r.output


# -- untrusted input: limits and validity (issue 17) ---------------------------------------------
BOWTIE = [[[4, 4], [12, 12], [12, 4], [4, 12], [4, 4]]]


def _import_one(store, tmp_path, name, data: bytes, **kw):
    from cellcurate.curation.qupath import import_geojson

    p = tmp_path / name
    p.write_bytes(data)
    return p, lambda: import_geojson(store, [p], images=["pannuke/fold1/00000"], **kw)


def test_bow_tie_polygon_is_refused_naming_file_feature_and_reason(store, tmp_path):
    text = json.dumps(_fc([_feat(SQUARE, "Macrophage"), {**_feat(BOWTIE, "Macrophage"), "id": "bow"}]))
    p, run = _import_one(store, tmp_path, "bowtie.geojson", text.encode())
    n = store.ledger.count()
    with pytest.raises(InputFormatError) as info:
        run()
    msg = str(info.value)
    assert msg.startswith(str(p)) and "feature 1 (id bow): invalid polygon (Self-intersection[8 8])" in msg
    assert "\n" not in msg and store.ledger.count() == n


def test_deeply_nested_json_is_a_one_line_error_not_a_recursion(store, tmp_path):
    p, run = _import_one(store, tmp_path, "deep.geojson", b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(InputFormatError) as info:
        run()
    assert str(info.value).startswith(str(p)) and "nested more than 64 levels deep" in str(info.value)
    # brackets inside strings do not count; a normal file is not refused
    from cellcurate.curation.qupath import _check_depth

    _check_depth(p, json.dumps({"a": "[" * 1000, "b": [[1]]}).encode(), 64)
    # depth hidden from the fast bracket count by a string of closing brackets: the parser's
    # RecursionError is caught and becomes the same one-line error
    p, run = _import_one(store, tmp_path, "hidden.geojson",
                         b'["' + b"]" * 100_000 + b'",' + b"[" * 100_000 + b"]" * 100_000 + b"]")
    with pytest.raises(InputFormatError, match="nested too deeply to parse"):
        run()


def test_gzip_bomb_stops_at_the_decompressed_size_limit(store, tmp_path):
    import zlib

    # 64 MiB of zeros gzip to ~64 KiB; with a 1 MiB limit the reader stops after 2 steps
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (1 << 20)
    data = b"".join(comp.compress(block) for _ in range(64)) + comp.flush()
    assert len(data) < 200_000
    p, run = _import_one(store, tmp_path, "bomb.geojson.gz", data, max_bytes=1 << 20)
    with pytest.raises(InputFormatError) as info:
        run()
    assert str(info.value).startswith(str(p)) and "decompresses to more than 1,048,576 bytes" in str(info.value)


def test_feature_count_limit_and_huge_integer(store, tmp_path):
    text = json.dumps(_fc([_feat(SQUARE, "Macrophage")] * 3))
    _p, run = _import_one(store, tmp_path, "many.geojson", text.encode(), max_features=2)
    with pytest.raises(InputFormatError, match="holds 3 features, more than the limit of 2"):
        run()
    _p, run = _import_one(store, tmp_path, "bigint.geojson", b'{"type": "FeatureCollection", "features": [' +
                         b"1" * 5000 + b"]}")
    with pytest.raises(InputFormatError, match="not valid JSON"):
        run()


def test_bad_gzip_is_a_one_line_error(store, tmp_path):
    data = gzip.compress(json.dumps(_fc([_feat(SQUARE)])).encode())[:-12]  # truncated
    p, run = _import_one(store, tmp_path, "cut.geojson.gz", data)
    with pytest.raises(InputFormatError) as info:
        run()
    assert str(info.value).startswith(str(p)) and "gzip" in str(info.value)


# -- export carries what import needs; cells have nuclei (issue 12) --------------------------------
def test_cell_export_has_nucleus_geometry_and_validates_with_geojson_pydantic(store, tmp_path):
    gp = pytest.importorskip("geojson_pydantic")
    import shapely

    from cellcurate.curation.qupath import export_qupath

    res = export_qupath(store, tmp_path / "qp", object_type="cell", progress=False)
    seq = store.ledger.head()[0]
    for f in res.files:
        data = json.loads(f.read_text())
        fc = gp.FeatureCollection.model_validate(data)  # an independent GeoJSON reader
        assert len(fc.features) == len(data["features"])
        for feat in data["features"]:
            assert feat["properties"]["objectType"] == "cell"
            nuc = shapely.geometry.shape(feat["nucleusGeometry"])
            assert nuc.is_valid and nuc.area == feat["properties"]["measurements"]["area_px"]
            gp.Polygon.model_validate(feat["nucleusGeometry"]) if feat["nucleusGeometry"]["type"] == "Polygon" \
                else gp.MultiPolygon.model_validate(feat["nucleusGeometry"])
            meta = feat["properties"]["metadata"]
            assert {"nucleus_id", "label", "class_value", "ledger_seq"} <= set(meta)
            assert meta["ledger_seq"] == str(seq)


def test_export_metadata_label_matches_the_release_table(store, tmp_path):
    from cellcurate.curation.qupath import export_qupath
    from cellcurate.curation.release import snapshot

    snap = snapshot(store).nuclei.set_index("nucleus_id")
    res = export_qupath(store, tmp_path / "qp", progress=False)
    for f in res.files:
        for feat in json.loads(f.read_text())["features"]:
            meta = feat["properties"]["metadata"]
            row = snap.loc[int(meta["nucleus_id"])]
            assert (int(meta["label"]), int(meta["class_value"])) == (int(row["label"]), int(row["class_value"]))


# -- import semantics: against the exported state ------------------------------------------------
def _export_one(store, tmp_path, **kw):
    from cellcurate.curation.qupath import export_qupath

    res = export_qupath(store, tmp_path / "qp", image_ids=["pannuke/fold1/00000"], progress=False, **kw)
    (path,) = res.files
    return path


def _edit(path, nid, class_name, *, drop=False, shift=0):
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as fh:
        data = json.load(fh)
    feats = []
    for f in data["features"]:
        if int(f["properties"]["metadata"]["nucleus_id"]) == nid:
            if drop:
                continue
            if class_name is not None:
                f["properties"]["classification"] = {"name": class_name, "color": [1, 2, 3]}
            if shift:
                f["geometry"]["coordinates"] = [[[x + shift, y] for x, y in ring] for ring in f["geometry"]["coordinates"]]
        feats.append(f)
    data["features"] = feats
    with opener(path, "wt") as fh:
        json.dump(data, fh)


def _a_nucleus(store, class_name="Connective"):
    from cellcurate.curation.release import snapshot

    nuc = snapshot(store).nuclei
    row = nuc[(nuc["image_id"] == "pannuke/fold1/00000") & (nuc["class_name"] == class_name)].iloc[0]
    return int(row["nucleus_id"])


@pytest.mark.parametrize("later", ["carol", "erin"])
def test_an_older_export_never_silently_reverts_a_newer_decision(store, tmp_path, later):
    """Same reviewer: applying the old file would undo her later decision; another reviewer: it
    would start a conflict. Either way the edit is refused and reported, the label stays."""
    from cellcurate.curation.qupath import import_geojson
    from cellcurate.curation.review import decide

    nid = _a_nucleus(store)
    path = _export_one(store, tmp_path)
    decide(store, nid, "set_class", reviewer=later, label="Dead")  # after the export
    _edit(path, nid, "Macrophage")
    n = store.ledger.count()
    imp = import_geojson(store, [path], reviewer="carol")
    assert imp.decisions.empty and store.ledger.count() == n
    assert _labels(store)[nid] == 4
    (row,) = imp.not_applied[imp.not_applied["nucleus_id"] == nid].itertuples(index=False)
    assert row.reason.startswith("newer decision") and f"by {later}" in row.reason
    assert imp.per_file["refused"].tolist() == [1]


def test_unchanged_features_of_an_older_export_change_nothing(store, tmp_path):
    """A class still as exported is no edit, even where the store has changed since (before: it
    was compared with the current label and reverted the newer decision)."""
    from cellcurate.curation.qupath import import_geojson
    from cellcurate.curation.review import decide

    nid = _a_nucleus(store)
    path = _export_one(store, tmp_path)
    decide(store, nid, "set_class", reviewer="carol", label="Dead")
    n = store.ledger.count()
    imp = import_geojson(store, [path], reviewer="carol")
    assert imp.decisions.empty and store.ledger.count() == n and _labels(store)[nid] == 4
    assert imp.not_applied.empty


def test_deleted_feature_and_moved_outline_are_reported(store, tmp_path):
    from cellcurate.curation.qupath import import_geojson

    nid_del = _a_nucleus(store, "Connective")
    nid_move = _a_nucleus(store, "Lymphocyte")
    path = _export_one(store, tmp_path)
    _edit(path, nid_del, None, drop=True)
    _edit(path, nid_move, "Macrophage", shift=1)
    imp = import_geojson(store, [path], reviewer="carol")
    reasons = {int(r.nucleus_id): r.reason for r in imp.not_applied.itertuples(index=False)}
    assert reasons[nid_del].startswith("deleted")
    assert reasons[nid_move].startswith("outline moved (") and "only the class" in reasons[nid_move]
    # the class edit on the moved outline is applied, the deletion and the geometry are not
    assert imp.decisions["nucleus_id"].tolist() == [nid_move]
    assert _labels(store)[nid_move] == 6 and _labels(store)[nid_del] == 3
    assert (imp.per_file["deleted"].tolist(), imp.per_file["moved"].tolist()) == ([1], [1])


def test_classification_names_and_gzip_are_read(store, tmp_path):
    from cellcurate.curation.qupath import import_geojson

    nid = _a_nucleus(store)
    path = _export_one(store, tmp_path, compress=True)
    with gzip.open(path, "rt") as fh:
        data = json.load(fh)
    for f in data["features"]:
        if int(f["properties"]["metadata"]["nucleus_id"]) == nid:
            f["properties"]["classification"] = {"names": ["Macrophage", "Positive"], "color": [1, 2, 3]}
    with gzip.open(path, "wt") as fh:
        json.dump(data, fh)
    imp = import_geojson(store, [path], reviewer="carol")
    assert imp.decisions["nucleus_id"].tolist() == [nid] and _labels(store)[nid] == 6


def test_cli_prints_unclassified_count_and_every_feature_not_applied(store, tmp_path):
    from click.testing import CliRunner

    from cellcurate.cli.ingest_qupath import command as ingest_cmd

    nid_del = _a_nucleus(store, "Connective")
    path = _export_one(store, tmp_path)
    _edit(path, nid_del, None, drop=True)
    data = json.loads(path.read_text())
    n_unclassified = sum("classification" not in f["properties"] for f in data["features"])
    spath = store.path
    store.close()
    r = CliRunner().invoke(ingest_cmd, [str(path), "--store", str(spath), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert f"{n_unclassified} unclassified" in r.output
    assert f"nucleus {nid_del}: deleted" in r.output and "1 features not applied" in r.output

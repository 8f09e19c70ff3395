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

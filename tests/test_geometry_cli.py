"""`curate review --instances` (CSV and QuPath GeoJSON paths) and `curate ingest qupath --geometry`."""

from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

from cellcurate.cli.main import cli
from cellcurate.curation.geometry import store_geometry
from cellcurate.napari_plugin.sample import write_disc_store

from instance_flags_helper import flag_event, square, write_instance_flags


@pytest.fixture()
def store(tmp_path):
    s = write_disc_store(tmp_path / "s", n_images=1, per_image=4, size=64, seed=5)
    img = str(s.images()["image_id"].iloc[0])
    write_instance_flags(s, [flag_event(img, "missing_annotation", n=0, polygons=[square(28, 0, 4)], label=2)])
    s.close()
    return tmp_path / "s"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_instances_csv_round_trip(store, tmp_path):
    p = tmp_path / "flags.csv"
    r = run("review", store, "--instances", "--reviewer", "ana", "--export-csv", p)
    assert r.exit_code == 0 and "wrote 1 instance flags not yet decided by ana" in r.output, r.output
    with open(p, newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[0]["decision"] = "accept"
    with open(p, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = run("review", store, "--instances", "--reviewer", "ana", "--import-csv", p)
    assert r.exit_code == 0 and "recorded 1 geometry events" in r.output, r.output
    rows[0]["decision"] = "explode"
    with open(p, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = run("review", store, "--instances", "--reviewer", "bob", "--import-csv", p)
    assert r.exit_code == 1 and "unknown decision 'explode'" in r.output and "nothing was applied" in r.output


def test_instances_geojson_then_ingest_qupath_geometry(store, tmp_path):
    out = tmp_path / "review"
    r = run("review", store, "--instances", "--export-geojson", out)
    assert r.exit_code == 0 and "with 1 proposals" in r.output, r.output
    (path,) = sorted(out.glob("*.geojson"))
    data = json.loads(path.read_text())
    for f in data["features"]:
        if f["properties"].get("metadata", {}).get("role") == "proposed":
            f["properties"]["classification"]["name"] = "Accept"
    path.write_text(json.dumps(data))
    r = run("ingest", "qupath", path, "--store", store, "--reviewer", "qp")
    assert r.exit_code == 0 and "decided only with --geometry" in r.output, r.output
    r = run("ingest", "qupath", path, "--store", store, "--reviewer", "qp", "--geometry")
    assert r.exit_code == 0 and "appended 0 decisions, 1 geometry events" in r.output, r.output
    from cellcurate.datasets.store import Store

    with Store.open(store) as s:
        assert store_geometry(s).counts()["added"] == 1


def test_instance_options_need_instances(store):
    r = run("review", store, "--issue", "bad_outline")
    assert r.exit_code == 2 and "need --instances" in r.output

"""Instance flags reviewed through CSV: export, decisions (with a drawn polygon), all or nothing."""

from __future__ import annotations

import csv
import json

import pytest

from cellcurate.curation.geometry import store_geometry
from cellcurate.curation.geometry_review import instance_queue
from cellcurate.curation.reviewcsv import CsvValidationError, export_instance_csv, import_instance_csv
from cellcurate.napari_plugin.sample import write_disc_store

from instance_flags_helper import flag_event, square, write_instance_flags

FREE = square(28, 0, 4)


@pytest.fixture()
def store(tmp_path):
    s = write_disc_store(tmp_path / "s", n_images=1, per_image=4, size=64, seed=5)
    img = str(s.images()["image_id"].iloc[0])
    nuc = s.nuclei().sort_values("instance_id").reset_index(drop=True)
    a, b = int(nuc.at[0, "nucleus_id"]), int(nuc.at[1, "nucleus_id"])
    write_instance_flags(s, [
        flag_event(img, "missing_annotation", n=0, polygons=[FREE], label=2, score=0.95),
        flag_event(img, "spurious_annotation", n=1, nucleus_ids=[a], action="delete", score=0.6),
        flag_event(img, "bad_outline", n=2, nucleus_ids=[b], action="replace", polygons=[square(30, 30, 3)],
                   score=0.8),
    ])
    s.ids = (a, b)
    yield s
    s.close()


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write(path, rs):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rs[0]))
        w.writeheader()
        w.writerows(rs)


def test_export_then_import_decisions(store, tmp_path):
    p = tmp_path / "flags.csv"
    assert export_instance_csv(store, p, reviewer="ana") == 3
    rs = rows(p)
    assert [r["issue"] for r in rs] == ["missing_annotation", "bad_outline", "spurious_annotation"]
    assert json.loads(rs[0]["proposed_polygons"]) == [FREE] and rs[0]["predicted_class"] == store.taxonomy.class_name(2)
    assert rs[2]["nucleus_ids"] == str(store.ids[0])
    drawn = square(31, 31, 2)
    rs[0].update(decision="accept", label="4")
    rs[1].update(decision="replace", polygon=json.dumps(drawn), comment="tighter")
    rs[2].update(decision="skip")
    write(p, rs)
    seqs = import_instance_csv(store, p, reviewer="ana")
    assert len(seqs) == 2
    ev = store.ledger.events(kinds=("geometry",), parse_payload=True)
    assert ev["action"].tolist() == ["add", "replace"] and int(ev["label"].iloc[0]) == 4
    assert ev["payload"].iloc[1]["polygon"] == drawn and ev["payload"].iloc[1]["comment"] == "tighter"
    assert ev["payload"].iloc[1]["source"] == "csv"
    assert store_geometry(store).counts() == {"added": 1, "deleted": 0, "replaced": 1}
    assert instance_queue(store, reviewer="ana")["decided"].tolist() == [False, True, True]
    assert export_instance_csv(store, p, reviewer="ana") == 1


def test_a_bad_file_applies_nothing_and_names_every_line(store, tmp_path):
    p = tmp_path / "flags.csv"
    export_instance_csv(store, p)
    rs = rows(p)
    rs[0].update(decision="add", polygon="[[0,0],[2,2],[2,0],[0,2]]")
    rs[1].update(decision="maybe")
    rs[2].update(decision="delete", flag_id="i1-nope-9")
    write(p, rs)
    with pytest.raises(CsvValidationError) as exc:
        import_instance_csv(store, p, reviewer="ana")
    probs = exc.value.problems
    assert len(probs) == 3
    assert probs[0].startswith(f"{p}:2: ") and "Self-intersection" in probs[0]
    assert probs[1].startswith(f"{p}:3: ") and "unknown decision 'maybe'" in probs[1]
    assert probs[2].startswith(f"{p}:4: ") and "unknown flag id 'i1-nope-9'" in probs[2]
    assert store.ledger.count("geometry") == 0

"""`curate review` without a GUI: CSV export/import (validated, all or nothing) and conflicts."""

import pandas as pd
import pytest
from click.testing import CliRunner

from cellcurate.cli.main import cli
from cellcurate.curation.queue import build_queue
from cellcurate.curation.review import decide
from cellcurate.curation.reviewcsv import EXPORT_COLUMNS, CsvValidationError, export_csv, import_csv
from cellcurate.datasets.store import Store
from cellcurate.napari_plugin.sample import write_disc_store, write_flags


@pytest.fixture()
def store(tmp_path):
    s = write_disc_store(tmp_path / "s", n_images=2, per_image=9, size=128, seed=5)
    write_flags(s, fraction=0.5, seed=6)
    return s


def test_export_then_import_roundtrip(store, tmp_path):
    out = tmp_path / "queue.csv"
    n = export_csv(store, out, reviewer="ana")
    df = pd.read_csv(out, dtype={"nucleus_id": "int64", "decision": str, "label": str, "reviewer": str, "comment": str})
    assert n == len(df) == 9 and tuple(df.columns) == EXPORT_COLUMNS
    assert df["decision"].isna().all()
    df.loc[0, ["decision"]] = ["accept"]
    df.loc[1, ["decision", "label"]] = ["set_class", "Macrophage"]
    df.loc[2, ["decision", "label", "reviewer"]] = ["set_class", "3", "bob"]
    df.loc[3, ["decision", "comment"]] = ["not_nucleus", "out of focus"]
    df.to_csv(out, index=False)
    seqs = import_csv(store, out, reviewer="ana")
    assert len(seqs) == 4
    ev = store.ledger.events(kinds=("decision",), parse_payload=True)
    assert ev["action"].tolist() == ["accept", "set_class", "set_class", "not_nucleus"]
    assert ev["label"].tolist()[1:] == [6, 3, -1] and ev["actor"].tolist() == ["ana", "ana", "bob", "ana"]
    assert ev["payload"].iloc[3] == {"source": "csv", "comment": "out of focus"}
    assert build_queue(store)["decided"].sum() == 4


def test_import_rejects_bad_rows_with_line_numbers(store, tmp_path):
    ids = [int(x) for x in build_queue(store)["nucleus_id"]]
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "nucleus_id,decision,label,reviewer\n"
        f"{ids[0]},accept,,\n"           # line 2: fine
        "123,keep,,\n"                    # line 3: unknown id
        f"{ids[1]},set_class,Mitosis,\n"  # line 4: unknown class
        f"{ids[0]},keep,,\n"              # line 5: duplicate
        f"{ids[2]},approve,,\n"           # line 6: bad action
        f"{ids[3]},set_class,,\n"         # line 7: no label
        f"{ids[4]},,,\n"                  # line 8: empty decision: ignored
    )
    with pytest.raises(CsvValidationError) as info:
        import_csv(store, bad, reviewer="ana")
    problems = info.value.problems
    assert [p.split(":")[1] for p in problems] == ["3", "4", "5", "6", "7"]
    assert "unknown nucleus id 123" in problems[0] and "unknown class 'Mitosis'" in problems[1]
    assert "duplicate nucleus id" in problems[2] and "also on line 2" in problems[2]
    assert "unknown decision 'approve'" in problems[3] and "needs a label" in problems[4]
    assert store.ledger.count("decision") == 0  # nothing applied

    r = CliRunner().invoke(cli, ["review", str(store.path), "--import-csv", str(bad), "--reviewer", "ana"])
    assert r.exit_code == 1
    lines = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 6 and "nothing was applied" in lines[-1]
    assert store.ledger.count("decision") == 0


def test_cli_export_import_conflicts_adjudicate(store, tmp_path):
    runner = CliRunner()
    out = tmp_path / "q.csv"
    r = runner.invoke(cli, ["review", str(store.path), "--export-csv", str(out), "--reviewer", "ana"])
    assert r.exit_code == 0, r.output
    assert "wrote 9 pending nuclei" in r.output
    df = pd.read_csv(out, dtype={"nucleus_id": "int64", "decision": str, "label": str, "reviewer": str, "comment": str})
    nid = int(df["nucleus_id"].iloc[0])
    df.loc[0, ["decision", "label"]] = ["set_class", "2"]
    df.to_csv(out, index=False)
    r = runner.invoke(cli, ["review", str(store.path), "--import-csv", str(out), "--reviewer", "ana"])
    assert r.exit_code == 0 and "recorded 1 decisions" in r.output
    r = runner.invoke(cli, ["review", str(store.path), "--conflicts"])
    assert r.exit_code == 0 and "no conflicts" in r.output
    decide(store, nid, "set_class", reviewer="bob", label=7)
    r = runner.invoke(cli, ["review", str(store.path), "--conflicts"])
    assert r.exit_code == 0 and "Lymphocyte" in r.output and "Neutrophil" in r.output
    assert "1 nuclei in conflict" in r.output
    r = runner.invoke(cli, ["review", str(store.path), "--adjudicate", str(nid), "Neutrophil", "--reviewer", "lead"])
    assert r.exit_code == 0 and "-> 7" in r.output
    r = runner.invoke(cli, ["review", str(store.path), "--conflicts"])
    assert "no conflicts" in r.output
    cur = Store.open(store.path).current_labels().set_index("nucleus_id")
    assert cur.loc[nid, "label"] == 7 and cur.loc[nid, "decided_by"] == "lead"


def test_cli_errors_are_one_line(store, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["review", str(tmp_path / "nope"), "--conflicts"])
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and "no such store folder" in r.stderr
    r = runner.invoke(cli, ["review", str(store.path), "--import-csv", str(tmp_path / "missing.csv")])
    assert r.exit_code == 1 and "no such CSV file" in r.stderr
    r = runner.invoke(cli, ["review", str(store.path), "--adjudicate", "1", "Neutrophil"])
    assert r.exit_code == 1 and "no nucleus 1" in r.stderr


def test_export_csv_temp_name_is_unique_per_write(store, tmp_path, monkeypatch):
    """Issue 10: the CSV went through the fixed name ``.queue.csv.tmp``; two writers shared it."""
    import os as _os

    out = tmp_path / "queue.csv"
    seen = []
    real_replace = _os.replace

    def spy(src, dst):
        seen.append(str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(_os, "replace", spy)
    export_csv(store, out, reviewer="ana")
    export_csv(store, out, reviewer="ana")
    temps = [s for s in seen if s.endswith(".tmp") and ".queue.csv." in s]
    assert len(temps) == 2 and temps[0] != temps[1] and temps[0] != str(tmp_path / ".queue.csv.tmp")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".queue")) == []

"""`curate demo --preset tiny` end to end: the model stage pre-trains the teacher's encoder, validates,
prints both models' PQ, mPQ, class F1 and count R² with the issue-9 targets, and exports the student."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cellcurate.cli.demo import command
from cellcurate.datasets.store import Store


@pytest.mark.slow
def test_tiny_demo_prints_model_metrics_and_targets(tmp_path):
    res = CliRunner().invoke(command, ["--out", str(tmp_path / "d"), "--preset", "tiny"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "teacher encoder pre-trained on" in out
    assert "| teacher |" in out and "| student |" in out
    assert "targets (issue 9 item 3):" in out and "parameter ratio" in out
    assert "student exported to" in out
    models = tmp_path / "d" / "models"
    for name in ("teacher", "student"):
        assert (models / name / "curves.png").is_file()
        doc = json.loads((models / name / "config.json").read_text())
        assert all("val_mPQ" in h for h in doc["metrics"]["history"])
        assert (models / name / "best" / "model.pt").is_file()
    # the instance round's flags were decided before the release, and the release's instance maps
    # carry those geometry decisions (accepted proposals), read back with zarr
    assert "instance flags decided by a simulated annotator" in out
    manifest = json.loads((tmp_path / "d" / "releases" / "v1" / "manifest.json").read_text())
    geo = manifest.get("geometry")
    assert geo and geo["added"] > 0 and geo["deleted"] > 0 and geo["replaced"] > 0
    with Store.open(tmp_path / "d" / "store") as store:
        ev = store.ledger.events(kinds=("geometry",))
        assert len(ev) and set(ev["actor"]) == {"demo-annotator"}

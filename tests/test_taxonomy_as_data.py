"""The taxonomy is data everywhere: a 5-class custom taxonomy (ids 1, 2, 3, 4, 9, ignore 250) runs
ingest -> relabel -> review (CSV) -> export, and no stage assumes 7 classes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

TAXONOMY = {
    "name": "five", "version": 1, "background": 0, "ignore": 250,
    "classes": [
        {"id": 1, "name": "Tumour", "color": "#e6194b"},
        {"id": 2, "name": "Immune", "color": "#3cb44b"},
        {"id": 3, "name": "Stroma", "color": "#4363d8"},
        {"id": 4, "name": "Necrotic", "color": "#ffe119"},
        {"id": 9, "name": "Normal epithelium", "color": "#f58231"},
    ],
    "sources": {
        "pannuke": {"Neoplastic": ["Tumour"], "Inflammatory": ["Immune"], "Connective": ["Stroma"],
                    "Dead": ["Necrotic"], "Epithelial": ["Normal epithelium"]},
        "monusac": {"Epithelial": ["Tumour", "Normal epithelium"], "Lymphocyte": ["Immune"],
                    "Macrophage": ["Immune"], "Neutrophil": ["Immune"], "Ambiguous": "ignore"},
        "consep": {"other": "*", "inflammatory": ["Immune"], "epithelial": ["Tumour", "Normal epithelium"],
                   "spindle-shaped": ["Stroma"]},
    },
}
IDS = [1, 2, 3, 4, 9]


@pytest.mark.slow
def test_five_class_taxonomy_end_to_end(tiny_sample, fixtures_dir, tmp_path):
    from click.testing import CliRunner

    from cellcurate.cli.main import cli
    from cellcurate.datasets.store import Store
    from cellcurate.relabel.rounds import RoundConfig, run_round

    tax_file = tmp_path / "five.json"
    tax_file.write_text(json.dumps(TAXONOMY))
    store_path = tmp_path / "store"
    runner = CliRunner()
    for source, path in (("pannuke", tiny_sample.pannuke_root), ("monusac", tiny_sample.monusac_root),
                         ("consep", fixtures_dir / "real" / "consep"), ("cpm", fixtures_dir / "real" / "cpm15")):
        res = runner.invoke(cli, ["ingest", source, str(path), "--store", str(store_path), "--taxonomy", str(tax_file)])
        assert res.exit_code == 0, res.output
    with Store.open(store_path, mode="a") as store:
        nuc = store.nuclei(include_ignore=False)
        # the registry's default mapping of cpm ("unknown nucleus" -> "*") follows the store's 5 classes
        assert set(nuc.loc[nuc["source"] == "cpm", "candidates"]) == {"1|2|3|4|9"}
        assert set(nuc.loc[nuc["source_label"] == "Epithelial", "candidates"]) >= {"9", "1|9"}
        r1 = run_round(store, 1, config=RoundConfig(folds=3, report=False), progress=False)
        ev = store.ledger.events(kinds=("proposal",), parse_payload=True)
        assert len(ev) == r1.counts["proposals"] > 0
        assert all(len(p["probs"]) == 5 for p in ev["payload"]) and set(ev["label"]) <= set(IDS)
        assert {int(k) for k in r1.metrics["class_after"]} == {-1, 0, *IDS}
        r2 = run_round(store, 2, config=RoundConfig(folds=3, report=False), progress=False)
        assert r2.counts["flags"] >= 1
        flags = store.ledger.events(kinds=("flag",), parse_payload=True)
        assert all(len(p["probs"]) == 5 for p in flags["payload"] if "probs" in p)

    csv = tmp_path / "queue.csv"
    res = runner.invoke(cli, ["review", str(store_path), "--export-csv", str(csv), "--reviewer", "ana"])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(csv, dtype=str)
    assert len(df) >= 3
    df.loc[0, ["decision", "label"]] = ["set_class", "Normal epithelium"]
    df.loc[1, ["decision", "label"]] = ["set_class", "9"]
    df.loc[2, ["decision"]] = ["not_nucleus"]
    df.to_csv(csv, index=False)
    res = runner.invoke(cli, ["review", str(store_path), "--import-csv", str(csv), "--reviewer", "ana"])
    assert res.exit_code == 0, res.output
    bad = df.copy()
    bad.loc[0, ["decision", "label"]] = ["set_class", "Macrophage"]  # a default-taxonomy class: refused
    bad.to_csv(tmp_path / "bad.csv", index=False)
    res = runner.invoke(cli, ["review", str(store_path), "--import-csv", str(tmp_path / "bad.csv"), "--reviewer", "bo"])
    assert res.exit_code != 0 and "Macrophage" in res.output

    res = runner.invoke(cli, ["export", str(store_path), "--version", "v1", "--out", str(tmp_path / "rel"),
                              "--allow-unreviewed"])
    assert res.exit_code == 0, res.output
    release = tmp_path / "rel" / "v1"
    manifest = json.loads((release / "manifest.json").read_text())
    assert manifest["taxonomy"]["classes"] == {str(c["id"]): c["name"] for c in TAXONOMY["classes"]}
    assert manifest["taxonomy"]["ignore"] == 250
    assert [a.split(":")[0] for a in manifest["attribution"]] == ["PanNuke", "MoNuSAC", "CoNSeP", "CPM-15/17"]
    import pyarrow.parquet as pq

    rel_nuc = pq.read_table(release / "nuclei.parquet").to_pandas()
    assert set(rel_nuc["class_value"].unique()) <= {*IDS, 250}
    assert (rel_nuc["class_value"] == 250).any() and (rel_nuc["class_value"] == 9).any()
    assert set(rel_nuc.loc[rel_nuc["source"] == "consep", "split"]) == {"test"}


def test_widget_keys_and_display_values_follow_the_taxonomy():
    from cellcurate.curation.review import display_values
    from cellcurate.datasets.taxonomy import Taxonomy

    five = Taxonomy.from_dict(TAXONOMY)
    assert display_values(Taxonomy.default()) == (8, 9, 10)
    assert display_values(five) == (10, 11, 12)  # above class id 9, never a class
    pytest.importorskip("qtpy")
    from cellcurate.napari_plugin.widget import class_keys

    assert class_keys(five) == {str(i): ("set_class", i) for i in IDS}
    assert sorted(class_keys(Taxonomy.default())) == [str(i) for i in range(1, 8)]


def test_probability_columns_follow_class_ids():
    from cellcurate.relabel.rounds import _probs_k

    out = _probs_k(np.array([[0.25, 0.75]]), np.array([2, 9]), np.array(IDS))
    assert out.tolist() == [[0.0, 0.25, 0.0, 0.0, 0.75]]


def test_unmapped_source_class_names_missing_from_a_custom_taxonomy_say_so(tmp_path):
    from cellcurate.datasets.taxonomy import Taxonomy
    from cellcurate.errors import ConfigError

    five = Taxonomy.from_dict(TAXONOMY)
    assert five.candidates("cpm", "unknown nucleus") == (1, 2, 3, 4, 9)
    with pytest.raises(ConfigError, match="'lizard' maps 'Neutrophil' to 'Neutrophil', which this taxonomy lacks"):
        five.candidates("lizard", "Neutrophil")
    assert isinstance(Path, type)

"""`curate demo`'s review stage leaves part of the queue for `curate review` (--review-fraction)."""

import pandas as pd
import pytest
from click.testing import CliRunner

from cellcurate.cli import demo
from cellcurate.cli.main import cli
from cellcurate.curation.queue import build_queue
from cellcurate.datasets.store import Store
from cellcurate.napari_plugin.sample import write_disc_store, write_flags


@pytest.mark.parametrize("fraction, decided", [(0.25, 4), (0.0, 0), (1.0, 14)])
def test_review_stage_decides_the_top_fraction(tmp_path, capsys, fraction, decided):
    store = write_disc_store(tmp_path / "s", n_images=3, per_image=9, size=128, seed=1)
    write_flags(store, fraction=0.5, seed=2)
    q = build_queue(store)
    # the synthetic truth: the flag's proposal for half the queue, another class for the rest
    truth = pd.Series([int(p) if i % 2 else int(p) % 7 + 1 for i, p in enumerate(q["proposed"])],
                      index=q["nucleus_id"].to_numpy())
    cur = store.current_labels().set_index("nucleus_id")["label"]
    truth = pd.concat([truth, cur.drop(truth.index).clip(lower=1)])
    store.close()
    ctx = {"out": tmp_path, "store_path": tmp_path / "s", "true_class": truth, "review_fraction": fraction}
    demo.stage_review(ctx)
    out = capsys.readouterr().out
    with Store.open(tmp_path / "s") as s:
        after = build_queue(s)
        assert int(after["decided"].sum()) == decided
        dec = s.ledger.events(kinds=("decision",))
        top = set(q["nucleus_id"].head(decided).astype(int))  # the highest issue scores
        assert set(dec["nucleus_id"].astype(int)) == top and dec["actor"].eq("demo-annotator").all()
    if decided < 14:
        assert f"{14 - decided} left for review by hand" in out and "curate review" in out
    if decided:
        assert f"the {decided} reviewed nuclei vs synthetic truth" in out and "1.000 after" in out


def test_review_fraction_is_validated():
    res = CliRunner().invoke(cli, ["demo", "--review-fraction", "1.5"])
    assert res.exit_code != 0 and "review-fraction" in res.output

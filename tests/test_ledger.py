import sqlite3

import pandas as pd
import pytest

from cellcurate.datasets.ledger import Ledger, conflicts, fold_labels
from cellcurate.errors import StoreError


def ingest(nid, label, candidates=(), source_label="X"):
    return {"kind": "ingest", "nucleus_id": nid, "actor": "ingest:test", "action": "ingest", "label": label,
            "payload": {"source_label": source_label, "candidates": list(candidates) or [label]}}


def decision(nid, actor, action, label=None, ref=None, round=2):
    return {"kind": "decision", "nucleus_id": nid, "actor": actor, "action": action, "label": label,
            "ref": ref, "round": round}


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "ledger.sqlite") as led:
        yield led


def test_append_assigns_sequential_seqs_and_chain(ledger):
    assert ledger.head()[0] == 0
    seqs = ledger.append([ingest(1, 3), ingest(2, 0, (2, 6, 7), "Inflammatory")])
    assert seqs == [1, 2]
    more = ledger.append([ingest(3, 1)])
    assert more == [3]
    assert ledger.head()[0] == 3 and ledger.verify_chain() == []
    ev = ledger.events(parse_payload=True)
    assert ev["nucleus_id"].tolist() == [1, 2, 3]
    assert ev["payload"][1]["candidates"] == [2, 6, 7]


def test_append_only_is_enforced_and_tampering_detected(ledger, tmp_path):
    ledger.append([ingest(1, 3), ingest(2, 4)])
    con = sqlite3.connect(tmp_path / "ledger.sqlite")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        con.execute("UPDATE events SET label=5 WHERE seq=1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        con.execute("DELETE FROM events")
    con.execute("DROP TRIGGER events_no_update")
    con.execute("UPDATE events SET label=5 WHERE seq=1")
    con.commit()
    con.close()
    problems = ledger.verify_chain()
    assert len(problems) == 1 and "event 1" in problems[0]


def test_bad_events_rejected_and_nothing_written(ledger):
    with pytest.raises(StoreError, match="unknown ledger event kind"):
        ledger.append([ingest(1, 3), {"kind": "bogus", "actor": "x"}])
    with pytest.raises(StoreError, match="no actor"):
        ledger.append([{"kind": "flag", "nucleus_id": 1}])
    assert ledger.count() == 0


def test_fold_ingest_proposal_decision_order(ledger):
    ledger.append([ingest(1, 0, (2, 6, 7), "Inflammatory"), ingest(2, 0, (2, 6, 7)), ingest(3, 3), ingest(4, 1)])
    ledger.append([
        {"kind": "proposal", "nucleus_id": 1, "actor": "relabel:r1", "action": "auto_accepted", "label": 2, "round": 1, "score": 0.97},
        {"kind": "proposal", "nucleus_id": 2, "actor": "relabel:r1", "action": "queued", "label": 6, "round": 1, "score": 0.55},
        {"kind": "proposal", "nucleus_id": 1, "actor": "relabel:r2", "action": "auto_accepted", "label": 7, "round": 2, "score": 0.99},
    ])
    ledger.append([decision(3, "ann", "set_class", 5), decision(4, "ann", "not_nucleus", -1)])
    f = ledger.current_labels()
    assert f.loc[1, "label"] == 7 and f.loc[1, "status"] == "auto" and f.loc[1, "round"] == 2
    assert f.loc[2, "label"] == 0 and f.loc[2, "status"] == "unresolved"
    assert f.loc[3, "label"] == 5 and f.loc[3, "status"] == "reviewed" and f.loc[3, "decided_by"] == "ann"
    assert f.loc[4, "label"] == -1 and f.loc[4, "status"] == "rejected"
    # history: the ledger as it was before the decisions
    assert ledger.current_labels(until_seq=7).loc[3, "label"] == 3


def test_fold_undo_skip_conflict_adjudicate(ledger):
    ledger.append([ingest(1, 1), ingest(2, 1), ingest(3, 1)])
    s = ledger.append([decision(1, "a", "set_class", 5)])[0]
    ledger.append([decision(1, "a", "skip"), decision(1, "a", "undo", ref=s)])
    ledger.append([decision(2, "a", "set_class", 5), decision(2, "b", "set_class", 3)])
    ledger.append([decision(3, "a", "set_class", 5), decision(3, "b", "set_class", 3)])
    ledger.append([decision(3, "lead", "adjudicate", 3)])
    f = ledger.current_labels()
    assert (f.loc[1, "label"], f.loc[1, "status"]) == (1, "source")  # undone: back to source label
    assert (f.loc[2, "label"], f.loc[2, "status"]) == (0, "conflict")
    assert (f.loc[3, "label"], f.loc[3, "status"], f.loc[3, "decided_by"]) == (3, "reviewed", "lead")
    c = conflicts(ledger.events())
    assert sorted(c["actor"]) == ["a", "b"] and set(c["nucleus_id"]) == {2}


def test_reingest_resets_earlier_events(ledger):
    ledger.append([ingest(1, 0, (1, 5))])
    ledger.append([decision(1, "a", "set_class", 5)])
    assert ledger.current_labels().loc[1, "label"] == 5
    ledger.append([ingest(1, 0, (1, 5))])
    f = ledger.current_labels()
    assert (f.loc[1, "label"], f.loc[1, "status"]) == (0, "unresolved")


def test_fold_of_empty_ledger(ledger):
    assert fold_labels(ledger.events()).empty


def test_readonly_ledger_refuses_writes(tmp_path):
    Ledger(tmp_path / "l.sqlite").close()
    ro = Ledger(tmp_path / "l.sqlite", readonly=True)
    with pytest.raises(StoreError, match="read-only"):
        ro.append([ingest(1, 1)])
    assert isinstance(ro.events(), pd.DataFrame)


def test_superseded_run_no_longer_counts(ledger):
    ledger.append([ingest(1, 0, (2, 6, 7)), ingest(2, 0, (2, 6, 7))])
    run1 = ledger.append([{"kind": "round", "round": 1, "actor": "relabel", "action": "started"}])[0]
    ledger.append([
        {"kind": "proposal", "nucleus_id": 1, "actor": "relabel:r1", "action": "auto_accepted", "label": 2, "round": 1, "ref": run1},
        {"kind": "proposal", "nucleus_id": 2, "actor": "relabel:r1", "action": "auto_accepted", "label": 6, "round": 1, "ref": run1},
    ])
    assert ledger.current_labels()["label"].tolist() == [2, 6]
    run2 = ledger.append([{"kind": "round", "round": 1, "actor": "relabel", "action": "started"}])[0]
    ledger.append([
        {"kind": "round", "round": 1, "actor": "relabel", "action": "superseded", "ref": run1},
        {"kind": "proposal", "nucleus_id": 1, "actor": "relabel:r1", "action": "auto_accepted", "label": 7, "round": 1, "ref": run2},
    ])
    f = ledger.current_labels()
    assert (f.loc[1, "label"], f.loc[2, "label"], f.loc[2, "status"]) == (7, 0, "unresolved")
    assert ledger.count("proposal") == 3  # history kept


def test_63_bit_ids_survive_null_rows(ledger):
    """Round events have NULL nucleus ids; large ids must not pass through float64."""
    big = 2**63 - 25
    ledger.append([ingest(big, 3), {"kind": "round", "round": 1, "actor": "relabel", "action": "started"},
                   ingest(big - 1, 4)])
    ev = ledger.events()
    assert ev["nucleus_id"].dropna().tolist() == [big, big - 1]
    assert sorted(ledger.current_labels().index) == [big - 1, big]


def test_payload_values_are_distinct_in_first_seen_order(tmp_path):
    from cellcurate.datasets.ledger import Ledger

    led = Ledger(tmp_path / "ledger.sqlite")
    ev = [{"kind": "instance_flag", "round": 1, "actor": "a", "action": "x", "nucleus_id": None, "score": 0.5,
           "label": 0, "ref": None, "payload": {"run": r}} for r in ("b", "a", "b", "c")]
    ev.append({**ev[0], "payload": {"other": 1}})  # no run: skipped
    ev.append({**ev[0], "round": 2, "payload": {"run": "z"}})
    led.append(ev)
    assert led.payload_values("instance_flag", "run", round=1) == ["b", "a", "c"]
    assert led.payload_values("instance_flag", "run") == ["b", "a", "c", "z"]
    assert led.payload_values("label", "run") == []
    with pytest.raises(ValueError):
        led.payload_values("instance_flag", "run') OR 1=1 --")

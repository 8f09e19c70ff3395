"""The review queue and the decision logic, without Qt."""

import sqlite3

import numpy as np
import pandas as pd
import pytest

from cellcurate.curation.queue import QUEUE_COLUMNS, build_queue, latest_flags, progress
from cellcurate.curation.review import ReviewSession, conflict_table, current_label, decide
from cellcurate.datasets.ledger import Ledger
from cellcurate.datasets.store import Store
from cellcurate.errors import ConfigError, StateError, StoreError
from cellcurate.napari_plugin.sample import write_disc_store, write_flags


@pytest.fixture()
def store(tmp_path):
    s = write_disc_store(tmp_path / "s", n_images=3, per_image=9, size=128, seed=1)
    write_flags(s, fraction=0.5, seed=2)
    return s


def flag(store, nid, *, round=1, score=0.5, label=3, ref=None, reason="confident_disagreement"):
    (seq,) = store.ledger.append([{"kind": "flag", "nucleus_id": nid, "round": round, "actor": f"relabel:r{round}:m",
                                   "action": reason, "label": label, "prev_label": current_label(store, nid),
                                   "score": score, "ref": ref, "payload": {"probs": [1 / 7] * 7}}])
    return seq


def test_queue_ranks_flags_by_score(store):
    q = build_queue(store, reviewer="ana")
    assert list(q.columns) == list(QUEUE_COLUMNS)
    assert len(q) == 14 and q["nucleus_id"].is_unique  # 27 nuclei * 0.5, rounded
    assert (np.diff(q["score"].to_numpy()) <= 0).all()
    assert q["rank"].tolist() == list(range(14))
    assert progress(q) == (0, 14)
    assert not q["decided"].any()


def test_latest_flag_wins_and_superseded_runs_leave(store):
    q = build_queue(store)
    nid = int(q["nucleus_id"].iloc[-1])
    (start,) = store.ledger.append([{"kind": "round", "round": 2, "actor": "relabel", "action": "started"}])
    seq = flag(store, nid, round=2, score=0.01, label=6, ref=start)
    q2 = build_queue(store)
    row = q2[q2["nucleus_id"] == nid].iloc[0]
    assert (row["flag_seq"], row["round"], row["proposed"]) == (seq, 2, 6)  # round 2 beats a higher round-1 score
    store.ledger.append([{"kind": "round", "round": 2, "actor": "relabel", "action": "superseded", "ref": start}])
    row = build_queue(store).set_index("nucleus_id").loc[nid]
    assert row["round"] == 1
    assert len(build_queue(store, round=2)) == 0


def test_latest_flags_tie_on_round_breaks_by_score():
    ev = pd.DataFrame({"seq": [1, 2, 3], "kind": "flag", "nucleus_id": [5, 5, 6], "round": [1, 1, 1],
                       "action": "x", "score": [0.9, 0.2, 0.4], "ref": [pd.NA] * 3})
    assert latest_flags(ev)["seq"].tolist() == [1, 3]


def test_filters(store):
    q = build_queue(store)
    reason = q["reason"].iloc[0]
    assert set(build_queue(store, reasons=reason)["reason"]) == {reason}
    by_class = build_queue(store, classes="Dead")
    assert ((by_class["label"] == 4) | (by_class["proposed"] == 4)).all()
    assert len(build_queue(store, classes=[4])) == len(by_class)
    assert len(build_queue(store, sources="monusac")) == 0 and len(build_queue(store, sources="pannuke")) == 14
    with pytest.raises(ConfigError, match="unknown class 'Mitosis'"):
        build_queue(store, classes="Mitosis")


def test_decisions_fold_and_leave_the_queue(store):
    q = build_queue(store)
    a, b, c = (int(x) for x in q["nucleus_id"].iloc[:3])
    prop_a = int(q["proposed"].iloc[0])
    before_b = current_label(store, b)
    d1 = decide(store, a, "accept", reviewer="ana")
    d2 = decide(store, b, "set_class", reviewer="ana", label="Macrophage")
    decide(store, c, "not_nucleus", reviewer="ana")
    assert (d1.label, d1.ref, d1.round) == (prop_a, int(q["flag_seq"].iloc[0]), 1)
    assert (d2.label, d2.prev_label) == (6, before_b)
    cur = store.current_labels().set_index("nucleus_id")
    assert cur.loc[a, "label"] == prop_a and cur.loc[b, "label"] == 6 and cur.loc[c, "status"] == "rejected"
    q2 = build_queue(store)
    assert progress(q2) == (3, 14)
    assert set(q2.loc[q2["decided"], "nucleus_id"]) == {a, b, c}
    assert q2["decided"].tolist() == [False] * 11 + [True] * 3  # settled ones last
    ev = store.ledger.events(kinds=("decision",), parse_payload=True)
    assert ev["actor"].eq("ana").all() and ev["time"].notna().all()
    assert ev["payload"].iloc[0] == {"source": "api"}


def test_keep_undo_skip(store):
    q = build_queue(store, reviewer="ana")
    nid = int(q.loc[q["label"] > 0, "nucleus_id"].iloc[0])
    keep = decide(store, nid, "keep", reviewer="ana")
    assert keep.label == keep.prev_label == current_label(store, nid)
    undo = decide(store, nid, "undo", reviewer="ana")
    assert undo.ref == keep.seq and undo.label is None
    assert not build_queue(store, reviewer="ana")["decided"].any()
    decide(store, nid, "skip", reviewer="ana")
    q2 = build_queue(store, reviewer="ana")
    assert q2["nucleus_id"].iloc[-1] == nid and q2["skipped"].iloc[-1]
    assert not build_queue(store, reviewer="bob")["skipped"].any()  # a skip is personal


@pytest.mark.parametrize("action,kwargs,exc,msg", [
    ("approve", {}, ConfigError, "unknown review action 'approve'"),
    ("set_class", {}, ConfigError, "set_class needs a class"),
    ("set_class", {"label": "Mitosis"}, ConfigError, "unknown class 'Mitosis'"),
    ("set_class", {"label": 9}, ConfigError, "unknown class id 9"),
    ("undo", {}, StateError, "no decision on nucleus"),
    ("accept", {"reviewer": ""}, ConfigError, "needs a reviewer"),
])
def test_bad_decisions(store, action, kwargs, exc, msg):
    nid = int(build_queue(store)["nucleus_id"].iloc[0])
    kwargs = {"reviewer": "ana", **kwargs}
    with pytest.raises(exc, match=msg):
        decide(store, nid, action, **kwargs)
    assert store.ledger.count("decision") == 0


def test_accept_needs_a_flag_and_unknown_nucleus(store):
    flagged = set(build_queue(store)["nucleus_id"])
    other = int(next(n for n in store.nuclei()["nucleus_id"] if n not in flagged))
    with pytest.raises(StateError, match="no flag or queued proposal"):
        decide(store, other, "accept", reviewer="ana")
    with pytest.raises(ConfigError, match="no nucleus 12345"):
        decide(store, 12345, "keep", reviewer="ana")


def test_two_reviewers_conflict_and_adjudication(store):
    nid = int(build_queue(store)["nucleus_id"].iloc[0])
    decide(store, nid, "set_class", reviewer="ana", label=2)
    assert nid not in set(build_queue(store, reviewer="bob").query("~decided")["nucleus_id"])
    assert nid in set(build_queue(store, reviewer="bob", double_review=True).query("~decided")["nucleus_id"])
    decide(store, nid, "set_class", reviewer="bob", label=7)
    table = conflict_table(store)
    assert table["reviewer"].tolist() == ["ana", "bob"] and table["label"].tolist() == [2, 7]
    assert table["label_name"].tolist() == ["Lymphocyte", "Neutrophil"]
    assert store.current_labels().set_index("nucleus_id").loc[nid, "status"] == "conflict"
    adj = decide(store, nid, "adjudicate", reviewer="lead", label="Neutrophil")
    assert adj.action == "adjudicate" and len(conflict_table(store)) == 0
    assert current_label(store, nid) == 7


def test_session_resumes_at_next_unreviewed(store):
    s = ReviewSession(store, reviewer="ana")
    first = s.current()
    assert first.rank == 0 and len(first.probs) == 7
    fourth = int(s.queue["nucleus_id"].iloc[3])
    s.act("accept")
    s.act("set_class", label=3)
    third = s.current().nucleus_id
    s.act("skip")
    s.close()
    again = ReviewSession(Store.open(store.path, mode="a"), reviewer="ana")
    assert again.progress() == (2, 14)
    assert again.current().nucleus_id == fourth  # decided and skipped ones go last
    assert again.queue["nucleus_id"].iloc[-3] == third
    d = again.undo()  # nothing in this session: undoes ana's last decision in the ledger (the skip)
    assert d.action == "undo" and again.current().nucleus_id == third
    other = ReviewSession(Store.open(store.path, mode="a"), reviewer="bob")
    assert other.progress() == (2, 14)
    again.close()
    other.close()


def test_session_undo_and_jump(store):
    s = ReviewSession(store, reviewer="ana")
    nid = s.current().nucleus_id
    before = current_label(store, nid)
    s.act("not_nucleus")
    assert s.progress() == (1, 14) and s.current().nucleus_id != nid
    s.undo()
    assert s.current().nucleus_id == nid and s.progress() == (0, 14)
    assert current_label(store, nid) == before
    last = int(s.queue["nucleus_id"].iloc[-1])
    assert s.jump(last).nucleus_id == last
    with pytest.raises(ConfigError, match="not in this review queue"):
        s.jump(1)
    s.close()


def test_context_window(store):
    s = ReviewSession(store, reviewer="ana", window=64)
    ctx = s.context()
    item = s.current()
    assert ctx.image.shape[2] == 3 and ctx.classes.shape == ctx.current.shape == ctx.image.shape[:2]
    assert ctx.current.sum() > 0
    assert set(np.unique(ctx.classes[ctx.current == 1])) == {item.label if item.label > 0 else 8}
    assert ctx.image.shape[0] <= 64
    s.close()


def test_readonly_store_fails_clearly(store):
    ro = Store.open(store.path, mode="r")
    s = ReviewSession(ro, reviewer="ana")
    nid = s.current().nucleus_id
    with pytest.raises(StoreError, match="read-only"):
        s.act("accept")
    assert s.current().nucleus_id == nid and s.progress() == (0, 14)
    assert store.ledger.count("decision") == 0


def test_full_disk_fails_clearly(store, monkeypatch):
    s = ReviewSession(store, reviewer="ana")
    nid = s.current().nucleus_id

    def full(self, c, events):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Ledger, "_insert", full)
    with pytest.raises(StoreError, match="cannot write the ledger: database or disk is full"):
        s.act("set_class", label=3)
    monkeypatch.undo()
    assert s.current().nucleus_id == nid and store.ledger.count("decision") == 0
    s.act("set_class", label=3)  # retry once the disk has room
    assert store.ledger.count("decision") == 1
    s.close()


def test_fold_one_agrees_with_the_ledger_fold(store):
    from cellcurate.curation.review import fold_one, nucleus_events

    q = build_queue(store)
    ids = [int(x) for x in q["nucleus_id"].iloc[:5]]
    decide(store, ids[0], "set_class", reviewer="ana", label=2)
    decide(store, ids[0], "set_class", reviewer="bob", label=5)  # conflict
    decide(store, ids[1], "not_nucleus", reviewer="ana")
    decide(store, ids[2], "set_class", reviewer="ana", label=7)
    decide(store, ids[2], "undo", reviewer="ana")
    decide(store, ids[3], "adjudicate", reviewer="lead", label=4)
    full = store.ledger.current_labels()
    for nid in ids:
        assert fold_one(nucleus_events(store, [nid]), nid) == full.at[nid, "label"]


def test_two_sessions_never_share_a_nucleus_unless_double_review(store):
    from cellcurate.curation.queue import build_queue

    ana = ReviewSession(store, reviewer="ana", claim_batch=4)
    bob = ReviewSession(Store.open(store.path, mode="a"), reviewer="bob", claim_batch=4)
    seen = {"ana": [], "bob": []}
    while not (ana.done and bob.done):
        for who, s in (("ana", ana), ("bob", bob)):
            if not s.done:
                seen[who].append(s.current().nucleus_id)
                s.act("set_class", label=1)
    assert not set(seen["ana"]) & set(seen["bob"])
    assert sorted(seen["ana"] + seen["bob"]) == sorted(build_queue(store)["nucleus_id"].astype(int))
    ana.close()
    bob.close()

    carol = ReviewSession(Store.open(store.path, mode="a"), reviewer="carol", double_review=True)
    dave = ReviewSession(Store.open(store.path, mode="a"), reviewer="dave", double_review=True)
    assert carol.current().nucleus_id == dave.current().nucleus_id  # double review: both see it
    carol.close()
    dave.close()


def test_a_closed_session_gives_its_nuclei_back(store):
    ana = ReviewSession(store, reviewer="ana", claim_batch=4)
    first = ana.current().nucleus_id
    bob = ReviewSession(Store.open(store.path, mode="a"), reviewer="bob", claim_batch=4)
    assert bob.current().nucleus_id != first
    assert bob.stats()["taken"] == 4 and first not in [i.nucleus_id for i in bob.upcoming(20)]
    ana.close()
    bob.refresh()
    assert bob.stats()["taken"] == 0 and first in [i.nucleus_id for i in bob.upcoming(20)]
    bob.close()


def test_deciding_what_someone_else_decided_needs_confirmation(store):
    from cellcurate.curation.review import DecidedByOthers

    s = ReviewSession(store, reviewer="ana", leases=False)
    nid = s.current().nucleus_id
    decide(store, nid, "set_class", reviewer="bob", label=4)
    with pytest.raises(DecidedByOthers, match="already decided by bob \\(Dead\\)"):
        s.act("set_class", label=3)
    assert store.ledger.count("decision") == 1 and s.current().nucleus_id == nid
    item = s.current()
    s.context(item)
    assert [(o.reviewer, o.label) for o in item.others] == [("bob", 4)]
    d = s.act("set_class", label=3, confirm=True)
    assert d.reviewer == "ana" and store.ledger.count("decision") == 2
    s.close()


def test_status_after_undo_is_not_reviewed(store):
    s = ReviewSession(store, reviewer="ana")
    nid = s.current().nucleus_id
    s.act("set_class", label=2)
    assert s.queue.set_index("nucleus_id").loc[nid, "status"] == "reviewed"
    s.undo()
    assert s.current().nucleus_id == nid and s.current().status == "flagged"
    s.close()


def test_session_stats_per_class_and_rate(store):
    s = ReviewSession(store, reviewer="ana")
    s.act("set_class", label=2)
    s.act("set_class", label=2)
    s.act("not_nucleus")
    s.act("skip")
    st = s.stats()
    assert st["decided"] == 3 and st["skipped"] == 1 and st["per_class"] == {-1: 1, 2: 2}
    assert st["left"] == 11 and 0 < st["rate_per_hour"] <= 3 * 60  # over at least one minute
    s.close()


def test_context_is_centred_and_padded_at_a_tile_edge(store):
    s = ReviewSession(store, reviewer="ana", window=64)
    q = s.queue
    row = q.loc[q["centroid_x"].idxmin()]  # the flagged nucleus nearest the left edge (x < 32)
    assert row["centroid_x"] < 32
    item = s.jump(int(row["nucleus_id"]))
    ctx = s.context(item)
    assert ctx.image.shape == (64, 64, 3) and ctx.offset[1] < 0
    ys, xs = np.nonzero(ctx.current)
    assert abs(ys.mean() - 32) <= 1.5 and abs(xs.mean() - 32) <= 1.5
    assert (ctx.image[:, 0] == (48, 48, 48)).all() and (ctx.classes[:, 0] == 0).all()  # padding left of the tile
    s.close()


def test_prefetched_context_is_refolded_after_a_decision(store):
    s = ReviewSession(store, reviewer="ana", window=128)
    nxt = s.upcoming(1)[0]
    s.prefetched(s.prefetch(1))
    assert nxt.nucleus_id in s._cache
    # a decision on a neighbour after the read-ahead: the prefetched class map must show it
    ctx = s._cache[nxt.nucleus_id]
    other = int(next(n for n in ctx.near["nucleus_id"] if int(n) != nxt.nucleus_id))
    decide(store, other, "set_class", reviewer="bob", label=5)
    got = s.context(nxt)
    inst = int(ctx.near.set_index("nucleus_id").loc[other, "instance_id"])
    assert set(np.unique(got.classes[got.instances == inst])) == {5}
    s.close()


def test_boundary_is_per_instance():
    from cellcurate.curation.review import boundary

    ins = np.zeros((6, 8), np.int32)
    ins[1:5, 1:4] = 1  # a 4 x 3 nucleus
    ins[1:5, 4:7] = 2  # touching it on the right
    got = boundary(ins, width=1)
    want = np.zeros((6, 8), bool)
    want[1:5, 1:7] = True
    want[2:4, 2] = False  # inner column of nucleus 1
    want[2:4, 5] = False  # inner column of nucleus 2
    assert np.array_equal(got, want)
    assert boundary(ins, width=2)[ins > 0].all()  # 2 px: both 3-px-wide nuclei are all outline

"""Ledger events given as a DataFrame (ingest: one per nucleus) are read column by column
(``ledger._frame_records``): the same records as ``to_dict("records")``, the same hash chain."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellcurate.datasets.ledger import Ledger, _frame_records


def _frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({
        "kind": pd.array(["ingest"] * n, dtype="str"),
        "nucleus_id": np.arange(n, dtype=np.int64) * 7919 + 2**40,
        "actor": np.array(["ingest:pannuke"] * n, dtype=object),
        "action": pd.array(["ingest", None] * (n // 2) + ["ingest"] * (n % 2), dtype="str"),
        "label": np.arange(n, dtype=np.int64) % 5,
        "score": np.where(np.arange(n) % 3 == 0, np.nan, 0.25),
        "ref": np.array([np.int64(3), None, "x", np.float32(1.5)] * (n // 4) + [None] * (n % 4), dtype=object),
        "payload": pd.array(['{"kind":"nucleus"}'] * n, dtype="str"),
        "time": ["2026-01-01T00:00:00+00:00"] * n,
    })


def _assert_same(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for k in a:  # same type and repr (NaN != NaN)
            assert type(a[k]) is type(b[k]) and repr(a[k]) == repr(b[k]), (k, a[k], b[k])


def test_frame_records_are_to_dict_records():
    df = _frame(10)
    _assert_same(_frame_records(df), df.to_dict("records"))
    nullable = df.assign(prev_label=pd.array([1, None] * 5, dtype="Int64"))  # goes through to_dict
    _assert_same(_frame_records(nullable), nullable.to_dict("records"))
    assert _frame_records(df.iloc[:0]) == []


def test_the_chain_is_the_same_from_a_frame_and_from_records(tmp_path):
    df = _frame(12)
    chains = []
    for name, events in (("a", df), ("b", df.to_dict("records"))):
        led = Ledger(tmp_path / f"{name}.sqlite")
        led.append(events)
        chains.append(led._con.execute("SELECT seq, chain FROM events ORDER BY seq").fetchall())
        led.close()
    assert chains[0] == chains[1] and len(chains[0]) == 12


def _stored(tmp_path, name: str, *batches) -> list[tuple]:
    led = Ledger(tmp_path / f"{name}.sqlite")
    for events in batches:
        led.append(events)
    rows = led._con.execute("SELECT * FROM events ORDER BY seq").fetchall()
    assert led.verify_chain() == []
    led.close()
    return rows


def test_frame_rows_store_what_the_event_loop_stores(tmp_path, monkeypatch):
    """The column-by-column rows (``ledger._frame_rows``) are the event loop's, value for value
    (NaN and pd.NA as NULL, numpy scalars as Python ones, dict payloads as JSON, missing times as
    now), and the chain goes on across batches of both kinds."""
    df = _frame(12).assign(
        time=["2026-01-01T00:00:00+00:00", None, ""] * 4,
        round=np.arange(12, dtype=np.int32),
        prev_label=np.where(np.arange(12) % 2 == 0, np.nan, 3.0),  # integral floats: stored as integers
        score=np.arange(12, dtype=np.int64) % 2,  # integers in the REAL column: stored as floats
        label=np.array([True, False, 2, 3.5] * 3, dtype=object),
        payload=np.array([{"a": np.int64(1)}, None, '{"b":2}', [np.float32(0.5)]] * 3, dtype=object),
    )
    from cellcurate.datasets import ledger as ledger_mod

    real, used = ledger_mod._frame_rows, []

    def recording(*args):
        rows = real(*args)
        used.append(rows is not None)
        return rows

    monkeypatch.setattr(ledger_mod, "_frame_rows", recording)
    fast = _stored(tmp_path, "fast", df, df.iloc[:5])
    monkeypatch.undo()
    assert used == [True, True]  # both batches took the column path
    slow = _stored(tmp_path, "slow", df.to_dict("records"), df.iloc[:5].to_dict("records"))
    assert len(fast) == len(slow) == 17
    for a, b in zip(fast, slow):
        a, b = list(a), list(b)
        ta, tb = a.pop(1), b.pop(1)  # the time: "now" differs between the two ledgers
        assert (ta == "2026-01-01T00:00:00+00:00") == (tb == "2026-01-01T00:00:00+00:00")
        assert a[:-1] == b[:-1], (a, b)
    assert [r[1] for r in fast[:3]][0] == "2026-01-01T00:00:00+00:00" and fast[1][1] and fast[2][1]
    # with the same times the chains are the same
    fixed = df.assign(time="2026-02-02T00:00:00+00:00")
    assert _stored(tmp_path, "f2", fixed) == _stored(tmp_path, "s2", fixed.to_dict("records"))


def test_frame_rows_leave_refusals_to_the_event_loop(tmp_path):
    """A frame with an unknown kind or an event with no actor is refused with the loop's error,
    naming the first such event, and nothing is stored."""
    import pytest

    from cellcurate.errors import StoreError

    led = Ledger(tmp_path / "l.sqlite")
    bad_actor = _frame(4).assign(actor=["a", "", "b", "c"])
    bad_kind = _frame(4).assign(kind=["ingest", "ingest", "nope", "ingest"])
    with pytest.raises(StoreError, match="has no actor"):
        led.append(bad_actor)
    with pytest.raises(StoreError, match="unknown ledger event kind 'nope'"):
        led.append(bad_kind)
    assert led._con.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0
    led.close()

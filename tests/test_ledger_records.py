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

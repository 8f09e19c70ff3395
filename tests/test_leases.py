"""Review leases: one reviewer per nucleus at a time, expiry, release (datasets/leases.py)."""

import sqlite3

from cellcurate.datasets.leases import Leases


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_claim_expiry_and_release(tmp_path):
    db = tmp_path / "ledger.sqlite"
    clock = Clock()
    ana = Leases(db, "ana", seconds=60, clock=clock)
    bob = Leases(db, "bob", seconds=60, clock=clock)
    assert ana.claim([1, 2, 3]) == {1, 2, 3}
    assert bob.claim([3, 4]) == {4}  # 3 is ana's
    assert ana.claim([3]) == {3}  # renewing your own lease works
    assert bob.taken() == {1: "ana", 2: "ana", 3: "ana"} and ana.taken() == {4: "bob"}
    clock.t += 61  # ana's leases have expired: free for bob
    assert bob.claim([1, 2]) == {1, 2} and bob.taken() == {}
    assert ana.taken() == {1: "bob", 2: "bob"}  # bob's lease on 4 has expired too
    bob.release([1])
    assert ana.claim([1]) == {1}
    bob.release()
    assert ana.taken() == {}
    # the rows, read with sqlite3 itself: one lease per nucleus
    rows = sqlite3.connect(db).execute("SELECT nucleus_id, reviewer FROM leases ORDER BY nucleus_id").fetchall()
    assert rows == [(1, "ana"), (3, "ana")]
    ana.close()
    bob.close()


def test_claim_nothing(tmp_path):
    leases = Leases(tmp_path / "ledger.sqlite", "ana")
    assert leases.claim([]) == set()
    leases.close()

"""Review leases: which reviewer is looking at which nucleus, so that two reviewers of one store
are never shown the same nucleus (unless they ask for double review).

A lease is a row ``(nucleus_id, reviewer, expires)`` in the ``leases`` table of the store's
``ledger.sqlite``. It is *not* part of the append-only event log: leases are short-lived
coordination state (claimed when a reviewer's session reaches a nucleus, renewed while the
session runs, released when it closes), they never change a label and nothing in the label fold
reads them. A lease whose ``expires`` (Unix seconds) has passed is free, so a crashed session
blocks nobody for longer than the lease duration.

Claiming is one ``BEGIN IMMEDIATE`` transaction: a nucleus goes to the first reviewer who claims
it while it is free (or already theirs); the others see it as taken.

Dimensions: L leases.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import StoreError

Clock = Callable[[], float]

#: Default lease duration in seconds (a session renews its leases while it runs).
LEASE_SECONDS = 15 * 60

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    nucleus_id INTEGER PRIMARY KEY,
    reviewer TEXT NOT NULL,
    expires REAL NOT NULL
);
"""


class Leases:
    """The leases of one store (a second connection to ``STORE/ledger.sqlite``).

    Parameters
    ----------
    path
        The store's ``ledger.sqlite``.
    reviewer
        Whose leases these are.
    seconds
        Lease duration.
    clock
        Time source (Unix seconds); tests pass a fake one.
    """

    def __init__(self, path: str | Path, reviewer: str, *, seconds: float = LEASE_SECONDS,
                 clock: Clock | None = None) -> None:
        self.path = Path(path)
        self.reviewer = str(reviewer)
        self.seconds = float(seconds)
        self.clock = clock or time.time
        try:
            self._con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
            self._con.execute("PRAGMA busy_timeout=60000")
            self._con.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the review leases: {exc}", path=self.path) from None

    def close(self) -> None:
        self._con.close()

    def _tx(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                out = work(self._con)
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
            self._con.execute("COMMIT")
            return out
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the review leases: {exc}", path=self.path) from None

    def claim(self, nucleus_ids: Iterable[int]) -> set[int]:
        """Claim (or renew) the given nuclei; return the ones this reviewer now holds."""
        ids = [int(i) for i in nucleus_ids]
        if not ids:
            return set()
        now = self.clock()
        until = now + self.seconds

        def work(c: sqlite3.Connection) -> set[int]:
            c.executemany(
                "INSERT INTO leases (nucleus_id, reviewer, expires) VALUES (?, ?, ?) "
                "ON CONFLICT(nucleus_id) DO UPDATE SET reviewer=excluded.reviewer, expires=excluded.expires "
                "WHERE leases.reviewer=excluded.reviewer OR leases.expires<=?",
                [(i, self.reviewer, until, now) for i in ids],
            )
            marks = ",".join("?" * len(ids))
            rows = c.execute(f"SELECT nucleus_id FROM leases WHERE reviewer=? AND nucleus_id IN ({marks})",
                             [self.reviewer, *ids]).fetchall()
            return {int(r[0]) for r in rows}

        return set(self._tx(work))

    def taken(self) -> dict[int, str]:
        """Nuclei leased by *other* reviewers right now: nucleus id -> reviewer."""
        rows = self._con.execute("SELECT nucleus_id, reviewer FROM leases WHERE reviewer<>? AND expires>?",
                                 (self.reviewer, self.clock())).fetchall()
        return {int(n): str(r) for n, r in rows}

    def release(self, nucleus_ids: Iterable[int] | None = None) -> None:
        """Give back this reviewer's leases (all of them when ``nucleus_ids`` is None)."""
        if nucleus_ids is None:
            self._tx(lambda c: c.execute("DELETE FROM leases WHERE reviewer=?", (self.reviewer,)))
            return
        ids = [(int(i), self.reviewer) for i in nucleus_ids]
        if ids:
            self._tx(lambda c: c.executemany("DELETE FROM leases WHERE nucleus_id=? AND reviewer=?", ids))

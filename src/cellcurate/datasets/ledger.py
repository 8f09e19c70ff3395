"""The store's append-only ledger (SQLite, WAL) and the fold that gives every nucleus its label.

Every label change is an *event*; nothing is ever updated or deleted (triggers refuse it).
The current label of a nucleus is a fold over its events in order:

1. ``ingest``: the latest ingest event sets the base: its ``label`` is the resolved unified class,
   or 0 when the source label still has several candidates (``payload["candidates"]``).
   A newer ingest (``curate ingest --overwrite``) resets the nucleus: older events no longer count.
2. ``proposal`` events with ``action="auto_accepted"`` (relabeling rounds) set the label; a later
   round overrides an earlier one. ``action="queued"`` proposals wait for review.
3. ``decision`` events (review) override proposals. Each reviewer's latest effective decision
   counts; ``undo`` (``ref`` = the seq of the undone decision) removes one; ``skip`` changes
   nothing. When the reviewers' effective decisions disagree the nucleus is in ``conflict``
   (label 0, unresolved) until an ``adjudicate`` decision, which is final (a later adjudication
   or an undo of it can change it).

Labels: -1 = not a nucleus (rejected in review), 0 = unresolved, 1..K = unified class ids.

Events also carry ``flag`` rows (cleanlab issues: ``action`` = reason, ``score`` = issue score,
``label`` = suggested class) and ``round`` rows (``nucleus_id`` NULL; ``action`` "started",
"finished" or "superseded"). Every ``proposal`` and ``flag`` event of a run has ``ref`` = the seq of
that run's ``round``/"started" event; a later ``round``/"superseded" event with the same ``ref``
(``curate relabel --overwrite``) retires that run: its proposals no longer count in the fold and
its flags leave the review queue, while the events themselves stay in the history.

Each event row stores ``chain`` = sha256(previous chain + the row's canonical content), so
:meth:`Ledger.verify_chain` detects any edit made behind the ledger's back, and a release records
the ledger position and its chain hash.

Durability: WAL with ``synchronous=NORMAL`` survives the death of the writing process (SIGKILL)
after ``append`` returns; ``synchronous=FULL`` (``durable=True``) also survives power loss.
Concurrent writers (several annotators, several processes) serialise on SQLite's write lock with
a generous busy timeout (:data:`DEFAULT_BUSY_TIMEOUT` seconds, ``CELLCURATE_LEDGER_TIMEOUT`` in the
environment overrides it); no event is lost. A ledger that stays locked longer (another process
holds a write transaction or ``locking_mode=EXCLUSIVE``) gives :data:`LOCKED_MESSAGE` with the
holder's process id, never a hang. Every SQLite error becomes a one-line :class:`StoreError` naming
the ledger file (a damaged or replaced file: "not an SQLite database").

Read-only media: a read-only ledger is opened ``mode=ro``; where SQLite cannot use its WAL index
there (no ``-shm`` and no write access), it is opened ``immutable=1`` (no locks, no WAL writes),
which is safe because nobody can write it; :attr:`Ledger.notes` says so.

Dimensions: E events, N nuclei.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..errors import StoreError

EventKind = Literal["ingest", "proposal", "flag", "decision", "round", "instance_flag", "geometry"]
#: ``instance_flag`` (instance-level label issues: a missed, spurious or badly drawn nucleus, with
#: the proposed geometry) and ``geometry`` (a reviewer's decision on one: add, delete, replace the
#: outline, keep, undo) are separate kinds so that the class-label fold, queue and rounds never
#: see them; see docs/INSTANCES.md.
EVENT_KINDS: tuple[str, ...] = ("ingest", "proposal", "flag", "decision", "round", "instance_flag", "geometry")
DecisionAction = Literal["accept", "keep", "set_class", "not_nucleus", "skip", "undo", "adjudicate"]
DECISION_ACTIONS: tuple[str, ...] = ("accept", "keep", "set_class", "not_nucleus", "skip", "undo", "adjudicate")
LabelStatus = Literal["source", "unresolved", "auto", "reviewed", "conflict", "rejected"]

NOT_A_NUCLEUS = -1
UNRESOLVED = 0

#: Columns of an event, in storage order (``seq`` and ``chain`` are assigned by the ledger).
EVENT_COLUMNS: tuple[str, ...] = (
    "seq", "time", "kind", "nucleus_id", "round", "actor", "action",
    "label", "prev_label", "score", "ref", "payload", "chain",
)
_INSERT_COLUMNS = EVENT_COLUMNS[1:]
_INSERT_EVENTS = f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES ({', '.join('?' * len(EVENT_COLUMNS))})"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS units (
    unit TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    dir TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    taxonomy_hash TEXT NOT NULL,
    n_images INTEGER NOT NULL,
    n_nuclei INTEGER NOT NULL,
    origin TEXT NOT NULL,
    time TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    kind TEXT NOT NULL,
    nucleus_id INTEGER,
    round INTEGER,
    actor TEXT NOT NULL,
    action TEXT,
    label INTEGER,
    prev_label INTEGER,
    score REAL,
    ref INTEGER,
    payload TEXT,
    chain TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_nucleus ON events (nucleus_id);
CREATE INDEX IF NOT EXISTS events_kind_round ON events (kind, round);
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END;
"""

GENESIS = "0" * 64

#: Seconds a ledger read or write waits for another process's lock before it gives up.
DEFAULT_BUSY_TIMEOUT = 60.0
#: What a ledger locked for longer than the busy timeout says (followed by the holder, when known).
LOCKED_MESSAGE = "ledger is locked by another curate process; retry or stop it"


def busy_timeout_default() -> float:
    """The busy timeout: ``CELLCURATE_LEDGER_TIMEOUT`` (seconds) or :data:`DEFAULT_BUSY_TIMEOUT`."""
    text = os.environ.get("CELLCURATE_LEDGER_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_BUSY_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise StoreError(f"CELLCURATE_LEDGER_TIMEOUT must be a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise StoreError(f"CELLCURATE_LEDGER_TIMEOUT must be >= 0 seconds, got {text!r}")
    return value


def _is_locked(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


def lock_holders(path: str | Path) -> list[str]:
    """Processes other than this one holding a write lock on the ledger file or its ``-wal`` /
    ``-shm`` (from ``/proc/locks``; Linux only, empty elsewhere): ``["pid 123 (python -m ...)"]``."""
    inodes = set()
    for suffix in ("", "-wal", "-shm"):
        try:
            st = os.stat(f"{path}{suffix}")
        except OSError:
            continue
        inodes.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids: set[int] = set()
    for line in lines:
        parts = line.split()
        if "->" in parts:  # a waiter, not a holder
            continue
        try:
            kind, pid, where = parts[3], int(parts[4]), parts[5].split(":")
            key = (int(where[0], 16), int(where[1], 16), int(where[2]))
        except (IndexError, ValueError):
            continue
        if kind == "WRITE" and key in inodes and pid != os.getpid():
            pids.add(pid)
    out = []
    for pid in sorted(pids):
        try:
            cmd = " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ").split())
        except OSError:
            cmd = ""
        out.append(f"pid {pid}" + (f" ({cmd[:80]})" if cmd else ""))
    return out


def ledger_error(path: Path, exc: BaseException, doing: str = "read") -> StoreError:
    """The one-line :class:`StoreError` for an SQLite error on the ledger at ``path``."""
    cause = exc.__cause__ if isinstance(exc.__cause__, sqlite3.Error) else exc  # pandas wraps sqlite errors
    msg = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    low = msg.lower()
    if _is_locked(cause):
        holders = lock_holders(path)
        held = f" (held by {', '.join(holders)})" if holders else ""
        return StoreError(f"{LOCKED_MESSAGE}{held}", path=path)
    if "not a database" in low or "malformed" in low or "file is encrypted" in low:
        return StoreError(f"not an SQLite database, or damaged ({msg}); restore ledger.sqlite from a backup",
                          path=path)
    if "readonly" in low or "read-only" in low:
        return StoreError(f"cannot {doing} the ledger: the file or its folder is read-only ({msg})", path=path)
    return StoreError(f"cannot {doing} the ledger: {msg}", path=path)


def _guarded(method: Any) -> Any:
    """Turn SQLite errors (also those pandas wraps) raised by a ledger method into one-line StoreErrors."""

    @functools.wraps(method)
    def wrapper(self: Ledger, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except StoreError:
            raise
        except sqlite3.Error as exc:
            raise ledger_error(self.path, exc) from None
        except Exception as exc:
            if isinstance(exc.__cause__, sqlite3.Error):
                raise ledger_error(self.path, exc) from None
            raise

    return wrapper


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _canonical(row: Sequence[Any]) -> bytes:
    """The bytes a row's chain hash covers: fields joined by the unit separator (NULL as "\x00")."""
    return "\x1f".join(map(_canon_value, row)).encode("utf-8")


def _frame_columns(df: pd.DataFrame) -> dict[str, list[Any]] | None:
    """The columns of ``df`` as lists of the values ``df.to_dict("records")`` gives (numpy
    scalars as Python ones), or None when a column has another extension dtype (nullable
    integers, whose NA ``to_dict`` gives as None)."""
    cols: dict[str, list[Any]] = {}
    for name in df.columns:
        col = df[name]
        if isinstance(col.dtype, np.dtype) and col.dtype.kind in "biuf":
            cols[str(name)] = col.tolist()
        elif isinstance(col.dtype, np.dtype) and col.dtype.kind == "O":
            cols[str(name)] = [v.item() if isinstance(v, np.generic) else v for v in col.tolist()]
        elif isinstance(col.dtype, pd.StringDtype):
            cols[str(name)] = col.tolist()
        else:
            return None
    return cols


def _frame_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """``df.to_dict("records")``, the same values (numpy scalars as Python ones), built column by
    column: ~7x faster for the one event per nucleus of an ingest. Columns of other extension
    dtypes (nullable integers, whose NA ``to_dict`` gives as None) go through ``to_dict``."""
    cols = _frame_columns(df)
    if cols is None:
        return df.to_dict("records")  # type: ignore[return-value]
    names = list(cols)
    return [dict(zip(names, values)) for values in zip(*cols.values())] if len(df) else []


#: event fields stored in INTEGER / REAL columns: SQLite's column affinity turns an integral float
#: into an integer there (and an integer into a float in ``score``), so the value is normalised the
#: same way before it is hashed, or the chain would not verify when read back
_INTEGER_FIELDS = frozenset({"nucleus_id", "round", "label", "prev_label", "ref"})
_REAL_FIELDS = frozenset({"score"})


def _as_integer_column(v: Any) -> Any:
    """``v`` as SQLite stores it in an INTEGER column (an integral float or a bool as an int)."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float) and v.is_integer() and -(2**63) <= v < 2**63:
        return int(v)
    return v


def _as_real_column(v: Any) -> Any:
    """``v`` as SQLite stores it in a REAL column (an int or a bool as a float)."""
    return float(v) if isinstance(v, int) else v


#: field -> the form its column stores a value in (fields of TEXT columns: as given)
_STORED_AS = {**dict.fromkeys(_INTEGER_FIELDS, _as_integer_column), **dict.fromkeys(_REAL_FIELDS, _as_real_column)}


def _stored_value(name: str, v: Any) -> Any:
    """A field's value (after :func:`_none_if_na`) as its column stores it."""
    stored = _STORED_AS.get(name)
    return v if stored is None else stored(v)


def _canon_value(v: Any) -> str:
    """One field as :func:`_canonical` writes it."""
    return "\x00" if v is None else repr(v) if isinstance(v, float) else str(v)


def _canon_column(values: list[Any]) -> list[str]:
    """:func:`_canon_value` of every value of a column; a column of one repeated value (an
    ingest's kind, actor, action), of strings only or of ints only without a call per value."""
    first = values[0]
    if values.count(first) == len(values) and (first is None or type(first) in (str, int, float)):
        return [_canon_value(first)] * len(values)
    types = set(map(type, values))
    if types <= {str, int}:
        return list(map(str, values))
    return list(map(_canon_value, values))


def _payload_text(payload: Any) -> Any:
    if payload is not None and not isinstance(payload, str):
        return json.dumps(payload, separators=(",", ":"), default=_json_default)
    return payload


def _frame_rows(df: pd.DataFrame, seq: int, chain: str, now: str) -> list[tuple[Any, ...]] | None:
    """The rows :meth:`Ledger._insert` stores for the events of ``df`` (their seq numbers from
    ``seq + 1``, the chain from ``chain``), built column by column: the same values, the same
    chain as the event-by-event loop at a third of its cost (one event per nucleus of an ingest:
    the bytes hashed are joined per row from strings made per column). None when the frame
    needs that loop: a column of another extension dtype, or an event it refuses (the loop
    raises the same error, for the first such event)."""
    cols = _frame_columns(df)
    n = len(df)
    if cols is None or not n:
        return None
    kinds = cols.get("kind", [None] * n)
    actors = cols.get("actor", [None] * n)
    if not set(kinds) <= set(EVENT_KINDS) or not all(actors):
        return None
    none = [None] * n

    def field(name: str) -> list[Any]:
        values = cols.get(name)
        if values is None:
            return none
        if df[name].dtype.kind in "iu" and name not in _REAL_FIELDS:  # Python ints: stored as they are
            return values
        values = list(map(_none_if_na, values))
        stored = _STORED_AS.get(name)
        return values if stored is None else list(map(stored, values))

    values: list[list[Any]] = []
    for name in _INSERT_COLUMNS[:-1]:  # time ... payload; the chain is computed below
        if name == "time":
            values.append([v or now for v in field("time")])
        elif name == "kind":
            values.append(kinds)
        elif name == "actor":
            values.append([str(a) for a in actors])
        elif name == "payload":
            values.append(list(map(_payload_text, cols.get("payload", none))))
        else:
            values.append(field(name))
    texts = ["\x1f".join(t) for t in zip(*map(_canon_column, values))]
    seqs = range(seq + 1, seq + n + 1)
    chains: list[str] = []
    sha256 = hashlib.sha256
    for s, text in zip(seqs, texts):
        chain = sha256(chain.encode("ascii") + f"{s}\x1f{text}".encode("utf-8")).hexdigest()
        chains.append(chain)
    return list(zip(seqs, *values, chains))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _none_if_na(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, float) and np.isnan(v):
        return None
    if v is pd.NA:
        return None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


class Ledger:
    """Append-only event log of one store (``STORE/ledger.sqlite``).

    Parameters
    ----------
    path
        The SQLite file. Created (with its schema) unless ``readonly``.
    readonly
        Open without write access (``curate info`` / ``verify`` on a read-only store).
    durable
        ``synchronous=FULL``: every append is fsynced (survives power loss, slower).
    """

    def __init__(self, path: str | Path, *, readonly: bool = False, durable: bool = False,
                 busy_timeout: float | None = None) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.busy_timeout = busy_timeout_default() if busy_timeout is None else float(busy_timeout)
        #: what opening noticed (e.g. read-only media: opened immutable)
        self.notes: list[str] = []
        if readonly and not self.path.exists():
            raise StoreError("no ledger.sqlite: not a cellcurate store", path=self.path.parent)
        try:
            if readonly:
                self._con = self._connect_readonly()
            else:
                self._con = self._connect(str(self.path), uri=False)
                self._con.execute("PRAGMA journal_mode=WAL")
                self._con.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._con.executescript(_SCHEMA)
        except StoreError:
            raise
        except sqlite3.Error as exc:
            raise ledger_error(self.path, exc, "open") from None

    def _connect(self, target: str, *, uri: bool) -> sqlite3.Connection:
        con = sqlite3.connect(target, uri=uri, timeout=self.busy_timeout, isolation_level=None,
                              check_same_thread=False)
        con.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        return con

    def _connect_readonly(self) -> sqlite3.Connection:
        """``mode=ro``; on read-only media where SQLite cannot use the WAL index, ``immutable=1``."""
        from urllib.parse import quote

        base = f"file:{quote(str(self.path.resolve()))}"
        con = self._connect(f"{base}?mode=ro", uri=True)
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return con
        except sqlite3.OperationalError as exc:
            con.close()
            if _is_locked(exc) or not _read_only_media(self.path):
                raise
        con = self._connect(f"{base}?mode=ro&immutable=1", uri=True)
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        wal = Path(f"{self.path}-wal")
        self.notes.append("the store is on read-only media: the ledger was opened immutable (no locks)"
                          + (f"; {wal.name} is present and its events are not visible"
                             if wal.exists() and wal.stat().st_size else ""))
        return con

    # -- lifecycle ------------------------------------------------------------------------------
    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta / units ---------------------------------------------------------------------------
    @_guarded
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self._con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        self._write(lambda c: c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value)))

    @_guarded
    def units(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM units ORDER BY unit", self._con)

    @_guarded
    def data_version(self) -> int:
        """Changes whenever another connection commits (SQLite ``PRAGMA data_version``): a cheap
        way for readers to know their cached tables may be stale."""
        return int(self._con.execute("PRAGMA data_version").fetchone()[0])

    @_guarded
    def unit(self, name: str) -> dict[str, Any] | None:
        df = pd.read_sql_query("SELECT * FROM units WHERE unit=?", self._con, params=(name,))
        return None if df.empty else df.iloc[0].to_dict()

    def commit_units(self, units: Sequence[tuple[Mapping[str, Any], pd.DataFrame]]) -> None:
        """Register (or replace) ingest units and append their ingest events, in one transaction."""
        cols = ("unit", "source", "dir", "fingerprint", "taxonomy_hash", "n_images", "n_nuclei", "origin", "time")

        def work(c: sqlite3.Connection) -> None:
            for unit, events in units:
                values = tuple(unit[k] for k in cols)
                c.execute(
                    f"INSERT OR REPLACE INTO units ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    values,
                )
                self._insert(c, events)

        self._write(work)

    # -- events ---------------------------------------------------------------------------------
    def append(self, events: pd.DataFrame | Sequence[Mapping[str, Any]]) -> list[int]:
        """Append events in one transaction; return their seq numbers.

        Each event is a mapping with ``kind`` and ``actor`` and any of ``nucleus_id``, ``round``,
        ``action``, ``label``, ``prev_label``, ``score``, ``ref``, ``payload`` (dict or JSON text),
        ``time`` (default now, UTC).
        """
        out: list[int] = []
        self._write(lambda c: out.extend(self._insert(c, events)))
        return out

    def _insert(self, c: sqlite3.Connection, events: pd.DataFrame | Sequence[Mapping[str, Any]]) -> list[int]:
        if len(events) == 0:
            return []
        last = c.execute("SELECT seq, chain FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        seq, chain = (0, GENESIS) if last is None else (int(last[0]), str(last[1]))
        now = utc_now()
        rows = _frame_rows(events, seq, chain, now) if isinstance(events, pd.DataFrame) else None
        if rows is not None:
            c.executemany(_INSERT_EVENTS, rows)
            return [r[0] for r in rows]
        records = _frame_records(events) if isinstance(events, pd.DataFrame) else list(events)
        rows = []
        seqs: list[int] = []
        for ev in records:
            kind = ev.get("kind")
            if kind not in EVENT_KINDS:
                raise StoreError(f"unknown ledger event kind {kind!r}; expected one of {EVENT_KINDS}")
            if not ev.get("actor"):
                raise StoreError(f"ledger event of kind {kind!r} has no actor")
            payload = _payload_text(ev.get("payload"))
            seq += 1
            body = (
                _none_if_na(ev.get("time")) or now,
                kind,
                _stored_value("nucleus_id", _none_if_na(ev.get("nucleus_id"))),
                _stored_value("round", _none_if_na(ev.get("round"))),
                str(ev["actor"]),
                _none_if_na(ev.get("action")),
                _stored_value("label", _none_if_na(ev.get("label"))),
                _stored_value("prev_label", _none_if_na(ev.get("prev_label"))),
                _stored_value("score", _none_if_na(ev.get("score"))),
                _stored_value("ref", _none_if_na(ev.get("ref"))),
                payload,
            )
            chain = hashlib.sha256(chain.encode("ascii") + _canonical((seq, *body))).hexdigest()
            rows.append((seq, *body, chain))
            seqs.append(seq)
        c.executemany(_INSERT_EVENTS, rows)
        return seqs

    def _write(self, work: Any) -> None:
        if self.readonly:
            raise StoreError("the store is open read-only", path=self.path.parent)
        deadline = time.monotonic() + self.busy_timeout
        attempt = 0
        while True:
            try:
                self._con.execute("BEGIN IMMEDIATE")  # waits up to the busy timeout for the write lock
                try:
                    work(self._con)
                except BaseException:
                    self._con.execute("ROLLBACK")
                    raise
                self._con.execute("COMMIT")
                return
            except sqlite3.Error as exc:
                if _is_locked(exc) and time.monotonic() < deadline:
                    attempt += 1
                    time.sleep(min(0.05 * attempt, 0.5))
                    continue
                raise ledger_error(self.path, exc, "write") from None

    @_guarded
    def events(
        self,
        *,
        kinds: Iterable[str] | None = None,
        round: int | None = None,
        nucleus_ids: Iterable[int] | None = None,
        since_seq: int | None = None,
        until_seq: int | None = None,
        parse_payload: bool = False,
    ) -> pd.DataFrame:
        """Events as a frame (columns :data:`EVENT_COLUMNS`), in seq order, filtered."""
        where: list[str] = []
        params: list[Any] = []
        if kinds is not None:
            kinds = list(kinds)
            where.append(f"kind IN ({', '.join('?' * len(kinds))})")
            params.extend(kinds)
        if round is not None:
            where.append("round = ?")
            params.append(int(round))
        if since_seq is not None:
            where.append("seq > ?")
            params.append(int(since_seq))
        if until_seq is not None:
            where.append("seq <= ?")
            params.append(int(until_seq))
        ids: list[int] | None = None
        if nucleus_ids is not None:
            ids = [int(i) for i in nucleus_ids]
            if len(ids) <= 500:
                where.append(f"nucleus_id IN ({', '.join('?' * len(ids))})")
                params.extend(ids)
        sql = "SELECT * FROM events" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq"
        # numpy_nullable keeps 63-bit nucleus ids exact when the column holds NULLs (round events);
        # the default backend would pass them through float64 and round them.
        df = pd.read_sql_query(sql, self._con, params=params, dtype_backend="numpy_nullable")
        for col in ("time", "kind", "actor", "action", "payload", "chain"):
            df[col] = df[col].astype(object).where(df[col].notna(), None)
        df["score"] = df["score"].astype("float64")
        df["seq"] = df["seq"].astype("int64")
        if ids is not None and len(ids) > 500:
            df = df[df["nucleus_id"].isin(ids)].reset_index(drop=True)
        for col in ("nucleus_id", "round", "label", "prev_label", "ref"):
            df[col] = df[col].astype("Int64")
        if parse_payload:
            df["payload"] = [json.loads(p) if isinstance(p, str) else {} for p in df["payload"]]
        return df

    @_guarded
    def payload_values(self, kind: str, key: str, *, round: int | None = None) -> list[Any]:
        """The distinct values of top-level payload field ``key`` over the events of ``kind`` (and
        ``round``), in the order they first appear; events without it are skipped. Read by SQLite's
        JSON functions, without loading the events (an instance round's run tokens among its
        tens of thousands of flags)."""
        if not key.isidentifier():
            raise ValueError(f"payload key must be an identifier, got {key!r}")
        sql = (f"SELECT json_extract(payload, '$.{key}') AS v, MIN(seq) AS first FROM events WHERE kind = ?"
               + (" AND round = ?" if round is not None else "")
               + " AND json_valid(payload) GROUP BY v HAVING v IS NOT NULL ORDER BY first")
        params: list[Any] = [kind] + ([int(round)] if round is not None else [])
        return [r[0] for r in self._con.execute(sql, params).fetchall()]

    @_guarded
    def count(self, kind: str | None = None) -> int:
        if kind is None:
            return int(self._con.execute("SELECT COUNT(*) FROM events").fetchone()[0])
        return int(self._con.execute("SELECT COUNT(*) FROM events WHERE kind=?", (kind,)).fetchone()[0])

    @_guarded
    def head(self) -> tuple[int, str]:
        """The ledger position (last seq, 0 when empty) and its chain hash."""
        row = self._con.execute("SELECT seq, chain FROM events ORDER BY seq DESC LIMIT 1").fetchone()
        return (0, GENESIS) if row is None else (int(row[0]), str(row[1]))

    @_guarded
    def verify_chain(self) -> list[str]:
        """Recompute the hash chain; return problems (empty when intact)."""
        problems: list[str] = []
        chain = GENESIS
        expected_seq = None
        cur = self._con.execute(f"SELECT {', '.join(EVENT_COLUMNS)} FROM events ORDER BY seq")
        for row in cur:
            seq = int(row[0])
            if expected_seq is not None and seq != expected_seq:
                problems.append(f"ledger: events {expected_seq}..{seq - 1} are missing")
            expected_seq = seq + 1
            chain = hashlib.sha256(chain.encode("ascii") + _canonical(row[:-1])).hexdigest()
            if chain != row[-1]:
                problems.append(f"ledger: event {seq} does not match its hash chain (edited behind the ledger's back)")
                chain = row[-1]
                if len(problems) > 20:
                    break
        return problems

    # -- the fold -------------------------------------------------------------------------------
    @_guarded
    def current_labels(self, *, until_seq: int | None = None) -> pd.DataFrame:
        """Fold the events into the current label of every ingested nucleus.

        Returns a frame indexed by ``nucleus_id`` with columns ``label`` (int), ``status``
        (:data:`LabelStatus`), ``source_label``, ``candidates`` (tuple of ids from ingest),
        ``round`` (Int64: round of the accepted proposal or of the decision), ``decided_by``
        (actor of the deciding event) and ``seq`` (the deciding event).
        ``until_seq`` folds the ledger as it was at that position.
        """
        return fold_labels(self.events(kinds=("ingest", "proposal", "decision", "round"), until_seq=until_seq))


def _read_only_media(path: Path) -> bool:
    """The ledger's folder is on a read-only file system, or this process cannot write it."""
    folder = path.parent
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return True
    except OSError:
        pass
    return not os.access(folder, os.W_OK)


def fold_labels(events: pd.DataFrame) -> pd.DataFrame:
    """The label fold of :meth:`Ledger.current_labels`, on an events frame (see module docstring)."""
    cols = ["label", "status", "source_label", "candidates", "round", "decided_by", "seq"]
    ing = events[events["kind"] == "ingest"]
    if ing.empty:
        return pd.DataFrame(columns=cols).rename_axis("nucleus_id")
    ing = ing.drop_duplicates("nucleus_id", keep="last").set_index("nucleus_id")
    payloads = [json.loads(p) if isinstance(p, str) else {} for p in ing["payload"]]
    out = pd.DataFrame(
        {
            "label": ing["label"].fillna(0).astype("int64"),
            "status": np.where(ing["label"].fillna(0).to_numpy() > 0, "source", "unresolved"),
            "source_label": [p.get("source_label", "") for p in payloads],
            "candidates": [tuple(p.get("candidates", ())) for p in payloads],
            "round": pd.array([pd.NA] * len(ing), dtype="Int64"),
            "decided_by": ing["actor"].to_numpy(),
            "seq": ing["seq"].to_numpy(),
        },
        index=ing.index,
    )
    out.index.name = "nucleus_id"
    base_seq = out["seq"]

    # Accepted proposals after the base ingest; the latest wins.
    prop = events[(events["kind"] == "proposal") & (events["action"] == "auto_accepted")]
    retired = superseded_runs(events)
    if retired:
        prop = prop[~prop["ref"].isin(retired)]
    if not prop.empty:
        prop = prop[prop["nucleus_id"].isin(out.index)]
        prop = prop[prop["seq"].to_numpy() > base_seq.reindex(prop["nucleus_id"]).to_numpy()]
        prop = prop.drop_duplicates("nucleus_id", keep="last").set_index("nucleus_id")
        idx = prop.index
        out.loc[idx, "label"] = prop["label"].astype("int64")
        out.loc[idx, "status"] = "auto"
        out.loc[idx, "round"] = prop["round"]
        out.loc[idx, "decided_by"] = prop["actor"]
        out.loc[idx, "seq"] = prop["seq"]

    dec = events[events["kind"] == "decision"]
    if not dec.empty:
        dec = dec[dec["nucleus_id"].isin(out.index)]
        dec = dec[dec["seq"].to_numpy() > base_seq.reindex(dec["nucleus_id"]).to_numpy()]
        for nid, group in dec.groupby("nucleus_id", sort=False):
            result = _fold_decisions(group)
            if result is None:
                continue
            label, status, rnd, actor, seq = result
            if status == "conflict":
                out.loc[nid, ["label", "status", "decided_by", "seq"]] = [UNRESOLVED, "conflict", actor, seq]
            else:
                out.loc[nid, ["label", "status", "decided_by", "seq"]] = [label, status, actor, seq]
            out.loc[nid, "round"] = rnd
    out["label"] = out["label"].astype("int64")
    out["seq"] = out["seq"].astype("int64")
    return out


def superseded_runs(events: pd.DataFrame) -> set[int]:
    """Seqs of the ``round``/"started" events of runs retired by a later "superseded" event."""
    sup = events[(events["kind"] == "round") & (events["action"] == "superseded")]
    return {int(r) for r in sup["ref"].dropna()}


def _fold_decisions(group: pd.DataFrame) -> tuple[int, str, Any, str, int] | None:
    """Fold one nucleus's decisions (seq order). None when no decision has an effect."""
    stacks: dict[str, list[tuple[int, int, Any]]] = {}  # reviewer -> [(seq, label, round)]
    adjudications: list[tuple[int, int, Any, str]] = []  # (seq, label, round, actor)
    for row in group.itertuples(index=False):
        action = row.action
        if action == "skip":
            continue
        if action == "undo":
            target = None if pd.isna(row.ref) else int(row.ref)
            stack = stacks.get(row.actor, [])
            if target is None and stack:
                stack.pop()
            else:
                stacks[row.actor] = [d for d in stack if d[0] != target]
                adjudications[:] = [a for a in adjudications if not (a[0] == target and a[3] == row.actor)]
            continue
        label = int(row.label) if not pd.isna(row.label) else UNRESOLVED
        if action == "adjudicate":
            adjudications.append((int(row.seq), label, row.round, row.actor))
        else:
            stacks.setdefault(row.actor, []).append((int(row.seq), label, row.round))
    if adjudications:
        seq, label, rnd, actor = adjudications[-1]
        return label, ("rejected" if label == NOT_A_NUCLEUS else "reviewed"), rnd, actor, seq
    effective = {r: s[-1] for r, s in stacks.items() if s}
    if not effective:
        return None
    latest_actor, (seq, label, rnd) = max(effective.items(), key=lambda kv: kv[1][0])
    if len({d[1] for d in effective.values()}) > 1:
        return UNRESOLVED, "conflict", rnd, latest_actor, seq
    return label, ("rejected" if label == NOT_A_NUCLEUS else "reviewed"), rnd, latest_actor, seq


def conflicts(events: pd.DataFrame) -> pd.DataFrame:
    """Nuclei whose reviewers disagree (and no adjudication settled it): one row per effective decision."""
    folded = fold_labels(events)
    ids = folded.index[folded["status"] == "conflict"]
    dec = events[(events["kind"] == "decision") & events["nucleus_id"].isin(ids)]
    dec = dec[~dec["action"].isin(["skip", "undo"])]
    return dec.drop_duplicates(["nucleus_id", "actor"], keep="last").reset_index(drop=True)

"""Review decisions: what each action means, how it is recorded, and a review session over a queue.

Every decision is one ``decision`` event appended to the store's ledger in its own SQLite
transaction, durable when :func:`decide` returns (WAL; the session opens the ledger with
``synchronous=FULL``). The event carries the reviewer (``actor``), the time, the flag's round,
the action, ``prev_label`` (the label the reviewer saw) and ``label`` (the label it results in):

========== ======================================= ==========================
action     resulting ``label``                     ``ref``
========== ======================================= ==========================
accept     the flag's (or queued proposal's) class seq of that flag/proposal
keep       the current label                       seq of the flag
set_class  the chosen class 1..K                   seq of the flag
not_nucleus -1                                     seq of the flag
skip       None (no effect on the label)           seq of the flag
undo       None                                    seq of the undone decision
adjudicate the chosen class (or -1); final         seq of the flag, if any
========== ======================================= ==========================

How decisions fold into labels (several reviewers, undo, conflicts, adjudication) is defined in
:mod:`cellcurate.datasets.ledger`. A write that fails (read-only store, full disk) raises
:class:`~cellcurate.errors.StoreError` and records nothing; the caller keeps the decision pending.

Dimensions: K classes, h×w pixels of a context window.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..datasets.ledger import (
    NOT_A_NUCLEUS,
    UNRESOLVED,
    Ledger,
    _fold_decisions,
    conflicts,
    fold_labels,
    superseded_runs,
)
from ..datasets.store import Store
from ..errors import CellcurateError, ConfigError, StateError
from .queue import build_queue, latest_flags

ReviewAction = Literal["accept", "keep", "set_class", "not_nucleus", "skip", "undo", "adjudicate"]
REVIEW_ACTIONS: tuple[str, ...] = ("accept", "keep", "set_class", "not_nucleus", "skip", "undo", "adjudicate")
DecisionSource = Literal["napari", "csv", "cli", "api"]

def display_values(taxonomy: Any) -> tuple[int, int, int]:
    """(unresolved, rejected, ignore) values of the class map shown in napari besides the class
    ids: 8, 9, 10 while the taxonomy's class ids are at most 7, else the three values after its
    largest id."""
    base = max(7, *taxonomy.ids)
    if base + 3 > 255:
        raise ConfigError(f"class ids up to {base} leave no room for the review display values (<= 252)")
    return base + 1, base + 2, base + 3


@dataclass(frozen=True)
class Decision:
    """One recorded decision."""

    seq: int
    nucleus_id: int
    action: str
    reviewer: str
    label: int | None
    prev_label: int | None
    round: int | None
    ref: int | None


def default_reviewer() -> str:
    """``$USER`` (or ``$USERNAME``), else ``"anonymous"``."""
    return os.environ.get("USER") or os.environ.get("USERNAME") or "anonymous"


# -- reading the state of one nucleus ---------------------------------------------------------------
def nucleus_events(store: Store, nucleus_ids: Iterable[int]) -> pd.DataFrame:
    """The events of a few nuclei plus every ``round`` event (needed by the fold)."""
    ids = [int(i) for i in nucleus_ids]
    ev = store.ledger.events(nucleus_ids=ids)
    rounds = store.ledger.events(kinds=("round",))
    return pd.concat([ev, rounds], ignore_index=True).sort_values("seq", kind="stable").reset_index(drop=True)


def current_labels_of(store: Store, nucleus_ids: Iterable[int], *, events: pd.DataFrame | None = None) -> pd.DataFrame:
    """The exact label fold (:meth:`Ledger.current_labels` columns) of a few nuclei."""
    ids = [int(i) for i in nucleus_ids]
    ev = nucleus_events(store, ids) if events is None else events
    folded = fold_labels(ev)
    return folded.reindex([i for i in ids if i in folded.index])


def fold_one(events: pd.DataFrame, nucleus_id: int) -> int | None:
    """The label of one nucleus from its events (plus ``round`` events): the fold of
    :func:`cellcurate.datasets.ledger.fold_labels` for a single nucleus, without its per-frame
    overhead. None when the nucleus has no ingest event."""
    ev = events[events["nucleus_id"] == nucleus_id]
    ing = ev[ev["kind"] == "ingest"]
    if ing.empty:
        return None
    base_seq = int(ing["seq"].iloc[-1])
    label = 0 if pd.isna(ing["label"].iloc[-1]) else int(ing["label"].iloc[-1])
    ev = ev[ev["seq"] > base_seq]
    prop = ev[(ev["kind"] == "proposal") & (ev["action"] == "auto_accepted")]
    retired = superseded_runs(events)
    if retired:
        prop = prop[~prop["ref"].isin(list(retired))]
    if not prop.empty:
        label = int(prop["label"].iloc[-1])
    dec = ev[ev["kind"] == "decision"]
    if not dec.empty:
        result = _fold_decisions(dec)
        if result is not None:
            label = UNRESOLVED if result[1] == "conflict" else int(result[0])
    return label


def current_label(store: Store, nucleus_id: int) -> int:
    """The current label of one nucleus (-1 rejected, 0 unresolved, 1..K)."""
    folded = current_labels_of(store, [nucleus_id])
    if folded.empty:
        raise ConfigError(f"{store.path}: no nucleus {nucleus_id} in the store")
    return int(folded["label"].iloc[0])


def _latest_flag(ev: pd.DataFrame, nucleus_id: int) -> pd.Series | None:
    ev = ev[(ev["nucleus_id"] == nucleus_id) | (ev["kind"] == "round")]
    flags = latest_flags(ev)
    return None if flags.empty else flags.iloc[-1]


def _proposal_for(ev: pd.DataFrame, nucleus_id: int, flag_seq: int | None) -> tuple[int | None, int | None, Any]:
    """(proposed class, seq it came from, round) for ``accept``: the flag, else the latest queued proposal."""
    if flag_seq is not None:
        row = ev[ev["seq"] == int(flag_seq)]
        if row.empty or row["kind"].iloc[0] not in ("flag", "proposal") or int(row["nucleus_id"].iloc[0]) != nucleus_id:
            raise ConfigError(f"event {flag_seq} is not a flag or proposal of nucleus {nucleus_id}")
        lab = row["label"].iloc[0]
        return (None if pd.isna(lab) else int(lab)), int(flag_seq), row["round"].iloc[0]
    flag = _latest_flag(ev, nucleus_id)
    if flag is not None:
        return (None if pd.isna(flag["label"]) else int(flag["label"])), int(flag["seq"]), flag["round"]
    retired = superseded_runs(ev)
    prop = ev[(ev["kind"] == "proposal") & (ev["action"] == "queued") & (ev["nucleus_id"] == nucleus_id)]
    prop = prop[~prop["ref"].isin(list(retired))]
    if prop.empty:
        return None, None, None
    last = prop.iloc[-1]
    return int(last["label"]), int(last["seq"]), last["round"]


def _na(v: Any) -> Any:
    return None if v is None or pd.isna(v) else int(v)


# -- recording --------------------------------------------------------------------------------------
def decision_event(
    store: Store,
    nucleus_id: int,
    action: str,
    *,
    reviewer: str,
    label: int | str | None = None,
    round: int | None = None,
    flag_seq: int | None = None,
    reason: str | None = None,
    source: DecisionSource = "api",
    events: pd.DataFrame | None = None,
) -> dict[str, Any]:
    """Validate a decision and build its ledger event (not yet written). See :func:`decide`."""
    if action not in REVIEW_ACTIONS:
        raise ConfigError(f"unknown review action {action!r}; expected one of {', '.join(REVIEW_ACTIONS)}")
    if not reviewer or not str(reviewer).strip():
        raise ConfigError("a decision needs a reviewer name")
    nid = int(nucleus_id)
    ev = nucleus_events(store, [nid]) if events is None else events
    folded_label = fold_one(ev, nid)
    if folded_label is None:
        raise ConfigError(f"{store.path}: no nucleus {nid} in the store")
    prev = folded_label
    ref: int | None = None if flag_seq is None else int(flag_seq)
    rnd: Any = round
    new: int | None
    if action == "undo":
        mine = ev[(ev["kind"] == "decision") & (ev["actor"] == reviewer)]
        undone = set(mine.loc[mine["action"] == "undo", "ref"].dropna().astype(int))
        live = mine[(mine["action"] != "undo") & ~mine["seq"].isin(undone)]
        if live.empty:
            raise StateError(f"{reviewer} has no decision on nucleus {nid} to undo")
        target = live.iloc[-1]
        ref, new, rnd = int(target["seq"]), None, (rnd if rnd is not None else _na(target["round"]))
    else:
        if action == "accept":
            new, ref, flag_round = _proposal_for(ev, nid, flag_seq)
            if new is None:
                raise StateError(f"nucleus {nid} has no flag or queued proposal to accept")
        else:
            flag = _latest_flag(ev, nid) if flag_seq is None else None
            flag_round = None if flag is None else flag["round"]
            if flag is not None:
                ref = int(flag["seq"])
            elif flag_seq is not None:
                row = ev[ev["seq"] == int(flag_seq)]
                flag_round = None if row.empty else row["round"].iloc[0]
            if action == "keep":
                if prev == UNRESOLVED:
                    raise StateError(f"nucleus {nid} has no resolved label to keep; set a class")
                new = prev
            elif action in ("set_class", "adjudicate"):
                if label is None:
                    raise ConfigError(f"{action} needs a class (1..{store.taxonomy.n_classes} or a name)")
                if action == "adjudicate" and str(label).strip().lower() in ("-1", "not_nucleus", "not a nucleus"):
                    new = NOT_A_NUCLEUS
                else:
                    new = store.taxonomy.class_id(label)
            elif action == "not_nucleus":
                new = NOT_A_NUCLEUS
            else:  # skip
                new = None
        if rnd is None:
            rnd = _na(flag_round)
    payload = {"source": source}
    if reason:
        payload["reason"] = reason
    return {
        "kind": "decision", "nucleus_id": nid, "round": _na(rnd), "actor": str(reviewer), "action": action,
        "label": new, "prev_label": prev, "ref": ref, "payload": payload,
    }


def decide(
    store: Store,
    nucleus_id: int,
    action: ReviewAction,
    *,
    reviewer: str,
    label: int | str | None = None,
    round: int | None = None,
    flag_seq: int | None = None,
    reason: str | None = None,
    source: DecisionSource = "api",
    ledger: Ledger | None = None,
    events: pd.DataFrame | None = None,
) -> Decision:
    """Record one review decision; durable when it returns.

    Parameters
    ----------
    store
        The store (open with ``mode="a"``).
    nucleus_id
        The nucleus decided on.
    action
        One of :data:`REVIEW_ACTIONS`; ``undo`` undoes ``reviewer``'s last live decision on the nucleus.
    reviewer
        Who decides (the event's actor).
    label
        Class id or name, for ``set_class`` and ``adjudicate``.
    round
        Round of the decision; default the round of the flag decided on.
    flag_seq
        Seq of the flag (or queued proposal) decided on; default the nucleus's latest flag.
    reason, source
        Stored in the payload.
    ledger
        Ledger to write through (e.g. a ``Ledger(durable=True)``); default ``store.ledger``.
    events
        The nucleus's events plus every ``round`` event (:func:`nucleus_events`), when the caller
        has just read them; default read here.

    Raises
    ------
    StoreError
        The store is read-only or the disk is full: nothing was recorded.
    ConfigError, StateError
        Unknown nucleus, class or action; nothing to accept, keep or undo.

    >>> d = decide(store, nid, "set_class", reviewer="ana", label="Macrophage")  # doctest: +SKIP
    """
    event = decision_event(store, nucleus_id, action, reviewer=reviewer, label=label, round=round,
                           flag_seq=flag_seq, reason=reason, source=source, events=events)
    (seq,) = (ledger or store.ledger).append([event])
    return Decision(seq, int(event["nucleus_id"]), action, str(reviewer), event["label"], event["prev_label"],
                    event["round"], event["ref"])


def conflict_table(store: Store) -> pd.DataFrame:
    """Nuclei whose reviewers disagree, one row per reviewer's effective decision.

    Columns: nucleus_id, image_id, source, source_label, reviewer, action, label, label_name, time, seq.
    """
    ledger = store.ledger
    dec = ledger.events(kinds=("decision",))
    ids = dec["nucleus_id"].dropna().unique()
    ev = ledger.events(kinds=("ingest", "proposal", "decision"), nucleus_ids=ids) if len(ids) else dec
    ev = pd.concat([ev, ledger.events(kinds=("round",))], ignore_index=True).sort_values("seq", kind="stable")
    c = conflicts(ev)
    nuc = store.nuclei()[["nucleus_id", "image_id", "source", "source_label"]]
    c = c.merge(nuc, on="nucleus_id", how="left")
    names = {NOT_A_NUCLEUS: "not a nucleus", UNRESOLVED: "unresolved", **{k: store.taxonomy.class_name(k)
                                                                          for k in store.taxonomy.ids}}
    c = c.rename(columns={"actor": "reviewer"})
    c["label_name"] = [names.get(int(v), str(v)) if not pd.isna(v) else "" for v in c["label"]]
    cols = ["nucleus_id", "image_id", "source", "source_label", "reviewer", "action", "label", "label_name",
            "time", "seq"]
    return c[cols].sort_values(["nucleus_id", "seq"]).reset_index(drop=True)


# -- a review session (what the napari widget drives) --------------------------------------------
#: RGB of the context window outside the image (a nucleus at a tile edge stays centred).
PAD_RGB: tuple[int, int, int] = (48, 48, 48)


@dataclass(frozen=True)
class PriorDecision:
    """Another reviewer's effective decision on the shown nucleus (after its flag)."""

    reviewer: str
    action: str
    label: int | None
    time: str
    seq: int


@dataclass
class ReviewItem:
    """Everything the panel shows about the current nucleus."""

    nucleus_id: int
    image_id: str
    source: str
    source_label: str
    label: int
    status: str
    proposed: int | None
    score: float
    reason: str
    round: int | None
    flag_seq: int
    probs: list[float] = field(default_factory=list)
    centroid: tuple[float, float] = (0.0, 0.0)
    rank: int = 0
    #: other reviewers' effective decisions after the flag (filled by :meth:`ReviewSession.context`)
    others: list[PriorDecision] = field(default_factory=list)
    #: the reviewer holding a lease on it, when that is somebody else
    held_by: str | None = None


@dataclass
class Context:
    """The window around the current nucleus: image, class map, mask of the nucleus, offset.

    The window is always ``window`` × ``window`` pixels with the nucleus's centroid at its centre;
    the part outside the image is :data:`PAD_RGB` (instances 0)."""

    image: np.ndarray  # (h, w, 3) uint8
    classes: np.ndarray  # (h, w) uint8: 0 background, 1..K class, 8 unresolved, 9 rejected, 10 ignore
    current: np.ndarray  # (h, w) uint8: 1 on the current nucleus
    offset: tuple[int, int]  # (y0, x0) of the window in the image (negative at the top/left edge)
    nucleus_id: int = -1
    #: ledger position the classes were folded at, the events of the window's nuclei and their
    #: instance ids (to refold when the ledger moved on)
    seq: int = 0
    events: pd.DataFrame | None = None
    near: pd.DataFrame | None = None
    instances: np.ndarray | None = None
    label: int | None = None
    others: list[PriorDecision] = field(default_factory=list)
    #: ``classes`` on each nucleus's outline only (2 px), 0 elsewhere
    outline: np.ndarray | None = None
    #: pixels on a nucleus's outline (computed once per window)
    edge: np.ndarray | None = None


def boundary(instances: np.ndarray, width: int = 2) -> np.ndarray:
    """(h, w) bool: the pixels of each nucleus within ``width`` pixels of its edge (its outline,
    drawn per instance, so touching nuclei of one class keep their border)."""
    ins = instances
    edge = np.zeros(ins.shape, bool)
    edge[1:, :] |= ins[1:, :] != ins[:-1, :]
    edge[:-1, :] |= ins[:-1, :] != ins[1:, :]
    edge[:, 1:] |= ins[:, 1:] != ins[:, :-1]
    edge[:, :-1] |= ins[:, :-1] != ins[:, 1:]
    for _ in range(width - 1):
        grow = edge.copy()
        grow[1:, :] |= edge[:-1, :] & (ins[1:, :] == ins[:-1, :])
        grow[:-1, :] |= edge[1:, :] & (ins[:-1, :] == ins[1:, :])
        grow[:, 1:] |= edge[:, :-1] & (ins[:, 1:] == ins[:, :-1])
        grow[:, :-1] |= edge[:, 1:] & (ins[:, :-1] == ins[:, 1:])
        edge = grow
    return edge & (ins > 0)


def _changed_since(ledger: Ledger, nucleus_ids: list[int], seq: int) -> bool:
    """Whether the ledger has events after ``seq`` on any of these nuclei (one indexed SQL probe,
    no frame: the common answer, "no", costs well under a millisecond)."""
    if not nucleus_ids:
        return False
    marks = ",".join("?" * len(nucleus_ids))
    row = ledger._con.execute(f"SELECT 1 FROM events WHERE seq > ? AND nucleus_id IN ({marks}) LIMIT 1",
                              [int(seq), *nucleus_ids]).fetchone()
    return row is not None


class DecidedByOthers(StateError):
    """Deciding a nucleus another reviewer already decided needs confirmation (``confirm=True``)."""

    def __init__(self, nucleus_id: int, others: list[PriorDecision], names: Mapping[int, str]) -> None:
        who = ", ".join(f"{o.reviewer} ({names.get(o.label, o.label) if o.label is not None else o.action})"
                        for o in others)
        super().__init__(f"nucleus {nucleus_id} was already decided by {who}")
        self.nucleus_id = nucleus_id
        self.others = others


def label_names(store: Store) -> dict[int, str]:
    """Display names of label values: the taxonomy's classes, -1 and 0."""
    tax = store.taxonomy
    return {NOT_A_NUCLEUS: "not a nucleus", UNRESOLVED: "unresolved", **{c.id: c.name for c in tax.classes}}


def prior_decisions(events: pd.DataFrame, nucleus_id: int, flag_seq: int, reviewer: str) -> list[PriorDecision]:
    """Effective decisions by reviewers other than ``reviewer`` on a nucleus after its flag."""
    from .queue import EFFECTIVE_ACTIONS, effective_decisions

    dec = events[(events["kind"] == "decision") & (events["nucleus_id"] == nucleus_id) & (events["seq"] > flag_seq)]
    eff = effective_decisions(dec)
    eff = eff[eff["action"].isin(EFFECTIVE_ACTIONS) & (eff["actor"] != reviewer)]
    eff = eff.drop_duplicates("actor", keep="last")
    return [PriorDecision(str(r.actor), str(r.action), _na(r.label), str(r.time), int(r.seq))
            for r in eff.itertuples(index=False)]


class ReviewSession:
    """A reviewer working through the queue of one store. Pure Python: no Qt.

    Parameters
    ----------
    store
        An open store (``mode="a"`` to record decisions; ``"r"`` shows the queue, decisions fail
        with :class:`StoreError`).
    reviewer
        The reviewer's name (default ``$USER``).
    filters
        ``round``, ``classes``, ``sources``, ``reasons``, ``double_review``: see :func:`build_queue`.
    durable
        Write decisions with ``synchronous=FULL`` (survives power loss, not only a crash).
    window
        Side in pixels of the context window around the nucleus.
    leases
        Claim nuclei before showing them (:mod:`cellcurate.datasets.leases`) so that two
        reviewers never see the same nucleus; off with ``double_review`` or a read-only store.
    lease_seconds, claim_batch
        Lease duration; how many upcoming nuclei one claim takes.
    """

    def __init__(self, store: Store, *, reviewer: str | None = None, durable: bool = True, window: int = 256,
                 leases: bool = True, lease_seconds: float | None = None, claim_batch: int = 8,
                 **filters: Any) -> None:
        from ..datasets.leases import LEASE_SECONDS, Leases

        self.store = store
        self.reviewer = reviewer or default_reviewer()
        self.filters = filters
        self.window = int(window)
        self.double_review = bool(filters.get("double_review"))
        self._ledger: Ledger | None = None
        if durable and not store.readonly:
            self._ledger = Ledger(store.ledger.path, durable=True)
        self._leases: Leases | None = None
        if leases and not self.double_review and not store.readonly:
            self._leases = Leases(store.ledger.path, self.reviewer,
                                  seconds=LEASE_SECONDS if lease_seconds is None else lease_seconds)
        self.claim_batch = max(1, int(claim_batch))
        self._held: set[int] = set()
        self._claimed_at = 0.0
        self._taken: dict[int, str] = {}
        self.history: list[Decision] = []
        self.started = time.time()
        self._lock = threading.Lock()
        self._by_image: dict[str, pd.DataFrame] = {}
        self._nuclei: pd.DataFrame | None = None
        self._rounds = store.ledger.events(kinds=("round",))
        self._cache: dict[int, Context] = {}
        self.names = label_names(store)
        self.queue = build_queue(store, reviewer=self.reviewer, **filters)
        self._pos: dict[int, int] = {int(n): i for i, n in enumerate(self.queue["nucleus_id"])}
        self.cursor: int | None = None
        self.cursor = self._first_pending()
        self._claim_current()

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        if self._leases is not None:
            try:
                self._leases.release()
            except CellcurateError:  # a read-only or full disk: the leases expire by themselves
                pass
            self._leases.close()
            self._leases = None

    # -- navigation ---------------------------------------------------------------------------
    def _pending_mask(self) -> tuple[np.ndarray, np.ndarray]:
        decided = self.queue["decided"].to_numpy(bool)
        skipped = self.queue["skipped"].to_numpy(bool)
        free = ~decided
        if self._taken:
            taken = [self._pos[n] for n in self._taken if n in self._pos]
            free = free.copy()
            free[taken] = False
        return free & ~skipped, free

    def _first_pending(self, after: int | None = None) -> int | None:
        unseen, pending = self._pending_mask()
        start = 0 if after is None else after + 1
        for pool in (unseen, pending):  # unseen first, then the skipped ones
            idx = np.flatnonzero(pool[start:])
            if idx.size:
                return int(start + idx[0])
            idx = np.flatnonzero(pool[:start])
            if idx.size:
                return int(idx[0])
        return None

    def upcoming(self, n: int) -> list[ReviewItem]:
        """The next ``n`` nuclei :meth:`next` would show after the current one (for prefetching)."""
        out: list[ReviewItem] = []
        if self.cursor is None:
            return out
        unseen, pending = self._pending_mask()
        order = np.r_[np.arange(self.cursor + 1, len(self.queue)), np.arange(0, self.cursor)]
        for pool in (unseen, pending):
            for pos in order[pool[order]]:
                item = self._item(int(pos))
                if item.nucleus_id not in {o.nucleus_id for o in out}:
                    out.append(item)
                if len(out) >= n:
                    return out
        return out

    def _claim_current(self) -> None:
        """Hold a lease on the current nucleus (and the next few); move on past nuclei others hold."""
        if self._leases is None:
            return
        renew = time.time() - self._claimed_at > self._leases.seconds / 2
        for _ in range(len(self.queue) + 1):
            if self.cursor is None:
                return
            nid = int(self.queue["nucleus_id"].iat[self.cursor])
            if nid in self._held and not renew:
                return
            batch = [nid] + [i.nucleus_id for i in self.upcoming(self.claim_batch - 1)]
            if renew:
                batch += sorted(self._held)
            got = self._leases.claim(batch)
            self._claimed_at = time.time()
            renew = False
            self._held = (self._held | got) - (set(batch) - got)
            self._taken = self._leases.taken()
            for n in got:
                self._taken.pop(n, None)
            if nid in self._held:
                return
            self.cursor = self._first_pending(self.cursor)

    def progress(self) -> tuple[int, int]:
        """(reviewed, total) in this queue."""
        return int(self.queue["decided"].sum()), len(self.queue)

    def stats(self) -> dict[str, Any]:
        """This session's work: ``decided`` (effective decisions), ``skipped``, ``per_class``
        (resulting label -> count), ``rate_per_hour`` (decisions per hour since the session
        opened, over at least one minute), ``left`` in the queue, ``taken`` by other reviewers."""
        live = [d for d in self.history if d.action not in ("skip", "undo")]
        per_class: dict[int, int] = {}
        for d in live:
            if d.label is not None:
                per_class[int(d.label)] = per_class.get(int(d.label), 0) + 1
        hours = max(time.time() - self.started, 60.0) / 3600
        done, total = self.progress()
        return {"decided": len(live), "skipped": sum(d.action == "skip" for d in self.history),
                "per_class": dict(sorted(per_class.items())), "rate_per_hour": len(live) / hours,
                "left": total - done, "taken": len(self._taken)}

    @property
    def done(self) -> bool:
        return self.cursor is None

    def next(self) -> ReviewItem | None:
        """Move to the next pending nucleus (wrapping round; skipped ones come last)."""
        self.cursor = self._first_pending(self.cursor)
        self._claim_current()
        return self.current()

    def jump(self, nucleus_id: int) -> ReviewItem:
        """Show a given nucleus of the queue (reviewed or not, held by somebody else or not)."""
        pos = self._pos.get(int(nucleus_id))
        if pos is None:
            raise ConfigError(f"nucleus {nucleus_id} is not in this review queue")
        self.cursor = pos
        if self._leases is not None and int(nucleus_id) not in self._taken:
            got = self._leases.claim([int(nucleus_id)])
            self._held |= got
        item = self.current()
        assert item is not None
        return item

    def refresh(self) -> None:
        """Rebuild the queue from the ledger (picks up other reviewers' decisions and leases)."""
        nid = None if self.cursor is None else int(self.queue["nucleus_id"].iat[self.cursor])
        self.queue = build_queue(self.store, reviewer=self.reviewer, **self.filters)
        self._rounds = self.store.ledger.events(kinds=("round",))
        self._pos = {int(n): i for i, n in enumerate(self.queue["nucleus_id"])}
        self._cache.clear()
        if self._leases is not None:
            self._taken = self._leases.taken()
        pos = None if nid is None else self._pos.get(nid)
        ok = pos is not None and not self.queue["decided"].iat[pos] and nid not in self._taken
        self.cursor = pos if ok else self._first_pending()
        self._claim_current()

    # -- the current nucleus ------------------------------------------------------------------
    def _item(self, pos: int) -> ReviewItem:
        r = self.queue.iloc[pos]
        payload = r["payload"]
        try:
            probs = list(json.loads(payload).get("probs", [])) if isinstance(payload, str) else []
        except json.JSONDecodeError:
            probs = []
        nid = int(r["nucleus_id"])
        return ReviewItem(
            nucleus_id=nid, image_id=str(r["image_id"]), source=str(r["source"]),
            source_label=str(r["source_label"]), label=int(r["label"]), status=str(r["status"]),
            proposed=None if pd.isna(r["proposed"]) else int(r["proposed"]),
            score=float(r["score"]) if not pd.isna(r["score"]) else float("nan"), reason=str(r["reason"]),
            round=None if pd.isna(r["round"]) else int(r["round"]), flag_seq=int(r["flag_seq"]),
            probs=[float(p) for p in probs], centroid=(float(r["centroid_y"]), float(r["centroid_x"])),
            rank=int(r["rank"]), held_by=self._taken.get(nid),
        )

    def current(self) -> ReviewItem | None:
        if self.cursor is None:
            return None
        return self._item(self.cursor)

    def _near(self, image_id: str) -> pd.DataFrame:
        with self._lock:
            near = self._by_image.get(image_id)
            if near is None:
                if self._nuclei is None:
                    self._nuclei = self.store.nuclei()[["nucleus_id", "image_id", "kind", "instance_id", "bbox_y0",
                                                        "bbox_x0", "bbox_y1", "bbox_x1"]]
                nuc = self._nuclei
                near = nuc[nuc["image_id"] == image_id]
                self._by_image[image_id] = near
            return near

    def load_context(self, item: ReviewItem, *, ledger: Ledger | None = None) -> Context:
        """Read the window around a nucleus with its neighbours' current classes.

        Safe to call from a worker thread when ``ledger`` is a connection of that thread's own
        (the prefetch does so); :meth:`context` calls it on the session's ledger."""
        ledger = ledger or self.store.ledger
        w = self.window
        half = w // 2
        cy, cx = round(item.centroid[0]), round(item.centroid[1])
        y0, x0 = cy - half, cx - half
        img, ins_part = self.store.read_region(item.image_id, y0, x0, y0 + w, x0 + w)
        image = np.empty((w, w, 3), np.uint8)
        image[:] = PAD_RGB
        ins = np.zeros((w, w), ins_part.dtype)
        py, px = max(0, -y0), max(0, -x0)
        image[py : py + img.shape[0], px : px + img.shape[1]] = img
        ins[py : py + ins_part.shape[0], px : px + ins_part.shape[1]] = ins_part
        near = self._near(item.image_id)
        near = near[(near["bbox_y1"] > y0) & (near["bbox_y0"] < y0 + w) & (near["bbox_x1"] > x0)
                    & (near["bbox_x0"] < x0 + w)]
        (seq, _) = ledger.head()
        ids = [int(n) for n in near["nucleus_id"]]
        if item.nucleus_id not in ids:
            ids.append(item.nucleus_id)
        ev = ledger.events(nucleus_ids=ids, until_seq=seq)
        ctx = Context(image=image, classes=np.zeros((w, w), np.uint8), current=np.zeros((w, w), np.uint8),
                      offset=(y0, x0), nucleus_id=item.nucleus_id, seq=seq, events=ev, near=near, instances=ins)
        self._fold_into(ctx, item)
        return ctx

    def _fold_into(self, ctx: Context, item: ReviewItem) -> None:
        assert ctx.events is not None and ctx.near is not None and ctx.instances is not None
        ev = pd.concat([ctx.events, self._rounds], ignore_index=True).sort_values("seq", kind="stable")
        folded = fold_labels(ev)
        near, ins = ctx.near, ctx.instances
        labels = folded["label"].reindex(near["nucleus_id"])
        value = labels.fillna(0).astype(np.int64).to_numpy()
        unresolved_v, rejected_v, ignore_v = display_values(self.store.taxonomy)
        value = np.where(value == NOT_A_NUCLEUS, rejected_v, np.where(value == UNRESOLVED, unresolved_v, value))
        value = np.where(near["kind"].to_numpy() == "ignore", ignore_v, value)
        inst = near["instance_id"].to_numpy(np.int64)
        lut = np.zeros(max(int(ins.max()) if ins.size else 0, int(inst.max()) if inst.size else 0) + 1, np.uint8)
        lut[inst] = value.astype(np.uint8)
        ctx.classes = lut[ins]
        if ctx.edge is None:
            ctx.edge = boundary(ins)
        ctx.outline = np.where(ctx.edge, ctx.classes, 0).astype(np.uint8)
        me = near.loc[near["nucleus_id"] == item.nucleus_id, "instance_id"]
        ctx.current = (ins == int(me.iloc[0])).astype(np.uint8) if len(me) else np.zeros(ins.shape, np.uint8)
        ctx.label = int(folded.at[item.nucleus_id, "label"]) if item.nucleus_id in folded.index else None
        ctx.others = prior_decisions(ev, item.nucleus_id, item.flag_seq, self.reviewer)

    def context(self, item: ReviewItem | None = None) -> Context:
        """The window around the (current) nucleus, from the prefetch cache when it is there and
        refolded when the ledger moved on since; fills ``item.label`` (the exact fold, the queue
        column may lag other writers) and ``item.others``."""
        item = item or self.current()
        if item is None:
            raise StateError("the review queue is empty")
        ctx = self._cache.pop(item.nucleus_id, None)
        if ctx is None or ctx.events is None or ctx.near is None:
            ctx = self.load_context(item)
        else:
            ids = [int(n) for n in ctx.near["nucleus_id"]] + [item.nucleus_id]
            changed = _changed_since(self.store.ledger, ids, ctx.seq)
            newer = self.store.ledger.events(nucleus_ids=ids, since_seq=ctx.seq) if changed else None
            if newer is not None and not newer.empty:
                ctx.events = pd.concat([ctx.events, newer], ignore_index=True)
                ctx.seq = int(newer["seq"].max())
                self._fold_into(ctx, item)
        if ctx.label is not None:
            item.label = ctx.label
        item.others = ctx.others
        return ctx

    def prefetched(self, contexts: Iterable[Context]) -> None:
        """Keep contexts read ahead (by a worker thread) for :meth:`context`; at most 16 kept."""
        for ctx in contexts:
            self._cache[ctx.nucleus_id] = ctx
        while len(self._cache) > 16:
            self._cache.pop(next(iter(self._cache)))

    def prefetch(self, n: int = 3, *, ledger: Ledger | None = None) -> list[Context]:
        """Read the contexts of the next ``n`` nuclei (what the widget's worker thread runs)."""
        return [self.load_context(item, ledger=ledger) for item in self.upcoming(n)
                if item.nucleus_id not in self._cache]

    # -- decisions ------------------------------------------------------------------------------
    def act(self, action: ReviewAction, *, label: int | str | None = None, advance: bool = True,
            confirm: bool = False) -> Decision:
        """Record a decision on the current nucleus, then move on (``undo`` goes back to it).

        Raises :class:`DecidedByOthers` (nothing recorded) when another reviewer already has an
        effective decision on it and ``confirm`` is False (not with double review, where that is
        the point); :class:`StoreError` when the store cannot be written: nothing recorded, the
        cursor stays on the nucleus.
        """
        if action == "undo":
            return self.undo()
        item = self.current()
        if item is None:
            raise StateError("the review queue is empty: nothing to decide")
        # the nucleus's events plus the round events read when the session opened (or refreshed)
        ev = pd.concat([self.store.ledger.events(nucleus_ids=[item.nucleus_id]), self._rounds],
                       ignore_index=True).sort_values("seq", kind="stable").reset_index(drop=True)
        if action not in ("skip", "adjudicate") and not confirm and not self.double_review:
            others = prior_decisions(ev, item.nucleus_id, item.flag_seq, self.reviewer)
            if others:
                raise DecidedByOthers(item.nucleus_id, others, self.names)
        d = decide(self.store, item.nucleus_id, action, reviewer=self.reviewer, label=label, round=item.round,
                   flag_seq=item.flag_seq, source="napari", ledger=self._ledger, events=ev)
        self.history.append(d)
        self._mark(item.nucleus_id, d)
        if advance:
            self.next()
        return d

    def undo(self) -> Decision:
        """Undo this reviewer's last decision in this session (or, on resume, the last one in the
        ledger) and go back to that nucleus."""
        if self.history:
            last = self.history[-1]
            nid = last.nucleus_id
        else:
            mine = self.store.ledger.events(kinds=("decision",))
            mine = mine[(mine["actor"] == self.reviewer)]
            undone = set(mine.loc[mine["action"] == "undo", "ref"].dropna().astype(int))
            live = mine[(mine["action"] != "undo") & ~mine["seq"].isin(undone)]
            if live.empty:
                raise StateError(f"{self.reviewer} has no decision to undo")
            nid = int(live["nucleus_id"].iloc[-1])
        d = decide(self.store, nid, "undo", reviewer=self.reviewer, source="napari", ledger=self._ledger)
        if self.history:
            self.history.pop()
        pos = self._pos.get(nid)
        if pos is not None:
            self._mark(nid, d)
            self.cursor = pos
        return d

    def _mark(self, nucleus_id: int, d: Decision) -> None:
        pos = self._pos.get(nucleus_id)
        if pos is None:
            return
        q = self.queue
        if d.action == "undo":
            # re-derive from the ledger for this nucleus (other reviewers may have decided too)
            ev = nucleus_events(self.store, [nucleus_id])
            flag_seq = int(q["flag_seq"].iat[pos])
            dec = ev[(ev["kind"] == "decision") & (ev["seq"] > flag_seq)]
            from .queue import EFFECTIVE_ACTIONS, effective_decisions

            eff = effective_decisions(dec)
            settled = eff[eff["action"].isin(EFFECTIVE_ACTIONS)]
            if self.filters.get("double_review"):
                settled = settled[settled["actor"] == self.reviewer]
            mine = eff[eff["actor"] == self.reviewer]
            q.iat[pos, q.columns.get_loc("decided")] = not settled.empty
            q.iat[pos, q.columns.get_loc("skipped")] = (not mine.empty and mine["action"].iloc[-1] == "skip"
                                                       and settled.empty)
            folded = fold_labels(ev)
            if nucleus_id in folded.index:
                q.iat[pos, q.columns.get_loc("label")] = int(folded.at[nucleus_id, "label"])
                status = str(folded.at[nucleus_id, "status"])
                q.iat[pos, q.columns.get_loc("status")] = ("flagged" if status in ("source", "unresolved", "auto")
                                                           else status)
            self._cache.pop(nucleus_id, None)
            return
        if d.action == "skip":
            q.iat[pos, q.columns.get_loc("skipped")] = True
            return
        q.iat[pos, q.columns.get_loc("decided")] = True
        q.iat[pos, q.columns.get_loc("skipped")] = False
        if d.label is not None:
            q.iat[pos, q.columns.get_loc("label")] = int(d.label)
        q.iat[pos, q.columns.get_loc("status")] = "rejected" if d.label == NOT_A_NUCLEUS else "reviewed"


def open_session(path: str | os.PathLike[str], *, reviewer: str | None = None, readonly: bool = False,
                 **filters: Any) -> ReviewSession:
    """Open a store and a review session on it (``readonly`` opens the store with mode "r")."""
    store = Store.open(path, mode="r" if readonly else "a")
    return ReviewSession(store, reviewer=reviewer, **filters)


def record_many(store: Store, events: list[Mapping[str, Any]], *, ledger: Ledger | None = None) -> list[int]:
    """Append prepared decision events in one transaction (all or nothing)."""
    if not events:
        return []
    return (ledger or store.ledger).append(list(events))

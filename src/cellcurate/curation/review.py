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
from ..errors import ConfigError, StateError
from .queue import build_queue, latest_flags

ReviewAction = Literal["accept", "keep", "set_class", "not_nucleus", "skip", "undo", "adjudicate"]
REVIEW_ACTIONS: tuple[str, ...] = ("accept", "keep", "set_class", "not_nucleus", "skip", "undo", "adjudicate")
DecisionSource = Literal["napari", "csv", "cli", "api"]

#: Values of the class map shown in napari besides the class ids (those of the default 7-class
#: taxonomy; :func:`display_values` gives the ones of any taxonomy, always above its largest id).
UNRESOLVED_VALUE = 8
REJECTED_VALUE = 9
IGNORE_VALUE = 10


def display_values(taxonomy: Any) -> tuple[int, int, int]:
    """(unresolved, rejected, ignore) values of the displayed class map for ``taxonomy``: 8, 9, 10
    while its class ids are at most 7, else the three values after its largest id."""
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

    Raises
    ------
    StoreError
        The store is read-only or the disk is full: nothing was recorded.
    ConfigError, StateError
        Unknown nucleus, class or action; nothing to accept, keep or undo.

    >>> d = decide(store, nid, "set_class", reviewer="ana", label="Macrophage")  # doctest: +SKIP
    """
    event = decision_event(store, nucleus_id, action, reviewer=reviewer, label=label, round=round,
                           flag_seq=flag_seq, reason=reason, source=source)
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


@dataclass
class Context:
    """The window around the current nucleus: image, class map, mask of the nucleus, offset."""

    image: np.ndarray  # (h, w, 3) uint8
    classes: np.ndarray  # (h, w) uint8: 0 background, 1..K class, 8 unresolved, 9 rejected, 10 ignore
    current: np.ndarray  # (h, w) uint8: 1 on the current nucleus
    offset: tuple[int, int]  # (y0, x0) of the window in the image


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
    """

    def __init__(self, store: Store, *, reviewer: str | None = None, durable: bool = True, window: int = 256,
                 **filters: Any) -> None:
        self.store = store
        self.reviewer = reviewer or default_reviewer()
        self.filters = filters
        self.window = int(window)
        self._ledger: Ledger | None = None
        if durable and not store.readonly:
            self._ledger = Ledger(store.ledger.path, durable=True)
        self.history: list[Decision] = []
        self.queue = build_queue(store, reviewer=self.reviewer, **filters)
        self._pos: dict[int, int] = {int(n): i for i, n in enumerate(self.queue["nucleus_id"])}
        self._nuclei_by_image: pd.core.groupby.DataFrameGroupBy | None = None
        self.cursor: int | None = None
        self.cursor = self._first_pending()

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    # -- navigation ---------------------------------------------------------------------------
    def _first_pending(self, after: int | None = None) -> int | None:
        decided = self.queue["decided"].to_numpy(bool)
        skipped = self.queue["skipped"].to_numpy(bool)
        start = 0 if after is None else after + 1
        for pool in (~decided & ~skipped, ~decided):  # unseen first, then the skipped ones
            idx = np.flatnonzero(pool[start:])
            if idx.size:
                return int(start + idx[0])
            idx = np.flatnonzero(pool[:start])
            if idx.size:
                return int(idx[0])
        return None

    def progress(self) -> tuple[int, int]:
        """(reviewed, total) in this queue."""
        return int(self.queue["decided"].sum()), len(self.queue)

    @property
    def done(self) -> bool:
        return self.cursor is None

    def next(self) -> ReviewItem | None:
        """Move to the next pending nucleus (wrapping round; skipped ones come last)."""
        self.cursor = self._first_pending(self.cursor)
        return self.current()

    def jump(self, nucleus_id: int) -> ReviewItem:
        """Show a given nucleus of the queue (reviewed or not)."""
        pos = self._pos.get(int(nucleus_id))
        if pos is None:
            raise ConfigError(f"nucleus {nucleus_id} is not in this review queue")
        self.cursor = pos
        item = self.current()
        assert item is not None
        return item

    def refresh(self) -> None:
        """Rebuild the queue from the ledger (picks up other reviewers' decisions)."""
        nid = None if self.cursor is None else int(self.queue["nucleus_id"].iat[self.cursor])
        self.queue = build_queue(self.store, reviewer=self.reviewer, **self.filters)
        self._pos = {int(n): i for i, n in enumerate(self.queue["nucleus_id"])}
        pos = None if nid is None else self._pos.get(nid)
        self.cursor = pos if pos is not None and not self.queue["decided"].iat[pos] else self._first_pending()

    # -- the current nucleus ------------------------------------------------------------------
    def current(self) -> ReviewItem | None:
        if self.cursor is None:
            return None
        r = self.queue.iloc[self.cursor]
        payload = r["payload"]
        try:
            probs = list(json.loads(payload).get("probs", [])) if isinstance(payload, str) else []
        except json.JSONDecodeError:
            probs = []
        return ReviewItem(
            nucleus_id=int(r["nucleus_id"]), image_id=str(r["image_id"]), source=str(r["source"]),
            source_label=str(r["source_label"]), label=int(r["label"]), status=str(r["status"]),
            proposed=None if pd.isna(r["proposed"]) else int(r["proposed"]),
            score=float(r["score"]) if not pd.isna(r["score"]) else float("nan"), reason=str(r["reason"]),
            round=None if pd.isna(r["round"]) else int(r["round"]), flag_seq=int(r["flag_seq"]),
            probs=[float(p) for p in probs], centroid=(float(r["centroid_y"]), float(r["centroid_x"])),
            rank=int(r["rank"]),
        )

    def context(self, item: ReviewItem | None = None) -> Context:
        """Read the window around the (current) nucleus with its neighbours' current classes."""
        item = item or self.current()
        if item is None:
            raise StateError("the review queue is empty")
        half = self.window // 2
        cy, cx = int(round(item.centroid[0])), int(round(item.centroid[1]))
        y0, x0 = max(0, cy - half), max(0, cx - half)
        image, ins = self.store.read_region(item.image_id, y0, x0, y0 + self.window, x0 + self.window)
        y1, x1 = y0 + ins.shape[0], x0 + ins.shape[1]
        if self._nuclei_by_image is None:
            nuc = self.store.nuclei()
            self._nuclei_by_image = nuc[["nucleus_id", "image_id", "kind", "instance_id", "bbox_y0", "bbox_x0",
                                         "bbox_y1", "bbox_x1"]].groupby("image_id", sort=False)
        near = self._nuclei_by_image.get_group(item.image_id)
        near = near[(near["bbox_y1"] > y0) & (near["bbox_y0"] < y1) & (near["bbox_x1"] > x0) & (near["bbox_x0"] < x1)]
        labels = current_labels_of(self.store, near["nucleus_id"])["label"]
        value = labels.reindex(near["nucleus_id"]).fillna(0).astype(np.int64).to_numpy()
        unresolved_v, rejected_v, ignore_v = display_values(self.store.taxonomy)
        value = np.where(value == NOT_A_NUCLEUS, rejected_v, np.where(value == UNRESOLVED, unresolved_v, value))
        value = np.where(near["kind"].to_numpy() == "ignore", ignore_v, value)
        inst = near["instance_id"].to_numpy(np.int64)
        lut = np.zeros(max(int(ins.max()) if ins.size else 0, int(inst.max()) if inst.size else 0) + 1, np.uint8)
        lut[inst] = value.astype(np.uint8)
        classes = lut[ins]
        me = near.loc[near["nucleus_id"] == item.nucleus_id, "instance_id"]
        current = (ins == int(me.iloc[0])).astype(np.uint8) if len(me) else np.zeros(ins.shape, np.uint8)
        # the exact current label of the shown nucleus (the queue column may lag other writers)
        if item.nucleus_id in labels.index:
            item.label = int(labels.loc[item.nucleus_id])
        return Context(image=image, classes=classes, current=current, offset=(y0, x0))

    # -- decisions ------------------------------------------------------------------------------
    def act(self, action: ReviewAction, *, label: int | str | None = None, advance: bool = True) -> Decision:
        """Record a decision on the current nucleus, then move on (``undo`` goes back to it).

        Raises :class:`StoreError` when the store cannot be written: nothing recorded, the
        cursor stays on the nucleus.
        """
        if action == "undo":
            return self.undo()
        item = self.current()
        if item is None:
            raise StateError("the review queue is empty: nothing to decide")
        d = decide(self.store, item.nucleus_id, action, reviewer=self.reviewer, label=label, round=item.round,
                   flag_seq=item.flag_seq, source="napari", ledger=self._ledger)
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

"""Reviewing instance flags: add a missed nucleus, delete a spurious one, replace an outline, keep.

Every decision is one or more ``geometry`` ledger events appended in one SQLite transaction,
durable when :func:`decide_flag` returns (the session writes with ``synchronous=FULL``):

============ ===================================================== =====================
decision     events                                                nucleus_id
============ ===================================================== =====================
accept       the flag's proposal: add → "add" per polygon; delete  see the rows below
             → "delete" per nucleus; replace → "replace"; merge →
             "replace" of the first nucleus + "delete" of the
             others; split → "replace" of the nucleus by the first
             polygon + "add" of the others
add          "add" of each polygon (the proposal, or one drawn)    a new stable id
delete       "delete" of each nucleus concerned                    the nucleus
replace      "replace" of the (first) nucleus by the polygon       the nucleus
keep         one "keep" (nothing changes; the flag is decided)     the first nucleus
undo         one "undo" per event of the reviewer's last decision  as the undone event
============ ===================================================== =====================

``ref`` is the seq of the ``instance_flag`` event (NULL for an edit without a flag, and the
undone event's seq for "undo"); ``label`` is the class given to an added nucleus (the flag's
predicted class unless the reviewer sets one; NULL when neither has one); the payload holds
``flag_id``, ``image_id``, ``polygon`` and ``rle`` (add/replace), ``origin`` "review",
``group`` (shared by the events of one decision, so undo takes them back together) and
``source`` (napari, csv, qupath, cli, api). A proposed polygon is validated first
(:func:`cellcurate.curation.geometry.check_polygon`: outside the image, empty or
self-intersecting is a one-line error and nothing is written).

The instance queue (:func:`instance_queue`) holds the flags of the newest instance run that this
reviewer has not decided, by score (descending).

Dimensions: F flags, w×w pixels of a context window.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..datasets.ledger import Ledger
from ..errors import CellcurateError, ConfigError, StateError
from .geometry import (
    ORIGIN_REVIEW,
    check_polygon,
    instance_flags,
    live_geometry_events,
    mask_rle,
    review_nucleus_id,
    rle_key,
    store_geometry,
)

FlagDecision = Literal["accept", "add", "delete", "replace", "keep"]
FLAG_DECISIONS: tuple[str, ...] = ("accept", "add", "delete", "replace", "keep")
GeometrySource = Literal["napari", "csv", "qupath", "cli", "api"]
#: Columns of :func:`instance_queue`: the flag columns, then these.
QUEUE_EXTRA: tuple[str, ...] = ("decided", "decided_by", "rank")


def default_reviewer() -> str:
    return os.environ.get("USER") or os.environ.get("USERNAME") or "anonymous"


# -- reading ------------------------------------------------------------------------------------
def store_flags(store: Any) -> pd.DataFrame:
    """:func:`~cellcurate.curation.geometry.instance_flags` of a store's ledger."""
    return instance_flags(store.ledger.events(kinds=("instance_flag",)))


def instance_queue(store: Any, *, reviewer: str | None = None, issues: Sequence[str] | str | None = None,
                   include_decided: bool = True) -> pd.DataFrame:
    """The instance flags in review order: not yet decided by ``reviewer`` first, by score
    (descending), then flag id; decided ones after (unless ``include_decided`` is False).

    ``decided``: ``reviewer`` (any reviewer when None) has a live geometry decision on the flag
    (same ``flag_id``); ``decided_by``: the reviewers with one, comma-joined."""
    flags = store_flags(store)
    if issues is not None:
        wanted = [issues] if isinstance(issues, str) else list(issues)
        flags = flags[flags["issue"].isin(wanted)]
    live = live_geometry_events(store.ledger.events(kinds=("geometry",), parse_payload=True))
    by_flag: dict[str, set[str]] = {}
    for actor, p in zip(live["actor"], live["payload"]):
        fid = p.get("flag_id") if isinstance(p, dict) else None
        if fid:
            by_flag.setdefault(str(fid), set()).add(str(actor))
    who = [by_flag.get(f, set()) for f in flags["flag_id"]]
    decided = [bool(w) if reviewer is None else reviewer in w for w in who]
    q = flags.assign(decided=decided, decided_by=[", ".join(sorted(w)) for w in who], _neg=-flags["score"])
    q = q.sort_values(["decided", "_neg", "flag_id"], kind="stable").drop(columns="_neg").reset_index(drop=True)
    if not include_decided:
        q = q[~q["decided"]].reset_index(drop=True)
    q["rank"] = np.arange(len(q), dtype=np.int64)
    return q


def _image_shape(store: Any, image_id: str) -> tuple[int, int]:
    im = store.images()
    row = im[im["image_id"] == image_id]
    if row.empty:
        raise ConfigError(f"{store.path}: no image {image_id!r} in the store")
    return int(row["height"].iloc[0]), int(row["width"].iloc[0])


def _taken_ids(store: Any) -> set[int]:
    return set(int(n) for n in store.nuclei()["nucleus_id"])


def _present(store: Any, image_id: str) -> set[int]:
    """Ids of the nuclei of an image after the geometry fold (ingested minus deleted, plus added)."""
    nuc = store.nuclei()
    ids = set(int(n) for n in nuc.loc[nuc["image_id"] == image_id, "nucleus_id"])
    ch = store_geometry(store).of_image(image_id)
    for nid, change in zip(ch["nucleus_id"], ch["change"]):
        if change == "deleted":
            ids.discard(int(nid))
        else:
            ids.add(int(nid))
    return ids


# -- building events ---------------------------------------------------------------------------
def geometry_events(
    store: Any,
    flag: Mapping[str, Any] | None,
    decision: str,
    *,
    reviewer: str,
    polygons: Sequence[Any] | None = None,
    label: int | str | None = None,
    nucleus_ids: Sequence[int] | None = None,
    image_id: str | None = None,
    source: GeometrySource = "api",
    comment: str | None = None,
) -> list[dict[str, Any]]:
    """Validate a decision on one flag (or an edit without a flag) and build its events (not
    written). See the module docstring for what each decision writes.

    Parameters
    ----------
    flag
        A row of :func:`instance_queue` / :func:`store_flags`; None for an edit without a flag
        (then ``image_id`` and ``nucleus_ids`` or ``polygons`` say what).
    decision
        One of :data:`FLAG_DECISIONS`.
    polygons
        Outlines drawn by the reviewer, replacing the proposal's (add, replace, accept).
    label
        Class (id or name) of an added nucleus; default the flag's predicted class.
    nucleus_ids
        The nuclei to delete or replace; default the flag's.
    """
    if decision not in FLAG_DECISIONS:
        raise ConfigError(f"unknown geometry decision {decision!r}; expected one of {', '.join(FLAG_DECISIONS)}")
    if not reviewer or not str(reviewer).strip():
        raise ConfigError("a geometry decision needs a reviewer name")
    flag = None if flag is None else dict(flag)
    if flag is None and image_id is None:
        raise ConfigError("an edit without a flag needs an image id")
    image = str(flag["image_id"]) if flag is not None else str(image_id)
    shape = _image_shape(store, image)
    flag_id = None if flag is None else str(flag["flag_id"])
    what = f"flag {flag_id}" if flag_id else f"image {image}"
    ref = None if flag is None else int(flag["seq"])
    rnd = None if flag is None or pd.isna(flag.get("round")) else int(flag["round"])
    nids = [int(n) for n in (nucleus_ids if nucleus_ids is not None else (flag or {}).get("nucleus_ids") or [])]
    if not nids and flag is not None and flag.get("nucleus_id") is not None and not pd.isna(flag["nucleus_id"]):
        nids = [int(flag["nucleus_id"])]
    proposed = [] if flag is None else list(flag.get("polygons") or [])
    polys = list(polygons) if polygons is not None and len(polygons) else proposed
    action = decision
    if decision == "accept":
        if flag is None:
            raise ConfigError("accept needs a flag (its proposal)")
        action = str(flag["proposed_action"])
    if label is None or label == "" or (isinstance(label, float) and np.isnan(label)):
        cls = None if flag is None else int(flag.get("label") or 0) or None
    else:
        cls = store.taxonomy.class_id(label)
    if cls is not None and cls not in store.taxonomy.ids:
        cls = None  # the predicted class of another taxonomy: unresolved

    touches = action in ("delete", "replace", "merge", "split")  # add and keep leave the annotated nuclei alone
    present = _present(store, image) if nids and touches else set(nids)
    for n in nids:
        if n not in present:
            raise StateError(f"{what}: nucleus {n} is not in image {image} (deleted, or never there)")

    group = secrets.token_hex(6)
    base_payload: dict[str, Any] = {"flag_id": flag_id, "image_id": image, "origin": ORIGIN_REVIEW, "group": group,
                                    "source": source}
    if comment:
        base_payload["comment"] = comment
    taken: set[int] | None = None
    events: list[dict[str, Any]] = []

    def shaped(k: int, poly: Any) -> dict[str, Any]:
        p, mask = check_polygon(poly, shape, what=f"{what}: polygon {k}")
        return {"polygon": p, "rle": mask_rle(mask)}

    def ev(act: str, nid: int | None, extra: dict[str, Any] | None = None, lab: int | None = None) -> None:
        events.append({"kind": "geometry", "nucleus_id": nid, "round": rnd, "actor": str(reviewer), "action": act,
                       "label": lab, "ref": ref, "payload": {**base_payload, **(extra or {})}})

    def add(k: int, poly: Any) -> None:
        nonlocal taken
        g = shaped(k, poly)
        if taken is None:
            taken = _taken_ids(store)
        key = f"{flag_id}|{k}" if flag_id else rle_key(g["rle"])
        ev("add", review_nucleus_id(image, key, taken), g, cls)

    if action == "keep":
        ev("keep", nids[0] if nids else None)
    elif action == "add":
        if not polys:
            raise ConfigError(f"{what}: nothing to add (no proposed or drawn polygon)")
        for k, poly in enumerate(polys):
            add(k, poly)
    elif action == "delete":
        if not nids:
            raise ConfigError(f"{what}: no annotated nucleus to delete")
        for n in nids:
            ev("delete", n)
    elif action == "replace":
        if not nids:
            raise ConfigError(f"{what}: no annotated nucleus to replace; add the polygon instead")
        if not polys:
            raise ConfigError(f"{what}: no polygon to replace the outline with")
        ev("replace", nids[0], shaped(0, polys[0]))
    elif action == "merge":
        if not nids or not polys:
            raise ConfigError(f"{what}: a merge needs the nuclei and the merged polygon")
        ev("replace", nids[0], shaped(0, polys[0]))
        for n in nids[1:]:
            ev("delete", n)
    elif action == "split":
        if not nids or not polys:
            raise ConfigError(f"{what}: a split needs the nucleus and the polygons")
        ev("replace", nids[0], shaped(0, polys[0]))
        for k, poly in enumerate(polys[1:], start=1):
            add(k, poly)
    else:
        raise ConfigError(f"{what}: unknown proposed action {action!r}")
    return events


@dataclass(frozen=True)
class GeometryDecision:
    """One recorded decision: its events' seqs, actions and nucleus ids."""

    seqs: list[int]
    actions: list[str]
    nucleus_ids: list[int | None]
    flag_id: str | None
    reviewer: str
    decision: str


def record(store: Any, events: Sequence[Mapping[str, Any]], *, ledger: Ledger | None = None) -> list[int]:
    """Append prepared geometry events in one transaction (all or nothing); their seqs."""
    if not events:
        return []
    return (ledger or store.ledger).append(list(events))


def decide_flag(store: Any, flag: Mapping[str, Any] | None, decision: str, *, reviewer: str,
                ledger: Ledger | None = None, **options: Any) -> GeometryDecision:
    """Validate and record one decision (:func:`geometry_events` options); durable on return."""
    events = geometry_events(store, flag, decision, reviewer=reviewer, **options)
    seqs = record(store, events, ledger=ledger)
    return GeometryDecision(seqs, [e["action"] for e in events], [e["nucleus_id"] for e in events],
                            None if flag is None else str(flag["flag_id"]), str(reviewer), decision)


def undo_last(store: Any, reviewer: str, *, ledger: Ledger | None = None,
              source: GeometrySource = "api") -> GeometryDecision:
    """Undo ``reviewer``'s last live geometry decision (every event of its group)."""
    live = live_geometry_events(store.ledger.events(kinds=("geometry",), parse_payload=True))
    mine = live[live["actor"] == reviewer]
    if mine.empty:
        raise StateError(f"{reviewer} has no geometry decision to undo")
    group = mine["payload"].iloc[-1].get("group")
    target = mine[[p.get("group") == group for p in mine["payload"]]] if group else mine.iloc[-1:]
    events: list[dict[str, Any]] = []
    for r in target.itertuples(index=False):
        p = r.payload
        events.append({"kind": "geometry", "nucleus_id": None if pd.isna(r.nucleus_id) else int(r.nucleus_id),
                       "round": None if pd.isna(r.round) else int(r.round), "actor": reviewer, "action": "undo",
                       "ref": int(r.seq), "payload": {"flag_id": p.get("flag_id"), "image_id": p.get("image_id"),
                                                      "origin": ORIGIN_REVIEW, "source": source}})
    seqs = record(store, events, ledger=ledger)
    fid = target["payload"].iloc[0].get("flag_id")
    return GeometryDecision(seqs, ["undo"] * len(seqs), [e["nucleus_id"] for e in events],
                            None if fid is None else str(fid), reviewer, "undo")


# -- a review session (what the napari dock drives) -----------------------------------------------
@dataclass
class GeometryContext:
    """The window around a flag: image, the current annotation, the proposal.

    ``annotated``: (w, w) uint8, 1 on the outline pixels of every current nucleus, 2 on those
    of the nuclei the flag concerns; ``proposed``: (w, w) uint8, k + 1 inside proposed polygon k;
    ``offset``: (y0, x0) of the window in the image (negative at the top/left edge)."""

    image: np.ndarray
    annotated: np.ndarray
    proposed: np.ndarray
    offset: tuple[int, int]
    flag_id: str = ""


@dataclass
class GeometrySession:
    """A reviewer working through the instance queue of one store. Pure Python: no Qt.

    ``label``: the class an "add" gives (None: the flag's predicted class), set with
    :meth:`set_label` and cleared after each decision."""

    store: Any
    reviewer: str = field(default_factory=default_reviewer)
    durable: bool = True
    window: int = 128
    issues: Sequence[str] | None = None
    history: list[GeometryDecision] = field(default_factory=list)
    label: int | None = None

    def __post_init__(self) -> None:
        self._ledger: Ledger | None = None
        if self.durable and not self.store.readonly:
            self._ledger = Ledger(self.store.ledger.path, durable=True)
        self.queue = instance_queue(self.store, reviewer=self.reviewer, issues=self.issues)
        self.cursor: int | None = self._first_pending()

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def _first_pending(self, after: int | None = None) -> int | None:
        pending = ~self.queue["decided"].to_numpy(bool)
        start = 0 if after is None else after + 1
        for part in (np.flatnonzero(pending[start:]) + start, np.flatnonzero(pending[:start])):
            if part.size:
                return int(part[0])
        return None

    @property
    def done(self) -> bool:
        return self.cursor is None

    def progress(self) -> tuple[int, int]:
        return int(self.queue["decided"].sum()), len(self.queue)

    def current(self) -> pd.Series | None:
        return None if self.cursor is None else self.queue.iloc[self.cursor]

    def next(self) -> pd.Series | None:
        """Move on to the next undecided flag (skipping the current one for now)."""
        self.cursor = self._first_pending(self.cursor)
        return self.current()

    def refresh(self) -> None:
        fid = None if self.cursor is None else str(self.queue["flag_id"].iat[self.cursor])
        self.queue = instance_queue(self.store, reviewer=self.reviewer, issues=self.issues)
        pos = {f: i for i, f in enumerate(self.queue["flag_id"])}.get(fid) if fid else None
        self.cursor = pos if pos is not None and not self.queue["decided"].iat[pos] else self._first_pending()

    def set_label(self, label: int | str | None) -> None:
        self.label = None if label is None else self.store.taxonomy.class_id(label)

    def act(self, decision: str, *, polygons: Sequence[Any] | None = None, advance: bool = True) -> GeometryDecision:
        """Record a decision on the current flag, then move on (:meth:`undo` for "undo")."""
        if decision == "undo":
            return self.undo()
        flag = self.current()
        if flag is None:
            raise StateError("the instance queue is empty: nothing to decide")
        d = decide_flag(self.store, flag.to_dict(), decision, reviewer=self.reviewer, polygons=polygons,
                        label=self.label, source="napari", ledger=self._ledger)
        self.history.append(d)
        self.label = None
        assert self.cursor is not None
        self.queue.iat[self.cursor, self.queue.columns.get_loc("decided")] = True
        if advance:
            self.cursor = self._first_pending(self.cursor)
        return d

    def undo(self) -> GeometryDecision:
        """Undo this reviewer's last decision and go back to its flag."""
        d = undo_last(self.store, self.reviewer, ledger=self._ledger, source="napari")
        if self.history:
            self.history.pop()
        pos = {f: i for i, f in enumerate(self.queue["flag_id"])}.get(d.flag_id) if d.flag_id else None
        if pos is not None:
            self.queue = instance_queue(self.store, reviewer=self.reviewer, issues=self.issues)
            pos = {f: i for i, f in enumerate(self.queue["flag_id"])}.get(d.flag_id)
            self.cursor = pos
        return d

    def context(self, flag: pd.Series | None = None) -> GeometryContext:
        """The window around the (current) flag, centred on its proposal (or its nuclei)."""
        flag = self.current() if flag is None else flag
        if flag is None:
            raise StateError("the instance queue is empty")
        image_id = str(flag["image_id"])
        img, ins = self.store.read(image_id)
        nuc = self.store.nuclei()
        nuc = nuc[nuc["image_id"] == image_id]
        fold = store_geometry(self.store)
        ins, present = fold.paint(image_id, ins, nuc)
        h, w = ins.shape
        props = np.zeros((h, w), np.uint8)
        from .geometry import polygon_mask

        for k, poly in enumerate(flag["polygons"] or []):
            try:
                props[polygon_mask(poly, (h, w))] = k + 1
            except (CellcurateError, ValueError):
                continue
        concerned = [int(n) for n in flag["nucleus_ids"] or []]
        inst = present.loc[present["nucleus_id"].isin(concerned), "instance_id"].to_numpy()
        ys, xs = np.nonzero(props if props.any() else np.isin(ins, inst))
        cy, cx = (float(ys.mean()), float(xs.mean())) if ys.size else (h / 2, w / 2)
        side = self.window
        y0, x0 = round(cy) - side // 2, round(cx) - side // 2

        def crop(a: np.ndarray, fill: Any) -> np.ndarray:
            out = np.empty((side, side, *a.shape[2:]), a.dtype)
            out[...] = fill
            sy0, sx0 = max(0, y0), max(0, x0)
            sy1, sx1 = min(h, y0 + side), min(w, x0 + side)
            if sy1 > sy0 and sx1 > sx0:
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = a[sy0:sy1, sx0:sx1]
            return out

        from .review import PAD_RGB, boundary

        win = crop(ins, 0)
        edge = boundary(win, 1)
        annotated = np.where(edge, 1, 0).astype(np.uint8)
        annotated[edge & np.isin(win, inst)] = 2
        return GeometryContext(crop(img, PAD_RGB), annotated, crop(props, 0), (y0, x0), str(flag["flag_id"]))

"""The review queue: flagged nuclei ranked by issue score, with what each reviewer has decided.

A nucleus is in the queue when a relabeling run that was not superseded flagged it (``flag``
events, see :mod:`cellcurate.datasets.ledger`). When several flags exist for one nucleus the
*latest* counts: the highest round, ties broken by the higher score (then the later event).
A nucleus deleted in geometry review (:mod:`cellcurate.curation.geometry`) is not in it.

Rule for "reviewed" (documented in docs/REVIEW.md):

* a nucleus leaves the queue once **any** reviewer has an effective decision on it after its
  flag (accept, keep, set_class, not_nucleus or adjudicate that was not undone); a nucleus on
  which reviewers disagree is then in ``conflict`` and is listed by ``curate review --conflicts``;
* with ``double_review=True`` only the given reviewer's own decisions count, so a second
  annotator sees every flagged nucleus again (that is how conflicts arise on purpose);
* a ``skip`` by the reviewer keeps the nucleus pending but moves it behind every nucleus the
  reviewer has not skipped, so a reviewer who comes back resumes at the next unseen nucleus.

Pending nuclei are ranked by issue score (descending), then nucleus id. The queue is built from
the flag and decision events only (plus the nuclei table), so it opens quickly on large stores:
its ``label`` column is the label the flag saw, updated by the decisions made since; the exact
fold of one nucleus is :func:`cellcurate.curation.review.current_label`.

Dimensions: Q flagged nuclei, K classes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from ..datasets.ledger import fold_labels, superseded_runs
from ..datasets.store import Store
from ..errors import ConfigError

#: Decisions that settle a nucleus (``skip`` and ``undo`` do not).
EFFECTIVE_ACTIONS: tuple[str, ...] = ("accept", "keep", "set_class", "not_nucleus", "adjudicate")

#: Columns of the queue frame, in order.
QUEUE_COLUMNS: tuple[str, ...] = (
    "nucleus_id", "image_id", "source", "source_label", "instance_id",
    "centroid_y", "centroid_x", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1",
    "label",      # label shown to the reviewer: the flag's prev_label updated by later decisions
    "status",     # "flagged" | "reviewed" | "rejected" | "conflict"
    "proposed",   # the class the flag suggests
    "score",      # issue score in [0, 1], higher = more likely wrong
    "reason",     # the flag's reason
    "round",      # the flag's round
    "flag_seq",   # seq of the flag event (decisions refer to it)
    "payload",    # the flag's JSON payload (probs, label_quality, rank), parsed on demand
    "decided",    # settled for this queue (see the module docstring)
    "skipped",    # the reviewer's latest decision on it after the flag is a skip
    "rank",       # position in review order, 0 = first
)


def _as_list(v: Any) -> list[Any] | None:
    if v is None:
        return None
    if isinstance(v, (str, int, np.integer)):
        return [v]
    return list(v)


def latest_flags(events: pd.DataFrame, *, retired: set[int] | None = None) -> pd.DataFrame:
    """One row per flagged nucleus: its latest flag of a run that was not superseded.

    Parameters
    ----------
    events
        Ledger events (at least the ``flag`` ones), columns ``EVENT_COLUMNS``.
    retired
        Seqs of superseded runs' "started" events; computed from ``events`` when None.
    """
    flags = events[events["kind"] == "flag"]
    retired = superseded_runs(events) if retired is None else retired
    if retired:
        flags = flags[~flags["ref"].isin(list(retired))]
    flags = flags[flags["nucleus_id"].notna()]
    flags = flags.assign(_r=flags["round"].fillna(-1).astype("int64"), _s=flags["score"].fillna(0.0))
    flags = flags.sort_values(["_r", "_s", "seq"]).drop_duplicates("nucleus_id", keep="last").sort_values("seq")
    return flags.drop(columns=["_r", "_s"]).reset_index(drop=True)


def effective_decisions(decisions: pd.DataFrame) -> pd.DataFrame:
    """Decisions that were not undone (undo rows and undone rows removed), in seq order.

    An ``undo`` removes the decision whose seq is its ``ref`` when both have the same actor
    (the fold's rule, :func:`cellcurate.datasets.ledger.fold_labels`).
    """
    undo = decisions[decisions["action"] == "undo"]
    rest = decisions[decisions["action"] != "undo"]
    if undo.empty:
        return rest
    undone = pd.MultiIndex.from_arrays([undo["actor"].astype(str), undo["ref"].fillna(-1).astype("int64")])
    key = pd.MultiIndex.from_arrays([rest["actor"].astype(str), rest["seq"].astype("int64")])
    return rest[~key.isin(undone)]


def build_queue(
    store: Store,
    *,
    reviewer: str | None = None,
    round: int | None = None,
    classes: Iterable[int | str] | int | str | None = None,
    sources: Iterable[str] | str | None = None,
    reasons: Iterable[str] | str | None = None,
    double_review: bool = False,
) -> pd.DataFrame:
    """All flagged nuclei (after the filters), in review order; columns :data:`QUEUE_COLUMNS`.

    Parameters
    ----------
    store
        An open store.
    reviewer
        Whose skips (and, with ``double_review``, whose decisions) count.
    round
        Only flags of this round.
    classes
        Class ids or names: keep nuclei whose current or proposed label is one of them.
    sources
        e.g. ``"pannuke"``.
    reasons
        Flag reasons, e.g. ``"confident_disagreement"``.
    double_review
        Count only ``reviewer``'s own decisions (see the module docstring).

    Returns
    -------
    pandas.DataFrame
        Q rows; pending ones (``decided`` False) first, skipped ones after, settled ones last.
    """
    if double_review and not reviewer:
        raise ConfigError("double review needs a reviewer name")
    ledger = store.ledger
    rounds = ledger.events(kinds=("round",))
    flags = latest_flags(ledger.events(kinds=("flag",)), retired=superseded_runs(rounds))
    if round is not None:
        flags = flags[flags["round"] == int(round)]
    reason_list = _as_list(reasons)
    if reason_list is not None:
        flags = flags[flags["action"].isin(reason_list)]

    nuc = store.nuclei(include_ignore=False)
    if ledger.count("geometry"):  # a nucleus deleted in geometry review leaves the class queue
        from .geometry import store_geometry

        ch = store_geometry(store).changes
        nuc = nuc[~nuc["nucleus_id"].isin(ch.loc[ch["change"] == "deleted", "nucleus_id"])]
    cols = ["nucleus_id", "image_id", "source", "source_label", "instance_id", "centroid_y", "centroid_x",
            "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1"]
    q = flags.rename(columns={"action": "reason", "seq": "flag_seq", "label": "proposed"})
    q = q.merge(nuc[cols], on="nucleus_id", how="inner")
    source_list = _as_list(sources)
    if source_list is not None:
        q = q[q["source"].isin(source_list)]

    # Decisions made after each flag: fold them on top of the label the flag saw.
    decisions = ledger.events(kinds=("decision",))
    decisions = decisions[decisions["nucleus_id"].isin(q["nucleus_id"])]
    flag_seq = pd.Series(q["flag_seq"].to_numpy(), index=q["nucleus_id"].to_numpy())
    decisions = decisions[decisions["seq"].to_numpy() > flag_seq.reindex(decisions["nucleus_id"]).to_numpy()]
    base = pd.DataFrame({
        "seq": q["flag_seq"].to_numpy(), "kind": "ingest", "nucleus_id": q["nucleus_id"].to_numpy(),
        "round": q["round"].to_numpy(), "actor": "flag", "action": "flag",
        "label": q["prev_label"].fillna(0).to_numpy(), "ref": pd.NA, "payload": None,
    })
    folded = fold_labels(pd.concat([base, decisions[list(base.columns)]], ignore_index=True))
    q = q.assign(
        label=folded["label"].reindex(q["nucleus_id"]).to_numpy().astype("int64"),
        status=folded["status"].reindex(q["nucleus_id"]).replace({"source": "flagged",
                                                                  "unresolved": "flagged"}).to_numpy(),
    )

    eff = effective_decisions(decisions)
    settled = eff[eff["action"].isin(EFFECTIVE_ACTIONS)]
    if double_review:
        settled = settled[settled["actor"] == reviewer]
    decided = q["nucleus_id"].isin(settled["nucleus_id"])
    if reviewer:
        mine = eff[eff["actor"] == reviewer].drop_duplicates("nucleus_id", keep="last")
        skipped_ids = mine.loc[mine["action"] == "skip", "nucleus_id"]
        skipped = q["nucleus_id"].isin(skipped_ids) & ~decided
    else:
        skipped = pd.Series(False, index=q.index)
    q = q.assign(decided=decided.to_numpy(), skipped=skipped.to_numpy())

    class_list = _as_list(classes)
    if class_list is not None:
        ids = [store.taxonomy.class_id(c) for c in class_list]
        q = q[q["label"].isin(ids) | q["proposed"].isin(ids)]

    q = q.assign(_neg=-q["score"].fillna(0.0))
    q = q.sort_values(["decided", "skipped", "_neg", "nucleus_id"], kind="stable").drop(columns="_neg")
    q = q.reset_index(drop=True)
    q["rank"] = np.arange(len(q), dtype=np.int64)
    q["proposed"] = q["proposed"].astype("Int64")
    return q[list(QUEUE_COLUMNS)]


def progress(queue: pd.DataFrame) -> tuple[int, int]:
    """(reviewed, total) of a queue frame."""
    return int(queue["decided"].sum()), len(queue)

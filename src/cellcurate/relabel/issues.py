"""The list of flagged nuclei (``curate issues``): flags of finished, not superseded runs.

A flag is *open* while no review decision on its nucleus came after it. Rows are ranked by issue
score (highest first), then by nucleus id.

Dimensions: Q flags.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ..errors import ConfigError, StateError

if TYPE_CHECKING:  # pragma: no cover
    from ..datasets.store import Store

ISSUE_COLUMNS = ("rank", "round", "nucleus_id", "image_id", "source", "source_label", "given", "suggested",
                 "reason", "score", "centroid_y", "centroid_x", "flag_seq")


def list_issues(store: "Store", *, round: int | None = None, cls: str | int | None = None,
                limit: int | None = None, include_decided: bool = False) -> pd.DataFrame:
    """Flagged nuclei as a frame (columns :data:`ISSUE_COLUMNS`; ``given``/``suggested`` are class names).

    Parameters
    ----------
    round
        Only this round's flags (default: every finished round).
    cls
        Only flags whose given or suggested class is this class (name or id).
    limit
        At most this many rows.
    include_decided
        Keep flags already answered by a review decision.
    """
    from .rounds import round_runs

    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    runs = round_runs(store)
    ok = runs[runs["finished"] & ~runs["superseded"]]
    if round is not None:
        ok = ok[ok["round"] == int(round)]
        if ok.empty:
            raise StateError(f"{store.path}: round {round} has not been run")
    names = {c.id: c.name for c in store.taxonomy.classes}
    names.update({0: "unresolved", -1: "rejected"})
    ev = store.ledger.events(kinds=("flag",))
    ev = ev[ev["ref"].isin(ok["seq"].tolist())]
    if not include_decided and len(ev):
        dec = store.ledger.events(kinds=("decision",), since_seq=int(ev["seq"].min()))
        last = dec.groupby("nucleus_id")["seq"].max()
        after = last.reindex(ev["nucleus_id"]).to_numpy(dtype=float)
        ev = ev[~(after > ev["seq"].to_numpy(dtype=float))]
    if cls is not None:
        cid = store.taxonomy.class_id(cls)
        ev = ev[(ev["label"] == cid) | (ev["prev_label"] == cid)]
    nuc = store.nuclei().set_index("nucleus_id")
    ev = ev.sort_values(["score", "nucleus_id"], ascending=[False, True], kind="stable")
    if limit is not None:
        ev = ev.head(limit)
    ids = ev["nucleus_id"].astype(np.int64).to_numpy()
    n = nuc.reindex(ids)
    out = pd.DataFrame({
        "rank": np.arange(1, len(ev) + 1), "round": ev["round"].astype(np.int64).to_numpy(), "nucleus_id": ids,
        "image_id": n["image_id"].to_numpy(), "source": n["source"].to_numpy(),
        "source_label": n["source_label"].to_numpy(),
        "given": [names.get(int(v), str(v)) for v in ev["prev_label"].fillna(0)],
        "suggested": [names.get(int(v), str(v)) for v in ev["label"].fillna(0)],
        "reason": ev["action"].to_numpy(), "score": ev["score"].to_numpy(np.float64),
        "centroid_y": n["centroid_y"].to_numpy(), "centroid_x": n["centroid_x"].to_numpy(),
        "flag_seq": ev["seq"].to_numpy(np.int64),
    })
    return out

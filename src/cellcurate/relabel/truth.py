"""Score a round against the synthetic sample's ground truth (``truth.parquet``).

Truth rows join the store's nuclei on ``(source, origin_file, origin_index, origin_channel,
origin_instance, origin_region)`` plus ``written_label`` = ``source_label`` (MoNuSAC Region ids
restart in every class block, so the class is part of the key). Definitions (docs/RELABEL.md):

- ``proposal_accuracy``: among the round's proposals on nuclei whose written label is coarse
  (PanNuke Inflammatory, MoNuSAC Epithelial) and *not* flipped, the share whose proposed class is the
  true class. ``proposal_accuracy_all`` includes flipped nuclei (which no candidate can fit).
- flags: the nuclei flagged in the round (any reason), against the planted flips
  (``flipped``) among the nuclei the store holds: ``flag_precision`` = flagged ∩ flipped / flagged,
  ``flag_recall`` = flagged ∩ flipped / flipped. ``cleanlab_precision``/``cleanlab_recall`` count
  only the cleanlab reasons (``confident_disagreement``, ``likely_class_swap``).

Dimensions: N nuclei.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import InputFormatError, StateError

if TYPE_CHECKING:  # pragma: no cover
    from ..datasets.store import Store

JOIN_KEYS = ("source", "origin_file", "origin_index", "origin_channel", "origin_instance", "origin_region")
CLEANLAB_REASONS = ("confident_disagreement", "likely_class_swap")


def truth_for_nuclei(nuclei: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """``nuclei`` (nucleus_id + join keys + source_label) with ``true_class`` and ``flipped`` (NaN if unmatched)."""
    need = {*JOIN_KEYS, "written_label", "true_class", "flipped"}
    missing = need - set(truth.columns)
    if missing:
        raise InputFormatError("truth.parquet", f"truth table lacks columns {sorted(missing)}")
    left = nuclei[["nucleus_id", *JOIN_KEYS, "source_label"]].copy()
    right = truth[[*JOIN_KEYS, "written_label", "true_class", "flipped"]].rename(
        columns={"written_label": "source_label"}).copy()
    for df in (left, right):
        for c in ("source", "origin_file", "origin_region", "source_label"):
            df[c] = df[c].astype(str)
        for c in ("origin_index", "origin_channel", "origin_instance"):
            df[c] = df[c].astype(np.int64)
    right = right.drop_duplicates([*JOIN_KEYS, "source_label"])
    return left.merge(right, on=[*JOIN_KEYS, "source_label"], how="left")


def _prf(flagged: np.ndarray, flipped: np.ndarray) -> tuple[float, float]:
    tp = int((flagged & flipped).sum())
    prec = tp / int(flagged.sum()) if flagged.any() else float("nan")
    rec = tp / int(flipped.sum()) if flipped.any() else float("nan")
    return prec, rec


def score_frames(labels: pd.DataFrame, props: pd.DataFrame, flags: pd.DataFrame, truth: pd.DataFrame) -> dict[str, Any]:
    """Truth metrics from a round's proposals and flags (frames with ``nucleus_id``)."""
    t = truth_for_nuclei(labels, truth).set_index("nucleus_id")
    matched = t["true_class"].notna()
    if not matched.any():
        raise InputFormatError("truth.parquet", "no truth row matches a nucleus of the store (another sample?)")
    t = t[matched]
    flipped_all = t["flipped"].astype(bool)
    p = props[props["nucleus_id"].isin(t.index)]
    tc = t.loc[p["nucleus_id"], "true_class"].to_numpy(np.int64)
    fl = t.loc[p["nucleus_id"], "flipped"].to_numpy(bool)
    right = p["proposed"].to_numpy(np.int64) == tc
    flagged = t.index.isin(flags["nucleus_id"].to_numpy())
    cl = t.index.isin(flags.loc[flags["reason"].isin(CLEANLAB_REASONS), "nucleus_id"].to_numpy())
    prec, rec = _prf(flagged, flipped_all.to_numpy())
    cprec, crec = _prf(cl, flipped_all.to_numpy())
    auto = (p["action"] == "auto_accepted").to_numpy()
    return {
        "n_matched": int(matched.sum()), "n_unmatched": int((~matched).sum()),
        "n_proposals": int((~fl).sum()), "proposal_accuracy": float(right[~fl].mean()) if (~fl).any() else float("nan"),
        "proposal_accuracy_all": float(right.mean()) if len(right) else float("nan"),
        "auto_accepted_accuracy": float(right[auto & ~fl].mean()) if (auto & ~fl).any() else float("nan"),
        "n_flipped": int(flipped_all.sum()), "n_flagged": int(flagged.sum()),
        "flag_precision": prec, "flag_recall": rec, "cleanlab_precision": cprec, "cleanlab_recall": crec,
        "n_cleanlab_flags": int(cl.sum()),
    }


def score_against_truth(store: "Store", truth: pd.DataFrame, *, round: int) -> dict[str, Any]:
    """Truth metrics of the finished round ``round`` (read from ``STORE/rounds/<round>/``)."""
    from .rounds import active_run

    if active_run(store, round) is None:
        raise StateError(f"{store.path}: round {round} has not been run")
    folder = store.path / "rounds" / str(round)
    try:
        props = pd.read_parquet(folder / "proposals.parquet")
        flags = pd.read_parquet(folder / "flags.parquet")
    except (OSError, ValueError) as exc:
        raise StateError(f"{folder}: cannot read the round's outputs ({exc})") from None
    labels = store.nuclei(include_ignore=False)
    return score_frames(labels, props, flags, truth)

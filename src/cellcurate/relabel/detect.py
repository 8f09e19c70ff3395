"""Label issues from out-of-sample probabilities (cleanlab), each with a reason.

Reasons (the ``action`` of ``flag`` events):

- ``confident_disagreement``: cleanlab's ``find_label_issues`` marks the label as an issue and the
  model's argmax is another class;
- ``likely_class_swap``: as above, and the confident joint shows the two classes exchanging labels
  in both directions (``C[given, suggested]`` and ``C[suggested, given]`` are each at least
  :data:`SWAP_MIN_SHARE` of the larger one and at least 2): a systematic swap of two classes rather
  than an isolated error;
- ``low_confidence_proposal`` is not made here: it is a proposal the round did not auto-accept
  (see :mod:`cellcurate.relabel.rounds`).

Issue score = 1 − cleanlab's label quality (self-confidence: the out-of-sample probability of the
given label), in [0, 1], higher = more likely wrong.

Dimensions: N labelled nuclei, K classes present among their labels.

>>> import numpy as np
>>> labels = np.array([0, 0, 0, 1, 1, 1, 0])
>>> probs = np.array([[.9, .1], [.8, .2], [.95, .05], [.1, .9], [.2, .8], [.05, .95], [.02, .98]])
>>> res = find_issues(labels, probs)
>>> res.issue.nonzero()[0].tolist(), res.reason[6]
([6], 'confident_disagreement')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import ConfigError

FlagReason = Literal["low_confidence_proposal", "confident_disagreement", "likely_class_swap"]
FLAG_REASONS: tuple[str, ...] = ("low_confidence_proposal", "confident_disagreement", "likely_class_swap")
SWAP_MIN_SHARE = 0.25


@dataclass
class Issues:
    """Per-nucleus result of :func:`find_issues` (all arrays (N,))."""

    issue: np.ndarray  # bool
    quality: np.ndarray  # float64 label quality in [0, 1]
    score: np.ndarray  # float64 = 1 - quality
    suggested: np.ndarray  # int64 column index of argmax
    reason: np.ndarray  # object: reason or "" when not an issue
    rank: np.ndarray  # int64, 1 = most likely wrong among issues; 0 when not an issue


def find_issues(labels: np.ndarray, pred_probs: np.ndarray, *, filter_by: str = "prune_by_noise_rate",
                n_jobs: int = 1) -> Issues:
    """Rank label issues with cleanlab.

    Parameters
    ----------
    labels
        (N,) int64 in 0..K-1.
    pred_probs
        (N, K) float out-of-sample probabilities (rows sum to 1).
    filter_by
        cleanlab's ``filter_by`` option.
    n_jobs
        cleanlab's ``n_jobs`` (1 is fastest on 2 cores).
    """
    from cleanlab.count import compute_confident_joint
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    pred_probs = np.asarray(pred_probs, dtype=np.float64)
    if pred_probs.ndim != 2 or len(labels) != len(pred_probs):
        raise ConfigError(f"labels and pred_probs differ in length: {len(labels)} != {len(pred_probs)}")
    n, k = pred_probs.shape
    if n and (labels.min() < 0 or labels.max() >= k):
        raise ConfigError(f"labels must lie in 0..{k - 1}, got {labels.min()}..{labels.max()}")
    quality = np.ones(n)
    issue = np.zeros(n, bool)
    suggested = pred_probs.argmax(axis=1) if n else np.zeros(0, np.int64)
    if n and k >= 2 and len(np.unique(labels)) >= 2:
        quality = get_label_quality_scores(labels, pred_probs, method="self_confidence")
        issue = find_label_issues(labels, pred_probs, filter_by=filter_by, n_jobs=n_jobs)
        issue &= suggested != labels
        cj = compute_confident_joint(labels, pred_probs)
    else:
        cj = np.zeros((k, k))
    reason = np.full(n, "", dtype=object)
    idx = np.flatnonzero(issue)
    a, b = cj[labels[idx], suggested[idx]], cj[suggested[idx], labels[idx]]
    swap = (np.minimum(a, b) >= np.maximum(2, SWAP_MIN_SHARE * np.maximum(a, b)))
    reason[idx] = np.where(swap, "likely_class_swap", "confident_disagreement")
    score = 1.0 - quality
    rank = np.zeros(n, np.int64)
    order = idx[np.argsort(-score[idx], kind="stable")]
    rank[order] = np.arange(1, len(order) + 1)
    return Issues(issue, quality, score, suggested.astype(np.int64), reason, rank)

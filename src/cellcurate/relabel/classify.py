"""Grouped cross-validated classifiers and out-of-sample probabilities.

Groups keep correlated nuclei on one side of every split: a MoNuSAC nucleus's group is its
patient (``monusac:<patient_id>``), a PanNuke nucleus's group is its fold (``pannuke:<split>``).
No group is ever in both the training and the test part of a split.

Dimensions: N nuclei, F features, K classes (K = the store taxonomy's classes in probability vectors).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X = np.r_[rng.normal(0, 1, (60, 2)), rng.normal(4, 1, (60, 2))]
>>> y = np.r_[np.ones(60, int), np.full(60, 2)]
>>> g = np.tile(np.arange(6), 20)
>>> cv = cross_val_probs(X, y, g, classes=[1, 2, 3], folds=3, seed=0)
>>> cv.probs.shape, cv.accuracy > 0.9
((120, 3), True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import ConfigError, StateError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

ClassifierName = Literal["hgb", "logreg"]
CLASSIFIERS: tuple[str, ...] = ("hgb", "logreg")


def nucleus_groups(nuclei: "pd.DataFrame", images: "pd.DataFrame") -> np.ndarray:
    """(N,) object array of group keys ``<source>:<group>``: ``monusac:<patient_id>``,
    ``pannuke:<split>``, ``consep:<slide>`` ... as each source's registry entry says
    (``SourceSpec.group_by``). Sources not in the registry group by patient when known, else by
    split, else by image.
    """
    from ..datasets.sources import find_source

    im = images.set_index("image_id")
    patient = im["patient_id"].reindex(nuclei["image_id"]).to_numpy(dtype=object)
    split = im["split"].reindex(nuclei["image_id"]).to_numpy(dtype=object)
    src = nuclei["source"].astype(str).to_numpy()
    img = nuclei["image_id"].astype(str).to_numpy()
    specs = {s: find_source(s) for s in np.unique(src)}
    out = np.empty(len(nuclei), dtype=object)
    for i in range(len(out)):
        spec = specs[src[i]]
        if spec is not None:
            key = spec.group_key(patient[i], split[i], img[i])
        else:
            key = patient[i] if isinstance(patient[i], str) and patient[i] else (
                split[i] if isinstance(split[i], str) else img[i])
        out[i] = f"{src[i]}:{key}"
    return out


def make_classifier(name: str = "hgb", *, seed: int = 0) -> Any:
    """A scikit-learn classifier (a fresh, unfitted estimator)."""
    if name == "hgb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, max_leaf_nodes=15,
                                              early_stopping=False, l2_regularization=1.0, random_state=seed)
    if name == "logreg":
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=300))
    raise ConfigError(f"unknown classifier {name!r}; expected one of {', '.join(CLASSIFIERS)}")


def group_folds(y: np.ndarray, groups: np.ndarray, *, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Grouped, class-stratified K-fold splits: (train index, test index) pairs.

    ``folds`` is capped at the number of groups; at least 2 groups are needed.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise StateError(f"cross-validation needs nuclei from at least 2 groups (patients / folds), found {n_groups}")
    k = min(folds, n_groups)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only n members"
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = [(tr, te) for tr, te in splitter.split(np.zeros(len(y)), y, groups)]
    return [(tr, te) for tr, te in splits if len(te)]


@dataclass
class CVResult:
    """Out-of-sample probabilities of a grouped cross-validation.

    Attributes
    ----------
    probs
        (N, K) float64, columns = ``classes``; each row from the fold model that did not see it.
    classes
        (K,) class ids.
    folds
        Number of splits used.
    accuracy
        Out-of-sample accuracy of argmax(probs) against ``y``.
    confusion
        (K, K) int64 counts, rows = given class, columns = predicted class.
    models
        The fold models (for predicting nuclei outside the training set).
    """

    probs: np.ndarray
    classes: np.ndarray
    folds: int
    accuracy: float
    confusion: np.ndarray
    models: list[Any]


def _expand(model: Any, probs: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Map a model's ``predict_proba`` columns (its ``classes_``) onto ``classes``."""
    out = np.zeros((len(probs), len(classes)))
    col = {int(c): i for i, c in enumerate(classes)}
    for j, c in enumerate(model.classes_):
        out[:, col[int(c)]] = probs[:, j]
    return out


def cross_val_probs(X: np.ndarray, y: np.ndarray, groups: np.ndarray, *, classes: "list[int] | np.ndarray",
                    folds: int = 5, seed: int = 0, classifier: str = "hgb", n_jobs: int = 1,
                    max_train: int | None = None) -> CVResult:
    """Grouped K-fold out-of-sample probabilities.

    Parameters
    ----------
    X
        (N, F) float features.
    y
        (N,) int class ids, each in ``classes``.
    groups
        (N,) group keys.
    classes
        (K,) class ids: the columns of the returned probabilities.
    n_jobs
        Threads for the classifier's native code (OpenMP/BLAS); 1 is fastest on 2 shared cores.
    max_train
        Fit each fold on at most this many nuclei (a seeded, class-stratified subsample of its
        training part); every nucleus still gets out-of-sample probabilities. None: no cap.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(n_jobs):
        return _cross_val_probs(X, y, groups, classes=classes, folds=folds, seed=seed, classifier=classifier,
                                max_train=max_train)


def subsample(y: np.ndarray, idx: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """At most ``cap`` of ``idx``, keeping each class's share (sorted, so the result is deterministic)."""
    if cap is None or len(idx) <= cap:
        return idx
    keep = []
    for c in np.unique(y[idx]):
        members = idx[y[idx] == c]
        k = max(1, int(round(cap * len(members) / len(idx))))
        keep.append(rng.choice(members, min(k, len(members)), replace=False))
    return np.sort(np.concatenate(keep))


def _cross_val_probs(X: np.ndarray, y: np.ndarray, groups: np.ndarray, *, classes: "list[int] | np.ndarray",
                     folds: int, seed: int, classifier: str, max_train: int | None) -> CVResult:
    classes = np.asarray(classes, dtype=np.int64)
    if len(X) != len(y) or len(y) != len(groups):
        raise ConfigError(f"X, y and groups differ in length: {len(X)}, {len(y)}, {len(groups)}")
    probs = np.zeros((len(y), len(classes)))
    models = []
    splits = group_folds(y, groups, folds=folds, seed=seed)
    rng = np.random.default_rng(seed)
    for tr, te in splits:
        tr = subsample(y, tr, max_train, rng)
        model = make_classifier(classifier, seed=seed)
        if len(np.unique(y[tr])) < 2:
            raise StateError(f"a cross-validation split has only class {int(y[tr][0])} to train on; "
                             "the classes are not spread over enough patients/folds")
        model.fit(X[tr], y[tr])
        probs[te] = _expand(model, model.predict_proba(X[te]), classes)
        models.append(model)
    pred = classes[probs.argmax(axis=1)]
    pos = {int(c): i for i, c in enumerate(classes)}
    conf = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(conf, (np.array([pos[int(v)] for v in y]), np.array([pos[int(v)] for v in pred])), 1)
    return CVResult(probs, classes, len(splits), float((pred == y).mean()) if len(y) else float("nan"), conf, models)


def predict_mean(models: list[Any], X: np.ndarray, classes: np.ndarray, *, n_jobs: int = 1) -> np.ndarray:
    """(N, K) mean of the fold models' probabilities for nuclei none of them trained on."""
    from threadpoolctl import threadpool_limits

    if not len(X):
        return np.zeros((0, len(classes)))
    with threadpool_limits(n_jobs):
        return np.mean([_expand(m, m.predict_proba(X), classes) for m in models], axis=0)

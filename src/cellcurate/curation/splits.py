"""Image-level splits of a release, deterministic from content and a seed.

Rules (documented in docs/RELEASE_FORMAT.md):

* PanNuke keeps its official folds: ``fold1``, ``fold2``, ``fold3``.
* MoNuSAC keeps its official ``train`` / ``test``; a ``val`` split is drawn from the *patients*
  of MoNuSAC train (``val_fraction`` of them, at least one when train has two or more patients),
  so no patient is on two sides.
* Every other source maps its own splits through its registry entry (``SourceSpec.splits`` in
  ``cellcurate.datasets.sources``, keyed by source, so a new source's ``fold1`` never joins
  PanNuke's); those with ``val_from_train`` give ``val`` patients as MoNuSAC does.
* PanNuke has no patient ids; ``pannuke_val_fraction`` (default 0) optionally draws ``val``
  images from fold1/fold2, grouped by image.
* The order in which patients are drawn is ``sha256(f"{seed}:{group}")``: no RNG state, so the
  same store and seed give the same split bit for bit, and adding a patient never reshuffles the
  others.

Convenience names (what ``load_release(path, split=...)`` accepts besides the split names):
``train`` = fold1 + fold2 + MoNuSAC train (minus val); ``val`` = val; ``test`` = fold3 + MoNuSAC
test; ``all`` = everything.

Dimensions: N images.

>>> import pandas as pd
>>> images = pd.DataFrame({"image_id": ["a", "b"], "source": ["monusac"] * 2,
...                        "split": ["train", "train"], "patient_id": ["P1", "P2"]})
>>> assign_splits(images, seed=0)["split"].tolist()  # P2 comes first in sha256('0:...') order: val
['train', 'val']
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd

from ..errors import ConfigError

#: Split names a release can hold, in display order.
SPLIT_NAMES: tuple[str, ...] = ("fold1", "fold2", "fold3", "train", "val", "test")

#: Convenience split -> (source, source split) pairs it gathers (``val`` is its own split).
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("fold1", "fold2", "train"),
    "val": ("val",),
    "test": ("fold3", "test"),
    "all": SPLIT_NAMES,
}


def _order_key(group: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{group}".encode("utf-8")).hexdigest()


def _draw(groups: list[str], fraction: float, seed: int, *, at_least_one: bool) -> set[str]:
    groups = sorted(set(groups))
    if not groups or fraction <= 0:
        return set()
    n = int(math.floor(fraction * len(groups) + 0.5))
    if at_least_one and len(groups) >= 2:
        n = max(n, 1)
    n = min(n, len(groups) - 1)  # never move every training group out
    ordered = sorted(groups, key=lambda g: _order_key(g, seed))
    return set(ordered[:n])


def assign_splits(
    images: pd.DataFrame, *, seed: int = 0, val_fraction: float = 0.2, pannuke_val_fraction: float = 0.0
) -> pd.DataFrame:
    """The release split of every image.

    Parameters
    ----------
    images
        N rows with ``image_id``, ``source``, ``split`` (the source's own split) and
        ``patient_id`` (may be missing).
    seed
        Part of the draw order of the val groups.
    val_fraction
        Fraction of MoNuSAC train patients moved to ``val``.
    pannuke_val_fraction
        Fraction of PanNuke fold1/fold2 images moved to ``val`` (0 keeps the folds whole).

    Returns
    -------
    DataFrame
        N rows, columns ``image_id``, ``source_split`` (the source's own split, kept) and
        ``split`` (the release split), in the order of ``images``.
    """
    for name, v in (("val_fraction", val_fraction), ("pannuke_val_fraction", pannuke_val_fraction)):
        if not 0.0 <= float(v) < 1.0:
            raise ConfigError(f"{name} must be in [0, 1), got {v}")
    source_split = images["split"].astype(str).to_numpy()
    source = images["source"].astype(str).to_numpy()
    split = release_splits(source, source_split)
    patient = images["patient_id"].astype("string").fillna("").to_numpy(dtype=object)
    group = np.where(patient != "", patient, images["image_id"].astype(str).to_numpy())
    from_train = _val_from_train(source)

    # MoNuSAC (and every source whose entry says val_from_train): val by patient, never a test patient.
    is_train = from_train & (split == "train")
    test_groups = set(group[from_train & (split == "test")])
    candidates = [g for g in group[is_train] if g not in test_groups]
    val = _draw(candidates, float(val_fraction), seed, at_least_one=val_fraction > 0)
    split[is_train & np.isin(group, list(val))] = "val"

    if pannuke_val_fraction > 0:
        is_pn = (source == "pannuke") & np.isin(source_split, ["fold1", "fold2"])
        pn_val = _draw(list(group[is_pn]), float(pannuke_val_fraction), seed, at_least_one=True)
        split[is_pn & np.isin(group, list(pn_val))] = "val"

    return pd.DataFrame({
        "image_id": images["image_id"].astype(str).to_numpy(),
        "source_split": source_split,
        "split": split.astype(str),
    })


def release_splits(source: np.ndarray, source_split: np.ndarray) -> np.ndarray:
    """(N,) object array: each image's release split from its source's own split, through the
    source's registry entry (``SourceSpec.splits``, keyed by source: CoNSeP ``test`` -> ``test``,
    Lizard ``fold3`` -> ``test``; PanNuke keeps ``fold1``..``fold3``). A split the entry does not
    map, or a source not in the registry, keeps its name if it is a release split name, else
    raises ConfigError (an image must never land in a split nobody asked for)."""
    from ..datasets.sources import find_source

    out = np.empty(len(source), dtype=object)
    for src in np.unique(source):
        spec = find_source(str(src))
        sel = source == src
        for ss in np.unique(source_split[sel]):
            target = spec.splits.get(str(ss), str(ss)) if spec is not None else str(ss)
            if target not in SPLIT_NAMES:
                raise ConfigError(
                    f"source {src!r}: its split {ss!r} has no release split; the source's registry entry "
                    f"must map it to one of {', '.join(SPLIT_NAMES)}"
                )
            out[sel & (source_split == ss)] = target
    return out


def _val_from_train(source: np.ndarray) -> np.ndarray:
    from ..datasets.sources import find_source

    out = np.zeros(len(source), dtype=bool)
    for src in np.unique(source):
        spec = find_source(str(src))
        out[source == src] = (src != "pannuke") if spec is None else spec.val_from_train
    return out


def resolve_split(name: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Split names a convenience name or a list of names stands for (``"train"`` ->
    fold1, fold2, train): the rule the release loader applies to a release's manifest."""
    from ..datasets.release_format import resolve_release_split

    manifest = {"splits": {"aliases": {k: list(v) for k, v in SPLIT_ALIASES.items()},
                           "n_images": dict.fromkeys(SPLIT_NAMES, 0)}}
    return resolve_release_split(manifest, name)
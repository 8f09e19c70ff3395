"""Sample stores for the review plugin: the synthetic sample (napari "sample data"), and a fast
store of painted discs with flags written through the ledger API (tests and benchmarks).

Nothing here imports Qt or napari, so tests and benchmarks use it headless.

Dimensions: N images, n nuclei per image, K = 7 classes, T×T pixels per tile.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..datasets.records import SourceImage
from ..datasets.store import Store

#: PanNuke label painted for each unified class (Inflammatory for the three immune classes).
_PANNUKE_LABEL = {1: "Neoplastic", 2: "Inflammatory", 3: "Connective", 4: "Dead", 5: "Epithelial",
                  6: "Inflammatory", 7: "Inflammatory"}
_RADIUS = {1: 8, 2: 4, 3: 5, 4: 3, 5: 7, 6: 9, 7: 5}
_TINT = {1: (90, 40, 130), 2: (40, 30, 110), 3: (150, 90, 160), 4: (60, 50, 60), 5: (120, 70, 150),
         6: (140, 90, 150), 7: (80, 50, 140)}
FLAG_REASONS: tuple[str, ...] = ("low_confidence_proposal", "confident_disagreement", "likely_class_swap")


def _disc_tile(rng: np.random.Generator, index: int, per_image: int, size: int, stamps: dict[int, np.ndarray]
               ) -> SourceImage:
    grid = int(np.ceil(np.sqrt(per_image)))
    step = size // grid
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (235, 215, 225)
    ins = np.zeros((size, size), np.int32)
    classes = rng.integers(1, 8, per_image)
    for k, c in enumerate(classes):
        r = _RADIUS[int(c)]
        gy, gx = divmod(k, grid)
        cy = gy * step + step // 2 + int(rng.integers(-2, 3))
        cx = gx * step + step // 2 + int(rng.integers(-2, 3))
        m = stamps[r]
        ys, xs = slice(cy - r, cy + r + 1), slice(cx - r, cx + r + 1)
        ins[ys, xs][m] = k + 1
        img[ys, xs][m] = _TINT[int(c)]
    nuc = pd.DataFrame({
        "instance_id": np.arange(1, per_image + 1, dtype=np.int32), "kind": "nucleus",
        "source_label": [_PANNUKE_LABEL[int(c)] for c in classes],
        "origin_channel": np.zeros(per_image, np.int16), "origin_instance": np.arange(per_image) + 1,
        "origin_region": "",
    })
    return SourceImage(key=f"fold1/{index:06d}", split="fold1", image=img, instances=ins, nuclei=nuc,
                       origin_file="Fold 1/images/fold1/images.npy", origin_index=index,
                       annotation_file="Fold 1/masks/fold1/masks.npy", tissue="Breast")


def write_disc_store(path: str | Path, *, n_images: int = 4, per_image: int = 16, size: int = 256,
                     seed: int = 0) -> Store:
    """A PanNuke-like store of ``n_images`` tiles, each with ``per_image`` discs sized by class.

    Written through the store writer (one unit, stacked tiles): fast enough for 200,000 nuclei.
    """
    rng = np.random.default_rng(seed)
    grid = int(np.ceil(np.sqrt(per_image)))
    if size // grid < 2 * max(_RADIUS.values()) + 5:
        raise ValueError(f"{per_image} discs do not fit a {size}x{size} tile")
    stamps = {}
    for r in set(_RADIUS.values()):
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        stamps[r] = yy**2 + xx**2 <= r * r
    store = Store.create(path)
    with store.unit_writer("pannuke-fold1", "pannuke", fingerprint=f"discs-{seed}-{n_images}-{per_image}",
                           origin="synthetic discs", stacked=(n_images, size, size)) as w:
        for i in range(n_images):
            w.add(_disc_tile(rng, i, per_image, size, stamps))
        w.commit()
    return store


def write_flags(store: Store, *, fraction: float = 0.1, round: int = 1, seed: int = 0,
                model: str = "synthetic") -> pd.DataFrame:
    """Flag a random ``fraction`` of the nuclei as a relabeling run would (round started, flags,
    round finished), through the ledger API. Returns the flag events written (with their seq).
    """
    rng = np.random.default_rng(seed)
    nuc = store.nuclei(include_ignore=False)
    cur = store.ledger.current_labels()
    n = max(1, int(len(nuc) * fraction + 0.5))
    pick = np.sort(rng.choice(len(nuc), size=min(n, len(nuc)), replace=False))
    ids = nuc["nucleus_id"].to_numpy()[pick]
    given = cur["label"].reindex(ids).to_numpy()
    class_ids = np.asarray(store.taxonomy.ids)  # the store's classes (ids need not be 1..K)
    k = len(class_ids)
    logits = rng.normal(size=(len(ids), k))
    pos = rng.integers(0, k, len(ids))
    suggested = class_ids[pos]
    logits[np.arange(len(ids)), pos] += 2.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    score = np.round(rng.uniform(0.3, 1.0, len(ids)), 4)
    actor = f"relabel:r{round}:{model}"
    (start,) = store.ledger.append([{"kind": "round", "round": round, "actor": "relabel", "action": "started",
                                     "payload": {"model": model, "synthetic": True}}])
    order = np.argsort(-score)
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(len(ids))
    reasons = np.asarray(FLAG_REASONS)[rng.integers(0, len(FLAG_REASONS), len(ids))]
    flags = pd.DataFrame({
        "kind": "flag", "nucleus_id": ids, "round": round, "actor": actor, "action": reasons,
        "label": suggested, "prev_label": given, "score": score, "ref": start,
        "payload": [f'{{"probs":[{",".join(f"{p:.4f}" for p in row)}],"label_quality":{1 - s:.4f},"rank":{r}}}'
                    for row, s, r in zip(probs, score, rank)],
    })
    seqs = store.ledger.append(flags)
    # like a real run, the round folder is in place (naming the run) before the run is committed
    from ..core.atomic import atomic_write_json

    folder = Path(store.path) / "rounds" / str(round)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "summary.json", {"metrics": {"run_seq": int(start)}, "synthetic": True,
                                                "model": model})
    store.ledger.append([{"kind": "round", "round": round, "actor": "relabel", "action": "finished", "ref": start}])
    return flags.assign(seq=seqs)


def make_sample_store(path: str | Path, *, preset: str = "tiny", seed: int = 0, flag_fraction: float = 0.1,
                      step: Callable[[str], None] | None = None) -> Store:
    """The synthetic sample (:func:`cellcurate.datasets.synthetic.write_sample`) ingested into a
    store under ``path``, with flags on ``flag_fraction`` of its nuclei. ``step`` is told each
    stage as it starts (a progress display)."""
    from ..datasets.ingest import ingest_monusac, ingest_pannuke
    from ..datasets.synthetic import write_sample

    tell = step or (lambda _what: None)
    root = Path(path)
    sample = root / "sample"
    tell("writing the synthetic sample")
    write_sample(sample, preset=preset, seed=seed)  # type: ignore[arg-type]
    store = Store.create(root / "store")
    tell("ingesting PanNuke")
    ingest_pannuke(store, sample / "pannuke", progress=False)
    tell("ingesting MoNuSAC")
    ingest_monusac(store, sample / "monusac", progress=False)
    tell("flagging")
    write_flags(store, fraction=flag_fraction, seed=seed)
    return store


#: Stages of :func:`sample_data` (for its progress bar).
SAMPLE_STEPS = 5


def sample_data() -> list[tuple[Any, dict[str, Any], str]]:
    """napari sample-data contribution: the tiny synthetic sample, images with nuclei by class.

    Built in a temporary folder that is removed before returning (the layers are in memory);
    each stage shows in napari's activity dock."""
    from .reader import store_layers

    bar: Any = None
    try:
        from napari.utils import progress

        bar = progress(total=SAMPLE_STEPS, desc="cellcurate sample")
    except ImportError:  # pragma: no cover - napari is this module's dependency
        pass

    def step(what: str) -> None:
        if bar is not None:
            bar.set_description(f"cellcurate sample: {what}")
            bar.update(1)

    try:
        with tempfile.TemporaryDirectory(prefix="cellcurate-sample-") as tmp:
            store = make_sample_store(tmp, step=step)
            step("reading the layers")
            try:
                return store_layers(store, max_images=4)
            finally:
                store.close()
    finally:
        if bar is not None:
            bar.close()

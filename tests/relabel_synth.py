"""A tiny painted store for the relabel tests: discs whose size and colour depend on the true class.

PanNuke-like units (3 folds of stacked 96×96 tiles, 9 nuclei each) and MoNuSAC-like units (patients
with 128×128 images, 16 nuclei each), written with the store's own writer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cellcurate.datasets.records import SourceImage
from cellcurate.datasets.store import Store

#: true class -> (radius y, radius x, RGB)
LOOK = {
    1: (9, 9, (80, 40, 120)), 2: (4, 4, (40, 20, 90)), 3: (4, 10, (120, 80, 160)), 4: (3, 3, (30, 10, 40)),
    5: (7, 7, (150, 110, 190)), 6: (8, 8, (170, 140, 200)), 7: (5, 5, (100, 60, 150)),
}
PANNUKE_OF = {1: "Neoplastic", 2: "Inflammatory", 3: "Connective", 4: "Dead", 5: "Epithelial",
              6: "Inflammatory", 7: "Inflammatory"}
MONUSAC_OF = {1: "Epithelial", 5: "Epithelial", 2: "Lymphocyte", 6: "Macrophage", 7: "Neutrophil"}
CHANNEL = {"Neoplastic": 0, "Inflammatory": 1, "Connective": 2, "Dead": 3, "Epithelial": 4}


def paint(classes: list[int], size: int, grid: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (230, 180, 220)
    ins = np.zeros((size, size), np.int32)
    cell = size // grid
    yy, xx = np.mgrid[:size, :size]
    for k, c in enumerate(classes):
        ry, rx, rgb = LOOK[c]
        cy, cx = cell * (k // grid) + cell // 2, cell * (k % grid) + cell // 2
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        ins[m] = k + 1
        img[m] = rgb
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8), ins


def _nuclei(labels: list[str], source: str) -> pd.DataFrame:
    n = len(labels)
    return pd.DataFrame({
        "instance_id": np.arange(1, n + 1, dtype=np.int32), "kind": "nucleus", "source_label": labels,
        "origin_channel": [CHANNEL[lab] if source == "pannuke" else -1 for lab in labels],
        "origin_instance": np.arange(n) + 1 if source == "pannuke" else np.full(n, -1),
        "origin_region": [""] * n if source == "pannuke" else [str(i + 1) for i in range(n)],
    })


def build_store(path: Path, *, sources: tuple[str, ...] = ("pannuke", "monusac"), seed: int = 0,
                tiles: int = 6, patients: int = 4, dead: float = 1.0, flip: float = 0.0) -> Store:
    """Create a store at ``path``; ``dead`` scales how often Dead nuclei occur; ``flip`` plants label noise."""
    rng = np.random.default_rng(seed)
    store = Store.create(path)
    if "pannuke" in sources:
        w = np.array([1, 1, 1, dead, 1, 1, 1], float)
        for fold in (1, 2, 3):
            items = []
            for t in range(tiles):
                cls = list(rng.choice(np.arange(1, 8), 9, p=w / w.sum()))
                img, ins = paint(cls, 96, 3, rng)
                labels = [PANNUKE_OF[int(c)] for c in cls]
                labels = [rng.choice(sorted(set(PANNUKE_OF.values()) - {lab})) if rng.random() < flip else lab
                          for lab in labels]
                items.append(SourceImage(
                    key=f"fold{fold}/{t:05d}", split=f"fold{fold}", image=img, instances=ins,
                    nuclei=_nuclei([str(x) for x in labels], "pannuke"), origin_file=f"Fold {fold}/images.npy",
                    origin_index=t, mpp=0.25, tissue="Breast", annotation_file=f"Fold {fold}/masks.npy"))
            with store.unit_writer(f"pannuke-fold{fold}", "pannuke", fingerprint=f"f{fold}", origin="/x",
                                   stacked=(tiles, 96, 96)) as wr:
                for it in items:
                    wr.add(it)
                wr.commit()
    if "monusac" in sources:
        for p in range(patients):
            pid = f"TCGA-AA-{p:04d}"
            with store.unit_writer(f"monusac-train-{pid}", "monusac", fingerprint=f"m{p}", origin="/y") as wr:
                for i in range(2):
                    cls = list(rng.choice([1, 5, 2, 6, 7], 16))
                    img, ins = paint(cls, 128, 4, rng)
                    wr.add(SourceImage(
                        key=f"{pid}_{i}", split="train", image=img, instances=ins,
                        nuclei=_nuclei([MONUSAC_OF[int(c)] for c in cls], "monusac"),
                        origin_file=f"{pid}/{pid}_{i}.tif", mpp=0.25, patient_id=pid,
                        annotation_file=f"{pid}/{pid}_{i}.xml"))
                wr.commit()
    return store

"""napari reader: ``napari STORE`` opens a cellcurate store, images with nuclei coloured by class.

A store can hold hundreds of thousands of nuclei, so the reader opens the first
:data:`MAX_IMAGES` images only (each read lazily, on open); ``CELLCURATE_NAPARI_IMAGES`` changes
that number. Each image becomes an image layer and a labels layer whose values are the current
class of each nucleus (colours from the store's taxonomy), laid out side by side.

Dimensions: H×W pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..curation.review import current_labels_of, display_values
from ..datasets.ledger import NOT_A_NUCLEUS, UNRESOLVED
from ..datasets.store import Store
from ..datasets.taxonomy import Taxonomy

MAX_IMAGES = 4
LayerData = tuple[Any, dict[str, Any], str]


def class_colors(taxonomy: Taxonomy) -> dict[int | None, str]:
    """Colours of the class map values: the taxonomy's classes, unresolved white, rejected grey,
    ignore regions dark grey, background transparent."""
    colors: dict[int | None, str] = {None: "transparent", 0: "transparent"}
    colors.update({c.id: c.color for c in taxonomy.classes})
    unresolved_v, rejected_v, ignore_v = display_values(taxonomy)
    colors.update({unresolved_v: "#ffffff", rejected_v: "#808080", ignore_v: "#404040"})
    return colors


def class_map(store: Store, image_id: str, instances: np.ndarray) -> np.ndarray:
    """(H, W) uint8 map of each nucleus's current class (see :func:`class_colors` for the values)."""
    nuc = store.nuclei()
    nuc = nuc[nuc["image_id"] == image_id]
    labels = current_labels_of(store, nuc["nucleus_id"])["label"]
    value = labels.reindex(nuc["nucleus_id"]).fillna(0).astype(np.int64).to_numpy()
    unresolved_v, rejected_v, ignore_v = display_values(store.taxonomy)
    value = np.where(value == NOT_A_NUCLEUS, rejected_v, np.where(value == UNRESOLVED, unresolved_v, value))
    value = np.where(nuc["kind"].to_numpy() == "ignore", ignore_v, value)
    inst = nuc["instance_id"].to_numpy(np.int64)
    lut = np.zeros(max(int(instances.max(initial=0)), int(inst.max(initial=0))) + 1, np.uint8)
    lut[inst] = value.astype(np.uint8)
    return lut[instances]


def store_layers(store: Store, *, max_images: int | None = None) -> list[LayerData]:
    """Layer data of the first ``max_images`` images of a store (image + class labels each)."""
    n = MAX_IMAGES if max_images is None else int(max_images)
    images = store.images().head(n)
    colors = class_colors(store.taxonomy)
    layers: list[LayerData] = []
    x = 0
    for row in images.itertuples(index=False):
        image, instances = store.read(row.image_id)
        translate = (0, x)
        layers.append((image, {"name": row.image_id, "rgb": True, "translate": translate}, "image"))
        layers.append((class_map(store, row.image_id, instances),
                       {"name": f"{row.image_id} classes", "colormap": colors, "opacity": 0.45,
                        "translate": translate}, "labels"))
        x += int(row.width) + 16
    return layers


def is_store(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "store.json").is_file()


def napari_get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader contribution: a reader for a store folder, None for anything else."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not is_store(path):
        return None
    return read_store


def read_store(path: str | list[str]) -> list[LayerData]:
    if isinstance(path, list):
        path = path[0]
    n = int(os.environ.get("CELLCURATE_NAPARI_IMAGES", MAX_IMAGES))
    with Store.open(path, mode="r") as store:
        return store_layers(store, max_images=n)

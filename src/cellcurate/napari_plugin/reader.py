"""napari reader: ``napari STORE`` opens a cellcurate store, images with nuclei coloured by class.

The class layers are read-only (a two-level multiscale labels layer, which napari does not let
anyone paint on) and carry the class names as features, so hovering a nucleus shows its class.

A store can hold hundreds of thousands of nuclei, so the reader opens the first
:data:`MAX_IMAGES` images only (each read lazily, on open); ``CELLCURATE_NAPARI_IMAGES`` changes
that number. Each image becomes an image layer and a labels layer whose values are the current
class of each nucleus (colours from the store's taxonomy), laid out side by side.

Dimensions: H×W pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

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


#: Outline colours to choose from for the nucleus under review: colours that stand out on H&E
#: (no blues or purples, which vanish on haematoxylin).
OUTLINE_CANDIDATES: tuple[str, ...] = (
    "#00ff00", "#80ff00", "#00ff80", "#00ffc8", "#00ffff", "#ffff00", "#b4ff00", "#ff8000", "#ff4500",
    "#ff0000", "#ff0080", "#ff6eb4", "#000000",
)


def _rgb(color: str) -> np.ndarray:
    h = color.lstrip("#")
    return np.array([int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)], float)


def _lab(color: str) -> np.ndarray:
    """CIE L*a*b* (D65) of an sRGB colour: distances there follow what the eye tells apart."""
    c = _rgb(color) / 255
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ c
    t = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def outline_color(taxonomy: Taxonomy) -> str:
    """The candidate colour farthest (CIE Lab distance) from every colour of the class map: each
    class, unresolved white, rejected and ignore greys; so the outline of the nucleus under
    review never looks like a class (a Dead nucleus is yellow: its outline is not)."""
    used = [_lab(c) for c in class_colors(taxonomy).values() if c != "transparent"]
    return max(OUTLINE_CANDIDATES, key=lambda c: min(float(np.linalg.norm(_lab(c) - u)) for u in used))


def class_names(taxonomy: Taxonomy) -> dict[int, str]:
    """Names of the class map values (what napari shows on hover)."""
    names = {0: "background", **{c.id: c.name for c in taxonomy.classes}}
    unresolved_v, rejected_v, ignore_v = display_values(taxonomy)
    names.update({unresolved_v: "unresolved", rejected_v: "not a nucleus", ignore_v: "ignore region"})
    return names


def class_features(taxonomy: Taxonomy) -> pd.DataFrame:
    """Labels-layer features: one row per class map value, column ``class`` (shown on hover)."""
    names = class_names(taxonomy)
    return pd.DataFrame({"index": list(names), "class": list(names.values())})


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
        image, instances = np.array(image), np.asarray(instances)  # in memory: the store may go away
        translate = (0, x)
        layers.append((image, {"name": row.image_id, "rgb": True, "translate": translate}, "image"))
        # a (two-level) multiscale labels layer: napari makes those read-only (no paint tools, no
        # keys switching to them); the class of the nucleus under the cursor shows on hover
        cmap = class_map(store, row.image_id, instances)
        layers.append(([cmap, cmap[::2, ::2]],
                       {"name": f"{row.image_id} classes", "colormap": colors, "opacity": 0.45,
                        "translate": translate, "multiscale": True, "features": class_features(store.taxonomy)},
                       "labels"))
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

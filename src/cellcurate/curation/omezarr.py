"""OME-Zarr (OME-NGFF) copies of release images with their label images.

One OME-Zarr image per release image, ``<release>/ome/<safe image id>.ome.zarr``::

    <image>.ome.zarr/            multiscales image, axes (c, y, x), scale (1, mpp, mpp) micrometer
      0/                         (3, H, W) uint8 RGB
      labels/                    labels group: ["instances", "classes"]
        instances/0              (H, W) int32 instance label image
        classes/0                (H, W) uint8 class label image, image-label colours and
                                 properties {label-value, class} for 0 (background), every
                                 class and 255 (ignore)

NGFF 0.5 (default) is Zarr v3 with the metadata under the ``"ome"`` key of the group
attributes; NGFF 0.4 is Zarr v2 with ``multiscales`` / ``labels`` / ``image-label`` at the top
level of ``.zattrs`` and a ``version`` in each block. Chunk keys are ``/``-nested in both
(``0/0/1/2``; NGFF has required it since 0.2): 0.4 arrays say ``"dimension_separator": "/"``,
which the zarr-2 ome-zarr stack needs to find the chunks (with ``.`` keys it reads all zeros).
Label value 0 has its own ``colors`` / ``properties`` entry (transparent, ``background``), so a
reader that maps properties by position (older napari-ome-zarr) names each class right.
napari's OME-Zarr reader, ome-zarr-py and QuPath (via its OME-Zarr support) open both; the
metadata validates under ome-zarr-models (tests/test_omezarr.py).

Dimensions: H×W pixels, K classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..core.constants import IGNORE_VALUE
from ..errors import ConfigError

OME_VERSIONS: tuple[str, ...] = ("0.5", "0.4")
CHUNK = 512
IGNORE_RGBA = [128, 128, 128, 128]
BACKGROUND_RGBA = [0, 0, 0, 0]
#: ``/``-nested chunk keys for both Zarr formats (NGFF >= 0.2 requires them).
_KEYS = {2: {"name": "v2", "separator": "/"}, 3: {"name": "default", "separator": "/"}}


def _axes(with_channel: bool) -> list[dict[str, str]]:
    ax = [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
    return ([{"name": "c", "type": "channel"}] + ax) if with_channel else ax


def _multiscales(name: str, mpp: float, *, with_channel: bool, version: str) -> list[dict[str, Any]]:
    scale = ([1.0] if with_channel else []) + [float(mpp), float(mpp)]
    ms: dict[str, Any] = {
        "name": name,
        "axes": _axes(with_channel),
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
    }
    if version == "0.4":
        ms = {"version": "0.4", **ms}
    return [ms]


def _put(group: Any, meta: dict[str, Any], version: str) -> None:
    if version == "0.5":
        group.attrs.update({"ome": {"version": "0.5", **meta}})
    else:
        group.attrs.update(meta)


def write_ome_image(path: str | Path, image: np.ndarray, instances: np.ndarray, classes: np.ndarray, *,
                    mpp: float, taxonomy: Any, name: str = "image", version: str = "0.5") -> Path:
    """Write one OME-Zarr image with ``instances`` and ``classes`` label images.

    Parameters
    ----------
    image
        (H, W, 3) uint8 RGB (stored as (3, H, W)).
    instances
        (H, W) int32 instance ids.
    classes
        (H, W) uint8 class ids (0 background, 1..K, 255 ignore).
    mpp
        Microns per pixel (the spatial scale).
    taxonomy
        Gives the class names and colours of the ``classes`` label image.
    version
        "0.5" (Zarr v3) or "0.4" (Zarr v2).
    """
    import zarr

    if version not in OME_VERSIONS:
        raise ConfigError(f"OME-NGFF version must be one of {OME_VERSIONS}, got {version!r}")
    h, w = instances.shape
    if image.shape != (h, w, 3) or classes.shape != (h, w):
        raise ConfigError(f"{name}: image {image.shape}, instances {instances.shape} and classes "
                          f"{classes.shape} do not agree")
    zf = 3 if version == "0.5" else 2
    ch = (min(CHUNK, h), min(CHUNK, w))
    root = zarr.open_group(str(path), mode="w", zarr_format=zf)
    kw: dict[str, Any] = {"fill_value": 0, "chunk_key_encoding": _KEYS[zf]}
    if zf == 3:
        kw["dimension_names"] = ["c", "y", "x"]
    root.create_array("0", data=np.ascontiguousarray(image.transpose(2, 0, 1)), chunks=(1, *ch), **kw)
    _put(root, {
        "multiscales": _multiscales(name, mpp, with_channel=True, version=version),
        "omero": {"channels": [
            {"label": c, "color": col, "active": True, "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
            for c, col in (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))
        ], "rdefs": {"model": "color"}},
    }, version)
    labels = root.create_group("labels")
    _put(labels, {"labels": ["instances", "classes"]}, version)
    for lname, data in (("instances", instances.astype(np.int32, copy=False)),
                        ("classes", classes.astype(np.uint8, copy=False))):
        g = labels.create_group(lname)
        lkw: dict[str, Any] = {"fill_value": 0, "chunk_key_encoding": _KEYS[zf]}
        if zf == 3:
            lkw["dimension_names"] = ["y", "x"]
        g.create_array("0", data=data, chunks=ch, **lkw)
        image_label: dict[str, Any] = {"source": {"image": "../../"}}
        if lname == "classes":
            image_label["colors"] = [{"label-value": 0, "rgba": BACKGROUND_RGBA}] + [
                {"label-value": c.id, "rgba": [*c.rgb, 255]} for c in taxonomy.classes] + [
                {"label-value": IGNORE_VALUE, "rgba": IGNORE_RGBA}]
            image_label["properties"] = [{"label-value": 0, "class": "background"}] + [
                {"label-value": c.id, "class": c.name} for c in taxonomy.classes] + [
                {"label-value": IGNORE_VALUE, "class": "ignore"}]
        if version == "0.4":
            image_label = {"version": "0.4", **image_label}
        _put(g, {"image-label": image_label,
                 "multiscales": _multiscales(f"{name}/{lname}", mpp, with_channel=False, version=version)}, version)
    return Path(path)


def write_release_ome_zarr(folder: str | Path, images: pd.DataFrame, taxonomy: Any, *, version: str = "0.5",
                           progress: bool = True) -> list[Path]:
    """Write ``<folder>/ome/<image>.ome.zarr`` for every image of a release being written in
    ``folder`` (reads the release's own ``arrays.zarr``)."""
    import zarr
    from tqdm import tqdm

    from .release import safe_name

    folder = Path(folder)
    (folder / "ome").mkdir(exist_ok=True)
    out: list[Path] = []
    opened: dict[str, tuple[Any, Any, Any]] = {}
    for row in tqdm(images.itertuples(index=False), total=len(images), desc="OME-Zarr", unit="img",
                    disable=None if progress else True):
        g = str(row.zarr_group)
        if g not in opened:
            base = folder / "arrays.zarr" / g
            opened[g] = tuple(zarr.open_array(str(base / n), mode="r") for n in ("image", "instances", "classes"))
        a_img, a_ins, a_cls = opened[g]
        k = int(row.zarr_index)
        sel: Any = k if k >= 0 else Ellipsis
        out.append(write_ome_image(folder / "ome" / f"{safe_name(row.image_id)}.ome.zarr",
                                   np.asarray(a_img[sel]), np.asarray(a_ins[sel]), np.asarray(a_cls[sel]),
                                   mpp=float(row.mpp), taxonomy=taxonomy, name=str(row.image_id),
                                   version=version))
    return out


def read_ome_metadata(path: str | Path) -> dict[str, Any]:
    """The NGFF metadata of an OME-Zarr image and its label images, normalised to one dict
    ``{"version", "multiscales", "labels", "image-label": {name: ...}, "label-multiscales": {...}}``
    whatever the NGFF version (0.4 or 0.5)."""
    import zarr

    root = zarr.open_group(str(path), mode="r")

    def meta(g: Any) -> dict[str, Any]:
        a = dict(g.attrs)
        return dict(a["ome"]) if "ome" in a else a

    top = meta(root)
    version = top.get("version") or top["multiscales"][0].get("version")
    lab = meta(root["labels"])
    out: dict[str, Any] = {"version": version, "multiscales": top["multiscales"], "labels": lab["labels"],
                           "image-label": {}, "label-multiscales": {}}
    for name in lab["labels"]:
        m = meta(root["labels"][name])
        out["image-label"][name] = m["image-label"]
        out["label-multiscales"][name] = m["multiscales"]
    return out


# -- label images of a slide, written block by block -------------------------------------------------

#: Chunk side of slide label images (int32: 4 MiB a chunk before compression).
SLIDE_CHUNK = 1024
#: Label pyramids halve until the longer side is at most this.
SLIDE_MIN_SIDE = 512


def _label_multiscales(name: str, mpp: float, translation: tuple[float, float], n_levels: int,
                       version: str) -> list[dict[str, Any]]:
    """Multiscales of a label pyramid whose level k is level 0 subsampled by 2**k ([::2**k]):
    pixel (r, c) of level k is pixel (2**k r, 2**k c) of level 0, so only the scale changes."""
    datasets = [{"path": str(k), "coordinateTransformations": [
        {"type": "scale", "scale": [float(mpp) * 2**k, float(mpp) * 2**k]},
        {"type": "translation", "translation": [float(translation[0]), float(translation[1])]}]}
        for k in range(n_levels)]
    ms: dict[str, Any] = {"name": name, "axes": _axes(False), "datasets": datasets}
    if version == "0.4":
        ms = {"version": "0.4", **ms}
    return [ms]


def _class_label_entries(names: list[str], colors: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``colors`` and ``properties`` of a class label image: 0 background, then classes 1..K."""
    def rgba(hex_color: str) -> list[int]:
        h = hex_color.lstrip("#")
        return [int(h[i : i + 2], 16) for i in (0, 2, 4)] + [255]

    cols = [{"label-value": 0, "rgba": BACKGROUND_RGBA}] + [
        {"label-value": i, "rgba": rgba(c)} for i, c in enumerate(colors, start=1)]
    props = [{"label-value": 0, "class": "background"}] + [
        {"label-value": i, "class": n} for i, n in enumerate(names, start=1)]
    return cols, props


def write_slide_labels(path: str | Path, crops: Any, *, shape: tuple[int, int], mpp: float,
                       translation: tuple[float, float] = (0.0, 0.0), class_names: list[str],
                       colors: list[str], version: str = "0.5", name: str = "slide") -> Path:
    """Write the nuclei of a slide as an OME-Zarr labels group, block by block, atomically.

    Layout (``path`` is a labels group, ``{"labels": ["instances", "classes"]}``)::

        <path>/instances/0, 1, ...   (H, W) int32 instance ids, a pyramid (level k = level 0[::2**k])
        <path>/classes/0, 1, ...     (H, W) uint8 class ids, image-label colours and properties

    Parameters
    ----------
    crops
        Iterable of ``(y0, x0, instances, classes)``: (h, w) int32 / uint8 blocks at row ``y0``,
        column ``x0`` of level 0. A pixel already labelled keeps its label (the first block wins).
        Only these blocks are held in memory, never the whole image.
    shape
        (H, W) of level 0.
    mpp, translation
        Level-0 pixel size (µm) and the (y, x) position of pixel (0, 0) in µm.
    class_names, colors
        Classes 1..K and their "#rrggbb" colours.

    The folder is written under a temporary name beside ``path`` and renamed into place at the
    end; an existing ``path`` is replaced only then.
    """
    import zarr

    from ..core.atomic import remove_tree, replace_dir, temp_sibling

    if version not in OME_VERSIONS:
        raise ConfigError(f"OME-NGFF version must be one of {OME_VERSIONS}, got {version!r}")
    h, w = (int(v) for v in shape)
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(final)
    zf = 3 if version == "0.5" else 2
    n_levels, side = 1, max(h, w)
    while side > SLIDE_MIN_SIDE:
        side = -(-side // 2)
        n_levels += 1
    C = SLIDE_CHUNK
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=zf)
        _put(root, {"labels": ["instances", "classes"]}, version)
        arrays: dict[str, list[Any]] = {}
        for lname, dtype in (("instances", np.int32), ("classes", np.uint8)):
            g = root.create_group(lname)
            # instances: only 0 has a colour (transparent); ome-zarr-models 1.6 also fails on an
            # image-label without "colors", optional in NGFF
            image_label: dict[str, Any] = {"colors": [{"label-value": 0, "rgba": BACKGROUND_RGBA}]}
            if lname == "classes":
                image_label["colors"], image_label["properties"] = _class_label_entries(class_names, colors)
            if version == "0.4":
                image_label = {"version": "0.4", **image_label}
            _put(g, {"image-label": image_label,
                     "multiscales": _label_multiscales(f"{name}/{lname}", mpp, translation, n_levels, version)},
                 version)
            levels = []
            for k in range(n_levels):
                lh, lw = -(-h // 2**k), -(-w // 2**k)
                kw: dict[str, Any] = {"fill_value": 0, "chunk_key_encoding": _KEYS[zf]}
                if zf == 3:
                    kw["dimension_names"] = ["y", "x"]
                levels.append(g.create_array(str(k), shape=(lh, lw), dtype=dtype,
                                             chunks=(min(C, lh), min(C, lw)), **kw))
            arrays[lname] = levels
        touched: set[tuple[int, int]] = set()
        for y0, x0, ins, cls in crops:
            y0, x0 = int(y0), int(x0)
            y1, x1 = min(h, y0 + ins.shape[0]), min(w, x0 + ins.shape[1])
            if y1 <= y0 or x1 <= x0:
                continue
            ins, cls = ins[: y1 - y0, : x1 - x0], cls[: y1 - y0, : x1 - x0]
            cur = arrays["instances"][0][y0:y1, x0:x1]
            new = (ins > 0) & (cur == 0)
            if not new.any():
                continue
            cur[new] = ins[new]
            arrays["instances"][0][y0:y1, x0:x1] = cur
            cc = arrays["classes"][0][y0:y1, x0:x1]
            cc[new] = cls[new]
            arrays["classes"][0][y0:y1, x0:x1] = cc
            touched.update((i, j) for i in range(y0 // C, (y1 - 1) // C + 1) for j in range(x0 // C, (x1 - 1) // C + 1))
        for k in range(1, n_levels):  # each level from the one above, only where there are labels
            touched = {(i // 2, j // 2) for i, j in touched}
            for lname in ("instances", "classes"):
                src, dst = arrays[lname][k - 1], arrays[lname][k]
                for i, j in sorted(touched):
                    block = src[2 * i * C : 2 * (i + 1) * C, 2 * j * C : 2 * (j + 1) * C]
                    dst[i * C : (i + 1) * C, j * C : (j + 1) * C] = block[::2, ::2]
        old = None
        if final.exists():
            old = temp_sibling(final)
            final.rename(old)
        replace_dir(tmp, final)
        if old is not None:
            remove_tree(old)
    except BaseException:
        remove_tree(tmp)
        raise
    return final

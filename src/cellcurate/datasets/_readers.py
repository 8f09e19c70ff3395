"""Helpers shared by the instance-map readers (CoNSeP, CPM, Lizard/CoNIC, MoNuSeg).

Every failure is an :class:`~cellcurate.errors.InputFormatError` naming the file: a reader's
plan/read step raises it before the store commits anything.

Dimensions: H×W pixels, n instances.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputFormatError, InputNotFoundError
from .records import SOURCE_NUCLEI_COLUMNS, IngestReport

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def load_mat(path: Path, required: Sequence[str]) -> dict[str, Any]:
    """A MATLAB v5/v7 ``.mat`` (``scipy.io.loadmat``) holding every key of ``required``."""
    import scipy.io

    if not path.is_file():
        raise InputNotFoundError(path, "label file not found")
    try:
        data = scipy.io.loadmat(str(path))
    except NotImplementedError:
        raise InputFormatError(path, "MATLAB v7.3 (HDF5) .mat files are not supported; re-save as v7") from None
    except Exception as exc:  # truncated / corrupt files raise many types; one line each
        raise InputFormatError(path, f"not a readable .mat file, truncated? ({one_line(exc)})") from None
    missing = [k for k in required if k not in data]
    if missing:
        have = sorted(k for k in data if not k.startswith("__"))
        raise InputFormatError(path, f"has no {', '.join(missing)} (holds {', '.join(have) or 'nothing'})")
    return data


def read_rgb(path: Path, report: IngestReport | None = None) -> np.ndarray:
    """(H, W, 3) uint8 from a PNG/JPEG/TIFF; an alpha channel is dropped, grey is refused."""
    if not path.is_file():
        raise InputNotFoundError(path, "image not found")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(str(path))
        else:
            from PIL import Image

            with Image.open(path) as im:
                im.load()
                arr = np.asarray(im.convert("RGBA") if im.mode in ("P", "LA") else im)
    except Exception as exc:
        raise InputFormatError(path, f"cannot read the image ({one_line(exc)})") from None
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
        raise InputFormatError(path, f"expected an RGB or RGBA uint8 image, got shape {arr.shape} {arr.dtype}")
    if arr.shape[2] == 4:
        if report is not None:
            report.count("images_rgba")
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def instance_ids(inst: Any, path: Path, *, what: str = "inst_map") -> np.ndarray:
    """Check a raw instance map: 2-D, integral, >= 0. Returns it as int64."""
    arr = np.asarray(inst)
    if arr.ndim != 2:
        raise InputFormatError(path, f"{what} must be 2-D, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise InputFormatError(path, f"{what} must be numeric, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise InputFormatError(path, f"{what} holds values that are not integers")
    out = arr.astype(np.int64)
    if out.size and out.min() < 0:
        raise InputFormatError(path, f"{what} holds negative ids")
    return out


def relabel(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive ids: (instances (H, W) int32 with 1..n in ascending raw-id order, raw ids (n,))."""
    ids, inverse = np.unique(raw, return_inverse=True)
    inverse = inverse.reshape(raw.shape)
    if ids.size and ids[0] == 0:
        return inverse.astype(np.int32), ids[1:]
    return (inverse + 1).astype(np.int32), ids


def check_same_size(image: np.ndarray, labels: np.ndarray, image_path: Path, label_path: Path) -> None:
    if image.shape[:2] != labels.shape[:2]:
        raise InputFormatError(
            label_path, f"labels are {labels.shape[1]}x{labels.shape[0]} but the image {image_path.name} is "
            f"{image.shape[1]}x{image.shape[0]} (width x height)"
        )


def count_pieces(instances: np.ndarray, n: int) -> int:
    """Instances made of more than one 8-connected piece (counted, never split)."""
    from scipy import ndimage

    if n == 0:
        return 0
    split = 0
    for i, sl in enumerate(ndimage.find_objects(instances, max_label=n), start=1):
        if sl is None:
            continue
        _, k = ndimage.label(instances[sl] == i, structure=np.ones((3, 3), bool))
        split += int(k > 1)
    return split


def nuclei_table(raw_ids: np.ndarray, labels: Iterable[str], *, kinds: Iterable[str] | None = None) -> pd.DataFrame:
    """Rows for instances 1..n: ``origin_instance`` = the raw id in the source's own map."""
    raw_ids = np.asarray(raw_ids, dtype=np.int64)
    n = raw_ids.size
    labels = list(labels)
    kinds = ["nucleus"] * n if kinds is None else list(kinds)
    return pd.DataFrame(
        {
            "instance_id": np.arange(1, n + 1, dtype=np.int32),
            "kind": pd.Series(kinds, dtype=object),
            "source_label": pd.Series(labels, dtype=object),
            "origin_channel": np.full(n, -1, dtype=np.int16),
            "origin_instance": raw_ids,
            "origin_region": pd.Series([""] * n, dtype=object),
            "origin_annotation": pd.Series([""] * n, dtype=object),
        },
        columns=list(SOURCE_NUCLEI_COLUMNS),
    )


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def mat_keys(path: Path) -> set[str]:
    """Variable names of a .mat file from its headers only (``scipy.io.whosmat``); empty if unreadable."""
    import scipy.io

    try:
        return {name for name, _shape, _cls in scipy.io.whosmat(str(path))}
    except Exception:  # any unreadable file: not this layout (the reader reports it properly later)
        return set()


def first_mat(folder: Path) -> Path | None:
    return next(iter(sorted(folder.glob("*.mat"))), None)

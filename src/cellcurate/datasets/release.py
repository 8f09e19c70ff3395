"""Load a cellcurate release for training: ``load_release(path, split="train")``.

This module reads the release files itself (schema: docs/RELEASE_FORMAT.md) and does not depend
on :mod:`cellcurate.curation`. Items are dicts::

    {"image": uint8 tensor (3, H, W), "instances": int32 tensor (H, W),
     "classes": uint8 tensor (H, W) (0 background, 1..K classes, 255 ignore),
     "image_id": str, "mpp": float}

Zarr arrays are opened lazily, once per process, so the dataset pickles cheaply into
``DataLoader(num_workers=...)`` workers.

>>> from torch.utils.data import DataLoader                      # doctest: +SKIP
>>> from cellcurate.datasets import load_release                 # doctest: +SKIP
>>> ds = load_release("releases/v1", split="train")              # doctest: +SKIP
>>> for batch in DataLoader(ds, batch_size=8, num_workers=2):    # doctest: +SKIP
...     batch["image"].shape                                     # (8, 3, 256, 256)

Dimensions: N images, M nuclei, H×W pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ..errors import InputFormatError
from .release_format import read_release_manifest, resolve_release_split


class ReleaseDataset(Dataset):
    """One or more splits of a release as a torch ``Dataset`` (see the module docstring).

    Attributes
    ----------
    images
        The rows of ``images.parquet`` in this dataset, in item order.
    nuclei
        The rows of ``nuclei.parquet`` of these images.
    manifest
        The parsed ``manifest.json``.
    class_names
        Class id -> name (1..K).
    """

    def __init__(self, path: str | Path, split: str | Sequence[str] = "train", *,
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.path = Path(path)
        self.manifest = read_release_manifest(self.path)
        self.splits = resolve_release_split(self.manifest, split)
        try:
            images = pd.read_parquet(self.path / "images.parquet")
            nuclei = pd.read_parquet(self.path / "nuclei.parquet")
        except (OSError, ValueError) as exc:
            raise InputFormatError(self.path, f"cannot read the release tables ({exc})") from None
        self.images = images[images["split"].isin(self.splits)].reset_index(drop=True)
        self.nuclei = nuclei[nuclei["image_id"].isin(set(self.images["image_id"]))].reset_index(drop=True)
        self.class_names = {int(k): v for k, v in self.manifest.get("taxonomy", {}).get("classes", {}).items()}
        self.transform = transform
        self._groups = self.images["zarr_group"].astype(str).to_numpy()
        self._index = self.images["zarr_index"].to_numpy(np.int64)
        self._ids = self.images["image_id"].astype(str).to_numpy()
        self._mpp = self.images["mpp"].to_numpy(np.float64)
        self._arrays: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.images)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}  # zarr handles are reopened in each worker
        return state

    def _open(self, group: str) -> tuple[Any, Any, Any]:
        arrs = self._arrays.get(group)
        if arrs is None:
            from .containment import resolves_inside, unsafe_relative_path
            from .zarrsafe import open_array

            rel = f"arrays.zarr/{group}"
            why = unsafe_relative_path(group) or (None if resolves_inside(self.path, rel)
                                                  else "resolves outside the release")
            if why is not None:
                raise InputFormatError(self.path / "images.parquet", f"zarr_group {group!r} {why}")
            base = self.path / "arrays.zarr" / group
            arrs = tuple(open_array(base / name) for name in ("image", "instances", "classes"))
            self._arrays[group] = arrs
        return arrs

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw arrays of item ``i``: image (H, W, 3) uint8, instances (H, W) int32, classes (H, W) uint8."""
        a_img, a_ins, a_cls = self._open(self._groups[i])
        k = int(self._index[i])
        try:
            if k >= 0:
                return a_img[k], a_ins[k], a_cls[k]
            return a_img[...], a_ins[...], a_cls[...]
        except (IndexError, ValueError, OSError, RuntimeError) as exc:  # damaged chunks, wrong index
            where = self.path / "arrays.zarr" / str(self._groups[i])
            raise InputFormatError(where, f"image {self._ids[i]!r} (index {k}) cannot be read "
                                          f"({type(exc).__name__}: {str(exc)[:120]})") from None

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i = int(i) % len(self)
        img, ins, cls = self.read(i)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
            "instances": torch.from_numpy(ins),
            "classes": torch.from_numpy(cls),
            "image_id": str(self._ids[i]),
            "mpp": float(self._mpp[i]),
        }
        if self.transform is not None:
            item = self.transform(item)
        return item

    def __repr__(self) -> str:
        return (f"ReleaseDataset({str(self.path)!r}, version={self.manifest.get('version')!r}, "
                f"splits={list(self.splits)}, images={len(self)}, nuclei={len(self.nuclei)})")


def load_release(path: str | Path, split: str | Sequence[str] = "train", *,
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> ReleaseDataset:
    """A torch ``Dataset`` over ``split`` of the release at ``path``.

    Parameters
    ----------
    path
        The release folder (holding ``manifest.json``).
    split
        A split name (``fold1``, ``fold2``, ``fold3``, ``train``, ``val``, ``test``), a convenience
        name from the manifest's aliases (``train`` = fold1 + fold2 + MoNuSAC train; ``test`` =
        fold3 + MoNuSAC test; ``all``), or a list of them.
    transform
        Called on each item dict; returns the dict to yield.
    """
    return ReleaseDataset(path, split, transform=transform)

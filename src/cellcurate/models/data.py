"""Training tiles from a released dataset, their augmentations, and a per-tile tensor cache.

Dimensions: N base images of H×W pixels (sizes differ), T×T tiles (T = 256 by default),
B tiles per batch.

A *base dataset* is any ``torch.utils.data.Dataset`` whose items are dicts with ``"image"``
uint8 (3, H, W), ``"instances"`` int32 (H, W), ``"classes"`` uint8 (H, W) (0 background, 1..7,
255 ignore), ``"image_id"`` str and ``"mpp"`` float, as ``cellcurate.datasets.release.load_release``
returns. :class:`TileDataset` turns it into fixed-size tiles with HoVer targets:

- ``mode="grid"``: every image is covered by T×T tiles (overlapping evenly when H or W is not a
  multiple of T); deterministic, so a tile's id (``"<image_id>@<y>,<x>"``) always names the same
  pixels. Training uses this mode: the frozen encoder's features and the teacher's predictions
  are computed once per tile and cached (:class:`TileCache`).
- ``mode="random"``: one random T×T crop per image per epoch (seeded by ``seed``, the epoch and
  the index; call :meth:`TileDataset.set_epoch`).

Images smaller than T are padded: pixels white (255), instances 0, classes 255 (ignore), so the
padding is masked out of every loss. Images whose pixel size differs from ``mpp`` by more than
``mpp_tolerance`` (relative) are resampled to ``mpp`` first (bilinear image, nearest labels).

Items are dicts: ``image`` uint8 (3, T, T), ``np`` int64 (T, T), ``hv`` float32 (2, T, T), ``tp``
int64 (T, T), ``valid`` bool (T, T), ``inside`` bool (T, T) (False on padding), ``labelled`` bool
(False for an unlabelled tile), ``tile_id`` str, ``key`` str (tile id + a digest of the tile's
pixels: the cache key).

Curation-aware targets (issue 9): a release keeps every nucleus a reviewer rejected as "not a
nucleus" as an ignore region (class 255, ``ignore_reason == "rejected"`` in ``nuclei.parquet``).
For training that region is known to be *background*, so :class:`TileDataset` turns rejected
nuclei into background (instance 0, class 0: a negative for the nuclear map); unresolved,
conflicting and ambiguous regions stay ignored. :func:`rejected_instances` reads the ids.

Unlabelled data (the CellGenNet setting, issue 19): :class:`UnlabelledImages` serves a folder
of images (or any images) as items without annotation; their tiles have ``labelled`` False and
every pixel ignored for the ground-truth losses, so only a teacher's soft targets train on them.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from ..errors import ConfigError, InputFormatError, ModelError
from .targets import IGNORE, dihedral, dihedral_hv, hover_targets

__all__ = [
    "TILE_MODES",
    "StrippedLabels",
    "TileCache",
    "TileDataset",
    "TileMode",
    "UnlabelledImages",
    "augment_batch",
    "collate_tiles",
    "rejected_instances",
    "stain_jitter",
]

TileMode = Literal["grid", "random"]
TILE_MODES: tuple[str, ...] = ("grid", "random")


def rejected_instances(base: Any) -> dict[str, set[int]]:
    """Instance ids of the nuclei reviewers rejected as "not a nucleus", per image id.

    Looks through ``torch.utils.data.Subset`` wrappers for a release dataset's ``nuclei`` table
    (columns ``image_id``, ``instance_id``, ``ignore_reason``); any other dataset has none.
    """
    ds = base
    while hasattr(ds, "dataset") and not hasattr(ds, "nuclei"):
        ds = ds.dataset
    nuclei = getattr(ds, "nuclei", None)
    if nuclei is None or not {"image_id", "instance_id", "ignore_reason"} <= set(getattr(nuclei, "columns", ())):
        return {}
    rej = nuclei[nuclei["ignore_reason"].astype(str) == "rejected"]
    out: dict[str, set[int]] = {}
    for image_id, inst in zip(rej["image_id"].astype(str), rej["instance_id"].astype("int64")):
        out.setdefault(image_id, set()).add(int(inst))
    return out


class UnlabelledImages(Dataset):
    """Images without annotation as base-dataset items (all pixels ignored, ``labelled`` False).

    Parameters
    ----------
    images
        Image files (PNG/TIF/JPG, read by :func:`cellcurate.models.predict.read_image`), folders
        (their image files, sorted), or (H, W, 3) uint8 arrays.
    mpp
        Pixel size of the images (µm/px).
    """

    def __init__(self, images: list[Any], *, mpp: float = 0.25) -> None:
        from .predict import IMAGE_SUFFIXES

        self.entries: list[Any] = []
        for entry in images:
            if isinstance(entry, (str, os.PathLike)):
                path = Path(entry)
                if path.is_dir():
                    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
                    if not files:
                        raise InputFormatError(path, f"folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
                    self.entries.extend(files)
                elif not path.exists():
                    from ..errors import InputNotFoundError

                    raise InputNotFoundError(path, "unlabelled image or folder not found")
                else:
                    self.entries.append(path)
            else:
                arr = np.asarray(entry)
                if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
                    raise ConfigError(f"unlabelled image {len(self.entries)} must be (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
                self.entries.append(arr)
        if not self.entries:
            raise ConfigError("no unlabelled images given")
        self.mpp = float(mpp)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from .predict import read_image

        entry = self.entries[i]
        if isinstance(entry, Path):
            image, image_id = read_image(entry), f"unlabelled:{entry.name}"
        else:
            image, image_id = entry, f"unlabelled:{i}"
        h, w = image.shape[:2]
        return {"image": np.ascontiguousarray(image.transpose(2, 0, 1)), "instances": np.zeros((h, w), np.int32),
                "classes": np.full((h, w), IGNORE, np.uint8), "image_id": image_id, "mpp": self.mpp,
                "labelled": False}


class StrippedLabels(Dataset):
    """The images of ``base`` (any base dataset) as unlabelled items: the annotation is dropped."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.base[i])
        shape = tuple(np.asarray(item["instances"]).shape)
        item["instances"] = np.zeros(shape, np.int32)
        item["classes"] = np.full(shape, IGNORE, np.uint8)
        item["image_id"] = f"unlabelled:{item['image_id']}"
        item["labelled"] = False
        return item


def _starts(length: int, tile: int) -> list[int]:
    if length <= tile:
        return [0]
    n = math.ceil(length / tile)
    return [int(round(v)) for v in np.linspace(0, length - tile, n)]


class TileDataset(Dataset):
    """Fixed-size training tiles + HoVer targets over a base dataset (see the module docstring).

    Parameters
    ----------
    base
        The base dataset.
    tile_size
        T, a multiple of 32.
    mode
        ``"grid"`` or ``"random"``.
    mpp
        Pixel size of the tiles (µm/px).
    seed
        Seed of the random crops.
    rejected_as_background
        Turn nuclei rejected in review into background (see the module docstring).
    """

    def __init__(
        self,
        base: Dataset,
        *,
        tile_size: int = 256,
        mode: TileMode = "grid",
        mpp: float = 0.25,
        mpp_tolerance: float = 0.1,
        seed: int = 0,
        rejected_as_background: bool = True,
    ) -> None:
        if mode not in TILE_MODES:
            raise ConfigError(f"tile mode must be one of {TILE_MODES}, got {mode!r}")
        if tile_size < 32 or tile_size % 32:
            raise ConfigError(f"tile_size must be a positive multiple of 32, got {tile_size}")
        self.base = base
        self.tile_size = int(tile_size)
        self.mode = mode
        self.mpp = float(mpp)
        self.mpp_tolerance = float(mpp_tolerance)
        self.seed = int(seed)
        self.epoch = 0
        self.rejected = rejected_instances(base) if rejected_as_background else {}
        self._last: tuple[int, dict[str, Any]] | None = None
        n = len(base)  # type: ignore[arg-type]
        if n == 0:
            raise ConfigError("the dataset has no images to train on")
        self.index: list[tuple[int, int, int]] = []
        if mode == "grid":
            for i in range(n):
                item = self._load(i)
                h, w = item["instances"].shape
                for y in _starts(h, self.tile_size):
                    for x in _starts(w, self.tile_size):
                        self.index.append((i, y, x))
        else:
            self.index = [(i, -1, -1) for i in range(n)]

    def set_epoch(self, epoch: int) -> None:
        """Choose the random crops of ``epoch`` (``mode="random"``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.index)

    def _load(self, i: int) -> dict[str, Any]:
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        item = self.base[i]
        try:
            image = np.asarray(item["image"], dtype=np.uint8)
            inst = np.asarray(item["instances"]).astype(np.int32, copy=False)
            cls = np.asarray(item["classes"], dtype=np.uint8)
            image_id = str(item["image_id"])
            mpp = float(item.get("mpp", self.mpp))
            labelled = bool(item.get("labelled", True))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"dataset item {i} is not a release item ({exc!r})") from None
        if image.ndim != 3 or image.shape[0] != 3 or image.shape[1:] != inst.shape or cls.shape != inst.shape:
            raise InputFormatError(
                image_id,
                f"image must be (3, H, W) with (H, W) instances/classes, got {image.shape}, {inst.shape}, {cls.shape}",
            )
        rejected = self.rejected.get(image_id)
        if rejected:
            gone = np.isin(inst, np.fromiter(rejected, np.int64))
            inst = np.where(gone, 0, inst).astype(np.int32)
            cls = np.where(gone, 0, cls).astype(np.uint8)
        if mpp > 0 and abs(mpp / self.mpp - 1.0) > self.mpp_tolerance:
            f = mpp / self.mpp
            image = np.clip(ndimage.zoom(image.astype(np.float32), (1, f, f), order=1), 0, 255).round().astype(np.uint8)
            inst = ndimage.zoom(inst, f, order=0)
            cls = ndimage.zoom(cls, f, order=0)
        out = {"image": image, "instances": inst, "classes": cls, "image_id": image_id, "labelled": labelled}
        self._last = (i, out)
        return out

    def __getitem__(self, idx: int) -> dict[str, Any]:
        i, y, x = self.index[idx]
        item = self._load(i)
        t = self.tile_size
        h, w = item["instances"].shape
        if y < 0:  # random crop
            rng = np.random.default_rng([self.seed, self.epoch, i])
            y = int(rng.integers(0, max(h - t, 0) + 1))
            x = int(rng.integers(0, max(w - t, 0) + 1))
        image = np.full((3, t, t), 255, np.uint8)
        inst = np.zeros((t, t), np.int32)
        cls = np.full((t, t), IGNORE, np.uint8)
        inside = np.zeros((t, t), bool)
        ch, cw = min(t, h - y), min(t, w - x)
        inside[:ch, :cw] = True
        image[:, :ch, :cw] = item["image"][:, y : y + ch, x : x + cw]
        inst[:ch, :cw] = item["instances"][y : y + ch, x : x + cw]
        cls[:ch, :cw] = item["classes"][y : y + ch, x : x + cw]
        tg = hover_targets(inst, cls)
        tile_id = f"{item['image_id']}@{y},{x}"
        digest = hashlib.blake2b(image.tobytes(), digest_size=8).hexdigest()
        return {
            "image": torch.from_numpy(image),
            "np": torch.from_numpy(tg["np"].astype(np.int64)),
            "hv": torch.from_numpy(tg["hv"]),
            "tp": torch.from_numpy(tg["tp"].astype(np.int64)),
            "valid": torch.from_numpy(tg["valid"]),
            "inside": torch.from_numpy(inside),
            "labelled": torch.tensor(bool(item["labelled"])),
            "tile_id": tile_id,
            "key": f"{tile_id}#{digest}",
        }


def collate_tiles(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors and keep strings as lists."""
    out: dict[str, Any] = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


class TileCache:
    """Tensors per tile, keyed by a namespace (e.g. an encoder or teacher id) and the tile key.

    In memory by default; with ``directory`` the tensors are written as float16 ``.npz`` files under
    ``directory/namespace/`` (atomically) and read back from there (``allow_pickle=False``), so a
    cache survives restarts and is shared between runs with the same namespace.
    """

    def __init__(self, namespace: str, *, directory: str | os.PathLike[str] | None = None) -> None:
        self.namespace = namespace
        self.directory = None if directory is None else Path(directory) / namespace
        self._memory: dict[str, list[torch.Tensor]] = {}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / (hashlib.sha1(key.encode()).hexdigest() + ".npz")

    def __contains__(self, key: str) -> bool:
        if self.directory is None:
            return key in self._memory
        return self._path(key).is_file()

    def put(self, key: str, tensors: list[torch.Tensor]) -> None:
        arrays = [t.detach().to("cpu", torch.float16) for t in tensors]
        if self.directory is None:
            self._memory[key] = arrays
            return
        path = self._path(key)
        from ..core.atomic import atomic_write_with

        atomic_write_with(path, lambda fh: np.savez(fh, *[a.numpy() for a in arrays]))  # fsynced

    def get(self, key: str) -> list[torch.Tensor]:
        if self.directory is None:
            return self._memory[key]
        path = self._path(key)
        try:
            with np.load(path, allow_pickle=False) as z:
                return [torch.from_numpy(z[f"arr_{j}"]) for j in range(len(z.files))]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"cache entry is unreadable ({exc})", path=path) from None

    def get_batch(self, keys: list[str], *, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Stack the tensors of ``keys``: one (B, …) float32 tensor per cached position."""
        per_tile = [self.get(k) for k in keys]
        return [torch.stack([t[j] for t in per_tile]).to(device, torch.float32) for j in range(len(per_tile[0]))]


# -- augmentations ------------------------------------------------------------------------------

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), unit length.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def stain_jitter(
    images: torch.Tensor, *, generator: torch.Generator | None = None, sigma: float = 0.05, bias: float = 0.02
) -> torch.Tensor:
    """Random per-image H&E stain perturbation in optical-density (HED) space.

    Each stain concentration ``s`` becomes ``s·a + b`` with ``a ~ U(1−σ, 1+σ)``, ``b ~ U(−bias, bias)``.

    Parameters
    ----------
    images
        (B, 3, H, W) float RGB in [0, 1].
    """
    b = images.shape[0]
    dev, dt = images.device, torch.float32
    a = 1 + (torch.rand(b, 3, generator=generator) * 2 - 1) * sigma
    c = (torch.rand(b, 3, generator=generator) * 2 - 1) * bias
    od = -torch.log(images.float().clamp_min(1e-6))
    hed = torch.einsum("bchw,cd->bdhw", od, _HED_FROM_RGB.to(dev, dt))
    hed = hed * a.to(dev, dt)[:, :, None, None] + c.to(dev, dt)[:, :, None, None]
    od2 = torch.einsum("bdhw,dc->bchw", hed, _RGB_FROM_HED.to(dev, dt))
    return torch.exp(-od2).clamp(0.0, 1.0).to(images.dtype)


def augment_batch(
    batch: dict[str, Any],
    *,
    generator: torch.Generator,
    teacher: list[torch.Tensor] | None = None,
    stain: bool = True,
    stain_sigma: float = 0.05,
) -> tuple[dict[str, Any], list[torch.Tensor] | None]:
    """Random flip/90° rotation per tile (targets and teacher maps transformed with it) + stain jitter.

    Parameters
    ----------
    batch
        Collated tiles; ``image`` may be uint8 or float in [0, 1] (returned as float in [0, 1]).
    teacher
        ``[np (B, 2, T, T), hv (B, 2, T, T), tp (B, K, T, T)]`` teacher outputs for the same tiles.
    """
    out = dict(batch)
    img = batch["image"]
    img = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    n = img.shape[0]
    ks = torch.randint(0, 4, (n,), generator=generator).tolist()
    flips = torch.randint(0, 2, (n,), generator=generator).tolist()
    imgs, nps, tps, valids, hvs, insides = [], [], [], [], [], []
    t_out: list[list[torch.Tensor]] = [[], [], []]
    for j in range(n):
        k, f = ks[j], bool(flips[j])
        imgs.append(dihedral(img[j], k, f))
        nps.append(dihedral(batch["np"][j], k, f))
        tps.append(dihedral(batch["tp"][j], k, f))
        valids.append(dihedral(batch["valid"][j], k, f))
        if "inside" in batch:
            insides.append(dihedral(batch["inside"][j], k, f))
        hvs.append(dihedral_hv(batch["hv"][j], k, f))
        if teacher is not None:
            t_out[0].append(dihedral(teacher[0][j], k, f))
            t_out[1].append(dihedral_hv(teacher[1][j], k, f))
            t_out[2].append(dihedral(teacher[2][j], k, f))
    x = torch.stack(imgs)
    if stain:
        x = stain_jitter(x, generator=generator, sigma=stain_sigma, bias=stain_sigma * 0.4)
    out.update(image=x, np=torch.stack(nps), tp=torch.stack(tps), valid=torch.stack(valids), hv=torch.stack(hvs))
    if insides:
        out["inside"] = torch.stack(insides)
    return out, ([torch.stack(t) for t in t_out] if teacher is not None else None)

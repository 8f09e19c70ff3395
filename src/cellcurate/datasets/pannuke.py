"""Read the PanNuke release (``Fold k/images/foldk/images.npy`` ...) as a stream of SourceImage.

Dimensions: N tiles in a fold, H×W = 256×256 pixels, C = 6 mask channels (the first 5 are
instance maps), n instances in one tile.

Release layout (note the space in ``Fold 1``)::

    <root>/Fold 1/images/fold1/images.npy   (N, 256, 256, 3) float64 holding 0..255
    <root>/Fold 1/images/fold1/types.npy    (N,) <U13 tissue names
    <root>/Fold 1/masks/fold1/masks.npy     (N, 256, 256, 6) float64; channels Neoplastic,
                                            Inflammatory, Connective, Dead, Epithelial, Background

Conversion rules
----------------
* Each of channels 0-4 is its own instance map. An instance is the pair (channel, raw id): the
  same raw id in two channels gives two instances, never one.
* Instance ids in the output are 1..n, numbered by channel, then by raw id (ascending).
* **Overlap rule** (``overlap=``, recorded in the unit's ``report.json`` and part of the fold
  fingerprint): a pixel claimed by more than one channel goes to the instance of the *highest
  channel index* (``"highest"``, the default: Epithelial > Dead > Connective > Inflammatory >
  Neoplastic), as the official PanNuke evaluation's ``binarize`` and the CellViT and torch-em
  converters do, so a nucleus drawn over another class's nucleus is kept and the stored ground
  truth is the official one. ``"lowest"`` (the rule before issue 10) gives the pixel to the
  lowest channel index instead. Such pixels are counted in ``report.counts["overlap_pixels"]`` (once per pixel); an instance
  that loses every pixel this way is dropped and counted in ``"instances_lost_to_overlap"``
  (with a warning naming the file and tile).
* Channel 5 (Background) is not used for instances; pixels where it disagrees with the
  instance map (background flag set on a nucleus pixel, or unset on a background pixel) are
  counted in ``"background_channel_disagreement_pixels"``.
* Images are rounded to uint8 (values are integral in the real release; non-integral values are
  counted in ``"image_values_rounded"``). Empty tiles are kept, with no nuclei.
* Mask ids must be integral and >= 0, image values within 0..255; anything else raises
  :class:`~cellcurate.errors.InputFormatError` naming the file and the first offending tile.
  These checks happen while streaming (the store commits only after a whole fold was read).

Memory: files are opened with ``np.load(..., mmap_mode="r")`` for validation, but tiles are read
in contiguous batches of ``batch_size`` with positioned reads into one reused buffer. Slicing the
memmap instead would map every page it touched into the process, so the resident size would grow
with the fold (~12 GB for a real fold); with batched reads peak memory stays ~ 5 MB × batch_size.

>>> for item in iter_pannuke("/data/pannuke"):  # doctest: +SKIP
...     item.key, item.tissue, len(item.nuclei)
('fold1/00000', 'Breast', 8)
"""

from __future__ import annotations

import functools
import hashlib
import mmap
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import xxhash

from ..errors import ConfigError, InputFormatError, InputNotFoundError
from .records import OPTIONAL_SOURCE_COLUMNS, SOURCE_NUCLEI_COLUMNS, IngestReport, SourceImage, UnitPart, UnitPlan
from .store import ConvertedImage, label_candidates, nucleus_id
from .taxonomy import Taxonomy

__all__ = [
    "PANNUKE_CHANNELS",
    "PANNUKE_TISSUES",
    "PANNUKE_MPP",
    "DEFAULT_OVERLAP",
    "OVERLAP_RULES",
    "FoldArrays",
    "OverlapRule",
    "PannukeFold",
    "discover_pannuke",
    "combine_fold_fingerprint",
    "convert_pannuke_tiles",
    "fingerprint_like",
    "fold_fingerprint",
    "fold_fingerprint_v2",
    "iter_pannuke",
    "iter_pannuke_fold",
    "load_types",
    "looks_like_pannuke",
    "open_fold",
]

#: Names of mask channels 0-4, in file order; channel 5 is Background.
PANNUKE_CHANNELS: tuple[str, ...] = ("Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial")
#: The 19 tissue names as stored in the release's ``types.npy``.
PANNUKE_TISSUES: tuple[str, ...] = (
    "Adrenal_gland", "Bile-duct", "Bladder", "Breast", "Cervix", "Colon", "Esophagus", "HeadNeck",
    "Kidney", "Liver", "Lung", "Ovarian", "Pancreatic", "Prostate", "Skin", "Stomach", "Testis",
    "Thyroid", "Uterus",
)
PANNUKE_MPP = 0.25
TILE = 256
N_MASK_CHANNELS = 6

_FOLD_DIR = re.compile(r"^fold[ _]?(\d+)$", re.IGNORECASE)
_CHANNEL_LABELS = np.array(PANNUKE_CHANNELS, dtype=object)
_MAX_ID = 2**53  # float64 holds integers exactly up to here
_TABLE_LIMIT = 1 << 20  # relabel with a lookup table while 8 * (max id + 1) stays below this
_HASH_BLOCK = 1 << 22  # fingerprint: bytes read at a time
OverlapRule = Literal["highest", "lowest"]
OVERLAP_RULES: tuple[str, ...] = ("highest", "lowest")
DEFAULT_OVERLAP: OverlapRule = "highest"


def _check_overlap(overlap: str) -> None:
    if overlap not in OVERLAP_RULES:
        raise ConfigError(f"unknown PanNuke overlap rule {overlap!r}; expected one of {', '.join(OVERLAP_RULES)}")


# -- discovery --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PannukeFold:
    """Paths of one fold. ``root`` is the folder that contains ``Fold k``."""

    fold: int
    images: Path
    types: Path
    masks: Path
    root: Path

    @property
    def folder(self) -> Path:
        return self.images.parents[2]

    def rel(self, path: Path) -> str:
        """``path`` relative to the release root, with forward slashes."""
        return path.relative_to(self.root).as_posix()


def _fold_from_dir(folder: Path, k: int) -> PannukeFold:
    name = f"fold{k}"
    return PannukeFold(
        fold=k,
        images=folder / "images" / name / "images.npy",
        types=folder / "images" / name / "types.npy",
        masks=folder / "masks" / name / "masks.npy",
        root=folder.parent,
    )


def _fold_number(path: Path) -> int | None:
    m = _FOLD_DIR.match(path.name)
    return int(m.group(1)) if m and path.is_dir() else None


def discover_pannuke(path: str | os.PathLike[str]) -> list[PannukeFold]:
    """Find the folds under a release root, or the single fold a ``Fold k`` folder holds.

    Files are not checked here (:func:`open_fold` does), only the folder names.

    Raises
    ------
    InputNotFoundError
        ``path`` does not exist, or holds no ``Fold k`` folder.
    """
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(path, "PanNuke folder not found")
    if not path.is_dir():
        raise InputFormatError(path, "expected a PanNuke release folder or a 'Fold k' folder, got a file")
    k = _fold_number(path)
    if k is not None:
        return [_fold_from_dir(path, k)]
    folds = []
    for child in path.iterdir():
        k = _fold_number(child)
        if k is not None:
            folds.append(_fold_from_dir(child, k))
    if not folds:
        raise InputNotFoundError(path, "holds no PanNuke fold (expected 'Fold 1/images/fold1/images.npy')")
    folds.sort(key=lambda f: f.fold)
    seen = [f.fold for f in folds]
    if len(set(seen)) != len(seen):
        raise InputFormatError(path, f"holds two folders for the same fold: {sorted(f.folder.name for f in folds)}")
    return folds


def looks_like_pannuke(path: str | os.PathLike[str]) -> bool:
    """Cheap check: is ``path`` a PanNuke release root or a ``Fold k`` folder?

    True when a ``Fold k`` folder (``path`` itself or a child) has an ``images/`` or ``masks/``
    subfolder; reads no file.
    """
    try:
        folds = discover_pannuke(path)
    except (InputNotFoundError, InputFormatError, OSError):
        return False
    return any((f.folder / "images").is_dir() or (f.folder / "masks").is_dir() for f in folds)


# -- opening and validation -------------------------------------------------------------------
@dataclass(frozen=True)
class FoldArrays:
    """One fold, opened and checked: memmaps of images and masks, and the tissue names.

    Attributes
    ----------
    images
        (N, 256, 256, 3) numeric memmap.
    masks
        (N, 256, 256, 6) numeric memmap.
    types
        (N,) object array of str (tissue names).
    """

    fold: PannukeFold
    images: np.ndarray
    masks: np.ndarray
    types: np.ndarray

    @property
    def n(self) -> int:
        return int(self.images.shape[0])


def _read_header(path: Path) -> tuple[tuple[int, ...], np.dtype, bool]:
    """Shape, dtype, fortran_order from an npy header, without touching the data."""
    if not path.is_file():
        raise InputNotFoundError(path, f"{path.name} not found")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, EOFError, OSError, SyntaxError) as exc:
        raise InputFormatError(path, f"not a valid .npy file ({_one_line(exc)})") from None
    return tuple(shape), np.dtype(dtype), bool(fortran)


def _open_numeric(path: Path, what: str) -> np.ndarray:
    shape, dtype, _ = _read_header(path)
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None:
        raise InputFormatError(path, f"{what} must be numeric, got dtype {dtype.str}")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputFormatError(path, f"cannot map {path.name}, truncated? ({_one_line(exc)})") from None
    if arr.shape != shape:  # pragma: no cover - np.load agrees with the header it parsed
        raise InputFormatError(path, f"header says shape {shape}, mapped {arr.shape}")
    return arr


def load_types(path: str | os.PathLike[str], *, n: int | None = None) -> np.ndarray:
    """Read a PanNuke ``types.npy``: the tissue name of every tile.

    Parameters
    ----------
    path
        The ``types.npy`` file: (N,) unicode (``<U13`` in the release) or bytes strings.
    n
        Expected length (the fold's N); checked when given.

    Returns
    -------
    (N,) object ndarray of str, whitespace stripped.
    """
    path = Path(path)
    shape, dtype, _ = _read_header(path)
    if dtype.kind not in "US":
        raise InputFormatError(path, f"types.npy must hold strings, got dtype {dtype.str}")
    if len(shape) != 1:
        raise InputFormatError(path, f"types.npy must be 1-D, got shape {shape}")
    if n is not None and shape[0] != n:
        raise InputFormatError(path, f"types.npy has {shape[0]} entries, images.npy has {n} tiles")
    try:
        raw = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputFormatError(path, f"cannot read types.npy, truncated? ({_one_line(exc)})") from None
    if raw.dtype.kind == "S":
        try:
            names = [s.decode("utf-8").strip() for s in raw.tolist()]
        except UnicodeDecodeError:
            raise InputFormatError(path, "types.npy holds bytes that are not UTF-8") from None
    else:
        names = [s.strip() for s in raw.tolist()]
    out = np.empty(len(names), dtype=object)
    out[:] = names
    return out


def open_fold(fold: PannukeFold) -> FoldArrays:
    """Open and check one fold's files: existence, npy headers, dtypes, shapes, lengths.

    Only headers and ``types.npy`` are read; the pixel checks (value ranges, integral ids)
    happen while streaming in :func:`iter_pannuke_fold`.

    Raises
    ------
    InputNotFoundError
        A file is missing.
    InputFormatError
        A file is not a valid npy, is truncated, or has the wrong dtype, shape or length.
    """
    images = _open_numeric(fold.images, "images.npy")
    if images.ndim != 4 or images.shape[1:] != (TILE, TILE, 3):
        raise InputFormatError(fold.images, f"images.npy must be (N, {TILE}, {TILE}, 3), got {images.shape}")
    masks = _open_numeric(fold.masks, "masks.npy")
    if masks.ndim != 4 or masks.shape[1:3] != (TILE, TILE):
        raise InputFormatError(fold.masks, f"masks.npy must be (N, {TILE}, {TILE}, 6), got {masks.shape}")
    if masks.shape[3] != N_MASK_CHANNELS:
        raise InputFormatError(fold.masks, f"masks.npy has {masks.shape[3]} channels, expected {N_MASK_CHANNELS}")
    if masks.shape[0] != images.shape[0]:
        raise InputFormatError(
            fold.masks, f"masks.npy has {masks.shape[0]} tiles, images.npy has {images.shape[0]}"
        )
    types = load_types(fold.types, n=images.shape[0])
    return FoldArrays(fold=fold, images=images, masks=masks, types=types)


# -- fingerprint ------------------------------------------------------------------------------
#: Prefix of the current fold fingerprint (``"pannuke-fold-v3:" + 32 hex digits``); a stored
#: fingerprint without it is the older sha256 one (:func:`fold_fingerprint_v2`).
FINGERPRINT_V3 = "pannuke-fold-v3"


def _check_file(path: Path) -> int:
    if not path.is_file():
        raise InputNotFoundError(path, f"{path.name} not found")
    return path.stat().st_size


def fold_fingerprint_v2(fold: PannukeFold, *, overlap: OverlapRule = DEFAULT_OVERLAP) -> str:
    """The fold fingerprint of stores written before v3 ("pannuke-fold-v2"): sha256 over the role,
    size and *whole* content of the fold's three files, streamed in 4 MiB blocks, and the overlap
    rule. Kept to recognise unchanged files of such a store (:func:`fingerprint_like`); about
    1.7 GB/s on one core, which is why v3 replaced it."""
    _check_overlap(overlap)
    h = hashlib.sha256(b"pannuke-fold-v2")
    h.update(f"fold{fold.fold}|overlap={overlap}".encode())
    for role, path in (("images", fold.images), ("types", fold.types), ("masks", fold.masks)):
        size = _check_file(path)
        h.update(f"|{role}|{size}|".encode())
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
    return h.hexdigest()


def _new_block_hashers() -> tuple[xxhash.xxh3_128, xxhash.xxh3_128]:
    return xxhash.xxh3_128(), xxhash.xxh3_128()


def _block_digest(h_img: xxhash.xxh3_128, h_msk: xxhash.xxh3_128) -> str:
    return h_img.hexdigest() + h_msk.hexdigest()


def _range_digest(arrays: FoldArrays, start: int, stop: int, batch_size: int = 32) -> str:
    """Block digest of tiles ``start:stop`` read on their own (what :func:`iter_pannuke_fold`
    computes on the side while it converts them)."""
    h_img, h_msk = _new_block_hashers()
    pf = arrays.fold
    img_reader = _BatchReader(arrays.images, pf.images, batch_size)
    msk_reader = _BatchReader(arrays.masks, pf.masks, batch_size)
    try:
        for s in range(start, stop, batch_size):
            e = min(s + batch_size, stop)
            h_img.update(img_reader.read(s, e))
            h_msk.update(msk_reader.read(s, e))
            img_reader.release(s, e)
            msk_reader.release(s, e)
    finally:
        img_reader.close()
        msk_reader.close()
    return _block_digest(h_img, h_msk)


def _block_ranges(n: int) -> list[tuple[int, int]]:
    """The tile ranges of a fold's blocks: its parts (:data:`PART_TILES` tiles; one empty block
    for an empty fold)."""
    return [(s, min(s + PART_TILES, n)) for s in range(0, n, PART_TILES)] or [(0, 0)]


def combine_fold_fingerprint(fold: PannukeFold | FoldArrays, blocks: list[str], *,
                             overlap: OverlapRule = DEFAULT_OVERLAP) -> str:
    """The v3 fingerprint of a fold from the digests of its blocks, in block order.

    ``blocks[k]`` is xxh3-128 of the bytes of tiles ``64k:64k+64`` of ``images.npy`` and, beside
    it, of ``masks.npy`` (computed by the ingest workers on the blocks they convert anyway, so the
    fold is read once). Combined here, in a fixed order (so the result does not depend on
    ``--jobs``), with what the blocks do not cover: the fold number, the overlap rule, the block
    size, each file's role and size, the npy headers, any bytes after the data, and the whole of
    ``types.npy``. Any edit anywhere in the three files changes it.
    """
    _check_overlap(overlap)
    arrays = fold if isinstance(fold, FoldArrays) else open_fold(fold)
    pf = arrays.fold
    expected = len(_block_ranges(arrays.n))
    if len(blocks) != expected:
        raise ValueError(f"{pf.folder}: {len(blocks)} block digests for {expected} blocks")
    h = xxhash.xxh3_128()
    h.update(f"{FINGERPRINT_V3}|fold{pf.fold}|overlap={overlap}|block_tiles={PART_TILES}".encode())
    for role, path, arr in (("images", pf.images, arrays.images), ("types", pf.types, None),
                            ("masks", pf.masks, arrays.masks)):
        size = _check_file(path)
        h.update(f"|{role}|{size}|".encode())
        with open(path, "rb") as f:
            if arr is None:  # types.npy: small, hashed whole
                while block := f.read(_HASH_BLOCK):
                    h.update(block)
                continue
            offset = int(getattr(arr, "offset", 0))
            h.update(f.read(offset))  # the npy header
            f.seek(offset + int(arr.nbytes))
            tail = f.read()  # bytes after the array (none in a well-formed file)
            h.update(f"|tail|{len(tail)}|".encode())
            h.update(tail)
    for digest in blocks:
        h.update(bytes.fromhex(digest))
    return f"{FINGERPRINT_V3}:{h.hexdigest()}"


def fold_fingerprint(fold: PannukeFold | FoldArrays, *, overlap: OverlapRule = DEFAULT_OVERLAP) -> str:
    """Content fingerprint of a fold ("pannuke-fold-v3"): :func:`combine_fold_fingerprint` over
    the block digests, here read on their own (a fold already in the store, to decide whether
    it changed). Reads the fold once, with bounded memory, at xxh3 speed (~20 GB/s warm);
    ingest of a new fold gets the same value from its workers without a second read.

    Any edit anywhere in a file changes it (a nucleus added in the middle of a 24 MiB
    ``masks.npy`` included); used to make re-ingest of the same files a no-op. The overlap rule
    is part of it: converting the same files with another rule is a change (``--overwrite``).
    """
    _check_overlap(overlap)
    arrays = fold if isinstance(fold, FoldArrays) else open_fold(fold)
    blocks = [_range_digest(arrays, s, e) for s, e in _block_ranges(arrays.n)]
    return combine_fold_fingerprint(arrays, blocks, overlap=overlap)


def fingerprint_like(fold: PannukeFold, stored: str, *, overlap: OverlapRule = DEFAULT_OVERLAP) -> str | None:
    """The fold's fingerprint in the format of ``stored`` when that is an older one (v2 sha256:
    a store written before v3, whose unchanged folds must still be recognised); None when
    ``stored`` is v3 (compare with :func:`fold_fingerprint`)."""
    if stored.startswith(FINGERPRINT_V3 + ":"):
        return None
    return fold_fingerprint_v2(fold, overlap=overlap)


# -- streaming --------------------------------------------------------------------------------
class _BatchReader:
    """Contiguous tile ranges of one C-ordered npy, read with bounded resident memory.

    Where the platform has ``madvise(MADV_DONTNEED)`` the file is mapped once and each batch is
    a zero-copy view; :meth:`release` drops the batch's pages from this process after use (they
    stay in the OS page cache), so the resident size never grows with the file. Elsewhere each
    batch is copied into one reused buffer with ``readinto``.
    """

    def __init__(self, arr: np.ndarray, path: Path, batch_size: int) -> None:
        self.path = path
        self.n = int(arr.shape[0])
        self.tile_shape = tuple(arr.shape[1:])
        self.dtype = arr.dtype
        self.tile_bytes = int(np.prod(self.tile_shape)) * arr.dtype.itemsize
        offset = getattr(arr, "offset", None)
        if offset is None or not (arr.flags.c_contiguous or self.n <= 1):
            raise InputFormatError(path, f"{path.name} is Fortran-ordered; re-save it in C order to stream it")
        self.offset = int(offset)
        self.view: np.ndarray | None = None
        self.buf: np.ndarray | None = None
        self.file = None
        if hasattr(mmap, "MADV_DONTNEED") and self.n:
            with open(path, "rb") as f:  # the mapping keeps its own handle
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            flat = np.frombuffer(self.mm, dtype=self.dtype, count=self.n * (self.tile_bytes // self.dtype.itemsize),
                                 offset=self.offset)
            self.view = flat.reshape(self.n, *self.tile_shape)
        else:
            self.buf = np.empty((min(batch_size, self.n), *self.tile_shape), dtype=self.dtype)
            self.file = open(path, "rb", buffering=0)

    def read(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, *tile_shape) tiles; valid until the next call."""
        if self.view is not None:
            return self.view[start:stop]
        assert self.buf is not None and self.file is not None
        out = self.buf[: stop - start]
        view = memoryview(out.reshape(-1).view(np.uint8))
        self.file.seek(self.offset + start * self.tile_bytes)
        done, total = 0, (stop - start) * self.tile_bytes
        while done < total:
            got = self.file.readinto(view[done:])
            if not got:
                raise InputFormatError(self.path, f"{self.path.name} ends inside tile {start + done // self.tile_bytes}")
            done += got
        return out

    def release(self, start: int, stop: int) -> None:
        """Drop the pages of tiles ``start:stop`` from this process (mapped mode only)."""
        if self.view is None:
            return
        page = mmap.PAGESIZE
        lo = (self.offset + start * self.tile_bytes) // page * page
        hi = min(self.offset + stop * self.tile_bytes, len(self.mm))
        if hi > lo:
            self.mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        self.view = None  # the mapping closes when the last view of it is gone
        if self.file is not None:
            self.file.close()


def _empty_nuclei() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=t) for c, t in SOURCE_NUCLEI_COLUMNS.items()})


def _unique_sorted(keys: np.ndarray, size: int) -> np.ndarray:
    """Sorted unique values of non-negative int64 ``keys`` (a lookup table when ``size`` is small)."""
    if size <= _TABLE_LIMIT:
        table = np.zeros(size, dtype=bool)
        table[keys] = True
        return np.flatnonzero(table)
    return np.unique(keys)


@dataclass
class _TileResult:
    instances: np.ndarray  # (H, W) int32
    channels: np.ndarray  # (n,) int16
    raw_ids: np.ndarray  # (n,) int64
    overlap_pixels: int
    lost: list[tuple[int, int]]  # (channel, raw id) of instances that lost all their pixels
    bg_disagreement: int
    win_pix: np.ndarray  # (k,) int64: the labelled pixels (flat index y * W + x), ascending
    win_label: np.ndarray  # (k,) int32: their instance ids


def _convert_mask(tile: np.ndarray, overlap: OverlapRule = DEFAULT_OVERLAP) -> _TileResult | None:
    """Instance map of one C-contiguous (H, W, 6) mask tile; None when an id in channels 0-4 is
    not an integer >= 0.

    One contiguous pass finds the nonzero entries of channels 0-4; everything after works on
    those sparse entries only. Entries come sorted by (pixel, channel), so the first entry of
    each pixel is its lowest channel and the last its highest: the overlap winner.
    """
    h, w, c6 = tile.shape
    flat = tile.reshape(-1)
    nz = flat != 0  # NaN counts as nonzero and fails the checks below
    by_pixel = nz.reshape(-1, c6)
    bg = by_pixel[:, c6 - 1].copy()  # from the small boolean array, not a second pass over the floats
    by_pixel[:, c6 - 1] = False  # channel 5 (Background) holds no instances
    idx = np.flatnonzero(nz)
    if idx.size == 0:
        return _TileResult(np.zeros((h, w), np.int32), np.zeros(0, np.int16), np.zeros(0, np.int64), 0, [],
                           int(h * w - np.count_nonzero(bg)), np.zeros(0, np.int64), np.zeros(0, np.int32))
    vals = flat[idx]
    with np.errstate(invalid="ignore"):
        ints = vals.astype(np.int64)
    if vals.dtype.kind == "f" and not np.array_equal(ints, vals):  # fractions, NaN, inf
        return None
    if ints.min() <= 0 or vals.max() >= _MAX_ID:
        return None
    pix, chan = np.divmod(idx, c6)
    first = np.empty(idx.size, dtype=bool)
    first[0] = True
    np.not_equal(pix[1:], pix[:-1], out=first[1:])
    keys = ints * 8 + chan  # one key per (channel, raw id) instance
    size = int(keys.max()) + 1
    claimed = _unique_sorted(keys, size)
    if first.all():  # no pixel claimed twice
        n_overlap, lost, win_keys, win_pix, present = 0, [], keys, pix, claimed
    else:
        n_overlap = int(np.count_nonzero(first[:-1] & ~first[1:]))
        if overlap == "lowest":
            win = first
        else:  # the last entry of each pixel: its highest channel
            win = np.empty(idx.size, dtype=bool)
            win[-1] = True
            np.not_equal(pix[1:], pix[:-1], out=win[:-1])
        win_keys, win_pix = keys[win], pix[win]
        present = _unique_sorted(win_keys, size)
        lost = []
        if present.size != claimed.size:
            gone = np.setdiff1d(claimed, present, assume_unique=True)
            lost = [(int(k & 7), int(k >> 3)) for k in gone]
    # number instances by (channel, raw id)
    p_chan, p_id = present & 7, present >> 3
    order = np.lexsort((p_id, p_chan))
    present, p_chan, p_id = present[order], p_chan[order], p_id[order]
    labels = np.arange(1, present.size + 1, dtype=np.int32)
    instances = np.zeros(h * w, dtype=np.int32)
    if size <= _TABLE_LIMIT:
        lut = np.zeros(size, dtype=np.int32)
        lut[present] = labels
        win_label = lut[win_keys]
    else:
        by_key = np.argsort(present)
        win_label = labels[by_key][np.searchsorted(present[by_key], win_keys)]
    instances[win_pix] = win_label
    n_fg = win_pix.size
    bg_on_fg = int(np.count_nonzero(bg[win_pix]))
    bg_dis = bg_on_fg + (h * w - n_fg) - (int(np.count_nonzero(bg)) - bg_on_fg)
    return _TileResult(instances.reshape(h, w), p_chan.astype(np.int16), p_id, n_overlap, lost, bg_dis,
                       win_pix, win_label)


def _bad_id_detail(tile: np.ndarray) -> str:
    """Where and what the first mask id that :func:`_convert_mask` refused is (error path only)."""
    ids = tile[..., : N_MASK_CHANNELS - 1]
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(ids) if ids.dtype.kind == "f" else np.ones(ids.shape, bool)
        whole = np.ones(ids.shape, bool) if ids.dtype.kind != "f" else finite & (np.floor(np.where(finite, ids, 0)) == ids)
        bad = (ids != 0) & (~finite | ~whole | (ids < 0) | (np.where(finite, ids, 0) >= _MAX_ID))
    head = "holds mask ids that are not integers >= 0 in channels 0-4"
    if not bad.any():
        return head
    y, x, c = (int(v) for v in np.argwhere(bad)[0])
    return f"{head}: channel {c}, pixel (y={y}, x={x}) has {ids[y, x, c].item()!r} (ids run 1..{_MAX_ID - 1:,}, 0 = none)"


def _nuclei_table(res: _TileResult) -> pd.DataFrame:
    n = res.channels.size
    if n == 0:
        return _empty_nuclei()
    blank = pd.Series(np.full(n, "", dtype=object), dtype=object)
    cols = {
        "instance_id": np.arange(1, n + 1, dtype=np.int32),
        "kind": pd.Series(np.full(n, "nucleus", dtype=object), dtype=object),
        "source_label": pd.Series(_CHANNEL_LABELS[res.channels], dtype=object),
        "origin_channel": res.channels,
        "origin_instance": res.raw_ids,
        "origin_region": blank,
    }
    for name, default in OPTIONAL_SOURCE_COLUMNS.items():  # e.g. origin_annotation: ""
        if name in SOURCE_NUCLEI_COLUMNS and name not in cols:
            cols[name] = blank if default == "" else pd.Series(np.full(n, default, dtype=object), dtype=object)
    return pd.DataFrame({c: cols[c] for c in SOURCE_NUCLEI_COLUMNS if c in cols})


def _image_ranges(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = batch.reshape(batch.shape[0], -1)
    return flat.min(axis=1), flat.max(axis=1)


def iter_pannuke_fold(
    fold: PannukeFold | FoldArrays,
    *,
    report: IngestReport | None = None,
    batch_size: int = 32,
    start: int = 0,
    stop: int | None = None,
    overlap: OverlapRule = DEFAULT_OVERLAP,
    fold_warnings: bool = True,
    blocks: list[str] | None = None,
) -> Iterator[SourceImage]:
    """Stream the tiles ``start:stop`` of one fold as :class:`SourceImage` (rules: module doc).

    Parameters
    ----------
    fold
        A fold from :func:`discover_pannuke`, or one already opened with :func:`open_fold`.
    report
        Collects counters (``images``, ``images_without_nuclei``, ``nuclei``, ``overlap_pixels``,
        ``instances_lost_to_overlap``, ``background_channel_disagreement_pixels``,
        ``image_values_rounded``) and warnings.
    batch_size
        Tiles read per positioned read; memory grows by ~4.7 MB per tile of batch (float64).
    start, stop
        Tile range (Python slice semantics, no negative indices).
    overlap
        Which channel wins a pixel claimed by several: ``"highest"`` (official PanNuke
        evaluation, default) or ``"lowest"`` (module doc).
    fold_warnings
        Warn about an empty fold and unknown tissue names of ``start:stop`` (off for the
        parts of a fold after the first, which :func:`plan_units` cuts; the first warns for the
        whole fold).
    blocks
        When given, the block digest of ``start:stop`` (xxh3-128 of the tiles' bytes in both
        files, :func:`combine_fold_fingerprint`) is appended to it once the range is read: the
        fingerprint costs no second read of the fold. ``start:stop`` must then be one block.

    Raises
    ------
    InputFormatError
        On the first tile whose image values leave 0..255 or whose mask ids are not integral and
        >= 0 (the message names the file and the tile index), or any check of :func:`open_fold`.
    """
    _check_overlap(overlap)
    arrays = fold if isinstance(fold, FoldArrays) else open_fold(fold)
    pf = arrays.fold
    report = report if report is not None else IngestReport()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = arrays.n
    stop = n if stop is None else min(stop, n)
    if start < 0 or start > stop:
        raise ValueError(f"start must be in 0..{stop}, got {start}")
    images_rel, masks_rel = pf.rel(pf.images), pf.rel(pf.masks)
    split = f"fold{pf.fold}"
    if fold_warnings:
        _warn_fold(arrays, report, start, stop)

    img_reader = _BatchReader(arrays.images, pf.images, batch_size)
    msk_reader = _BatchReader(arrays.masks, pf.masks, batch_size)
    img_float = arrays.images.dtype.kind == "f"
    hashers = _new_block_hashers() if blocks is not None else None
    try:
        for s in range(start, stop, batch_size):
            e = min(s + batch_size, stop)
            imgs = img_reader.read(s, e)
            if hashers is not None:
                hashers[0].update(imgs)
            if arrays.images.dtype != np.uint8:
                lo, hi = _image_ranges(imgs)
                with np.errstate(invalid="ignore"):
                    ok = (lo >= 0) & (hi <= 255)  # False for NaN
                if not ok.all():
                    j = int(np.argmin(ok))
                    raise InputFormatError(
                        pf.images,
                        f"images.npy tile {s + j} holds values outside 0..255 "
                        f"(min {lo[j]}, max {hi[j]})",
                    )
            masks = msk_reader.read(s, e)
            if hashers is not None:
                hashers[1].update(masks)
            for j in range(e - s):
                i = s + j
                res = _convert_mask(masks[j], overlap)
                if res is None:
                    raise InputFormatError(pf.masks, f"masks.npy tile {i} {_bad_id_detail(masks[j])}")
                tile = imgs[j]
                if img_float:
                    rounded = np.rint(tile)
                    nonint = int(np.count_nonzero(rounded != tile))
                    if nonint:
                        report.count("image_values_rounded", nonint)
                    image = rounded.astype(np.uint8)
                else:
                    image = tile.astype(np.uint8)
                _count_tile(res, report, masks_rel, i)
                nuclei = _nuclei_table(res)
                tissue = arrays.types[i]
                yield SourceImage(
                    key=f"{split}/{i:05d}",
                    split=split,
                    image=image,
                    instances=res.instances,
                    nuclei=nuclei,
                    origin_file=images_rel,
                    origin_index=i,
                    mpp=PANNUKE_MPP,
                    patient_id=None,
                    tissue=tissue or None,
                    annotation_file=masks_rel,
                )
            imgs = masks = None
            img_reader.release(s, e)
            msk_reader.release(s, e)
        if hashers is not None and blocks is not None:
            blocks.append(_block_digest(*hashers))
    finally:
        img_reader.close()
        msk_reader.close()


def _warn_fold(arrays: FoldArrays, report: IngestReport, start: int, stop: int) -> None:
    pf = arrays.fold
    if arrays.n == 0:
        report.warn(f"{pf.rel(pf.images)}: images.npy holds no tiles")
    for name in sorted(set(arrays.types[start:stop].tolist()) - set(PANNUKE_TISSUES)):
        report.warn(f"{pf.rel(pf.types)}: unknown tissue name {name!r} (kept as written)")


def iter_pannuke(path: str | os.PathLike[str], *, report: IngestReport | None = None,
                 overlap: OverlapRule = DEFAULT_OVERLAP) -> Iterator[SourceImage]:
    """Stream every fold under ``path`` (a release root or one ``Fold k`` folder), fold by fold.

    All folds are opened (headers checked) before the first tile is yielded.
    """
    arrays = [open_fold(f) for f in discover_pannuke(path)]
    for a in arrays:
        yield from iter_pannuke_fold(a, report=report, overlap=overlap)


# -- block conversion (ingest's path) ---------------------------------------------------------
_LABELS_U = np.array(PANNUKE_CHANNELS)  # (5,) <U12: the source_label column as convert_image makes it
BLOCK_TILES = 64  # tiles converted together by convert_pannuke_tiles (one part, one shard)


@dataclass
class _Runs:
    """The runs of one tile's instance map: maximal stretches of one instance along one row.
    R runs; ``label`` 1..n, ``y`` the row, ``x0``..``x1`` the columns (inclusive)."""

    label: np.ndarray  # (R,) int64
    y: np.ndarray  # (R,) int64
    x0: np.ndarray  # (R,) int64
    x1: np.ndarray  # (R,) int64


def _tile_runs(res: _TileResult, w: int) -> _Runs:
    """The runs of ``res``'s instance map from its winning pixels (which come in pixel order),
    without a scan of the map."""
    wp, lab = res.win_pix, res.win_label
    if not wp.size:
        z = np.zeros(0, np.int64)
        return _Runs(z, z, z, z)
    brk = np.empty(wp.size, dtype=bool)
    brk[0] = True
    np.not_equal(wp[1:], wp[:-1] + 1, out=brk[1:])
    brk[1:] |= lab[1:] != lab[:-1]
    y_all = wp // w
    brk[1:] |= y_all[1:] != y_all[:-1]
    rs = np.flatnonzero(brk)
    re = np.empty_like(rs)
    re[:-1] = rs[1:] - 1
    re[-1] = wp.size - 1
    y = y_all[rs].astype(np.int64)
    return _Runs(lab[rs].astype(np.int64), y, wp[rs] - y * w, wp[re] - y * w)


def _runs_geometry(runs: list[_Runs], counts: np.ndarray, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """:func:`~.store.instance_geometry` of every tile of a block at once, from their runs: ``area``,
    ``cy``, ``cx`` ((n,) for the n instances of all tiles, tile after tile) and ``bbox`` ((n, 4)
    int32). ``counts``: (B,) instances per tile. A few bincounts over the block's runs; the sums
    are of integers, exact in float64, so the centroids are bit for bit the same."""
    h, w = shape
    n = int(counts.sum())
    offsets = np.r_[0, np.cumsum(counts)[:-1]]
    row = np.concatenate([r.label - 1 + o for r, o in zip(runs, offsets.tolist())]) if runs else np.zeros(0, np.int64)
    y = np.concatenate([r.y for r in runs]) if runs else row
    x0 = np.concatenate([r.x0 for r in runs]) if runs else row
    x1 = np.concatenate([r.x1 for r in runs]) if runs else row
    length = x1 - x0 + 1
    area = np.bincount(row, weights=length, minlength=n)
    sy = np.bincount(row, weights=length * y, minlength=n)
    sx = np.bincount(row, weights=(x0 + x1) * length // 2, minlength=n)
    lo = np.full((2, n), max(h, w), dtype=np.int64)
    hi = np.zeros((2, n), dtype=np.int64)
    np.minimum.at(lo[0], row, y)
    np.minimum.at(lo[1], row, x0)
    np.maximum.at(hi[0], row, y + 1)
    np.maximum.at(hi[1], row, x1 + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cy, cx = sy / area, sx / area
    bbox = np.stack([lo[0], lo[1], hi[0], hi[1]], axis=1).astype(np.int32)
    return {"area": area.astype(np.int32), "cy": cy.astype(np.float32), "cx": cx.astype(np.float32), "bbox": bbox}


def convert_pannuke_tiles(arrays: FoldArrays, start: int, stop: int, *, source: str, taxonomy: Taxonomy,
                          report: IngestReport | None = None, cache: dict[str, tuple[int, ...]] | None = None,
                          overlap: OverlapRule = DEFAULT_OVERLAP, blocks: list[str] | None = None,
                          batch_size: int = 32) -> list[ConvertedImage]:
    """The tiles ``start:stop`` (one block, at most :data:`BLOCK_TILES`) of an opened fold, converted.

    Exactly ``[convert_image(item, ...) for item in iter_pannuke_fold(arrays, start=start, stop=stop,
    ...)]``: the same nucleus ids, columns, geometry, counters, warnings, and the same first error
    (``batch_size`` is that path's: which of a bad image and a bad mask it meets first), without a
    :class:`~.records.SourceImage` and its table per tile, nor a scan of each instance map for the
    geometry: each tile is read, hashed, checked and converted (:func:`_convert_mask`) once while in
    cache, its pages released at once, and the geometry of the whole block comes from the
    instances' runs (:func:`_runs_geometry`).

    ``blocks``: as in :func:`iter_pannuke_fold`, the block digest is appended to it.
    """
    _check_overlap(overlap)
    report = report if report is not None else IngestReport()
    cache = {} if cache is None else cache
    pf = arrays.fold
    stop = min(stop, arrays.n)
    if start < 0 or start > stop:
        raise ValueError(f"start must be in 0..{stop}, got {start}")
    b = stop - start
    if b > BLOCK_TILES:
        raise ValueError(f"a block holds at most {BLOCK_TILES} tiles, got {b}")
    images_rel, masks_rel = pf.rel(pf.images), pf.rel(pf.masks)
    split = f"fold{pf.fold}"
    hashers = _new_block_hashers() if blocks is not None else None
    img_reader = _BatchReader(arrays.images, pf.images, max(b, 1))
    msk_reader = _BatchReader(arrays.masks, pf.masks, max(b, 1))
    check_range = arrays.images.dtype != np.uint8
    img_float = arrays.images.dtype.kind == "f"

    def image_error(j: int) -> InputFormatError | None:
        tile = imgs[j]
        lo, hi = tile.min(), tile.max()
        with np.errstate(invalid="ignore"):
            if lo >= 0 and hi <= 255:  # False for NaN
                return None
        return InputFormatError(pf.images, f"images.npy tile {start + j} holds values outside 0..255 "
                                           f"(min {lo}, max {hi})")

    try:
        imgs = img_reader.read(start, stop)
        masks = msk_reader.read(start, stop)
        w = masks.shape[2]
        images, results, runs = [], [], []
        for j in range(b):
            i = start + j
            tile, mtile = imgs[j], masks[j]
            if hashers is not None:
                hashers[0].update(tile)
                hashers[1].update(mtile)
            if img_float:  # one cast and one comparison where every value is an integer in 0..255
                with np.errstate(invalid="ignore"):
                    image = tile.astype(np.uint8)
                if np.count_nonzero(image != tile):  # out of range, NaN, or to round: as tile by tile
                    if (err := image_error(j)) is not None:
                        raise err
                    rounded = np.rint(tile)
                    report.count("image_values_rounded", int(np.count_nonzero(rounded != tile)))
                    image = rounded.astype(np.uint8)
            else:
                if check_range and (err := image_error(j)) is not None:
                    raise err
                image = tile.astype(np.uint8)
            res = _convert_mask(mtile, overlap)
            if res is None:  # the tile-by-tile path checks a batch's images before its masks
                for k in range(j + 1, min(b, (j // batch_size + 1) * batch_size)) if check_range else ():
                    if (err := image_error(k)) is not None:
                        raise err
                raise InputFormatError(pf.masks, f"masks.npy tile {i} {_bad_id_detail(mtile)}")
            _count_tile(res, report, masks_rel, i)
            images.append(image)
            results.append(res)
            runs.append(_tile_runs(res, w))
            img_reader.release(i, i + 1)
            msk_reader.release(i, i + 1)
        counts = np.array([r.channels.size for r in results], dtype=np.int64)
        geo = _runs_geometry(runs, counts, masks.shape[1:3])
        out = []
        s = 0
        for j, res in enumerate(results):
            i = start + j
            e = s + int(counts[j])
            out.append(_converted_tile(res, {k: v[s:e] for k, v in geo.items()}, images[j], key=f"{split}/{i:05d}",
                                       index=i, split=split, tissue=arrays.types[i], images_rel=images_rel,
                                       masks_rel=masks_rel, source=source, taxonomy=taxonomy, cache=cache))
            s = e
        if hashers is not None and blocks is not None:
            blocks.append(_block_digest(*hashers))
        return out
    finally:
        img_reader.close()
        msk_reader.close()


def _count_tile(res: _TileResult, report: IngestReport, masks_rel: str, i: int) -> None:
    """A converted mask tile's counters and warnings (both paths: the same report)."""
    if res.overlap_pixels:
        report.count("overlap_pixels", res.overlap_pixels)
    if res.lost:
        report.count("instances_lost_to_overlap", len(res.lost))
        lost = ", ".join(f"{PANNUKE_CHANNELS[c]} id {r}" for c, r in res.lost[:5])
        report.warn(f"{masks_rel}: tile {i}: {len(res.lost)} instance(s) lost all pixels "
                    f"to a lower channel and were dropped ({lost})")
    if res.bg_disagreement:
        report.count("background_channel_disagreement_pixels", res.bg_disagreement)
    n = res.channels.size
    report.count("images")
    report.count("nuclei", n)
    if not n:
        report.count("images_without_nuclei")


def _converted_tile(res: _TileResult, geo: dict[str, np.ndarray], image: np.ndarray, *, key: str, index: int,
                    split: str, tissue: str, images_rel: str, masks_rel: str, source: str, taxonomy: Taxonomy,
                    cache: dict[str, tuple[int, ...]]) -> ConvertedImage:
    """One converted mask tile and its geometry as :func:`~.store.convert_image` makes them."""
    n = res.channels.size
    ch, oi = res.channels, res.raw_ids
    labels = _LABELS_U[ch] if n else np.zeros(0, dtype="<U1")
    unified, cand_text = label_candidates(labels, source=source, taxonomy=taxonomy, cache=cache,
                                          annotation_file=masks_rel)
    ids = np.fromiter((nucleus_id(source, masks_rel, index, c, o, "") for c, o in zip(ch.tolist(), oi.tolist())),
                      dtype=np.int64, count=n)
    image_id = f"{source}/{key}"
    blank = np.full(n, "")
    cols = {
        "nucleus_id": ids, "image_id": np.full(n, image_id, dtype=object), "kind": np.full(n, "nucleus"),
        "instance_id": np.arange(1, n + 1, dtype=np.int32), "bbox": geo["bbox"], "centroid_y": geo["cy"],
        "centroid_x": geo["cx"], "area": geo["area"], "source_label": labels, "unified_label": unified,
        "candidates": cand_text, "origin_file": np.full(n, masks_rel, dtype=object),
        "origin_index": np.full(n, index, dtype=np.int32), "origin_channel": ch, "origin_instance": oi,
        "origin_region": blank, "origin_annotation": blank,
    }
    h, w = image.shape[:2]
    row = {
        "image_id": image_id, "source": source, "split": split, "patient_id": None, "tissue": tissue or None,
        "mpp": float(PANNUKE_MPP), "height": h, "width": w, "n_nuclei": n, "origin_file": images_rel,
        "origin_index": index, "annotation_file": masks_rel,
    }
    return ConvertedImage(key, image, res.instances, cols, row)

# -- registry hooks (cellcurate.datasets.sources) ---------------------------------------------
looks_like = looks_like_pannuke


def plan_units(path: Path, *, overlap: str | None = None) -> list[UnitPlan]:
    """One unit per fold (``pannuke-fold<k>``); every fold is opened and checked here, before any write.

    ``overlap``: the mask channel that wins a pixel claimed by several (``"highest"``, the default
    and the official evaluation's rule, or ``"lowest"``); recorded in the fingerprint and report."""
    rule = overlap or "highest"
    if rule not in OVERLAP_RULES:
        raise ConfigError(f"unknown PanNuke overlap rule {rule!r}; expected one of {', '.join(OVERLAP_RULES)}")
    plans = []
    for fold in discover_pannuke(path):
        arrays = open_fold(fold)  # validates headers, shapes and types.npy before any write
        h, w = arrays.images.shape[1:3]
        parts = tuple(
            _tile_part(_TileRange(fold, rule, s, min(s + PART_TILES, arrays.n), arrays), f"{fold.images}, {fold.masks}")
            for s in (range(0, arrays.n, PART_TILES) or [0]))  # an empty fold: one part, for its warning
        plans.append(UnitPlan(unit=f"pannuke-fold{fold.fold}", n_images=arrays.n, fingerprint="",
                              fingerprint_fn=partial(fold_fingerprint, fold, overlap=rule),
                              fingerprint_from_blocks=partial(combine_fold_fingerprint, fold, overlap=rule),
                              legacy_fingerprint_fn=partial(fingerprint_like, fold, overlap=rule),
                              origin=str(fold.folder), parts=parts, stacked=(arrays.n, h, w),
                              settings={"pannuke_overlap": rule}))
    return plans


#: Tiles per part of a fold converted by one ingest worker (one store shard of 64 tiles); also the
#: block of the v3 fingerprint, so changing it is a new fingerprint version (docs/STORE.md).
PART_TILES = 64


@functools.lru_cache(maxsize=4)
def _open_fold_cached(fold: PannukeFold) -> FoldArrays:
    return open_fold(fold)


@dataclass
class _TileRange:
    """The tiles ``start:stop`` of a fold, as a part of its unit (:class:`~.records.UnitPart`).

    Pickles as paths and numbers only: a worker process opens the fold itself (once, cached);
    in the planning process the already opened fold is used."""

    fold: PannukeFold
    overlap: str
    start: int
    stop: int
    arrays: FoldArrays | None = None

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "arrays": None}

    def __call__(self, report: IngestReport) -> Iterator[SourceImage]:
        arrays = self.arrays if self.arrays is not None else _open_fold_cached(self.fold)
        if self.start == 0:  # the fold's warnings once, for the whole fold, from its first part
            _warn_fold(arrays, report, 0, arrays.n)
        return iter_pannuke_fold(arrays, report=report, start=self.start, stop=self.stop, overlap=self.overlap,  # type: ignore[arg-type]
                                 fold_warnings=False, blocks=report.blocks)

    def convert(self, report: IngestReport, *, source: str, taxonomy: Taxonomy,
                cache: dict[str, tuple[int, ...]] | None = None) -> list[ConvertedImage]:
        """The part's tiles converted at once (:func:`convert_pannuke_tiles`): what
        ``convert_image`` makes of what ``self(report)`` yields."""
        arrays = self.arrays if self.arrays is not None else _open_fold_cached(self.fold)
        if self.start == 0:
            _warn_fold(arrays, report, 0, arrays.n)
        return convert_pannuke_tiles(arrays, self.start, self.stop, source=source, taxonomy=taxonomy, report=report,
                                     cache=cache, overlap=self.overlap, blocks=report.blocks)  # type: ignore[arg-type]


def _tile_part(tiles: _TileRange, files: str) -> UnitPart:
    return UnitPart(tiles, files, convert=tiles.convert)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__

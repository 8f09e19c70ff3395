"""The cellcurate store: one directory holding every ingested image, nucleus and event.

Layout::

    STORE/
      store.json                  format marker and version
      taxonomy.json               the unified taxonomy + source mappings (hash in the ledger meta)
      ledger.sqlite               append-only events + the catalog of ingest units (one SQLite file)
      units/<unit>-<token>/       one folder per ingest unit (a PanNuke fold, a MoNuSAC patient folder)
          arrays.zarr/            zarr v3: images and instance maps
          images.parquet          one row per image   (columns: IMAGE_COLUMNS)
          nuclei.parquet          one row per nucleus (columns: NUCLEUS_COLUMNS)
          report.json             what the converter counted and warned about
      features/, rounds/          written by relabeling (see cellcurate.relabel)

Ingest units are written into a temporary folder, renamed into place, and only then registered
in the ledger's ``units`` table in the same SQLite transaction as their ingest events: that
transaction is the commit point. A crash leaves either the old state or the new one; folders not
registered (left by a crash) are ignored by readers and removed by the next ingest.

Arrays (chunking measured in ``benchmarks/bench_ingest.py``, see docs/STORE.md):

* fixed-size tiles (PanNuke) are stacked per unit: ``images`` (N, 256, 256, 3) uint8 and
  ``instances`` (N, 256, 256) int32, one chunk per tile, grouped into shards of
  :data:`TILES_PER_SHARD` tiles so a fold is a few hundred files, not tens of thousands;
* images of their own size (MoNuSAC) keep their native size: ``img/<i>`` (H, W, 3) and
  ``ins/<i>`` (H, W), chunks of :data:`NATIVE_CHUNK` pixels (so a review window reads only what it
  shows) inside one shard per image (one file per array). No nucleus is ever cut.

Dimensions: N images, M nuclei, H×W pixels.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..core.atomic import atomic_write_text, fsync_dir, fsync_tree
from ..errors import ConfigError, StoreError
from .ledger import Ledger
from .leftovers import locked_tempdir, release_tempdir, remove_stale_tempdirs, remove_tree
from .records import IngestReport, SourceImage
from .shards import ShardLayout, read_native, read_tile
from .taxonomy import Taxonomy

STORE_FORMAT = "cellcurate-store"
STORE_FORMAT_VERSION = 1
TILES_PER_SHARD = 64
NATIVE_CHUNK = 512

IMAGE_COLUMNS: dict[str, str] = {
    "image_id": "string",  # "<source>/<key>", e.g. "pannuke/fold1/00012"
    "source": "string",
    "unit": "string",
    "split": "string",  # the source's own split: fold1..fold3, train, test
    "patient_id": "string",  # MoNuSAC: TCGA barcode's first 12 characters; PanNuke: <NA>
    "tissue": "string",
    "mpp": "float64",  # microns per pixel
    "height": "int32",
    "width": "int32",
    "n_nuclei": "int32",
    "origin_file": "string",  # pixels' file, relative to the source root
    "origin_index": "int32",  # index in origin_file (PanNuke), else -1
    "annotation_file": "string",  # labels' file, relative to the source root
    "zarr_path": "string",  # array inside the unit's arrays.zarr: "images" or "img/<i>"
    "zarr_index": "int32",  # index along the first axis of a stacked array, else -1
}

NUCLEUS_COLUMNS: dict[str, str] = {
    "nucleus_id": "int64",  # stable: hash of source + origin reference
    "image_id": "string",
    "source": "string",
    "kind": "string",  # "nucleus" | "ignore"
    "instance_id": "int32",  # id in the image's instance map
    "bbox_y0": "int32",
    "bbox_x0": "int32",
    "bbox_y1": "int32",  # exclusive
    "bbox_x1": "int32",  # exclusive
    "centroid_y": "float32",
    "centroid_x": "float32",
    "area": "int32",  # pixels
    "source_label": "string",
    "unified_label": "int16",  # resolved class id, 0 when several candidates remain
    "candidates": "string",  # candidate class ids, "|"-joined, e.g. "2|6|7"; "" for ignore regions
    "origin_file": "string",  # annotation file, relative to the source root
    "origin_index": "int32",
    "origin_channel": "int16",
    "origin_instance": "int64",
    "origin_region": "string",
    "origin_annotation": "string",  # MoNuSAC Annotation Id ("" otherwise): Region Ids restart per block
}


def nucleus_id(source: str, origin_file: str, origin_index: int, origin_channel: int,
               origin_instance: int, origin_region: str, origin_annotation: str = "") -> int:
    """Stable 63-bit id of a nucleus from its origin reference (survives re-ingest)."""
    key = f"{source}|{origin_file}|{origin_index}|{origin_channel}|{origin_instance}|{origin_region}"
    if origin_annotation:
        key += f"|{origin_annotation}"
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little") & (2**63 - 1)


def instance_geometry(instances: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """Bbox, centroid and area of instance ids 1..n, vectorised over the whole map.

    One pass finds the labelled pixels (row-major, so each instance's rows come sorted); areas and
    centroids are bincounts, the bbox comes from the instance's pixels grouped by a stable sort of
    their ids (first/last row, min/max column), with no per-instance Python and no scipy import
    (``scipy.ndimage.find_objects`` gives the same boxes; ``tests/test_store.py`` compares).

    Parameters
    ----------
    instances
        (H, W) int32 instance map.
    n
        Number of instances (ids 1..n).
    """
    w = instances.shape[1]
    flat = instances.reshape(-1)
    idx = np.flatnonzero(flat)
    ids = flat[idx]
    ys, xs = np.divmod(idx, w)
    area = np.bincount(ids, minlength=n + 1)[1 : n + 1]
    sy = np.bincount(ids, weights=ys, minlength=n + 1)[1 : n + 1]
    sx = np.bincount(ids, weights=xs, minlength=n + 1)[1 : n + 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        cy = sy / area
        cx = sx / area
    bbox = np.zeros((n, 4), dtype=np.int32)
    if idx.size:
        order = np.argsort(ids, kind="stable")
        sid, sys_, sxs = ids[order], ys[order], xs[order]
        starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])
        ends = np.r_[starts[1:], sid.size] - 1
        keep = (sid[starts] >= 1) & (sid[starts] <= n)  # ids outside 1..n have no row (as find_objects)
        lab = sid[starts][keep] - 1
        bbox[lab, 0] = sys_[starts[keep]]
        bbox[lab, 2] = sys_[ends[keep]] + 1
        bbox[lab, 1] = np.minimum.reduceat(sxs, starts)[keep]
        bbox[lab, 3] = np.maximum.reduceat(sxs, starts)[keep] + 1
    return {"area": area.astype(np.int32), "cy": cy.astype(np.float32), "cx": cx.astype(np.float32), "bbox": bbox}


@dataclass
class UnitSummary:
    unit: str
    source: str
    status: str  # "ingested" | "unchanged" | "replaced"
    n_images: int = 0
    n_nuclei: int = 0
    report: IngestReport = field(default_factory=IngestReport)


@dataclass
class PreparedUnit:
    """A unit written and renamed into place, waiting for :meth:`Store.commit`."""

    row: dict[str, Any]
    events: pd.DataFrame
    nucleus_ids: np.ndarray
    folder: Path
    report: IngestReport


@dataclass
class ConvertedImage:
    """One image with its per-nucleus columns computed (:func:`convert_image`), ready for
    :meth:`UnitWriter.add_converted`. Plain numpy arrays and a dict, cheap to pickle: ingest
    workers send these to the writing process."""

    key: str
    image: np.ndarray | None  # (H, W, 3) uint8; None once encoded
    instances: np.ndarray | None  # (H, W) int32; None once encoded
    cols: dict[str, np.ndarray]  # the nucleus columns of UnitWriter (bbox as (n, 4) int32)
    row: dict[str, Any]  # the image row, less unit, zarr_path, zarr_index
    #: the image's and instance map's stored chunks (:mod:`.shards`; None: an empty chunk), when a
    #: worker compressed them for a stacked unit (:func:`encode_converted`)
    chunks: tuple[bytes | None, bytes | None] | None = None
    #: a native-size image's (``img/<i>``) and instance map's (``ins/<i>``) shard files (None: all
    #: empty, no file), when a worker compressed them (:func:`encode_converted` with ``native``)
    shards: tuple[bytes | None, bytes | None] | None = None


#: blosc settings of the stored images (uint8) and instance maps (int32): lz4-1, chosen by measurement
#: over zstd-1 (a third of the CPU for ~7 % more bytes on real H&E; docs/STORE.md)
IMAGES_BLOSC = {"cname": "lz4", "clevel": 1, "shuffle": "bitshuffle"}
INSTANCES_BLOSC = {"cname": "lz4", "clevel": 1, "shuffle": "shuffle"}


def _chunk_codecs() -> tuple[Any, Any]:
    from .shards import ChunkCodec

    return ChunkCodec(typesize=1, **IMAGES_BLOSC), ChunkCodec(typesize=4, **INSTANCES_BLOSC)  # type: ignore[arg-type]


#: how ingest workers compress images for the writer (:func:`unit_encoding`): ``"tiles"``, the
#: chunks of a stacked unit; ``"native"``, the shard files of a native-size image
Encoding = Literal["tiles", "native"]


def native_chunks(h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Chunk and shard shape (rows, columns) of a native-size H×W image: chunks of
    :data:`NATIVE_CHUNK` pixels (smaller for a small image) in one shard file covering it."""
    chunks = (min(NATIVE_CHUNK, h), min(NATIVE_CHUNK, w))
    return chunks, (-(-h // chunks[0]) * chunks[0], -(-w // chunks[1]) * chunks[1])


def encode_converted(conv: ConvertedImage, *, native: bool = False) -> ConvertedImage:
    """``conv`` with its image and instance map compressed into the chunks a stacked unit stores
    (what the writer would compress itself; same bytes), the arrays dropped: what an ingest worker
    sends back for a PanNuke or CoNIC tile, a third of the raw size. ``native``: into the shard
    files of a native-size image instead (:func:`~.shards.native_shard`; MoNuSAC and the other
    sources whose images keep their own size)."""
    if conv.chunks is not None or conv.shards is not None or conv.image is None or conv.instances is None:
        return conv
    img_codec, ins_codec = _chunk_codecs()
    if native:
        from .shards import native_shard

        chunks, _ = native_chunks(*conv.instances.shape)
        return replace(conv, image=None, instances=None,
                       shards=(native_shard(conv.image, (*chunks, 3), img_codec),
                               native_shard(conv.instances, chunks, ins_codec)))
    return replace(conv, image=None, instances=None,
                   chunks=(img_codec.encode(conv.image), ins_codec.encode(conv.instances)))


def _create_stacked(group: Any, stacked: tuple[int, int, int]) -> tuple[Any, Any]:
    """The ``images`` and ``instances`` arrays of a stacked unit of (N, H, W) in ``group``."""
    from zarr.codecs import BloscCodec

    n, h, w = stacked
    shard = min(TILES_PER_SHARD, max(n, 1))
    img = group.create_array("images", shape=(n, h, w, 3), dtype="uint8", chunks=(1, h, w, 3), shards=(shard, h, w, 3),
                             compressors=[BloscCodec(**IMAGES_BLOSC)], fill_value=0)  # type: ignore[arg-type]
    ins = group.create_array("instances", shape=(n, h, w), dtype="int32", chunks=(1, h, w), shards=(shard, h, w),
                             compressors=[BloscCodec(**INSTANCES_BLOSC)], fill_value=0)  # type: ignore[arg-type]
    return img, ins


def _create_native(group: Any, i: int, h: int, w: int) -> tuple[Any, Any]:
    """The (metadata of the) ``img/<i>`` and ``ins/<i>`` arrays of a native-size H×W image."""
    from zarr.codecs import BloscCodec

    chunks, shards = native_chunks(h, w)
    img = group.create_array(f"img/{i}", shape=(h, w, 3), dtype="uint8", chunks=(*chunks, 3), shards=(*shards, 3),
                             compressors=[BloscCodec(**IMAGES_BLOSC)], fill_value=0)  # type: ignore[arg-type]
    ins = group.create_array(f"ins/{i}", shape=(h, w), dtype="int32", chunks=chunks, shards=shards,
                             compressors=[BloscCodec(**INSTANCES_BLOSC)], fill_value=0)  # type: ignore[arg-type]
    return img, ins


def unit_encoding(stacked: tuple[int, int, int] | None) -> Encoding | None:
    """How ingest workers may compress the images of a unit (:func:`encode_converted`), decided
    before its writer exists (workers convert the next unit while the writer finishes this one):
    the layout the unit's arrays will have, probed on in-memory arrays made as
    :class:`UnitWriter` makes them (a native image with two chunks per axis and edge chunks).
    The writer checks its real arrays again (:attr:`UnitWriter.accepts_encoded`, and the layout of
    each native image's arrays)."""
    import zarr
    from zarr.storage import MemoryStore

    from .shards import shard_layout

    group = zarr.open_group(MemoryStore(), mode="w", zarr_format=3)
    if stacked is not None:
        img, ins = _create_stacked(group, stacked)
        ok = shard_layout(img, Path("images")) is not None and shard_layout(ins, Path("instances")) is not None
        return "tiles" if ok else None
    img, ins = _create_native(group, 0, NATIVE_CHUNK + 88, 2 * NATIVE_CHUNK + 76)
    ok = shard_layout(img, Path("img"), native=True) is not None and shard_layout(ins, Path("ins"), native=True) is not None
    return "native" if ok else None


def label_candidates(labels: np.ndarray, *, source: str, taxonomy: Taxonomy, cache: dict[str, tuple[int, ...]],
                     annotation_file: str) -> tuple[np.ndarray, np.ndarray]:
    """The unified label ((n,) int16; 0 while several candidates remain) and the ``"|"``-joined
    candidate class ids ((n,) object) of nuclei with source labels ``labels`` ((n,) str), from
    ``taxonomy`` (memoised per label in ``cache``); a label the taxonomy does not map is a
    :class:`~cellcurate.errors.StoreError` naming ``annotation_file``."""
    n = len(labels)
    unified = np.zeros(n, np.int16)
    cand_text = np.empty(n, dtype=object)
    for lab in np.unique(labels):
        name = str(lab)
        cands = cache.get(name)
        if cands is None:
            try:
                cands = taxonomy.candidates(source, name)
            except ConfigError as exc:
                raise StoreError(f"{annotation_file}: {exc}") from None
            cache[name] = cands
        sel = labels == lab
        unified[sel] = cands[0] if len(cands) == 1 else 0
        cand_text[sel] = "|".join(map(str, cands))
    return unified, cand_text


def convert_image(item: SourceImage, *, source: str, taxonomy: Taxonomy,
                  cache: dict[str, tuple[int, ...]] | None = None) -> ConvertedImage:
    """Validate one source image and compute what the store keeps of its nuclei: geometry (bbox,
    centroid, area), candidates and unified label from ``taxonomy``, and the stable nucleus ids.
    Pure (no store access), so ingest runs it in worker processes; ``cache`` memoises the
    taxonomy's candidates per source label."""
    item.validate()
    cache = {} if cache is None else cache
    image_id = f"{source}/{item.key}"
    h, w = item.instances.shape
    nuc = item.nuclei
    order = np.argsort(nuc["instance_id"].to_numpy(), kind="stable")
    n = len(order)

    def col(name: str) -> np.ndarray:
        return np.asarray(nuc[name].to_numpy())[order]

    geo = instance_geometry(item.instances, n)
    if n and (geo["area"] == 0).any():
        missing = col("instance_id")[geo["area"] == 0]
        raise StoreError(f"{item.origin_file}: image {item.key}: instances {missing[:5].tolist()} have no pixels")
    annotation_file = item.annotation_file or item.origin_file
    labels = col("source_label").astype(str)
    kinds = col("kind").astype(str)
    ch = col("origin_channel").astype(np.int16)
    oi = col("origin_instance").astype(np.int64)
    reg = col("origin_region").astype(str)
    if "origin_annotation" in nuc:
        ann = np.asarray(nuc["origin_annotation"].fillna("").to_numpy())[order].astype(str)
    else:
        ann = np.full(n, "", dtype=str)
    unified, cand_text = label_candidates(labels, source=source, taxonomy=taxonomy, cache=cache,
                                          annotation_file=annotation_file)
    ids = np.fromiter(
        (nucleus_id(source, annotation_file, item.origin_index, int(c), int(o), r, a)
         for c, o, r, a in zip(ch, oi, reg, ann)), dtype=np.int64, count=n)
    cols = {
        "nucleus_id": ids, "image_id": np.full(n, image_id, dtype=object), "kind": kinds,
        "instance_id": col("instance_id").astype(np.int32), "bbox": geo["bbox"], "centroid_y": geo["cy"],
        "centroid_x": geo["cx"], "area": geo["area"], "source_label": labels, "unified_label": unified,
        "candidates": cand_text, "origin_file": np.full(n, annotation_file, dtype=object),
        "origin_index": np.full(n, item.origin_index, dtype=np.int32), "origin_channel": ch,
        "origin_instance": oi, "origin_region": reg, "origin_annotation": ann,
    }
    row = {
        "image_id": image_id, "source": source, "split": item.split,
        "patient_id": item.patient_id, "tissue": item.tissue, "mpp": float(item.mpp),
        "height": h, "width": w, "n_nuclei": int((kinds == "nucleus").sum()),
        "origin_file": item.origin_file, "origin_index": item.origin_index,
        "annotation_file": annotation_file,
    }
    return ConvertedImage(item.key, item.image, item.instances, cols, row)


class Store:
    """A cellcurate store directory. Open with :meth:`open`, create with :meth:`create`.

    Reads are lazy and cached: tables are read once, zarr arrays opened once per unit.

    >>> store = Store.create("demo_store")              # doctest: +SKIP
    >>> image, instances = store.read("pannuke/fold1/00000")  # doctest: +SKIP
    """

    def __init__(self, path: Path, *, readonly: bool) -> None:
        self.path = path
        self.readonly = readonly
        self.taxonomy = Taxonomy.load(path / "taxonomy.json")
        self.ledger = Ledger(path / "ledger.sqlite", readonly=readonly)
        self._tables: tuple[pd.DataFrame, pd.DataFrame] | None = None
        self._tables_key: Any = None
        self._lookup: dict[str, tuple[str, str, int, int, int]] = {}
        self._arrays: OrderedDict[tuple[str, str], tuple[Any, ShardLayout | None]] = OrderedDict()
        #: repairs and observations made while opening or creating (printed by the CLI as notes)
        self.notes: list[str] = list(self.ledger.notes)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, *, taxonomy: Taxonomy | None = None, exist_ok: bool = False) -> "Store":
        """Create a new store at ``path`` (a missing or empty folder), atomically: it is built in a
        locked sibling folder ``.<name>.creating-<token>`` and renamed into place, so a crash leaves
        no half-made store. A folder left by an interrupted creation (no ``store.json``, only the
        files creation writes, an empty ledger) is removed and the store made afresh; so are the
        sibling temporary folders of killed creations. Each such repair is listed in
        :attr:`notes`. With ``exist_ok``, an existing store is opened instead."""
        path = Path(path)
        if (path / "store.json").exists():
            return cls._existing(path, taxonomy, exist_ok)
        notes: list[str] = []
        parent = path.parent
        prefix = f".{path.name}.creating-"
        removed, _problems = remove_stale_tempdirs(parent, prefix)
        notes += [f"{p}: removed the folder of an interrupted store creation" for p in removed]
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise StoreError("exists and is not a folder", path=path)
        if path.exists() and any(path.iterdir()):
            if not _interrupted_creation(path):
                raise StoreError("folder exists and is not an empty cellcurate store", path=path)
            try:
                for child in list(path.iterdir()):
                    remove_tree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            except OSError as exc:
                raise StoreError(f"cannot clean an interrupted store creation: {exc.strerror or exc}",
                                 path=path) from None
            notes.append(f"{path}: found an interrupted store creation (no store.json); removed it and "
                         "created the store afresh")
        taxonomy = taxonomy or Taxonomy.default()
        in_place = path.is_dir() and _mount_point(path)
        fd = -1
        try:
            parent.mkdir(parents=True, exist_ok=True)
            if not in_place and path.is_dir():
                try:
                    tmp, fd = locked_tempdir(parent, prefix)
                except PermissionError:  # may write the given empty folder but not its parent
                    in_place = True
            if in_place:  # an empty mount point cannot be replaced by a rename: build in it, marker last
                cls._build(path, taxonomy)
            else:
                if fd < 0:
                    tmp, fd = locked_tempdir(parent, prefix)
                try:
                    cls._build(tmp, taxonomy)
                    fsync_tree(tmp)
                    try:
                        os.rename(tmp, path)  # replaces an empty folder too
                    except OSError as exc:
                        if (path / "store.json").exists():  # another process created it meanwhile
                            remove_tree(tmp)
                            return cls._existing(path, taxonomy, exist_ok)
                        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                            raise StoreError("folder exists and is not an empty cellcurate store",
                                             path=path) from None
                        raise
                    fsync_dir(parent)
                except BaseException:
                    if tmp.exists():
                        remove_tree(tmp)
                    raise
        except OSError as exc:
            raise StoreError(f"cannot create the store: {exc.strerror or exc}", path=path) from None
        finally:
            if fd >= 0:
                release_tempdir(fd)
        store = cls(path, readonly=False)
        store.notes = notes
        return store

    @classmethod
    def _existing(cls, path: Path, taxonomy: Taxonomy | None, exist_ok: bool) -> "Store":
        if not exist_ok:
            raise StoreError("a store already exists here", path=path)
        store = cls.open(path, mode="a")
        if taxonomy is not None and taxonomy != store.taxonomy:
            raise ConfigError(
                f"{path}: the store uses taxonomy {store.taxonomy.hash[:12]}, "
                f"not the given {taxonomy.hash[:12]}; use a new store for another taxonomy"
            )
        return store

    @staticmethod
    def _build(folder: Path, taxonomy: Taxonomy) -> None:
        """Write a new store's files into ``folder`` (``store.json`` last)."""
        from .. import __version__

        (folder / "units").mkdir(exist_ok=True)
        atomic_write_text(folder / "taxonomy.json", taxonomy.to_json())
        ledger = Ledger(folder / "ledger.sqlite")
        ledger.set_meta("taxonomy_hash", taxonomy.hash)
        ledger.set_meta("created", _now())
        ledger.close()
        meta = {"format": STORE_FORMAT, "format_version": STORE_FORMAT_VERSION,
                "created": _now(), "cellcurate_version": __version__}
        atomic_write_text(folder / "store.json", json.dumps(meta, indent=2) + "\n")

    @classmethod
    def open(cls, path: str | Path, *, mode: str = "r") -> "Store":
        """Open an existing store; ``mode`` "r" (read-only) or "a" (read-write)."""
        if mode not in ("r", "a"):
            raise ConfigError(f"mode must be 'r' or 'a', got {mode!r}")
        path = Path(path)
        marker = path / "store.json"
        if not path.is_dir():
            raise StoreError("no such store folder", path=path)
        if not marker.exists():
            raise StoreError("not a cellcurate store (no store.json); create one with `curate ingest`", path=path)
        try:
            meta = json.loads(marker.read_text("utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"store.json is unreadable ({exc})", path=path) from None
        if meta.get("format") != STORE_FORMAT:
            raise StoreError(f"store.json says format {meta.get('format')!r}, expected {STORE_FORMAT!r}", path=path)
        if int(meta.get("format_version", 0)) > STORE_FORMAT_VERSION:
            raise StoreError(
                f"store format {meta.get('format_version')} is newer than this cellcurate understands "
                f"({STORE_FORMAT_VERSION}); upgrade cellcurate", path=path,
            )
        return cls(path, readonly=(mode == "r"))

    def close(self) -> None:
        self.ledger.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- locking --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def write_lock(self, what: str) -> Iterator[None]:
        """Exclusive lock for bulk writers (ingest, relabel). Review decisions do not need it."""
        if self.readonly:
            raise StoreError("the store is open read-only", path=self.path)
        lock_path = self.path / ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot lock the store: {exc.strerror}", path=self.path) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"another process is writing this store; {what} waits for it to finish",
                                 path=self.path) from None
            yield
        finally:
            os.close(fd)

    # -- tables ---------------------------------------------------------------------------------
    def units(self) -> pd.DataFrame:
        return self.ledger.units()

    def _load_tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        version = self.ledger.data_version()
        if self._tables is not None and self._tables_key == version:
            return self._tables
        units = self.units()
        self._arrays.clear()  # a unit may have been replaced by another process
        imgs, nucs = [], []
        for d in units["dir"]:
            udir = self.path / d
            try:
                imgs.append(pd.read_parquet(udir / "images.parquet"))
                nucs.append(pd.read_parquet(udir / "nuclei.parquet"))
            except (OSError, ValueError) as exc:
                raise StoreError(f"unit {d}: cannot read its tables ({exc})", path=self.path) from None
        images = pd.concat(imgs, ignore_index=True) if imgs else _empty(IMAGE_COLUMNS)
        nuclei = pd.concat(nucs, ignore_index=True) if nucs else _empty(NUCLEUS_COLUMNS)
        self._tables, self._tables_key = (images, nuclei), version
        self._lookup = {
            r[0]: r[1:] for r in zip(images["image_id"], images["unit"], images["zarr_path"],
                                     images["zarr_index"].astype(int), images["height"].astype(int),
                                     images["width"].astype(int))
        }
        return self._tables

    def images(self) -> pd.DataFrame:
        """All images (columns :data:`IMAGE_COLUMNS`)."""
        return self._load_tables()[0]

    def nuclei(self, *, include_ignore: bool = True) -> pd.DataFrame:
        """All nuclei (columns :data:`NUCLEUS_COLUMNS`); ``include_ignore=False`` drops ignore regions."""
        nuc = self._load_tables()[1]
        return nuc if include_ignore else nuc[nuc["kind"] == "nucleus"].reset_index(drop=True)

    def current_labels(self) -> pd.DataFrame:
        """The nuclei table joined with the ledger fold (``label``, ``status``, ``round``, ...)."""
        nuc = self.nuclei()
        folded = self.ledger.current_labels()
        return nuc.join(folded.drop(columns=["source_label", "candidates"]), on="nucleus_id")

    # -- arrays ---------------------------------------------------------------------------------
    def _image_row(self, image_id: str) -> tuple[str, str, int, int, int]:
        """(unit, zarr_path, zarr_index, height, width) of an image."""
        if self._tables is None:
            self._load_tables()
        row = self._lookup.get(image_id)
        if row is None:
            self._load_tables()  # another process may have ingested it since
            row = self._lookup.get(image_id)
            if row is None:
                raise StoreError(f"no image {image_id!r} in the store", path=self.path)
        return row

    def _array(self, unit: str, name: str) -> Any:
        return self._opened(unit, name)[0]

    def _opened(self, unit: str, name: str) -> tuple[Any, ShardLayout | None]:
        """The zarr array ``name`` of a unit and, for an array in the layout ingest writes (stacked
        or native-size), its :class:`~.shards.ShardLayout`: what :func:`~.shards.read_tile` and
        :func:`~.shards.read_native` read it with, without zarr's indexing."""
        from .shards import shard_layout
        from .zarrsafe import open_array

        key = (unit, name)
        got = self._arrays.get(key)
        if got is None:
            udir = self.ledger.unit(unit)
            if udir is None:
                raise StoreError(f"unit {unit!r} is not in the store", path=self.path)
            folder = self.path / udir["dir"] / "arrays.zarr" / name
            arr = open_array(folder)  # codecs checked first
            native = name.startswith(("img/", "ins/"))
            got = arr, (shard_layout(arr, folder, native=native) if native or name in ("images", "instances") else None)
            self._arrays[key] = got
            if len(self._arrays) > 256:
                self._arrays.popitem(last=False)
        else:
            self._arrays.move_to_end(key)
        return got

    def read_image(self, image_id: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""
        row = self._image_row(image_id)
        return self._read(row, "image")

    def read_instances(self, image_id: str) -> np.ndarray:
        """(H, W) int32 instance map; ids match ``nuclei().instance_id`` of that image."""
        row = self._image_row(image_id)
        return self._read(row, "instances")

    def read(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        row = self._image_row(image_id)
        return self._read(row, "image"), self._read(row, "instances")

    def read_region(self, image_id: str, y0: int, x0: int, y1: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
        """A window (clipped to the image) of the image and its instance map; reads only the chunks needed."""
        row = self._image_row(image_id)
        y0, x0 = max(0, y0), max(0, x0)
        y1, x1 = min(row[3], y1), min(row[4], x1)
        win = (slice(y0, y1), slice(x0, x1))
        return self._read(row, "image", win), self._read(row, "instances", win)

    def _runs(self, image_ids: list[str] | None, batch: int
              ) -> Iterator[tuple[tuple[str, str, int, int, int], list[str], int]]:
        """``(first row, image ids, n)`` per read: runs of up to ``batch`` consecutive tiles of a
        stacked unit (one slice each), native-size images alone (n = 0). Order: by unit and
        position; ``image_ids`` restricts the set (default: every image)."""
        if self._tables is None:
            self._load_tables()
        wanted = list(self._lookup) if image_ids is None else list(image_ids)
        rows = sorted((self._image_row(i), i) for i in wanted)
        k = 0
        while k < len(rows):
            (unit, path, idx, _h, _w), image_id = rows[k]
            if idx < 0:
                yield rows[k][0], [image_id], 0
                k += 1
                continue
            j = k + 1
            while (j < len(rows) and j - k < batch and rows[j][0][0] == unit and rows[j][0][1] == path
                   and rows[j][0][2] == idx + (j - k)):
                j += 1
            yield rows[k][0], [r[1] for r in rows[k:j]], j - k
            k = j

    def iter_slabs(self, image_ids: list[str] | None = None, *, batch: int = TILES_PER_SHARD
                   ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
        """Yield ``(image_ids, images (B, H, W, 3), instances (B, H, W))`` slabs: runs of up to
        ``batch`` consecutive tiles of a stacked unit read with one slice each (one decode pass
        per shard), and native-size images one at a time (B = 1). Order: by unit and position,
        the fast order; ``image_ids`` restricts the set (default: every image)."""
        for row, ids, n in self._runs(image_ids, batch):
            if not n:
                yield ids, self._read(row, "image")[None], self._read(row, "instances")[None]
                continue
            unit, path, idx = row[0], row[1], row[2]
            yield ids, np.asarray(self._array(unit, path)[idx : idx + n]), \
                np.asarray(self._array(unit, "instances")[idx : idx + n])

    def iter_instances(self, image_ids: list[str] | None = None, *, batch: int = TILES_PER_SHARD
                       ) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(image_id, instances)`` in :meth:`iter_slabs` order, reading only the instance
        maps (runs of stacked tiles with one slice each)."""
        for row, ids, n in self._runs(image_ids, batch):
            if not n:
                yield ids[0], self._read(row, "instances")
                continue
            ins = np.asarray(self._array(row[0], "instances")[row[2] : row[2] + n])
            yield from zip(ids, ins)

    def iter_images(self, image_ids: list[str] | None = None, *, batch: int = TILES_PER_SHARD
                    ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """Yield ``(image_id, image, instances)`` for many images, read in slabs (:meth:`iter_slabs`)."""
        for ids, imgs, inss in self.iter_slabs(image_ids, batch=batch):
            for m, image_id in enumerate(ids):
                yield image_id, imgs[m], inss[m]

    def _read(self, row: tuple[str, str, int, int, int], what: str,
              window: tuple[slice, slice] | None = None) -> np.ndarray:
        unit, path, idx = row[0], row[1], row[2]
        if what == "instances":
            path = "instances" if path == "images" else path.replace("img/", "ins/", 1)
        arr, layout = self._opened(unit, path)
        if layout is not None:  # in the layout ingest writes: read from the shard file directly
            if idx < 0:
                return read_native(layout, tuple(arr.shape), arr.dtype, window)
            if idx >= arr.shape[0]:
                raise StoreError(f"{layout.folder}: tile {idx} of an array of {arr.shape[0]}", path=layout.folder)
            tile = read_tile(layout, idx, tuple(arr.shape[1:]), arr.dtype)
            return tile if window is None else np.ascontiguousarray(tile[window])
        sl: tuple[Any, ...] = window or (slice(None), slice(None))
        return np.asarray(arr[(idx, *sl)] if idx >= 0 else arr[sl])

    # -- writing --------------------------------------------------------------------------------
    def unit_writer(self, unit: str, source: str, *, fingerprint: str, origin: str,
                    stacked: tuple[int, int, int] | None = None, overwrite: bool = False) -> "UnitWriter":
        """Start writing an ingest unit. Commit with :meth:`UnitWriter.commit`; an exception inside a
        ``with`` block discards everything written."""
        if self.readonly:
            raise StoreError("the store is open read-only", path=self.path)
        return UnitWriter(self, unit, source, fingerprint=fingerprint, origin=origin,
                          stacked=stacked, overwrite=overwrite)

    def commit(self, prepared: list[PreparedUnit]) -> list[UnitSummary]:
        """Make prepared units visible: one ledger transaction registers them all with their
        ingest events. On any error nothing is registered and the prepared folders are removed."""
        try:
            names = {p.row["unit"] for p in prepared}
            images, nuclei = self.images(), self.nuclei()
            keep = ~nuclei["image_id"].isin(images.loc[images["unit"].isin(names), "image_id"])
            seen = nuclei.loc[keep, "nucleus_id"].to_numpy()
            for p in prepared:
                clash = np.intersect1d(seen, p.nucleus_ids)
                if clash.size:
                    raise StoreError(f"unit {p.row['unit']}: {clash.size} nucleus ids already belong to other units",
                                     path=self.path)
                seen = np.concatenate([seen, p.nucleus_ids])
            old = {p.row["unit"]: self.ledger.unit(p.row["unit"]) for p in prepared}
            self.ledger.commit_units([(p.row, p.events) for p in prepared])
        except BaseException:
            for p in prepared:
                shutil.rmtree(p.folder, ignore_errors=True)
            raise
        summaries = []
        for p in prepared:
            o = old[p.row["unit"]]
            if o is not None and o["dir"] != p.row["dir"]:
                shutil.rmtree(self.path / o["dir"], ignore_errors=True)
            summaries.append(UnitSummary(p.row["unit"], p.row["source"], "replaced" if o is not None else "ingested",
                                         p.row["n_images"], p.row["n_nuclei"], p.report))
        self.invalidate()
        return summaries

    def unit_status(self, unit: str, fingerprint: str) -> str:
        """"new", "unchanged" (same files and taxonomy) or "changed"."""
        row = self.ledger.unit(unit)
        if row is None:
            return "new"
        if row["fingerprint"] == fingerprint and row["taxonomy_hash"] == self.taxonomy.hash:
            return "unchanged"
        return "changed"

    def remove_orphans(self) -> list[str]:
        """Delete unit folders that no committed unit points to (left by an interrupted ingest)."""
        registered = set(self.units()["dir"])
        removed = []
        for d in sorted((self.path / "units").iterdir()):
            rel = f"units/{d.name}"
            if rel not in registered:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(rel)
        return removed

    def invalidate(self) -> None:
        self._tables = None
        self._arrays.clear()


class UnitWriter:
    """Writes one ingest unit into a temporary folder; :meth:`commit` makes it visible atomically."""

    def __init__(self, store: Store, unit: str, source: str, *, fingerprint: str, origin: str,
                 stacked: tuple[int, int, int] | None, overwrite: bool) -> None:
        import zarr
        from zarr.codecs import BloscCodec

        self.store, self.unit, self.source = store, unit, source
        self.fingerprint, self.origin, self.overwrite = fingerprint, origin, overwrite
        self.token = secrets.token_hex(4)
        self.final_dir = store.path / "units" / f"{unit}-{self.token}"
        self.tmp_dir = store.path / "units" / f".tmp-{unit}-{self.token}"
        self.tmp_dir.mkdir(parents=True)
        self.group = zarr.open_group(str(self.tmp_dir / "arrays.zarr"), mode="w", zarr_format=3)
        self._img_codec = [BloscCodec(**IMAGES_BLOSC)]  # type: ignore[arg-type]
        self._ins_codec = [BloscCodec(**INSTANCES_BLOSC)]  # type: ignore[arg-type]
        self.stacked = stacked
        self._stack_img: Any = None
        self._stack_ins: Any = None
        self._pool: Any = None
        self._pending: Any = None
        #: shard files (and their folders) the writer thread fsynced as it wrote them; skipped by
        #: the fsync of the whole unit folder in :meth:`prepare`
        self._synced: set[str] = set()
        if stacked is not None:
            self._stack_img, self._stack_ins = _create_stacked(self.group, stacked)
            self._buf: list[ConvertedImage] = []
            self._buf_start = 0
            from .shards import shard_layout

            arrays = self.tmp_dir / "arrays.zarr"
            self._layouts = (shard_layout(self._stack_img, arrays / "images"),
                             shard_layout(self._stack_ins, arrays / "instances"))
        self._image_rows: list[dict[str, Any]] = []
        self._cols: dict[str, list[np.ndarray]] = {k: [] for k in (
            "nucleus_id", "image_id", "kind", "instance_id", "bbox", "centroid_y", "centroid_x", "area",
            "source_label", "unified_label", "candidates", "origin_file", "origin_index", "origin_channel",
            "origin_instance", "origin_region", "origin_annotation")}
        self._cand_cache: dict[str, tuple[int, ...]] = {}
        self._n = 0
        self.report = IngestReport()
        self._done = False

    def __enter__(self) -> "UnitWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self._done:
            self.abort()

    def add(self, item: SourceImage) -> None:
        """Add one image with its instances and nuclei."""
        self.add_converted(convert_image(item, source=self.source, taxonomy=self.store.taxonomy,
                                         cache=self._cand_cache))

    @property
    def accepts_encoded(self) -> bool:
        """True when this unit's tiles may come compressed (:func:`encode_converted`): a stacked
        unit whose arrays have the layout :mod:`.shards` writes."""
        return self.stacked is not None and None not in self._layouts

    def add_converted(self, conv: "ConvertedImage") -> None:
        """Add one image already through :func:`convert_image` (in this process or a worker's),
        possibly compressed by :func:`encode_converted` (stacked units, :attr:`accepts_encoded`)."""
        i = self._n
        h, w = int(conv.row["height"]), int(conv.row["width"])
        if self.stacked is not None:
            if (h, w) != self.stacked[1:]:
                raise StoreError(f"{conv.row['origin_file']}: image {conv.key} is {h}x{w}, expected {self.stacked[1:]}")
            if i >= self.stacked[0]:
                raise StoreError(f"{conv.row['origin_file']}: more images than announced ({self.stacked[0]})")
            if conv.chunks is not None and not self.accepts_encoded:
                raise StoreError(f"unit {self.unit}: compressed tiles for arrays of another layout")
            self._buf.append(conv)
            if len(self._buf) >= self._shard_tiles or (self._buf_start + len(self._buf)) % self._shard_tiles == 0:
                self._flush()
            zarr_path, zarr_index = "images", i
        else:
            if conv.shards is not None:  # compressed by a worker: zarr writes the metadata, we the shard files
                self._add_native_shards(i, h, w, conv.shards)
            else:
                assert conv.image is not None and conv.instances is not None
                chunks, shards = native_chunks(h, w)  # one shard file per image
                self.group.create_array(f"img/{i}", data=conv.image, chunks=(*chunks, 3), shards=(*shards, 3),
                                        compressors=self._img_codec, fill_value=0)
                self.group.create_array(f"ins/{i}", data=conv.instances, chunks=chunks, shards=shards,
                                        compressors=self._ins_codec, fill_value=0)
            zarr_path, zarr_index = f"img/{i}", -1
        for name, values in conv.cols.items():
            self._cols[name].append(values)
        self._image_rows.append({**conv.row, "unit": self.unit, "zarr_path": zarr_path, "zarr_index": zarr_index})
        self._n += 1

    def _add_native_shards(self, i: int, h: int, w: int, files: tuple[bytes | None, bytes | None]) -> None:
        """Image ``i``'s arrays from the shard files a worker encoded (:func:`encode_converted`):
        the arrays' metadata by zarr, then the files where zarr would have written them."""
        from .shards import shard_layout, write_file

        chunks, _ = native_chunks(h, w)
        for name, array, chunk, data in zip((f"img/{i}", f"ins/{i}"), _create_native(self.group, i, h, w),
                                            ((*chunks, 3), chunks), files):
            layout = shard_layout(array, self.tmp_dir / "arrays.zarr" / name, native=True)
            if layout is None or layout.chunk != chunk:
                raise StoreError(f"unit {self.unit}: compressed image {i} for arrays of another layout")
            write_file(layout.path(0), data)

    def _nuclei_table(self) -> pd.DataFrame:
        c = self._cols
        if not c["nucleus_id"]:
            return _empty(NUCLEUS_COLUMNS)
        cat = {k: np.concatenate(v) for k, v in c.items()}
        bbox = cat.pop("bbox")
        df = pd.DataFrame({
            "nucleus_id": cat["nucleus_id"], "image_id": cat["image_id"], "source": self.source,
            "kind": cat["kind"], "instance_id": cat["instance_id"],
            "bbox_y0": bbox[:, 0], "bbox_x0": bbox[:, 1], "bbox_y1": bbox[:, 2], "bbox_x1": bbox[:, 3],
            "centroid_y": cat["centroid_y"], "centroid_x": cat["centroid_x"], "area": cat["area"],
            "source_label": cat["source_label"], "unified_label": cat["unified_label"],
            "candidates": cat["candidates"], "origin_file": cat["origin_file"],
            "origin_index": cat["origin_index"], "origin_channel": cat["origin_channel"],
            "origin_instance": cat["origin_instance"], "origin_region": cat["origin_region"],
            "origin_annotation": cat["origin_annotation"],
        })
        return _typed(df, NUCLEUS_COLUMNS)

    def _flush(self) -> None:
        """Hand the buffered tiles (one shard) to the writer thread, so compression and I/O overlap
        with the conversion of the next tiles; at most one shard is in flight (bounded memory)."""
        if not self._buf:
            return
        s = self._buf_start
        e = s + len(self._buf)
        buf, self._buf = self._buf, []
        self._buf_start = e
        self._wait_pending()
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellcurate-shard-writer")
        if self.accepts_encoded:  # one whole shard (the buffer flushes at shard boundaries)
            self._pending = self._pool.submit(self._write_encoded, s // self._shard_tiles, buf)
        else:
            img = np.stack([c.image for c in buf])  # type: ignore[misc]
            ins = np.stack([c.instances for c in buf])  # type: ignore[misc]
            self._pending = self._pool.submit(self._write_slab, s, e, img, ins)

    @property
    def _shard_tiles(self) -> int:
        assert self.stacked is not None
        return min(TILES_PER_SHARD, max(self.stacked[0], 1))

    def _write_slab(self, s: int, e: int, img: np.ndarray, ins: np.ndarray) -> None:
        self._stack_img[s:e] = img
        self._stack_ins[s:e] = ins

    def _write_encoded(self, k: int, buf: list[ConvertedImage]) -> None:
        """Shard ``k`` of both arrays from tiles compressed by the workers or, for those that came
        as arrays (``--jobs 1``), compressed here: the bytes zarr writes (:mod:`.shards`)."""
        from .shards import write_shard

        img_layout, ins_layout = self._layouts
        assert img_layout is not None and ins_layout is not None
        chunks = [encode_converted(c).chunks or (None, None) for c in buf]
        write_shard(img_layout, k, [c[0] for c in chunks], synced=self._synced)
        write_shard(ins_layout, k, [c[1] for c in chunks], synced=self._synced)

    def _wait_pending(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises a write error here, in the caller's thread

    def _shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def prepare(self, report: IngestReport | None = None) -> "PreparedUnit":
        """Write the tables and rename the unit folder into place (not yet visible: see
        :meth:`Store.commit`)."""
        store = self.store
        if self.stacked is not None:
            self._flush()
            self._wait_pending()
            self._shutdown_pool()
            if self._n != self.stacked[0]:
                raise StoreError(f"unit {self.unit}: {self._n} images written, {self.stacked[0]} announced")
        images = _typed(pd.DataFrame(self._image_rows), IMAGE_COLUMNS)
        nuclei = self._nuclei_table()
        dup = nuclei["nucleus_id"].duplicated()
        if dup.any():
            first = nuclei.loc[dup].iloc[0]
            ref = (f"region Id={first['origin_region']} (Annotation {first['origin_annotation'] or '-'})"
                   if first["origin_region"] else
                   f"tile index {first['origin_index']}, channel {first['origin_channel']}, "
                   f"instance {first['origin_instance']}")
            raise StoreError(f"{first['origin_file']}: {int(dup.sum())} nuclei share an id (duplicate origin "
                             f"references), e.g. {ref} of image {first['image_id']} (unit {self.unit})")
        report = report or self.report
        images.to_parquet(self.tmp_dir / "images.parquet", index=False)
        nuclei.to_parquet(self.tmp_dir / "nuclei.parquet", index=False)
        atomic_write_text(self.tmp_dir / "report.json", json.dumps(report.as_dict(), indent=2) + "\n")
        fsync_tree(self.tmp_dir, skip=self._synced)
        os.replace(self.tmp_dir, self.final_dir)
        fsync_dir(self.final_dir.parent)
        self._done = True
        payloads: dict[tuple[str, str, str], str] = {}
        payload_col = []
        for key in zip(nuclei["source_label"].to_numpy(), nuclei["candidates"].to_numpy(), nuclei["kind"].to_numpy()):
            text = payloads.get(key)
            if text is None:
                s_lab, c, k = key
                text = json.dumps({"source_label": s_lab, "candidates": [int(x) for x in c.split("|")] if c else [],
                                   "kind": k, "unit": self.unit}, separators=(",", ":"))
                payloads[key] = text
            payload_col.append(text)
        events = pd.DataFrame({
            "kind": "ingest",
            "nucleus_id": nuclei["nucleus_id"].to_numpy(),
            "actor": f"ingest:{self.source}",
            "action": "ingest",
            "label": nuclei["unified_label"].to_numpy(np.int64),
            "payload": payload_col,
        })
        unit_row = {
            "unit": self.unit, "source": self.source, "dir": f"units/{self.final_dir.name}",
            "fingerprint": self.fingerprint, "taxonomy_hash": store.taxonomy.hash, "n_images": len(images),
            "n_nuclei": int((nuclei["kind"] == "nucleus").sum()), "origin": self.origin, "time": _now(),
        }
        return PreparedUnit(unit_row, events, nuclei["nucleus_id"].to_numpy(), self.final_dir, report)

    def commit(self, report: IngestReport | None = None) -> UnitSummary:
        """Prepare and commit this unit alone."""
        return self.store.commit([self.prepare(report)])[0]

    def abort(self) -> None:
        self._done = True
        try:
            self._wait_pending()
        except Exception:  # already failing: the folder is discarded either way
            pass
        self._shutdown_pool()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


# -- helpers ------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _empty(columns: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})


def _typed(df: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    if df.empty:
        return _empty(columns)
    return df[list(columns)].astype(columns)


#: What an interrupted creation can leave in the store folder (before store.json, written last).
_CREATION_FILES = {"units", "taxonomy.json", "ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm",
                   "ledger.sqlite-journal", ".lock"}


def _interrupted_creation(path: Path) -> bool:
    """``path`` (no store.json) holds only what store creation writes, with no ingested data."""
    import re
    import sqlite3

    for child in path.iterdir():
        name = child.name
        if name not in _CREATION_FILES and not re.fullmatch(r"\.(store|taxonomy)\.json\.[0-9a-f]+\.tmp", name):
            return False
    units = path / "units"
    if units.exists() and (not units.is_dir() or any(not c.name.startswith(".tmp-") for c in units.iterdir())):
        return False
    ledger = path / "ledger.sqlite"
    if ledger.is_file():
        try:
            con = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=1.0)
            try:
                n = sum(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("events", "units"))
            finally:
                con.close()
        except sqlite3.Error:
            return True  # a ledger cut off while it was being made
        if n:
            return False
    return True


def _mount_point(path: Path) -> bool:
    try:
        return os.stat(path).st_dev != os.stat(path.parent).st_dev
    except OSError:
        return False



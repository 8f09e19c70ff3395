"""Shard files of the store's stacked arrays (PanNuke, CoNIC), encoded without zarr's write path.

The stacked ``images`` (N, H, W, 3) uint8 and ``instances`` (N, H, W) int32 arrays are zarr v3
arrays with one chunk per tile and :data:`~cellcurate.datasets.store.TILES_PER_SHARD` tiles per
shard (docs/STORE.md). Ingest writes them here byte for byte as zarr writes them, so that the
expensive part, the blosc compression of each tile, can run in the ``--jobs`` workers beside the
conversion and only compressed bytes travel to the writing process (about a third of the raw
tile). What zarr 3 writes for such an array, and so what :func:`assemble_shard` writes:

* each non-empty chunk (a tile not entirely the fill value 0; zarr's default
  ``write_empty_chunks=False`` leaves empty chunks out) is the tile's C-order little-endian bytes
  through ``numcodecs.Blosc(cname, clevel, shuffle, typesize=itemsize, blocksize=0)``;
* a shard is its chunks concatenated in chunk order (Morton order, which for chunk grids
  ``(k, 1, 1[, 1])`` is the tile order), then the index: ``(offset, nbytes)`` as little-endian
  uint64 per chunk (``2**64 - 1`` twice for an empty chunk), then the CRC32C of the index
  (little-endian uint32); a shard whose chunks are all empty is not written at all;
* shard ``k`` of ``images`` is the file ``images/c/k/0/0/0`` (``instances/c/k/0/0``).

:func:`shard_layout` checks an array's metadata is exactly that layout (codecs, chunk key
encoding, fill value, C order); the writer uses zarr itself for anything else, so a future zarr
with other defaults cannot make it write a different format. ``tests/test_shards.py`` compares
the bytes with zarr's own for full, partial and empty shards.

:func:`read_tile` reads one tile of such an array back without zarr: two ``pread`` calls (the
index at the end of the shard file, then the chunk) and one blosc decode into the output array.
:func:`read_native` reads a native-size image the same way, only the chunks a window
touches. A random tile read through zarr costs about 3 ms, nearly all of it in zarr's async machinery
rather than in decoding (``benchmarks/bench_ingest.py --parts access``); the direct read is what
:meth:`~cellcurate.datasets.store.Store.read` uses for a stacked tile. It also says what zarr
does not: a shard whose index fails its CRC32C, a chunk that runs past the index, or a chunk
that does not decode to one tile is a :class:`~cellcurate.errors.StoreError` naming the file
(zarr 3 raises a ValueError about checksums that names no file). Neither can see a damaged byte
inside a chunk that still decodes: blosc carries no checksum of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError

__all__ = ["ChunkCodec", "ShardLayout", "assemble_shard", "native_shard", "read_native", "read_tile", "shard_layout",
           "write_file", "write_shard"]

_EMPTY = 2**64 - 1
_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


@dataclass(frozen=True)
class ChunkCodec:
    """The blosc settings of one stacked array (the ``blosc`` codec of its ``zarr.json``)."""

    cname: str
    clevel: int
    shuffle: str  # "noshuffle" | "shuffle" | "bitshuffle"
    typesize: int

    def encode(self, tile: np.ndarray) -> bytes | None:
        """The stored chunk of one tile, or None when the tile is all fill value (0): not stored."""
        if not tile.any():
            return None
        return bytes(self._blosc().encode(np.ascontiguousarray(tile)))

    def _blosc(self) -> Any:
        codec = _CODECS.get(self)
        if codec is None:
            from numcodecs import Blosc

            codec = Blosc(cname=self.cname, clevel=self.clevel, shuffle=_SHUFFLE[self.shuffle], blocksize=0,
                          typesize=self.typesize)
            _CODECS[self] = codec
        return codec


_CODECS: dict[ChunkCodec, Any] = {}


@dataclass(frozen=True)
class ShardLayout:
    """Where and how the shards of one stacked array are written."""

    folder: Path  # the array's folder (``.../arrays.zarr/images``)
    codec: ChunkCodec
    tiles_per_shard: int
    ndim: int
    chunk: tuple[int, ...] = ()  # the inner chunk shape (native arrays: :func:`native_shard`)

    def path(self, k: int) -> Path:
        return self.folder.joinpath("c", str(k), *(["0"] * (self.ndim - 1)))


def shard_layout(array: Any, folder: Path, *, native: bool = False) -> ShardLayout | None:
    """The :class:`ShardLayout` of a zarr v3 array written by ``UnitWriter`` (one tile per chunk,
    blosc inside a ``sharding_indexed`` codec with a CRC32C index at the end, default chunk keys,
    fill value 0, empty chunks not written), or None when its metadata is anything else.

    ``native``: the layout of a native-size image instead (``img/<i>``, ``ins/<i>``): chunks of any
    shape inside one shard that covers the whole array (:func:`native_shard`)."""
    try:
        import zarr

        meta = array.metadata.to_dict()
        if meta.get("zarr_format") != 3 or meta.get("fill_value") not in (0, 0.0):
            return None
        if zarr.config.get("array.write_empty_chunks") or zarr.config.get("array.order") != "C":
            return None
        keys = meta.get("chunk_key_encoding", {})
        if keys.get("name") != "default" or keys.get("configuration", {}).get("separator", "/") != "/":
            return None
        (shard,) = meta["codecs"]
        if shard["name"] != "sharding_indexed":
            return None
        conf = shard["configuration"]
        shape = tuple(meta["shape"])
        shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        chunk = tuple(int(c) for c in conf["chunk_shape"])
        if native:
            if len(chunk) != len(shape) or any(not s <= sh < s + c or sh % c for s, sh, c in zip(shape, shard_shape, chunk)):
                return None  # one shard, a whole number of chunks, no chunk wholly outside the array
        elif chunk != (1, *shape[1:]) or shard_shape[1:] != shape[1:]:
            return None
        if conf.get("index_location", "end") != "end":
            return None
        index_codecs = conf["index_codecs"]
        if len(index_codecs) != 2 or not _little_bytes(index_codecs[0]) or index_codecs[1] != {"name": "crc32c"}:
            return None
        inner = conf["codecs"]
        if len(inner) != 2 or not _little_bytes(inner[0]):
            return None
        blosc = inner[1]
        if blosc["name"] != "blosc" or blosc["configuration"].get("blocksize", 0) != 0:
            return None
        dtype = np.dtype(array.dtype)
        if dtype.byteorder == ">" or blosc["configuration"]["typesize"] != dtype.itemsize:
            return None
        c = blosc["configuration"]
        return ShardLayout(folder, ChunkCodec(c["cname"], int(c["clevel"]), c["shuffle"], int(c["typesize"])),
                           int(shard_shape[0]), len(shape), chunk)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _little_bytes(codec: dict[str, Any]) -> bool:
    """The ``bytes`` codec, little-endian (no ``endian`` for 1-byte types)."""
    return codec.get("name") == "bytes" and codec.get("configuration", {}).get("endian", "little") == "little"


def assemble_shard(chunks: list[bytes | None], tiles_per_shard: int) -> bytes | None:
    """The bytes of one shard file from its chunks in tile order (None: empty chunk; fewer than
    ``tiles_per_shard`` for the last shard of an array); None when every chunk is empty."""
    import google_crc32c

    if len(chunks) > tiles_per_shard:
        raise ValueError(f"{len(chunks)} chunks for a shard of {tiles_per_shard}")
    index = np.full((tiles_per_shard, 2), _EMPTY, dtype="<u8")
    parts: list[bytes] = []
    offset = 0
    for k, chunk in enumerate(chunks):
        if not chunk:
            continue
        index[k] = (offset, len(chunk))
        parts.append(chunk)
        offset += len(chunk)
    if not parts:
        return None
    index_bytes = index.tobytes()
    parts.append(index_bytes)
    parts.append(np.array([google_crc32c.value(index_bytes)], dtype="<u4").tobytes())
    return b"".join(parts)


def write_shard(layout: ShardLayout, k: int, chunks: list[bytes | None], *, synced: set[str] | None = None) -> None:
    """Write shard ``k`` of an array (nothing when all its chunks are empty, as zarr does).

    ``synced``: also fsync the file and the folders made for it (``c/<k>/0/...``; not ``c``,
    which gets other shards), and add their paths to the set, so that the unit writer's
    :func:`~cellcurate.core.atomic.fsync_tree` before the rename skips them: the syncs run in
    the writer thread while the next tiles convert, instead of all at the end. Without it the
    file is not fsynced here."""
    path = layout.path(k)
    data = assemble_shard(chunks, layout.tiles_per_shard)
    write_file(path, data, sync=synced is not None)
    if synced is None or data is None:
        return
    from ..core.atomic import fsync_dir

    synced.add(os.path.normpath(path))
    top = os.path.normpath(layout.folder / "c")
    folder = os.path.normpath(path.parent)
    while folder != top and len(folder) > len(top):
        fsync_dir(folder)
        synced.add(folder)
        folder = os.path.dirname(folder)


def native_shard(array: np.ndarray, chunk: tuple[int, ...], codec: ChunkCodec) -> bytes | None:
    """The bytes of the one shard file of a native-size array (a MoNuSAC image ``img/<i>`` (H, W, 3)
    or instance map ``ins/<i>`` (H, W)) written whole, as zarr writes it: chunks of shape ``chunk``
    (edge chunks padded with the fill value 0, all-0 chunks left out), concatenated in Morton
    order over the shard's chunk grid, then the index (C order of the chunk coordinates) and
    its CRC32C. None when every chunk is empty (zarr writes no file). What the ingest workers
    send back for such an image instead of its arrays (:func:`~.store.encode_converted`)."""
    from zarr.core.indexing import morton_order_iter

    shape = array.shape
    if len(chunk) != len(shape):
        raise ValueError(f"chunk {chunk} for an array of shape {shape}")
    grid = tuple(-(-s // c) for s, c in zip(shape, chunk))
    array = np.ascontiguousarray(array)
    chunks: dict[tuple[int, ...], bytes] = {}
    for coords in morton_order_iter(grid):
        sel = tuple(slice(k * c, min((k + 1) * c, s)) for k, c, s in zip(coords, chunk, shape))
        block = array[sel]
        if block.shape != chunk:  # an edge chunk: zarr encodes it padded to the full chunk shape
            padded = np.zeros(chunk, dtype=array.dtype)
            padded[tuple(slice(0, n) for n in block.shape)] = block
            block = padded
        data = codec.encode(block)
        if data is not None:
            chunks[coords] = data
    return _shard_bytes(chunks, grid)


def _shard_bytes(chunks: dict[tuple[int, ...], bytes], grid: tuple[int, ...]) -> bytes | None:
    """Chunks (in the order given: the file order) + index over ``grid`` + CRC32C; None if none."""
    import google_crc32c

    if not chunks:
        return None
    index = np.full((*grid, 2), _EMPTY, dtype="<u8")
    offset = 0
    for coords, data in chunks.items():
        index[coords] = (offset, len(data))
        offset += len(data)
    index_bytes = index.tobytes()
    return b"".join([*chunks.values(), index_bytes, np.array([google_crc32c.value(index_bytes)], dtype="<u4").tobytes()])


def write_file(path: Path, data: bytes | None, *, sync: bool = False) -> None:
    """Write one shard file (nothing when ``data`` is None: an all-empty shard); fsynced only
    with ``sync``."""
    if data is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_tile(layout: ShardLayout, idx: int, shape: tuple[int, ...], dtype: np.dtype[Any] | str) -> np.ndarray:
    """Tile ``idx`` (shape ``shape`` without the leading 1) of a stacked array, read from its shard
    file directly; zeros for a tile zarr left out (an empty chunk, or a shard with no file). Raises
    :class:`~cellcurate.errors.StoreError` naming the shard file when the file is truncated, its
    index fails the CRC32C or points outside the file, or the chunk does not decode to one tile."""
    out = np.zeros(shape, dtype=np.dtype(dtype))
    k, j = divmod(int(idx), layout.tiles_per_shard)
    with _ShardFile(layout, k, layout.tiles_per_shard) as shard:
        if shard.index is not None:
            shard.decode(j, out)
    return out


def read_native(layout: ShardLayout, shape: tuple[int, ...], dtype: np.dtype[Any] | str,
                window: tuple[slice, ...] | None = None) -> np.ndarray:
    """A native-size array (:func:`native_shard`'s layout: one shard of ``layout.chunk`` chunks)
    read from its shard file directly, whole or the ``window`` (slices with explicit, in-range
    bounds over the leading axes): only the chunks the window touches are read and decoded. The
    same errors as :func:`read_tile`."""
    dtype = np.dtype(dtype)
    chunk = layout.chunk
    grid = tuple(-(-n // c) for n, c in zip(shape, chunk))
    sel = tuple(window or ()) + tuple(slice(0, n) for n in shape[len(window or ()):])
    lo = [0 if sl.start is None else int(sl.start) for sl in sel]
    hi = [n if sl.stop is None else int(sl.stop) for sl, n in zip(sel, shape)]
    out = np.zeros(tuple(max(0, b - a) for a, b in zip(lo, hi)), dtype=dtype)
    if out.size == 0:
        return out
    with _ShardFile(layout, 0, int(np.prod(grid))) as shard:
        if shard.index is None:
            return out
        buf = np.empty(chunk, dtype=dtype)
        ranges = [range(a // c, -(-b // c)) for a, b, c in zip(lo, hi, chunk)]
        for coords in np.ndindex(*(len(r) for r in ranges)):
            cc = tuple(r[i] for r, i in zip(ranges, coords))
            if not shard.decode(int(np.ravel_multi_index(cc, grid)), buf):
                continue  # an empty chunk: zeros, already there
            src, dst = [], []
            for k, c, a, b in zip(cc, chunk, lo, hi):
                s0, s1 = max(a, k * c), min(b, (k + 1) * c)
                src.append(slice(s0 - k * c, s1 - k * c))
                dst.append(slice(s0 - a, s1 - a))
            out[tuple(dst)] = buf[tuple(src)]
    return out


class _ShardFile:
    """One shard file open for reading: its index (``n_entries`` rows of (offset, nbytes), None
    when the file does not exist: an all-empty shard) checked against its CRC32C, and
    :meth:`decode` of one entry into an array."""

    def __init__(self, layout: ShardLayout, k: int, n_entries: int) -> None:
        self.layout, self.path, self.n_entries = layout, layout.path(k), n_entries
        self.fd = -1
        self.index: np.ndarray | None = None

    def __enter__(self) -> "_ShardFile":
        import google_crc32c

        path = self.path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if not (self.layout.folder / "zarr.json").is_file():
                raise StoreError(f"{self.layout.folder}: the array is gone (the unit was replaced or removed); "
                                 "reopen the store", path=self.layout.folder) from None
            return self  # a shard whose every chunk is empty: zarr writes no file
        try:
            size = os.fstat(self.fd).st_size
            n_index = 16 * self.n_entries + 4
            if size < n_index:
                raise StoreError(f"{path}: shard file truncated ({size} bytes, the index alone is {n_index})",
                                 path=path)
            tail = os.pread(self.fd, n_index, size - n_index)
            if google_crc32c.value(tail[:-4]) != int.from_bytes(tail[-4:], "little"):
                raise StoreError(f"{path}: shard index fails its CRC32C (the file is damaged)", path=path)
        except BaseException:
            os.close(self.fd)
            raise
        self.chunk_bytes = size - n_index
        self.index = np.frombuffer(tail[:-4], dtype="<u8").reshape(self.n_entries, 2)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)

    def decode(self, j: int, out: np.ndarray) -> bool:
        """Decode entry ``j`` into ``out`` (C-contiguous, its exact size); False for an empty chunk."""
        assert self.index is not None
        path = self.path
        offset, nbytes = (int(v) for v in self.index[j])
        if offset == _EMPTY and nbytes == _EMPTY:
            return False
        if offset + nbytes > self.chunk_bytes or nbytes < 16:
            raise StoreError(f"{path}: chunk {j} of the shard runs outside the file "
                             f"(offset {offset}, {nbytes} bytes, {self.chunk_bytes} bytes of chunks)", path=path)
        chunk = os.pread(self.fd, nbytes, offset)
        if len(chunk) != nbytes:
            raise StoreError(f"{path}: shard file shorter than its index says", path=path)
        try:
            # the blosc header (16 bytes): version, codec version, flags, typesize, then as
            # little-endian uint32 the decoded size, the block size and the compressed size
            decoded, _block, cbytes = np.frombuffer(chunk, dtype="<u4", count=3, offset=4)
            if cbytes != nbytes:
                raise ValueError(f"its header says {cbytes} compressed bytes, the index {nbytes}")
            if decoded != out.nbytes:
                raise ValueError(f"holds {decoded} bytes, a chunk is {out.nbytes}")
            self.layout.codec._blosc().decode(chunk, out=out)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise StoreError(f"{path}: chunk {j} of the shard does not decode ({exc})", path=path) from None
        return True

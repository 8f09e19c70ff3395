"""Streaming whole-slide inference: tiles in, stitched nuclei out, memory flat.

Dimensions: T×T pixels of a model tile, O pixels of overlap, S = T - O the stride, C×C tiles of a
*chunk* (the unit of post-processing, of output and of ``--resume``), K type channels, n nuclei.

Grid. The slide region to process (whole slide, ``region`` or the ROI's bounds) is resampled to
the model's pixel size (:mod:`cellcurate.models.slide`) and covered by the same tile grid as the
in-memory :func:`cellcurate.models.predict.infer_tiled` (stride S, the last tile flush with the
edge). Tiles are grouped C×C into chunks; only tiles touching tissue (:mod:`cellcurate.models.tissue`)
run, and a chunk without such tiles is skipped.

Stitching. Inside a chunk the tiles' softmaxed outputs are blended with infer_tiled's weights, so
away from the chunk's border the maps equal the in-memory path's. Each chunk is post-processed on
its window (the bounding box of the tiles it runs) and keeps the nuclei whose centroid falls in its *core*: chunk cores partition
the region at the middle of the overlap between neighbouring tiles, and lie at least O/2 pixels
inside the window, so a nucleus narrower than O/2 + 1 px on each side of its centroid is never cut
and each nucleus is kept by exactly one chunk. With an ROI, nuclei whose centroid is outside it
are dropped.

Concurrency. A reader thread reads and resamples chunk windows into a bounded queue; the calling
thread batches tiles across chunks through the model and adds the weighted outputs into the
chunks' accumulators; a post-processing thread turns finished chunks into nuclei, writes them and
appends them to the merged outputs. At most a few chunks are alive at once, whatever the slide's
size, and when the last forward ends only the last chunk is left to post-process and merge.

Outputs (in ``out_dir``): ``<stem>.partial/`` holds ``config.json`` and one
``chunk_NNNNNN.parquet`` per finished chunk (written atomically); as chunks finish they are merged
in chunk order into ``<stem>.partial/nuclei.parquet.tmp`` (ids 1..n in that order, so a resumed run
gives the same table as an uninterrupted one; ``sinks`` such as the GeoJSON get the same tables),
which is renamed to ``<stem>_nuclei.parquet`` at the end; then the folder is removed. Table columns: ``nucleus_id``,
``centroid_x/_y``, ``bbox_x0/_y0/_x1/_y1`` (level-0 pixels, plus the ``offset``), ``area_px``,
``area_um2``, ``class_id``, ``class_name``, ``probs`` (fixed-size list of K-1 float32, the
foreground type probabilities renormalised, in the order of the schema's ``classes``),
``nucleus_prob``, ``polygon`` (WKB, level-0 pixel coordinates + offset), ``chunk``.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InputFormatError, StateError
from .postprocess import PostprocessConfig, mask_to_polygon, postprocess
from .predict import (
    _axis_starts,
    _ceil32,
    forward_tiles,
    _ramp,
    class_names_and_colors,
    model_meta,
    oom_error,
)
from .slide import Slide
from .tissue import TissueMap

#: Polygon maker: (mask (h, w) bool, offset (row, col)) -> shapely Polygon/MultiPolygon or None.
Polygonize = Callable[..., Any]
#: Label image writer: (crops, *, shape, mpp, translation, class_names, colors) -> Any, where crops
#: yields (y0, x0, instances (h, w) int32 with the table's ids, classes (h, w) uint8) blocks of the
#: region's model grid in chunk order (e.g. :func:`cellcurate.curation.omezarr.write_slide_labels`).
LabelWriter = Callable[..., Any]
#: Extra output of the merged table: (work folder, the table's ``cellcurate`` metadata) -> an
#: object with ``write(table)``, ``commit()`` and ``abort()`` (see :func:`predict_slide`).
SinkFactory = Callable[[Path, dict[str, Any]], Any]
_DONE = object()


@dataclass(frozen=True)
class SlideOptions:
    """Knobs of :func:`predict_slide` (saved in ``config.json``; a resume needs the same)."""

    tile: int = 256
    overlap: int = 64
    batch_size: int = 8
    chunk_tiles: int = 4
    offset: tuple[float, float] = (0.0, 0.0)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)

    def __post_init__(self) -> None:
        if self.tile <= 0 or self.tile % 32:
            raise ConfigError(f"tile must be a positive multiple of 32, got {self.tile}")
        if not 0 <= self.overlap < self.tile // 2 + 1 or self.overlap % 2:
            raise ConfigError(f"overlap must be even and in [0, tile/2] for slides, got {self.overlap} for tile {self.tile}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.chunk_tiles < 1:
            raise ConfigError(f"chunk_tiles must be >= 1, got {self.chunk_tiles}")


@dataclass
class Chunk:
    """One C×C block of tiles; coordinates in model pixels relative to the region's origin."""

    index: int
    window: tuple[int, int, int, int]  # y0, x0, y1, x1
    core: tuple[int, int, int, int]  # y0, x0, y1, x1
    tiles: list[tuple[int, int]]  # (y, x) starts of the tiles that run


@dataclass
class SlideResult:
    """What :func:`predict_slide` wrote."""

    nuclei_path: Path
    n_nuclei: int
    class_counts: dict[str, int]
    n_tiles: int
    n_chunks: int
    seconds: float
    resumed_chunks: int = 0
    tissue_fraction: float = 1.0
    #: ``time.perf_counter()`` when the first batch went into the model and when the last came
    #: out (None when no tile ran): what lies before and after them is the run's serial part.
    first_forward: float | None = None
    last_forward: float | None = None


def _cores(starts: list[int], side: int, size: int) -> list[int]:
    """Core boundaries between consecutive tiles (middle of their overlap): len(starts) + 1."""
    b = [0]
    for a, n in itertools.pairwise(starts):
        b.append((a + side + n) // 2)
    b.append(size)
    return b


#: Vectorised tissue test: (y0 (R, 1), x0 (1, C), y1, x1) tile boxes in model pixels,
#: region-relative, -> (R, C) bool, whether each tile touches tissue.
TouchesGrid = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def plan_chunks(
    size: tuple[int, int],
    *,
    tile: int,
    overlap: int,
    chunk_tiles: int,
    touches: Callable[[int, int, int, int], bool] | None = None,
    touches_grid: TouchesGrid | None = None,
) -> tuple[list[Chunk], tuple[int, int]]:
    """Chunks covering a (H, W) model-pixel region; ``touches(y0, x0, y1, x1)`` says whether a
    tile (model pixels, region-relative) touches tissue, ``touches_grid`` the same for the whole
    tile grid at once (:data:`TouchesGrid`; ~100x faster on a slide of 30,000 tiles). Returns the
    chunks that have tiles to run, and the tile side (th, tw) (smaller, a multiple of 32, for a
    region under one tile). A chunk's window is the bounding box of the tiles it runs, so a chunk
    on the edge of the tissue reads and post-processes only those."""
    h, w = size
    th = tile if h >= tile else _ceil32(h)
    tw = tile if w >= tile else _ceil32(w)
    stride = tile - overlap
    ys, xs = _axis_starts(max(h, th), th, stride), _axis_starts(max(w, tw), tw, stride)
    by, bx = _cores(ys, th, h), _cores(xs, tw, w)
    ya, xa = np.asarray(ys, np.int64), np.asarray(xs, np.int64)
    if touches_grid is not None:
        run = np.asarray(touches_grid(ya[:, None], xa[None, :], ya[:, None] + th, xa[None, :] + tw), bool)
        run = np.broadcast_to(run, (len(ys), len(xs)))
    elif touches is not None:
        run = np.asarray([[bool(touches(y, x, y + th, x + tw)) for x in xs] for y in ys], bool).reshape(len(ys), len(xs))
    else:
        run = np.ones((len(ys), len(xs)), bool)
    chunks: list[Any] = []
    for ci in range(0, len(ys), chunk_tiles):
        band = run[ci : ci + chunk_tiles]
        if not band.any():
            continue
        for cj in range(0, len(xs), chunk_tiles):
            sub = band[:, cj : cj + chunk_tiles]
            if not sub.any():
                continue
            ri, rj = np.nonzero(sub)
            tiles = [(ys[ci + a], xs[cj + b]) for a, b in zip(ri.tolist(), rj.tolist())]
            core = (by[ci], bx[cj], by[min(ci + chunk_tiles, len(ys))], bx[min(cj + chunk_tiles, len(xs))])
            window = (ys[ci + int(ri.min())], xs[cj + int(rj.min())], ys[ci + int(ri.max())] + th,
                      xs[cj + int(rj.max())] + tw)
            chunks.append(Chunk(len(chunks), window, core, tiles))
    return chunks, (th, tw)


def tile_filter(origin: tuple[int, int], scale: float, *, tissue: TissueMap | None = None,
                roi: Any = None) -> TouchesGrid | None:
    """The :data:`TouchesGrid` of a region whose model pixel (0, 0) is model pixel ``origin``
    (x, y) of a slide with ``scale`` model px per level-0 px: a tile runs when it touches the
    tissue map and the ROI (shapely, level-0 pixels, prepared). None when neither is given."""
    if tissue is None and roi is None:
        return None
    mx0, my0 = origin

    def grid(ty0: np.ndarray, tx0: np.ndarray, ty1: np.ndarray, tx1: np.ndarray) -> np.ndarray:
        import shapely

        bx0, by0, bx1, by1 = np.broadcast_arrays((mx0 + tx0) / scale, (my0 + ty0) / scale, (mx0 + tx1) / scale,
                                                 (my0 + ty1) / scale)
        hit = np.ones(bx0.shape, bool) if tissue is None else tissue.touches_boxes(bx0, by0, bx1, by1)
        if roi is not None:
            idx = np.nonzero(hit)
            hit[idx] = shapely.intersects(roi, shapely.box(bx0[idx], by0[idx], bx1[idx], by1[idx]))
        return hit

    return grid


# -- the run ----------------------------------------------------------------------------------


def _fingerprint(model_id: str, slide: Slide, opts: SlideOptions, extra: dict[str, Any]) -> str:
    st = slide.path.stat()
    doc = {"model": model_id, "slide": str(slide.path.resolve()), "size": st.st_size, "mtime": int(st.st_mtime),
           "mpp": slide.mpp, "options": asdict(opts), **extra}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_parquet(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, path)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then put ``tmp`` in place atomically (:func:`cellcurate.core.atomic.atomic_path`)."""
    from ..core.atomic import atomic_path

    with atomic_path(path) as tmp:
        write(tmp)


def predict_slide(
    model: Any,
    slide: Slide,
    out_dir: str | os.PathLike[str],
    stem: str,
    *,
    options: SlideOptions | None = None,
    region: tuple[int, int, int, int] | None = None,
    roi: Any = None,
    tissue: TissueMap | None = None,
    device: str | None = None,
    resume: bool = False,
    model_id: str = "",
    polygonize: Polygonize | None = None,
    labels: LabelWriter | None = None,
    sinks: Sequence[SinkFactory] = (),
    progress: bool = True,
) -> SlideResult:
    """Nuclei of a slide, streamed; see the module docstring.

    Parameters
    ----------
    model
        A model following the package contract (``model.meta["mpp"]`` is required).
    slide
        An open :class:`~cellcurate.models.slide.Slide`.
    region
        (x, y, w, h) level-0 box whose nuclei (by centroid) are wanted (default: the ROI's
        bounds, else the whole slide); a margin of ``max(overlap, 32)`` model pixels around it
        is read too, so that nuclei on its edge are whole.
    roi
        shapely geometry in level-0 pixels; only tiles touching it run, only nuclei whose
        centroid is inside it are kept.
    tissue
        Where tiles may run (default: everywhere).
    resume
        Keep the finished chunks of an earlier run with the same fingerprint (model id, slide,
        options, region, ROI, tissue); otherwise start over.
    model_id
        Identifies the model in the fingerprint (e.g. its file's hash).
    polygonize
        (mask, offset=(row, col)) -> shapely geometry; default: contours
        (:func:`cellcurate.models.postprocess.mask_to_polygon`).
    labels
        Also write a label image: each chunk keeps its nuclei's instance map
        (``labels_NNNNNN.npz`` beside its table, so ``resume`` keeps it too) and, once the table is
        merged, ``labels(crops, shape=, mpp=, translation=, class_names=, colors=)`` gets them in
        chunk order with the table's ids (see :data:`LabelWriter`); ``shape`` is the region on
        the model grid, ``mpp`` its pixel size, ``translation`` (y, x) of its pixel (0, 0) in µm
        (``offset`` included).
    sinks
        More outputs written as the table is merged: ``make(work_dir, table_meta)`` returns an
        object with ``write(table)`` (each chunk's id-numbered pyarrow table, in order),
        ``commit()`` (called once the table is in place) and ``abort()`` (on failure), e.g. a
        :class:`cellcurate.curation.qupath_slide.NucleiGeoJSONWriter` writing into ``work_dir``.
    """
    import shapely
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    opts = options or SlideOptions()
    meta = model_meta(model)
    if not meta.get("mpp"):
        raise ConfigError("the model's metadata has no pixel size (meta['mpp']); cannot place it on a slide")
    model_mpp = float(meta["mpp"])
    names, colors = class_names_and_colors(meta)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    W, H = slide.dimensions
    s = slide.scale(model_mpp)

    # region in level-0 px -> model px
    if region is None and roi is not None:
        minx, miny, maxx, maxy = roi.bounds
        region = (int(np.floor(minx)), int(np.floor(miny)), int(np.ceil(maxx - np.floor(minx))),
                  int(np.ceil(maxy - np.floor(miny))))
    if region is not None:
        x, y, w, h = region
        x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
        if w <= 0 or h <= 0 or x1 <= x0 or y1 <= y0:
            what = "ROI" if roi is not None else "region"
            raise InputFormatError(slide.path, f"the {what} ({x}, {y}, {w}x{h}) lies outside the slide ({W}x{H} px)")
        keep_box: tuple[float, float, float, float] | None = (x0, y0, x1, y1)
        # read a margin around the box so that nuclei on its edge are whole; keep them by centroid
        pad = int(np.ceil(max(opts.overlap, 32) / s))
        x0, y0, x1, y1 = max(0, x0 - pad), max(0, y0 - pad), min(W, x1 + pad), min(H, y1 + pad)
    else:
        x0, y0, x1, y1 = 0, 0, W, H
        keep_box = None
    mx0, my0 = int(np.floor(x0 * s)), int(np.floor(y0 * s))
    mx1, my1 = max(mx0 + 1, int(np.ceil(x1 * s))), max(my0 + 1, int(np.ceil(y1 * s)))
    size = (my1 - my0, mx1 - mx0)

    if roi is not None:
        shapely.prepare(roi)

    chunks, (th, tw) = plan_chunks(size, tile=opts.tile, overlap=opts.overlap, chunk_tiles=opts.chunk_tiles,
                                   touches_grid=tile_filter((mx0, my0), s, tissue=tissue, roi=roi))
    fp = _fingerprint(model_id, slide, opts, {
        "region": [x0, y0, x1, y1], "roi": None if roi is None else shapely.to_wkt(roi, rounding_precision=3),
        "tissue": None if tissue is None or tissue.mask is None else hashlib.sha256(
            np.packbits(tissue.mask).tobytes()).hexdigest(),
    })
    work = out_dir / f"{stem}.partial"
    cfg_path = work / "config.json"
    if work.exists() and not (resume and cfg_path.is_file() and json.loads(cfg_path.read_text()).get("fingerprint") == fp):
        shutil.rmtree(work)
    work.mkdir(exist_ok=True)
    # the pid of the process working on it (diagnostics; rewritten by a resuming process)
    cfg_path.write_text(json.dumps({"fingerprint": fp, "slide": str(slide.path), "n_chunks": len(chunks),
                                    "pid": os.getpid()}))
    done = {int(p.stem.split("_")[1]) for p in work.glob("chunk_*.parquet")
            if labels is None or (work / f"labels_{p.stem.split('_')[1]}.npz").is_file()}
    todo = [c for c in chunks if c.index not in done]

    schema = _schema(names, colors, slide, model_mpp, opts)
    poly_fn = polygonize or _contour_polygon
    inv = 1.0 / s
    ox, oy = opts.offset

    # -- threads ------------------------------------------------------------------------------
    read_q: queue.Queue[Any] = queue.Queue(maxsize=2)
    post_q: queue.Queue[Any] = queue.Queue(maxsize=2)
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for c in todo:
                if stop.is_set():
                    return
                wy0, wx0, wy1, wx1 = c.window
                img = slide.read_model_region(mx0 + wx0, my0 + wy0, wx1 - wx0, wy1 - wy0, model_mpp=model_mpp)
                _put(read_q, (c, img), stop)
            _put(read_q, _DONE, stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)
            _put(read_q, _DONE, stop)

    final = out_dir / f"{stem}_nuclei.parquet"
    merger = _Merger(final, work, schema, chunks, done, names,
                     [make(work, json.loads(schema.metadata[b"cellcurate"])) for make in sinks])

    def post_worker() -> None:
        try:
            merger.flush()  # the finished chunks of an earlier run that come first
            while True:
                item = post_q.get()
                if item is _DONE:
                    merger.flush()
                    return
                c, acc = item
                try:
                    table, crop = _chunk_table(c, acc, opts, names, schema, (mx0, my0), inv, (ox, oy), roi, poly_fn,
                                               slide.mpp, keep_box)
                except MemoryError as exc:
                    h, w = acc["w"].shape
                    raise oom_error(exc, f"post-processing a chunk of {w}x{h} px (lower --chunk-tiles)") from None
                if labels is not None:  # before the table: the table marks the chunk done
                    _atomic_write(work / f"labels_{c.index:06d}.npz", functools.partial(_write_crop, crop))
                _atomic_write(work / f"chunk_{c.index:06d}.parquet", functools.partial(_write_parquet, table))
                merger.add(c.index, table)
                bar.update(1)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            stop.set()
            while post_q.get() is not _DONE:  # drain so the producer never blocks
                pass

    bar = tqdm(total=len(chunks), initial=len(chunks) - len(todo), desc=f"{stem}", unit="chunk",
               disable=None if progress else True)
    t_reader = threading.Thread(target=reader, name="slide-reader", daemon=True)
    t_post = threading.Thread(target=post_worker, name="slide-post", daemon=True)
    t_reader.start()
    t_post.start()
    n_tiles = 0
    clock: dict[str, float] = {}
    try:
        n_tiles = _forward_loop(model, read_q, post_q, opts, (th, tw), device, stop, errors, clock)
    except BaseException as exc:
        errors.insert(0, exc)
    finally:
        post_q.put(_DONE)
        t_post.join()
        stop.set()
        while t_reader.is_alive():  # unblock a reader waiting on a full queue
            try:
                read_q.get_nowait()
            except queue.Empty:
                pass
            t_reader.join(0.05)
        bar.close()
    if errors:
        merger.abort()
        raise errors[0]
    try:
        merger.commit()
    except BaseException:
        merger.abort()
        raise
    counts, n, first_id = merger.counts, merger.n, merger.first_id
    if labels is not None:
        px = slide.mpp * inv  # µm per model-grid pixel (the slide's when no resampling)
        labels(_iter_crops(work, chunks, first_id), shape=size, mpp=px,
               translation=(my0 * px + oy * slide.mpp, mx0 * px + ox * slide.mpp), class_names=names, colors=colors)
    shutil.rmtree(work, ignore_errors=True)
    return SlideResult(final, n, counts, n_tiles, len(chunks), time.perf_counter() - t_start,
                       resumed_chunks=len(done & {c.index for c in chunks}),
                       tissue_fraction=1.0 if tissue is None else tissue.fraction,
                       first_forward=clock.get("first"), last_forward=clock.get("last"))


class _Merger:
    """Writes chunk tables into the final table in chunk order as they come (ids 1..n in that
    order), so that only the last chunk is left to merge when the forward ends. The file grows in
    the work folder and is renamed into place by :meth:`commit`; ``sinks`` get each id-numbered
    table too and are committed after it."""

    def __init__(self, final: Path, work: Path, schema: Any, chunks: list[Chunk], done: set[int],
                 names: list[str], sinks: list[Any]) -> None:
        import pyarrow.parquet as pq

        self.final, self.work, self.schema, self.chunks, self.done = final, work, schema, chunks, done
        self.sinks = sinks
        self.tmp = work / "nuclei.parquet.tmp"
        self.writer: Any = pq.ParquetWriter(self.tmp, schema)
        self.counts = dict.fromkeys(names, 0)
        self.n = 0
        self.first_id: dict[int, int] = {}  # chunk index -> its first nucleus id - 1
        self.pos = 0
        self.fresh: dict[int, Any] = {}

    def add(self, index: int, table: Any) -> None:
        self.fresh[index] = table
        self.flush()

    def flush(self) -> None:
        """Write every chunk whose table is at hand, in order, up to the first that is not."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        while self.pos < len(self.chunks):
            c = self.chunks[self.pos]
            if c.index in self.fresh:
                t = self.fresh.pop(c.index)
            elif c.index in self.done:
                t = pq.read_table(self.work / f"chunk_{c.index:06d}.parquet", schema=self.schema)
            else:
                return
            self.pos += 1
            if t.num_rows == 0:
                continue
            self.first_id[c.index] = self.n
            t = t.set_column(0, "nucleus_id", pa.array(np.arange(self.n + 1, self.n + 1 + t.num_rows, dtype=np.int64)))
            for name, k in zip(*np.unique(t.column("class_name").to_numpy(zero_copy_only=False), return_counts=True)):
                self.counts[str(name)] += int(k)
            self.n += t.num_rows
            self.writer.write_table(t)
            for sink in self.sinks:
                sink.write(t)

    def commit(self) -> None:
        from ..core.atomic import fsync_dir, fsync_file

        self.flush()
        if self.pos < len(self.chunks):
            missing = [c.index for c in self.chunks[self.pos :] if c.index not in self.done][:5]
            raise StateError(f"{self.work}: chunks {missing} have no output; rerun with --resume")
        self.writer.close()
        fsync_file(self.tmp)
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
        for sink in self.sinks:
            sink.commit()

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:  # noqa: BLE001 - best effort on the error path
            pass
        for sink in self.sinks:
            sink.abort()


def _write_crop(crop: tuple[int, int, np.ndarray, np.ndarray] | None, path: Path) -> None:
    """A chunk's label crop (region-grid origin, chunk-local ids 1..k in table order, classes)."""
    y0, x0, ins, cls = crop if crop is not None else (0, 0, np.zeros((0, 0), np.int32), np.zeros((0, 0), np.uint8))
    with open(path, "wb") as fh:
        np.savez_compressed(fh, origin=np.asarray([y0, x0], np.int64), instances=ins, classes=cls)


def _iter_crops(work: Path, chunks: list[Chunk], first_id: dict[int, int]) -> Iterator[Any]:
    """The chunks' label crops in chunk order, with the merged table's ids."""
    for c in chunks:
        if c.index not in first_id:
            continue
        with np.load(work / f"labels_{c.index:06d}.npz") as z:
            (y0, x0), ins, cls = z["origin"], z["instances"], z["classes"]
        if ins.size:
            yield int(y0), int(x0), np.where(ins > 0, ins + first_id[c.index], 0).astype(np.int32), cls


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _forward_loop(model: Any, read_q: queue.Queue[Any], post_q: queue.Queue[Any], opts: SlideOptions,
                  tile_hw: tuple[int, int], device: str | None, stop: threading.Event,
                  errors: list[BaseException], clock: dict[str, float] | None = None) -> int:
    """Batch tiles across chunks through the model; hand finished chunks to ``post_q``;
    ``clock`` gets the perf_counter of the first forward's start and the last one's end."""
    clock = {} if clock is None else clock
    import torch

    th, tw = tile_hw
    window = np.outer(_ramp(th, opts.overlap), _ramp(tw, opts.overlap)).astype(np.float32)
    window_t = torch.from_numpy(window)
    if device is None:
        params = list(model.parameters()) if hasattr(model, "parameters") else []
        device = str(params[0].device) if params else "cpu"
    if hasattr(model, "eval"):
        model.eval()
    pending: list[tuple[Any, int, int, np.ndarray]] = []  # (state, y, x, tile image)
    states: dict[int, dict[str, Any]] = {}
    exhausted = False
    n_tiles = 0

    def pull() -> None:
        nonlocal exhausted
        while not exhausted and len(pending) < opts.batch_size:
            if errors or stop.is_set():
                exhausted = True
                return
            try:
                item = read_q.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _DONE:
                exhausted = True
                return
            c, img = item
            wy0, wx0, wy1, wx1 = c.window
            st = {"chunk": c, "left": len(c.tiles), "acc": None, "shape": (wy1 - wy0, wx1 - wx0)}
            states[c.index] = st
            for y, x in c.tiles:
                pending.append((st, y - wy0, x - wx0, img[y - wy0 : y - wy0 + th, x - wx0 : x - wx0 + tw]))

    with torch.inference_mode():
        while True:
            pull()
            if not pending or errors:
                return n_tiles
            batch, pending[:] = pending[: opts.batch_size], pending[opts.batch_size :]
            arr = np.stack([b[3] for b in batch])
            clock.setdefault("first", time.perf_counter())
            p_np, p_hv, p_tp = forward_tiles(model, arr, device)
            clock["last"] = time.perf_counter()
            n_tiles += len(batch)
            # one (B, 3 + K, h, w) block, weighted in place and added tile by tile into the chunk's
            # (3 + K, H, W) accumulator, with torch's threads (the same float32 products and sums)
            k = p_tp.shape[1]
            out_t = torch.cat([torch.from_numpy(p_np)[:, None], torch.from_numpy(p_hv), torch.from_numpy(p_tp)], 1)
            out_t.mul_(window_t)
            for i, (st, y, x, _img) in enumerate(batch):
                if st["acc"] is None:
                    h, w = st["shape"]
                    maps = np.zeros((3 + k, h, w), np.float32)
                    st["acc"] = {"np": maps[0], "hv": maps[1:3], "tp": maps[3:], "w": np.zeros((h, w), np.float32)}
                    st["maps"] = torch.from_numpy(maps)
                acc = st["acc"]
                st["maps"][:, y : y + th, x : x + tw].add_(out_t[i])
                acc["w"][y : y + th, x : x + tw] += window
                st["left"] -= 1
                if st["left"] == 0:
                    del states[st["chunk"].index]
                    while True:
                        if errors:
                            return n_tiles
                        try:
                            post_q.put((st["chunk"], acc), timeout=0.1)
                            break
                        except queue.Full:
                            continue


def _contour_polygon(mask: np.ndarray, *, offset: tuple[int, int] = (0, 0)) -> Any:
    import shapely

    xy = mask_to_polygon(mask, offset=offset, tolerance=0.0)
    return shapely.Polygon(xy) if len(xy) >= 4 else None


def _schema(names: list[str], colors: list[str], slide: Slide, model_mpp: float, opts: SlideOptions) -> Any:
    import pyarrow as pa

    k = len(names)
    fields = [
        ("nucleus_id", pa.int64()), ("centroid_x", pa.float64()), ("centroid_y", pa.float64()),
        ("bbox_x0", pa.float64()), ("bbox_y0", pa.float64()), ("bbox_x1", pa.float64()), ("bbox_y1", pa.float64()),
        ("area_px", pa.float64()), ("area_um2", pa.float64()), ("class_id", pa.int16()), ("class_name", pa.string()),
        ("probs", pa.list_(pa.float32(), k)), ("nucleus_prob", pa.float32()), ("polygon", pa.binary()),
        ("chunk", pa.int32()),
    ]
    meta = {"classes": names, "colors": colors, "slide": str(slide.path), "slide_mpp": slide.mpp,
            "model_mpp": model_mpp, "offset": list(opts.offset), "coordinates": "level-0 pixels + offset"}
    return pa.schema(fields, metadata={b"cellcurate": json.dumps(meta).encode()})


def _chunk_table(c: Chunk, acc: dict[str, np.ndarray], opts: SlideOptions, names: list[str], schema: Any,
                 origin: tuple[int, int], inv: float, offset: tuple[float, float], roi: Any,
                 poly_fn: Polygonize, slide_mpp: float,
                 keep_box: tuple[float, float, float, float] | None) -> tuple[Any, Any]:
    """Post-process one chunk: the nuclei it keeps as a pyarrow table, and their label crop
    ``(y0, x0, instances, classes)`` (region model-grid origin; ids 1..k in table order), or None."""
    import pyarrow as pa
    import shapely
    from scipy import ndimage as ndi

    if acc["tp"].shape[0] != len(names) + 1:
        raise ConfigError(f"model has {acc['tp'].shape[0]} type channels but its metadata names {len(names)} classes")
    wgt = acc["w"]
    covered = wgt > 0
    safe = np.where(covered, wgt, np.float32(1.0))
    p_np = np.where(covered, acc["np"] / safe, np.float32(0.0)).astype(np.float32, copy=False)
    empty = pa.Table.from_pylist([], schema=schema)
    if not (p_np >= opts.postprocess.threshold).any():
        return empty, None  # no foreground pixel: postprocess finds no nucleus; skip the other maps
    hv = (acc["hv"] / safe).astype(np.float32, copy=False)
    tp = (acc["tp"] / safe).astype(np.float32, copy=False)
    tp[0][~covered] = 1.0
    post = postprocess(p_np, hv, tp, config=opts.postprocess)
    inst, n = post.instances, post.n
    if n == 0:
        return empty, None
    wy0, wx0 = c.window[0], c.window[1]
    flat = inst.ravel()
    rows, cols = np.indices(inst.shape)
    area = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
    cy = np.bincount(flat, weights=rows.ravel(), minlength=n + 1)[1:] / area + 0.5 + wy0
    cx = np.bincount(flat, weights=cols.ravel(), minlength=n + 1)[1:] / area + 0.5 + wx0
    y0c, x0c, y1c, x1c = c.core
    keep = (cy >= y0c) & (cy < y1c) & (cx >= x0c) & (cx < x1c)
    mx0, my0 = origin
    gx, gy = (cx + mx0) * inv, (cy + my0) * inv  # level-0
    if keep_box is not None:
        keep &= (gx >= keep_box[0]) & (gx < keep_box[2]) & (gy >= keep_box[1]) & (gy < keep_box[3])
    if roi is not None:
        keep &= shapely.contains_xy(roi, gx, gy)
    idx = np.flatnonzero(keep)
    if not len(idx):
        return empty, None
    boxes = ndi.find_objects(inst, max_label=n)
    polys, bb = [], []
    ox, oy = offset
    for i in idx:
        box = boxes[i]
        geom = poly_fn(inst[box] == i + 1, offset=(box[0].start + wy0 + my0, box[1].start + wx0 + mx0))
        if geom is not None and inv != 1.0:
            geom = shapely.affinity.scale(geom, xfact=inv, yfact=inv, origin=(0, 0))
        if geom is not None and (ox or oy):
            geom = shapely.affinity.translate(geom, ox, oy)
        polys.append(geom)
        bb.append(geom.bounds if geom is not None else (np.nan,) * 4)
    ok = np.asarray([p is not None for p in polys], bool)
    idx = idx[ok]
    polys = [p for p in polys if p is not None]
    bb_arr = np.asarray([b for b, o in zip(bb, ok) if o], np.float64).reshape(-1, 4)
    probs = post.probs[idx].astype(np.float64)
    fg = probs[:, 1:] / np.maximum(probs[:, 1:].sum(axis=1, keepdims=True), 1e-12)
    cls = post.classes[idx]
    a0 = area[idx] * inv * inv
    k = len(names)
    data = {
        "nucleus_id": np.zeros(len(idx), np.int64),
        "centroid_x": gx[idx] + ox, "centroid_y": gy[idx] + oy,
        "bbox_x0": bb_arr[:, 0], "bbox_y0": bb_arr[:, 1], "bbox_x1": bb_arr[:, 2], "bbox_y1": bb_arr[:, 3],
        "area_px": a0, "area_um2": a0 * slide_mpp * slide_mpp,
        "class_id": cls.astype(np.int16), "class_name": np.asarray(names, object)[cls - 1],
        "probs": pa.FixedSizeListArray.from_arrays(pa.array(fg.astype(np.float32).ravel()), k),
        "nucleus_prob": (1.0 - probs[:, 0]).astype(np.float32),
        "polygon": shapely.to_wkb(np.asarray(polys, dtype=object)),
        "chunk": np.full(len(idx), c.index, np.int32),
    }
    table = pa.Table.from_pydict({f.name: data[f.name] for f in schema}, schema=schema)
    # label crop: the kept nuclei's pixels over their union bounding box, ids in table order
    by0 = min(boxes[i][0].start for i in idx)
    bx0 = min(boxes[i][1].start for i in idx)
    by1 = max(boxes[i][0].stop for i in idx)
    bx1 = max(boxes[i][1].stop for i in idx)
    lut = np.zeros(n + 1, np.int32)
    lut[idx + 1] = np.arange(1, len(idx) + 1, dtype=np.int32)
    ins = lut[inst[by0:by1, bx0:bx1]]
    cls_lut = np.zeros(len(idx) + 1, np.uint8)
    cls_lut[1:] = cls
    return table, (by0 + wy0, bx0 + wx0, ins, cls_lut[ins])


def iter_nuclei(path: str | os.PathLike[str], *, batch_size: int = 10_000) -> Iterator[Any]:
    """Record batches (pyarrow) of a ``<stem>_nuclei.parquet`` table, for streaming writers."""
    import pyarrow.parquet as pq

    yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size)


def table_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``cellcurate`` schema metadata of a nucleus table (classes, colours, pixel sizes)."""
    import pyarrow.parquet as pq

    md = pq.read_schema(path).metadata or {}
    return json.loads(md.get(b"cellcurate", b"{}"))

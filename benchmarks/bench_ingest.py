"""Ingest benchmarks (issues 2 and 16), each against a baseline measured in the same run.

* PanNuke ingest of generated folds (default 1,000 and 2,000 tiles) with ``--jobs 1`` and
  ``--jobs 2`` (``--jobs``): wall time divided by the time to read the same raw .npy files once
  (the I/O floor), with a warm page cache and a cold one, and the peak RSS of the ingest process
  and of its largest worker (target: ratio <= 3 warm, RSS < 1 GiB whatever the fold size).
  "Cold" drops the input files from the page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)``
  (no root needed; ``/proc/sys/vm/drop_caches`` is not used), before the raw read and again before
  the ingest.
* MoNuSAC ingest: nuclei per second with each ``--jobs``; baseline: parsing + rasterising alone in
  one process, no store writes.
* XML parsing: defusedxml (the careful path) against the fast path (byte pre-scan + lxml) on the
  MoNuSAC-format sample and on the real MoNuSeg Aperio XML fixtures, when present.
* Random access: median time to read one image + its instance map from the store (target <= 5 ms),
  against reading the same tile from the raw memmaps, and against the same tiles read through
  zarr's own indexing (what ``Store.read`` used before the direct shard read).
* Floors (``floors``): what each step of a PanNuke ingest costs per tile on its own, in one
  process, on the first (smallest) fold size, as a multiple of the raw read of a tile: the fingerprints (v2 sha256,
  v3 xxh3, BLAKE3 when installed), reading + conversion of 64-tile blocks as ingest runs it (v3
  hashing, masks, geometry, ids; beside it, in parentheses, the tile-by-tile path it replaced),
  compression into the stored chunks, shard files, tables + ledger commit, and interpreter start +
  imports. Where the warm ratio stays above 3, this says which step sets the floor.

    python benchmarks/bench_ingest.py [--tiles 1000 2000] [--jobs 1 2] [--workdir /tmp/cc-bench] [--keep]
        [--parts pannuke,floors,monusac,xml,access]

The default run (the issue 16 figures) writes ~14 GB of generated .npy under the work folder
(the 2,000-tile fold is 9.4 GB: warm rows need it in the page cache, 24 GB of RAM is enough).

Each ingest runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own; each row prints
the 1-minute load average (the machine is shared: with other work running, the gain of a second
job is understated).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, resource, sys, time
from cellcurate.datasets.store import Store
from cellcurate.datasets.ingest import ingest_pannuke, ingest_monusac
src, store, kind, jobs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t = time.perf_counter()
with Store.create(store) as s:
    res = (ingest_pannuke if kind == "pannuke" else ingest_monusac)(s, src, progress=False, jobs=jobs)
wall = time.perf_counter() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB, the largest reaped worker
print(json.dumps({"wall": wall, "images": res.n_images, "nuclei": res.n_nuclei, "peak_rss_mib": int(hwm) / 1024,
                  "worker_rss_mib": worker / 1024}))
"""


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def raw_read(fold: Path, block: int = 64) -> float:
    """Read images.npy and masks.npy once, block by block (the I/O floor)."""
    t = time.perf_counter()
    for name in ("images/fold1/images.npy", "masks/fold1/masks.npy"):
        arr = np.load(fold / name, mmap_mode="r")
        for s in range(0, arr.shape[0], block):
            np.asarray(arr[s : s + block]).sum()
    return time.perf_counter() - t


def evict(folder: Path) -> None:
    """Drop a folder's files from the page cache (cold-cache measurements; no root needed)."""
    import os

    for f in folder.rglob("*.npy"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_child(src: Path, store: Path, kind: str, jobs: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(store), kind, str(jobs)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def xml_timings(files: list[Path]) -> list[tuple[str, int, float, float, float, float]]:
    """(name, bytes, defusedxml ms, fast ms, careful full parse ms, fast full parse ms) per file,
    best of 5; "full" = our region parser (parse_regions / parse_annotation_xml) on top."""
    import defusedxml.ElementTree as DET

    import cellcurate.datasets.monusac as M
    from cellcurate.datasets import monuseg
    from cellcurate.datasets.records import IngestReport

    def best(fn, k: int = 5) -> float:
        ts = []
        for _ in range(k):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts) * 1e3

    def timings(f: Path) -> tuple[float, float, float, float]:
        data = f.read_bytes()

        def full() -> None:
            monuseg.parse_regions(f, IngestReport()) if "MoNuSeg" in str(f) else M.parse_annotation_xml(f)

        careful = best(lambda: DET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True))
        fast = best(lambda: M.parse_xml_bytes(data, f))
        fast_full = best(full)
        real = M._fast_parser
        M._fast_parser = lambda: None  # every document through defusedxml: the path before issue 16
        try:
            careful_full = best(full)
        finally:
            M._fast_parser = real
        return careful, fast, careful_full, fast_full

    out = []
    for f in files:
        careful, fast, careful_full, fast_full = timings(f)
        out.append((f.name, f.stat().st_size, careful, fast, careful_full, fast_full))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--parts", default="pannuke,floors,monusac,xml,access",
                    help="sections to run (access needs pannuke and monusac)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    from cellcurate.datasets.synthetic import write_monusac

    work = args.workdir or Path(tempfile.mkdtemp(prefix="cc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir {work}; {len(os.sched_getaffinity(0))} usable cores; cold = posix_fadvise(DONTNEED) on the "
          "input files (no root)")
    last_store = None
    if "pannuke" in parts:
        last_store = bench_pannuke(work, args.tiles, args.jobs)
    msrc = work / "monusac"
    mstore = work / "store-monusac"
    if ("monusac" in parts or "xml" in parts) and not msrc.exists():
        write_monusac(msrc, train_patients=12, test_patients=4, images_per_patient=(2, 3), seed=2,
                      image_size=(600, 1200))
    if "monusac" in parts:
        bench_monusac(msrc, mstore, args.jobs)
    if "xml" in parts:
        bench_xml(msrc)
    if "floors" in parts:
        bench_floors(work, args.tiles[0])
    if "access" in parts and last_store is not None and mstore.exists():
        bench_access(last_store, mstore, work / f"pannuke-{args.tiles[-1]}" / "Fold 1")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


def bench_pannuke(work: Path, tiles: list[int], jobs_list: list[int]) -> Path | None:
    from cellcurate.datasets.synthetic import write_pannuke

    print("\nPanNuke ingest vs one raw read of the same .npy files (the I/O floor)")
    print(f"{'tiles':>6} {'cache':>5} {'jobs':>4} {'raw s':>7} {'ingest s':>9} {'ratio':>6} {'tiles/s':>8} "
          f"{'RSS MiB':>8} {'worker MiB':>10} {'load':>5}   targets: warm ratio <= 3, RSS < 1024 whatever the size")
    last_store = None
    for n in tiles:
        src = work / f"pannuke-{n}"
        if not src.exists():
            write_pannuke(src, tiles_per_fold=(n, 0, 0), seed=1, unique_tiles=32)
        fold = src / "Fold 1"
        for cache in ("warm", "cold"):
            for jobs in jobs_list:
                if cache == "cold":
                    evict(fold)
                    raw = raw_read(fold)
                    evict(fold)
                else:
                    raw_read(fold)
                    raw = min(raw_read(fold) for _ in range(2))
                store = work / f"store-{n}"
                shutil.rmtree(store, ignore_errors=True)
                r = run_child(fold, store, "pannuke", jobs)
                print(f"{n:>6} {cache:>5} {jobs:>4} {raw:>7.2f} {r['wall']:>9.2f} {r['wall'] / raw:>6.2f} "
                      f"{n / r['wall']:>8.0f} {r['peak_rss_mib']:>8.0f} {r['worker_rss_mib']:>10.0f} {load():>5}",
                      flush=True)
        last_store = store
    return last_store


def bench_floors(work: Path, n: int, sample: int = 256) -> None:
    """Per-tile cost of each ingest step on its own (module doc), on the ``n``-tile fold."""
    import hashlib
    import tempfile

    from cellcurate.datasets import pannuke as pn
    from cellcurate.datasets.ingest import ingest_pannuke
    from cellcurate.datasets.records import IngestReport
    from cellcurate.datasets.shards import shard_layout, write_shard
    from cellcurate.datasets.store import Store, UnitWriter, convert_image, encode_converted
    from cellcurate.datasets.taxonomy import Taxonomy

    src = work / f"pannuke-{n}"
    if not src.exists():
        from cellcurate.datasets.synthetic import write_pannuke

        write_pannuke(src, tiles_per_fold=(n, 0, 0), seed=1, unique_tiles=32)
    fold_dir = src / "Fold 1"
    (fold,) = pn.discover_pannuke(fold_dir)
    arrays = pn.open_fold(fold)
    m = min(sample, arrays.n)
    raw_read(fold_dir)
    raw = min(raw_read(fold_dir) for _ in range(2)) / arrays.n

    def per_tile(fn, count: int, k: int = 2) -> float:
        best = float("inf")
        for _ in range(k):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best / count

    rows: list[tuple[str, float]] = []
    rows.append(("fingerprint v2 (sha256, whole fold)", per_tile(lambda: pn.fold_fingerprint_v2(fold), arrays.n, 1)))
    rows.append(("fingerprint v3 (xxh3, on its own)", per_tile(lambda: pn.fold_fingerprint(fold), arrays.n)))
    try:
        import blake3  # type: ignore[import-not-found]

        def b3() -> None:
            h = blake3.blake3()
            for path in (fold.images, fold.masks):
                with open(path, "rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
        rows.append(("  (BLAKE3 of the same files, not used)", per_tile(b3, arrays.n, 1)))
    except ImportError:
        pass
    tax, cache = Taxonomy.default(), {}
    conv: list = []

    def blocks() -> None:  # what an ingest part runs: read, hash (v3), check, convert, geometry, ids
        conv[:] = [c for s in range(0, m, pn.BLOCK_TILES) for c in pn.convert_pannuke_tiles(
            arrays, s, min(s + pn.BLOCK_TILES, m), source="pannuke", taxonomy=tax, cache=cache, blocks=[])]
    rows.append(("read + convert, 64-tile blocks (hash, geometry, ids)", per_tile(blocks, m)))
    items: list = []
    rows.append(("  (tile by tile, before: read + masks + tables)", per_tile(
        lambda: items.__setitem__(slice(None), list(pn.iter_pannuke_fold(arrays, stop=m, report=IngestReport()))), m)))
    rows.append(("  (tile by tile, before: convert_image)", per_tile(
        lambda: [convert_image(x, source="pannuke", taxonomy=tax, cache=cache) for x in items], m)))
    enc: list = []
    rows.append(("compress into stored chunks (blosc lz4-1)", per_tile(
        lambda: enc.__setitem__(slice(None), [encode_converted(c) for c in conv]), m)))
    codec_rows = codec_comparison([(c.image, c.instances) for c in conv], per_tile, m)
    rows.append(("  (zstd-1, the codec before: same bit/byte shuffle)", codec_rows["zstd"][0]))
    import zarr

    with tempfile.TemporaryDirectory(dir=work) as tmp:
        g = zarr.open_group(tmp, mode="w", zarr_format=3)
        from zarr.codecs import BloscCodec

        from cellcurate.datasets.store import IMAGES_BLOSC
        a = g.create_array("images", shape=(m, 256, 256, 3), dtype="uint8", chunks=(1, 256, 256, 3),
                           shards=(64, 256, 256, 3), compressors=[BloscCodec(**IMAGES_BLOSC)], fill_value=0)
        lay = shard_layout(a, Path(tmp) / "images")
        assert lay is not None

        def shards() -> None:
            for k, s in enumerate(range(0, m, 64)):
                write_shard(lay, k, [c.chunks[0] for c in enc[s : s + 64]])
                write_shard(lay, k, [c.chunks[1] for c in enc[s : s + 64]])
        rows.append(("shard files (assemble + write)", per_tile(shards, m)))
    spent: dict[str, float] = {"prepare": 0.0, "commit": 0.0}

    def timed(name: str, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t
        return wrapper

    prepare, commit = UnitWriter.prepare, Store.commit
    UnitWriter.prepare, Store.commit = timed("prepare", prepare), timed("commit", commit)  # type: ignore[method-assign]
    try:
        store = work / "store-floors"
        shutil.rmtree(store, ignore_errors=True)
        with Store.create(store) as st:
            ingest_pannuke(st, fold_dir, progress=False, jobs=1)
        nuclei = len(pq_rows(store))
    finally:
        UnitWriter.prepare, Store.commit = prepare, commit  # type: ignore[method-assign]
        shutil.rmtree(work / "store-floors", ignore_errors=True)
    rows.append((f"tables + parquet + fsync ({nuclei / arrays.n:.0f} nuclei/tile)", spent["prepare"] / arrays.n))
    rows.append(("ledger commit (one hash-chained event per nucleus)", spent["commit"] / arrays.n))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cellcurate.datasets.ingest, cellcurate.datasets.pannuke, zarr, "
                    "scipy.ndimage, pyarrow.parquet"], check=True)
    start = time.perf_counter() - t
    rows.append((f"interpreter start + imports ({start:.2f} s, once)", start / arrays.n))
    _ = hashlib  # (kept for readers comparing with fold_fingerprint_v2)
    print(f"\nFloors: each step on its own, one process, {n}-tile fold (per-tile steps on {m} tiles); "
          f"raw read {raw * 1e3:.3f} ms/tile (load {load()})")
    print(f"  {'step':<52} {'ms/tile':>8} {'x raw':>7}")
    for name, sec in rows:
        print(f"  {name:<52} {sec * 1e3:>8.3f} {sec / raw:>7.1f}")
    used = [sec for name, sec in rows if not name.startswith(("fingerprint v2", "  (", "fingerprint v3"))]
    total = sum(used)
    print(f"  {'sum of the steps a new fold goes through (v3 hashed in the read)':<52} {total * 1e3:>8.3f} "
          f"{total / raw:>7.1f}   on 2 cores at best ~{total / raw / 2:.1f}x; goal 3x")
    print("  stored bytes / raw uint8 + int32 bytes, images | instance maps (generated tiles; real H&E below):")
    for cname, (_, img_ratio, ins_ratio) in codec_rows.items():
        print(f"    {cname:<5} {img_ratio:.3f} | {ins_ratio:.4f}")
    real = real_tiles()
    if real:
        cmp = codec_comparison([(t, None) for t in real], per_tile, len(real))
        print(f"  real H&E fixture tiles ({len(real)} of 256x256, CoNSeP / MoNuSeg / CPM-15), images: " +
              ", ".join(f"{c} {cmp[c][0] * 1e3:.3f} ms/tile, {cmp[c][1]:.3f} of raw" for c in cmp))


def codec_comparison(pairs: list, per_tile, count: int) -> dict[str, tuple[float, float, float]]:
    """Per-tile compression time and size ratios (images, instance maps) of the stored tiles with
    the store's blosc settings and with zstd-1 (the codec before), same shuffles: ``{cname: (s per
    tile, image ratio, instance ratio)}``."""
    from dataclasses import replace

    from cellcurate.datasets.store import _chunk_codecs

    img_codec, ins_codec = _chunk_codecs()
    out = {}
    for cname in (img_codec.cname, "zstd"):
        ci, cn = replace(img_codec, cname=cname), replace(ins_codec, cname=cname)
        def enc(ci=ci, cn=cn) -> list:
            return [(ci.encode(a), None if b is None else cn.encode(b)) for a, b in pairs]
        sec = per_tile(enc, count)
        coded = enc()
        img = sum(len(a or b"") for a, _ in coded) / sum(a.nbytes for a, _ in pairs)
        ins = (sum(len(b or b"") for _, b in coded) / sum(b.nbytes for _, b in pairs)) if pairs[0][1] is not None else 0.0
        out[cname] = (sec, img, ins)
    return out


def real_tiles() -> list:
    """256x256 RGB tiles cut from the real H&E fixtures (../shared/fixtures/real), when present."""
    root = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "real"
    if not root.is_dir():
        return []
    from skimage.io import imread

    files = sorted(root.glob("consep/images/*")) + sorted(root.glob("monuseg/**/*.tif")) + sorted(root.glob("cpm15/*.png"))
    tiles = []
    for f in files:
        try:
            im = np.asarray(imread(f))[..., :3]
        except Exception:  # noqa: BLE001 - a fixture skimage cannot read is left out of the figure
            continue
        for y in range(0, im.shape[0] - 255, 256):
            for x in range(0, im.shape[1] - 255, 256):
                tiles.append(np.ascontiguousarray(im[y:y + 256, x:x + 256], dtype=np.uint8))
    return tiles


def pq_rows(store: Path) -> "list[int]":
    import pyarrow.parquet as pq

    return [0] * sum(pq.read_metadata(f).num_rows for f in store.glob("units/*/nuclei.parquet"))


def bench_monusac(msrc: Path, mstore: Path, jobs_list: list[int]) -> None:
    print("\nMoNuSAC ingest")
    from cellcurate.datasets.monusac import discover_monusac, read_monusac_image

    t = time.perf_counter()
    n_parse = sum(len(read_monusac_image(it).nuclei) for it in discover_monusac(msrc))
    parse = time.perf_counter() - t
    print(f"  parse+rasterise alone (one process): {parse:.2f} s = {n_parse / parse:,.0f} nuclei/s (load {load()})")
    for jobs in jobs_list:
        shutil.rmtree(mstore, ignore_errors=True)
        r = run_child(msrc, mstore, "monusac", jobs)
        print(f"  --jobs {jobs}: {r['images']} images, {r['nuclei']:,} nuclei: ingest {r['wall']:.2f} s = "
              f"{r['nuclei'] / r['wall']:,.0f} nuclei/s ({r['nuclei'] / r['wall'] / (n_parse / parse):.2f}x "
              f"parse-only); peak RSS {r['peak_rss_mib']:.0f} MiB, worker {r['worker_rss_mib']:.0f} MiB "
              f"(load {load()})", flush=True)



def bench_xml(msrc: Path) -> None:
    print("\nXML parse, best of 5 (ms): defusedxml vs fast path (pre-scan + lxml); full = our region parser")
    xmls = sorted(msrc.rglob("*.xml"))[:3]
    real = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real" / "monuseg"
    xmls += sorted(real.rglob("*.xml")) if real.is_dir() else []
    print(f"  {'file':<40} {'KiB':>6} {'defused':>8} {'fast':>7} {'x':>5} {'full before':>11} {'full now':>9} {'x':>5}")
    for name, size, careful, fast, careful_full, fast_full in xml_timings(xmls):
        print(f"  {name:<40} {size / 1024:>6.0f} {careful:>8.1f} {fast:>7.1f} {careful / fast:>5.1f} "
              f"{careful_full:>11.1f} {fast_full:>9.1f} {careful_full / fast_full:>5.1f}")
    print(f"  (load {load()})")


def bench_access(last_store: Path, mstore: Path, fold: Path) -> None:
    from cellcurate.datasets.store import Store

    print("\nRandom access: one image + instance map (median of 200 reads)")
    rng = np.random.default_rng(0)
    with Store.open(last_store) as s:
        ids = s.images()["image_id"].to_numpy()
        s.read(ids[0])
        picks = rng.integers(0, len(ids), 200)
        ts, tz = [], []
        for i in picks:  # Store.read: a stacked tile straight from its shard file (shards.read_tile)
            t = time.perf_counter()
            s.read(ids[i])
            ts.append(time.perf_counter() - t)
        for i in picks:  # the same tiles through zarr's own indexing (what Store.read did before)
            unit, _path, idx = s._image_row(ids[i])[:3]
            t = time.perf_counter()
            np.asarray(s._array(unit, "images")[idx])
            np.asarray(s._array(unit, "instances")[idx])
            tz.append(time.perf_counter() - t)
    im = np.load(fold / "images/fold1/images.npy", mmap_mode="r")
    ms = np.load(fold / "masks/fold1/masks.npy", mmap_mode="r")
    tr = []
    for i in rng.integers(0, im.shape[0], 200):
        t = time.perf_counter()
        np.asarray(im[i]).astype(np.uint8)
        np.asarray(ms[i])
        tr.append(time.perf_counter() - t)
    with Store.open(mstore) as s:
        mids = s.images()["image_id"].to_numpy()
        s.read(mids[0])
        tm, tmz = [], []
        mpicks = rng.integers(0, len(mids), 100)
        for i in mpicks:
            t = time.perf_counter()
            s.read(mids[i])
            tm.append(time.perf_counter() - t)
        for i in mpicks:
            unit, path, _idx = s._image_row(mids[i])[:3]
            t = time.perf_counter()
            np.asarray(s._array(unit, path)[...])
            np.asarray(s._array(unit, path.replace("img/", "ins/", 1))[...])
            tmz.append(time.perf_counter() - t)
    print(f"  store, PanNuke tile:   median {np.median(ts) * 1e3:.2f} ms (p95 {np.percentile(ts, 95) * 1e3:.2f})  target <= 5 ms")
    print(f"  the same through zarr: median {np.median(tz) * 1e3:.2f} ms (p95 {np.percentile(tz, 95) * 1e3:.2f}); "
          f"direct read {np.median(tz) / np.median(ts):.1f}x faster")
    print(f"  raw .npy memmap tile:  median {np.median(tr) * 1e3:.2f} ms (baseline; float64, uncompressed)")
    print(f"  store, MoNuSAC image:  median {np.median(tm) * 1e3:.2f} ms (native size, up to 1200x1200); "
          f"through zarr {np.median(tmz) * 1e3:.2f} ms, direct read {np.median(tmz) / np.median(tm):.1f}x faster")
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob('*') if f.is_file()) for p in [last_store]}
    raw_bytes = sum(f.stat().st_size for f in fold.rglob("*.npy"))
    print(f"\nstore size {sizes[last_store.name] / 2**20:,.0f} MiB for {raw_bytes / 2**20:,.0f} MiB of raw .npy")


if __name__ == "__main__":
    main()

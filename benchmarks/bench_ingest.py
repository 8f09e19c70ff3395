"""Ingest benchmarks (issue 2), each against a baseline measured in the same run.

* PanNuke ingest of generated folds (default 1,000 and 2,000 tiles): wall time divided by the time
  to read the same raw .npy files once (the I/O floor; both measured with a warm page cache), and
  the peak RSS of the ingest process (target < 1 GiB whatever the fold size).
* MoNuSAC ingest: nuclei per second (baseline: parsing + rasterising alone, no store writes).
* Random access: median time to read one image + its instance map from the store (target ≤ 5 ms),
  against reading the same tile from the raw memmaps.

    python benchmarks/bench_ingest.py [--tiles 1000 2000] [--workdir /tmp/cc-bench] [--keep]

Each ingest runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, time
from cellcurate.datasets.store import Store
from cellcurate.datasets.ingest import ingest_pannuke, ingest_monusac
src, store, kind = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.perf_counter()
with Store.create(store) as s:
    res = (ingest_pannuke if kind == "pannuke" else ingest_monusac)(s, src, progress=False)
wall = time.perf_counter() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"wall": wall, "images": res.n_images, "nuclei": res.n_nuclei, "peak_rss_mib": int(hwm) / 1024}))
"""


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


def run_child(src: Path, store: Path, kind: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(store), kind],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    from cellcurate.datasets.store import Store
    from cellcurate.datasets.synthetic import write_monusac, write_pannuke

    work = args.workdir or Path(tempfile.mkdtemp(prefix="cc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir {work}")
    print("\nPanNuke ingest vs one raw read of the same .npy files (the I/O floor)")
    print(f"{'tiles':>6} {'cache':>5} {'raw s':>7} {'ingest s':>9} {'ratio':>6} {'tiles/s':>8} {'peak RSS MiB':>13}"
          "   targets: ratio <= 3, RSS < 1024 whatever the size")
    last_store = None
    for n in args.tiles:
        src = work / f"pannuke-{n}"
        if not src.exists():
            write_pannuke(src, tiles_per_fold=(n, 0, 0), seed=1, unique_tiles=32)
        fold = src / "Fold 1"
        for cache in ("cold", "warm"):
            if cache == "cold":
                evict(fold)
                raw = raw_read(fold)
                evict(fold)
            else:
                raw_read(fold)
                raw = min(raw_read(fold) for _ in range(2))
            store = work / f"store-{n}"
            shutil.rmtree(store, ignore_errors=True)
            r = run_child(fold, store, "pannuke")
            print(f"{n:>6} {cache:>5} {raw:>7.2f} {r['wall']:>9.2f} {r['wall'] / raw:>6.2f} {n / r['wall']:>8.0f} "
                  f"{r['peak_rss_mib']:>13.0f}")
        last_store = store

    print("\nMoNuSAC ingest")
    msrc = work / "monusac"
    if not msrc.exists():
        write_monusac(msrc, train_patients=12, test_patients=4, images_per_patient=(2, 3), seed=2,
                      image_size=(600, 1200))
    from cellcurate.datasets.monusac import discover_monusac, read_monusac_image

    t = time.perf_counter()
    n_parse = sum(len(read_monusac_image(it).nuclei) for it in discover_monusac(msrc))
    parse = time.perf_counter() - t
    mstore = work / "store-monusac"
    shutil.rmtree(mstore, ignore_errors=True)
    r = run_child(msrc, mstore, "monusac")
    print(f"  {r['images']} images, {r['nuclei']:,} nuclei: ingest {r['wall']:.2f} s = {r['nuclei'] / r['wall']:,.0f} nuclei/s; "
          f"parse+rasterise alone {parse:.2f} s = {n_parse / parse:,.0f} nuclei/s (ratio {r['wall'] / parse:.2f}); "
          f"peak RSS {r['peak_rss_mib']:.0f} MiB")

    print("\nRandom access: one image + instance map (median of 200 reads)")
    rng = np.random.default_rng(0)
    with Store.open(last_store) as s:
        ids = s.images()["image_id"].to_numpy()
        s.read(ids[0])
        ts = []
        for i in rng.integers(0, len(ids), 200):
            t = time.perf_counter()
            s.read(ids[i])
            ts.append(time.perf_counter() - t)
    fold = work / f"pannuke-{args.tiles[-1]}" / "Fold 1"
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
        tm = []
        for i in rng.integers(0, len(mids), 100):
            t = time.perf_counter()
            s.read(mids[i])
            tm.append(time.perf_counter() - t)
    print(f"  store, PanNuke tile:   median {np.median(ts) * 1e3:.2f} ms (p95 {np.percentile(ts, 95) * 1e3:.2f})  target <= 5 ms")
    print(f"  raw .npy memmap tile:  median {np.median(tr) * 1e3:.2f} ms (baseline; float64, uncompressed)")
    print(f"  store, MoNuSAC image:  median {np.median(tm) * 1e3:.2f} ms (native size, up to 1200x1200)")
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob('*') if f.is_file()) for p in [last_store]}
    raw_bytes = sum(f.stat().st_size for f in fold.rglob("*.npy"))
    print(f"\nstore size {sizes[last_store.name] / 2**20:,.0f} MiB for {raw_bytes / 2**20:,.0f} MiB of raw .npy")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

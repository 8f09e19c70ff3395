"""Benchmark: export of a 200,000-nucleus store, and loader throughput against raw zarr reads.

Run: ``.venv/bin/python benchmarks/bench_export.py [--tiles 4000 --per-tile 50] [--out DIR]``

1. Builds a store of ``tiles`` 256x256 PanNuke-like tiles with ``per_tile`` disc nuclei each
   (default 4,000 x 50 = 200,000 nuclei) with the store writer (not timed), plus one relabeling
   round of proposals and flags (so the nuclei table carries probabilities).
2. Times ``export_release`` (wall time, peak RSS of a child process doing only the export).
3. Loader throughput, one worker, CPU: ``ReleaseDataset[i]`` over the fold1 tiles vs reading the
   same three zarr arrays raw (baseline in the same run).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def build_store(path: Path, tiles: int, per_tile: int, seed: int = 0) -> None:
    from cellcurate.datasets.records import SourceImage
    from cellcurate.datasets.store import Store

    rng = np.random.default_rng(seed)
    store = Store.create(path)
    yy, xx = np.mgrid[:256, :256]
    side = int(np.ceil(np.sqrt(per_tile)))
    step = 256 // side
    labels_pool = np.array(["Neoplastic", "Inflammatory", "Connective", "Dead", "Epithelial"])
    base_ins = np.zeros((256, 256), np.int32)
    for k in range(per_tile):
        cy, cx = step // 2 + step * (k // side), step // 2 + step * (k % side)
        base_ins[(yy - cy) ** 2 + (xx - cx) ** 2 <= (step // 2 - 2) ** 2] = k + 1
    folds = {"fold1": tiles // 3, "fold2": tiles // 3, "fold3": tiles - 2 * (tiles // 3)}
    for fold, n in folds.items():
        with store.unit_writer(f"pannuke-{fold}", "pannuke", fingerprint=fold, origin="bench",
                               stacked=(n, 256, 256)) as w:
            for i in range(n):
                img = rng.integers(150, 230, (256, 256, 3), dtype=np.uint8)
                img[base_ins > 0] //= 2
                labels = labels_pool[rng.integers(0, 5, per_tile)]
                nuc = pd.DataFrame({"instance_id": np.arange(1, per_tile + 1, dtype=np.int32), "kind": "nucleus",
                                    "source_label": labels, "origin_channel": np.zeros(per_tile, np.int16),
                                    "origin_instance": np.arange(per_tile) + 1, "origin_region": ""})
                w.add(SourceImage(key=f"{fold}/{i:05d}", split=fold, image=img, instances=base_ins.copy(),
                                  nuclei=nuc, origin_file=f"{fold}/images.npy", origin_index=i))
            w.commit()
    nuc = store.nuclei()
    started = store.ledger.append([{"kind": "round", "round": 1, "actor": "relabel", "action": "started"}])[0]
    infl = nuc.loc[nuc["source_label"] == "Inflammatory", "nucleus_id"].to_numpy()
    probs = json.dumps({"probs": [0.05, 0.8, 0.05, 0.02, 0.03, 0.03, 0.02]})
    store.ledger.append(pd.DataFrame({"kind": "proposal", "round": 1, "nucleus_id": infl, "actor": "relabel:r1:m",
                                      "action": "auto_accepted", "label": 2, "score": 0.8, "ref": started,
                                      "payload": probs}))
    store.ledger.append([{"kind": "round", "round": 1, "actor": "relabel", "action": "finished", "ref": started}])
    store.close()


def export_child(store_path: str, out: str) -> None:
    from cellcurate.curation.release import export_release
    from cellcurate.datasets.store import Store

    t = time.perf_counter()
    with Store.open(store_path) as store:
        res = export_release(store, "bench", out=out, progress=False)
    wall = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "peak_rss_mib": rss, "nuclei": res.n_nuclei, "images": res.n_images,
                      "files": len(res.manifest["files"])}))


def loader_throughput(release: Path, n: int) -> dict[str, float]:
    import zarr

    from cellcurate.datasets.release import load_release

    ds = load_release(release, split="fold1")
    n = min(n, len(ds))
    _ = ds[0]
    t = time.perf_counter()
    for i in range(n):
        item = ds[i]
        assert item["image"].shape[0] == 3
    t_loader = time.perf_counter() - t
    g = zarr.open_group(str(release / "arrays.zarr"), mode="r")[ds.images.at[0, "zarr_group"]]
    a, b, c = g["image"], g["instances"], g["classes"]
    idx = ds.images["zarr_index"].to_numpy()
    _ = a[int(idx[0])]
    t = time.perf_counter()
    for i in range(n):
        k = int(idx[i])
        _x, _y, _z = a[k], b[k], c[k]
    t_raw = time.perf_counter() - t
    return {"tiles": n, "loader_tiles_per_s": n / t_loader, "raw_tiles_per_s": n / t_raw,
            "ratio": (n / t_loader) / (n / t_raw)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=4000)
    ap.add_argument("--per-tile", type=int, default=50)
    ap.add_argument("--loader-tiles", type=int, default=500)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        export_child(*args.child)
        return
    work = args.out or Path(tempfile.mkdtemp(prefix="bench_export_"))
    store = work / "store"
    t = time.perf_counter()
    build_store(store, args.tiles, args.per_tile)
    print(f"built store: {args.tiles * args.per_tile:,} nuclei in {time.perf_counter() - t:.1f} s", flush=True)
    out = subprocess.run([sys.executable, __file__, "--child", str(store), str(work / "releases")],
                         capture_output=True, text=True, check=True)
    exp = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"export: {exp['nuclei']:,} nuclei, {exp['images']:,} images, {exp['files']:,} files: "
          f"{exp['wall_s']:.1f} s wall, peak RSS {exp['peak_rss_mib']:.0f} MiB")
    thr = loader_throughput(work / "releases" / "bench", args.loader_tiles)
    print(f"loader (1 worker, CPU): {thr['loader_tiles_per_s']:.0f} tiles/s vs raw zarr "
          f"{thr['raw_tiles_per_s']:.0f} tiles/s = {thr['ratio']:.2f}x raw over {thr['tiles']} tiles")


if __name__ == "__main__":
    main()

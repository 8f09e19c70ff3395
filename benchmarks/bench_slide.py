"""Whole-slide pipeline: tiles/s against the model's forward alone, and peak RSS by slide size.

Run from the repository root::

    .venv/bin/python benchmarks/bench_slide.py                       # 2k and 8k sides, tiny student, CPU
    .venv/bin/python benchmarks/bench_slide.py --sides 2048 8192 32768 --student default --device cuda

For each side N a synthetic N×N pyramidal TIFF (0.25 µm/px, JPEG tiles) is written tile by tile
(never held in memory): an ellipse of tissue covering ~40 % of the slide, filled with stained
nuclei from the synthetic generator, on a white background. In its own spawned process (so peaks
do not mix), the slide path (:func:`cellcurate.models.wsi.predict_slide`, Otsu tissue detection,
reader thread, batched forward, post-processing thread, parquet output) runs over it, then the
model's forward alone (with the same softmax and copy to the host) runs on the first
``--forward-tiles`` of the same tiles (same batch size, read from the slide beforehand). Printed per side: tiles run, pipeline tiles/s, forward-alone tiles/s, their
ratio (goal >= 0.8) and the process's peak RSS (goal: flat in N, < 3 GiB).

The student has random weights (speed and memory do not depend on them); a random student's
maps are noise, so post-processing cost is that of noise (many small components), not of tissue.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MPP = 0.25
BLOCK = 512


def _blocks(seed: int = 0) -> list[np.ndarray]:
    from cellcurate.datasets import synthetic

    out = []
    for i in range(2):
        img, _mpp, _regions = synthetic._monusac_image(
            np.random.default_rng(seed + i), mix=np.array([1, 1, 0, 0, 1, 1, 1]) / 5.0, neo_share=0.5,
            size=(BLOCK, BLOCK), test=False, flip_fraction=0.0, floats=False)
        out.append(np.ascontiguousarray(img[:BLOCK, :BLOCK]))
    return out


def write_slide(path: Path, side: int, *, tile: int = 256) -> None:
    """An N×N pyramid written tile by tile (levels halve down to < 1024 px)."""
    import tifffile

    blocks = _blocks()

    def tiles(level: int):
        d = 2**level
        n = -(-side // d)
        small = [b[::d, ::d] for b in blocks]
        bs = small[0].shape[0]
        for ty in range(0, n, tile):
            for tx in range(0, n, tile):
                yy, xx = np.mgrid[ty : ty + tile, tx : tx + tile]
                u, v = (yy * d / side - 0.5) / 0.36, (xx * d / side - 0.5) / 0.36
                inside = u**2 + v**2 <= 1.0
                out = np.full((tile, tile, 3), 245, np.uint8)
                if inside.any():
                    b = small[((ty // bs) + (tx // bs)) % 2]
                    pat = b[yy % bs, xx % bs]
                    out[inside] = pat[inside]
                yield out

    levels = 1
    while side // 2 ** levels >= 1024:
        levels += 1
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k in range(levels):
            n = -(-side // 2**k)
            res = 1e4 / (MPP * 2**k)
            tw.write(tiles(k), shape=(n, n, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="jpeg", subfiletype=1 if k else 0, resolution=(res, res),
                     resolutionunit="CENTIMETER", metadata=None)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _student(kind: str) -> Any:
    import torch

    from cellcurate.models.student import TINY_STUDENT_CHANNELS, Student

    torch.manual_seed(0)
    return Student(channels=TINY_STUDENT_CHANNELS) if kind == "tiny" else Student()


def _run(path: str, kind: str, device: str, tile: int, batch: int, threads: int, out_dir: str, n_forward: int,
         q: Any) -> None:
    import torch

    from cellcurate.models.slide import open_slide
    from cellcurate.models.tissue import TissueMap, detect_tissue
    from cellcurate.models.wsi import SlideOptions, plan_chunks, predict_slide

    torch.set_num_threads(threads)
    model = _student(kind).to(device).eval()
    with open_slide(path) as s:
        thumb, _ = s.thumbnail(2048)
        tmap = TissueMap(detect_tissue(thumb), s.dimensions)
        opts = SlideOptions(tile=tile, batch_size=batch)
        res = predict_slide(model, s, out_dir, "bench", options=opts, tissue=tmap, device=device, progress=False)
        rss_pipeline = _rss_gib()
        # forward alone on the same tiles (read first; the first n_forward of them)
        chunks, (th, tw) = plan_chunks((s.dimensions[1], s.dimensions[0]), tile=tile, overlap=opts.overlap,
                                       chunk_tiles=opts.chunk_tiles,
                                       touches=lambda y0, x0, y1, x1: tmap.touches(x0, y0, x1, y1))
        starts = [t for c in chunks for t in c.tiles][: min(res.n_tiles, n_forward)]
        imgs = np.stack([s.read_level(x, y, tw, th, 0) for y, x in starts])
    t0 = time.perf_counter()
    done = 0
    with torch.inference_mode():
        for i in range(0, len(imgs), batch):
            b = imgs[i : i + batch]
            x = torch.from_numpy(b).to(device).permute(0, 3, 1, 2).float().div_(255.0)
            out = model(x)
            _ = [torch.softmax(out["np"].float(), 1).cpu(), out["hv"].float().cpu(),
                 torch.softmax(out["tp"].float(), 1).cpu()]
            done += len(b)
    fwd = done / (time.perf_counter() - t0)
    q.put({"tiles": res.n_tiles, "nuclei": res.n_nuclei, "pipeline_tiles_s": res.n_tiles / res.seconds,
           "forward_tiles_s": fwd, "seconds": res.seconds, "peak_rss_gib": rss_pipeline,
           "tissue_fraction": res.tissue_fraction})


def picture(out: Path, work: Path) -> None:
    """A predicted slide region with its nuclei: the slide path with an oracle model (it reads the
    nuclei encoded in the pixels, tests/wsi_synth.py) on a 1,100 × 1,300 slide in chunks of 2×2
    tiles; outlines coloured by class, chunk cores dashed, so the seams can be checked by eye."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq
    import shapely

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from wsi_synth import ContextOracle, oracle_scene

    from cellcurate.curation.qupath import mask_to_geometry
    from cellcurate.models.slide import open_slide, write_pyramid
    from cellcurate.models.wsi import SlideOptions, plan_chunks, predict_slide

    img, _inst = oracle_scene((1100, 1300), 3)
    path = work / "picture.tif"
    write_pyramid(path, img, mpp=MPP)
    model = ContextOracle()
    opts = SlideOptions(chunk_tiles=2)
    with open_slide(path) as s:
        res = predict_slide(model, s, work, "picture", options=opts, polygonize=mask_to_geometry, progress=False)
    t = pq.read_table(res.nuclei_path).to_pandas()
    meta = model.meta
    from cellcurate.models.predict import class_names_and_colors

    names, colors = class_names_and_colors(meta)
    col = dict(zip(names, colors))
    y0, y1, x0, x1 = 150, 650, 200, 800
    fig, ax = plt.subplots(figsize=(9, 7.5), dpi=110)
    ax.imshow(img[y0:y1, x0:x1, 0] > 0, cmap="Greys", alpha=0.25, extent=(x0, x1, y1, y0))
    for g, c in zip(shapely.from_wkb(t["polygon"]), t["class_name"]):
        if x0 <= g.centroid.x < x1 and y0 <= g.centroid.y < y1:
            xs, ys = g.exterior.xy
            ax.plot(xs, ys, color=col[c], lw=1.2)
    chunks, _ = plan_chunks((1100, 1300), tile=opts.tile, overlap=opts.overlap, chunk_tiles=opts.chunk_tiles)
    for c in chunks:
        cy0, cx0, cy1, cx1 = c.core
        ax.plot([cx0, cx1, cx1, cx0, cx0], [cy0, cy0, cy1, cy1, cy0], "k--", lw=0.8)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_title(f"slide path: {res.n_nuclei} nuclei in {res.n_chunks} chunks (dashed: chunk cores)")
    for n, c in col.items():
        ax.plot([], [], color=c, label=n)
    ax.legend(loc="upper right", fontsize=7, framealpha=0.9)
    ax.set_xlabel("x (level-0 px)")
    ax.set_ylabel("y (level-0 px)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"# picture -> {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--student", choices=["tiny", "default"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--forward-tiles", type=int, default=500, help="Tiles timed for the forward-alone rate.")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)))
    ap.add_argument("--workdir", type=Path, default=None, help="Where to write the slides (default: a temp folder).")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--picture", type=Path, default=None, help="Only draw the stitching picture to this PNG.")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_slide_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.picture:
        picture(args.picture, work)
        return
    print(f"# {platform.node()} {platform.machine()} python {platform.python_version()}, {os.cpu_count()} cpus, "
          f"student={args.student}, device={args.device}, tile={args.tile}, batch={args.batch_size}")
    print("| side | tiles | tissue | pipeline tiles/s | forward tiles/s | ratio | peak RSS GiB | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    ctx = mp.get_context("spawn")
    for side in args.sides:
        path = work / f"slide_{side}.tif"
        if not path.exists():
            t = time.perf_counter()
            write_slide(path, side)
            print(f"# wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.0f} s",
                  file=sys.stderr)
        q = ctx.Queue()
        p = ctx.Process(target=_run, args=(str(path), args.student, args.device, args.tile, args.batch_size,
                                           args.threads, str(work / f"out_{side}"), args.forward_tiles, q))
        p.start()
        r = q.get()
        p.join()
        r["side"] = side
        r["ratio"] = r["pipeline_tiles_s"] / r["forward_tiles_s"]
        rows.append(r)
        print(f"| {side} | {r['tiles']} | {r['tissue_fraction']:.2f} | {r['pipeline_tiles_s']:.1f} | "
              f"{r['forward_tiles_s']:.1f} | {r['ratio']:.2f} | {r['peak_rss_gib']:.2f} | {r['seconds']:.0f} |",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Whole-slide pipeline: tiles/s against the model's forward alone, and peak RSS by slide size.

Run from the repository root::

    .venv/bin/python benchmarks/bench_slide.py                                  # 2k and 8k sides
    .venv/bin/python benchmarks/bench_slide.py --sides 2048,8192,32768          # all three sides
    .venv/bin/python benchmarks/bench_slide.py --model student.pt --device cuda # a trained student

Slides. For each side N a synthetic N×N pyramidal TIFF (0.25 µm/px, JPEG tiles of 256 px, levels
halving down to < 1,024 px) is written tile by tile from a generator, never held in memory. Up to
8,192 px the tissue is one ellipse covering ~41 % of the slide; above, it is four discs of 640 px
radius (0.48 % of a 32k slide: ~230 of its ~29,000 tiles run), so tissue detection skips most of
the slide, as on a needle biopsy, and the run stays short while reading, planning, tissue
detection and outputs face the whole 32k × 32k slide.
Tissue is filled with stained nuclei from the synthetic generator, background is white.

Measurements, each in its own fresh process (so peaks do not mix):

- *pipeline*: :func:`cellcurate.cli._slidejob.run_slide` with the model already loaded: opening
  the slide, thumbnail and Otsu tissue detection, reading, batched forward, stitching,
  post-processing, the parquet table, the GeoJSON and the summary; tiles/s = tiles run / wall time.
  Its peak RSS is the process's maximum resident set size taken from outside
  (``os.wait4``), next to the RSS once torch and the model are loaded.
- *forward*: the same model's forward alone (:func:`cellcurate.models.predict.forward_tiles`: the
  softmax and the copy to the host included) over the first ``--forward-tiles`` of the same tiles,
  read from the slide beforehand, with the same batch size and threads.

Both are warmed up by one untimed batch. The two run ``--repeats`` times, interleaved (their order
alternating), and the ratio is computed per pair, so a change of machine load between them does
not decide it; the table gives medians and the range of the ratios (goal: ratio >= 0.8, peak RSS
flat in N and < 3 GiB). The *CPU ratio* is the forward's CPU seconds per tile over the pipeline's
(``time.process_time``, all threads): the extra work the pipeline adds, which is what the wall-clock
ratio tends to when other jobs saturate the cores. The load average is printed per side.
Python start-up, imports and model loading are not counted (printed on stderr). *serial start +
end* is the pipeline's time before its first forward (opening the slide, thumbnail, tissue
detection, planning, the first read) and after its last one (the last chunk's post-processing,
the merge's tail, renaming the outputs, the summary), from the slide summary's ``start_s``/``end_s``.

The default model is the tiny student with random weights (``--model PATH`` takes a trained
checkpoint folder or TorchScript file); a random student finds few nuclei, so its post-processing
is cheaper than a trained one's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MPP = 0.25
BLOCK = 512
TILE = 256
#: Tissue discs above 8,192 px: centres (y, x) as fractions of the side, radius in px.
DISCS = [(0.2, 0.25), (0.35, 0.7), (0.6, 0.4), (0.8, 0.75)]
DISC_R = 640


def _blocks(seed: int = 0) -> list[np.ndarray]:
    from cellcurate.datasets import synthetic

    out = []
    for i in range(2):
        img, _mpp, _regions = synthetic._monusac_image(
            np.random.default_rng(seed + i), mix=np.array([1, 1, 0, 0, 1, 1, 1]) / 5.0, neo_share=0.5,
            size=(BLOCK, BLOCK), test=False, flip_fraction=0.0, floats=False)
        out.append(np.ascontiguousarray(img[:BLOCK, :BLOCK]))
    return out


def _inside(side: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Tissue at level-0 pixel centres (yy, xx)."""
    if side <= 8192:
        u, v = (yy / side - 0.5) / 0.36, (xx / side - 0.5) / 0.36
        return u**2 + v**2 <= 1.0
    out = np.zeros(np.broadcast(yy, xx).shape, bool)
    for fy, fx in DISCS:
        out |= (yy - fy * side) ** 2 + (xx - fx * side) ** 2 <= DISC_R**2
    return out


def _box_may_touch(side: int, y0: int, x0: int, y1: int, x1: int) -> bool:
    if side <= 8192:
        return True
    for fy, fx in DISCS:
        cy, cx = fy * side, fx * side
        dy, dx = max(y0 - cy, 0, cy - y1), max(x0 - cx, 0, cx - x1)
        if dy * dy + dx * dx <= DISC_R**2:
            return True
    return False


def tissue_fraction(side: int) -> float:
    """Share of the slide's area that is tissue (by construction)."""
    if side <= 8192:
        return float(np.pi * 0.36**2)
    return len(DISCS) * np.pi * DISC_R**2 / side**2


def write_slide(path: Path, side: int, *, tile: int = TILE) -> None:
    """An N×N pyramid written tile by tile from generators (levels halve down to < 1,024 px)."""
    import tifffile

    blocks = _blocks()
    blank = np.full((tile, tile, 3), 245, np.uint8)

    def tiles(level: int):
        d = 2**level
        n = -(-side // d)
        small = [b[::d, ::d] for b in blocks]
        bs = small[0].shape[0]
        for ty in range(0, n, tile):
            for tx in range(0, n, tile):
                if not _box_may_touch(side, ty * d, tx * d, (ty + tile) * d, (tx + tile) * d):
                    yield blank
                    continue
                yy, xx = np.mgrid[ty : ty + tile, tx : tx + tile]
                inside = _inside(side, (yy + 0.5) * d, (xx + 0.5) * d)
                if not inside.any():
                    yield blank
                    continue
                out = blank.copy()
                b = small[((ty // bs) + (tx // bs)) % 2]
                out[inside] = b[yy % bs, xx % bs][inside]
                yield out

    levels = 1
    while side // 2**levels >= 1024:
        levels += 1
    tmp = path.with_name(path.name + ".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k in range(levels):
            n = -(-side // 2**k)
            res = 1e4 / (MPP * 2**k)
            tw.write(tiles(k), shape=(n, n, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="jpeg", subfiletype=1 if k else 0, resolution=(res, res),
                     resolutionunit="CENTIMETER", metadata=None)
    os.replace(tmp, path)


# -- the measured processes -------------------------------------------------------------------


def _rss_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def _load(model_path: str, device: str, threads: int) -> Any:
    import torch

    from cellcurate.cli._slidejob import _model

    torch.set_num_threads(threads)
    model = _model(model_path, device, None)  # cached: run_slide finds it loaded
    return model


def _warm(model: Any, device: str, batch: int) -> None:
    import torch

    from cellcurate.models.predict import forward_tiles

    with torch.inference_mode():
        forward_tiles(model, np.full((batch, TILE, TILE, 3), 200, np.uint8), device)


def _import_slide_path() -> float:
    """Import what the slide path imports lazily (a worker's second slide finds them loaded);
    returns the seconds it took (printed, not counted)."""
    t = time.perf_counter()
    import pyarrow.parquet  # noqa: F401
    import shapely  # noqa: F401
    import skimage.transform  # noqa: F401
    import tiffslide  # noqa: F401
    import tqdm.auto  # noqa: F401

    import cellcurate.curation.qupath_slide  # noqa: F401
    import cellcurate.models.postprocess  # noqa: F401
    import cellcurate.models.tissue  # noqa: F401
    import cellcurate.models.wsi  # noqa: F401
    return time.perf_counter() - t


def child_pipeline(a: argparse.Namespace) -> dict[str, Any]:
    from cellcurate.cli._slidejob import run_slide

    t = time.perf_counter()
    model = _load(a.model, a.device, a.threads)
    load_s = time.perf_counter() - t
    import_s = _import_slide_path()
    _warm(model, a.device, a.batch_size)
    rss0 = _rss_gib()
    t0, c0 = time.perf_counter(), time.process_time()
    s = run_slide(a.model, a.slide, a.out, stem="bench", device=a.device, tile=TILE, batch_size=a.batch_size,
                  resume=False, progress=False, labels_zarr="0.5" if a.labels_zarr else None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tiles": s["tiles"], "nuclei": s["nuclei"], "tissue_fraction": s["tissue_fraction"], "seconds": wall,
            "cpu_seconds": cpu, "tiles_s": s["tiles"] / wall, "rss_loaded_gib": rss0, "load_s": load_s,
            "import_s": import_s, "start_s": s.get("start_s", float("nan")), "end_s": s.get("end_s", float("nan"))}


def slide_tiles(slide: Any, tile: int, overlap: int, chunk_tiles: int) -> list[tuple[int, int]]:
    """The (y, x) starts of the tiles the pipeline runs on a slide at the model's pixel size."""
    from cellcurate.models.tissue import TissueMap, detect_tissue, detection_side
    from cellcurate.models.wsi import plan_chunks, tile_filter

    thumb, _ = slide.thumbnail(detection_side(slide.dimensions))
    tmap = TissueMap(detect_tissue(thumb), slide.dimensions)
    chunks, _ = plan_chunks((slide.dimensions[1], slide.dimensions[0]), tile=tile, overlap=overlap,
                            chunk_tiles=chunk_tiles, touches_grid=tile_filter((0, 0), 1.0, tissue=tmap))
    return [t for c in chunks for t in c.tiles]


def child_forward(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from cellcurate.models.predict import forward_tiles
    from cellcurate.models.slide import open_slide
    from cellcurate.models.wsi import SlideOptions

    model = _load(a.model, a.device, a.threads)
    opts = SlideOptions(tile=TILE, batch_size=a.batch_size)
    with open_slide(a.slide) as s:
        starts = slide_tiles(s, TILE, opts.overlap, opts.chunk_tiles)[: a.forward_tiles]
        imgs = np.stack([s.read_level(x, y, TILE, TILE, 0) for y, x in starts])
    _warm(model, a.device, a.batch_size)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for i in range(0, len(imgs), a.batch_size):
            forward_tiles(model, imgs[i : i + a.batch_size], a.device)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tiles": len(imgs), "seconds": wall, "cpu_seconds": cpu, "tiles_s": len(imgs) / wall}


def _spawn(kind: str, args: argparse.Namespace, slide: Path, out: Path) -> dict[str, Any]:
    """Run one measurement in a fresh process; its peak RSS comes from ``os.wait4``."""
    cmd = [sys.executable, __file__, "--child", kind, "--slide", str(slide), "--out", str(out), "--model", args.model,
           "--device", args.device, "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--forward-tiles", str(args.forward_tiles)] + (["--labels-zarr"] if args.labels_zarr else [])
    with tempfile.TemporaryFile() as out_fh, tempfile.TemporaryFile() as err_fh:
        proc = subprocess.Popen(cmd, stdout=out_fh, stderr=err_fh)
        _pid, status, usage = os.wait4(proc.pid, 0)  # reaps it with its own resource usage
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        out_fh.seek(0)
        err_fh.seek(0)
        stdout, stderr = out_fh.read(), err_fh.read()
    if code != 0:
        raise RuntimeError(f"{kind} on {slide} failed ({code}): {stderr.decode()[-2000:]}")
    r = json.loads(stdout.decode().strip().splitlines()[-1])
    r["peak_rss_gib"] = usage.ru_maxrss / 2**20  # KiB on Linux
    return r


def _student_file(work: Path) -> Path:
    """The tiny student with random (seeded) weights, exported to TorchScript as users run it."""
    import torch

    from cellcurate.models.export import export_torchscript
    from cellcurate.models.student import TINY_STUDENT_CHANNELS, Student

    path = work / "tiny_student.pt"
    if not path.exists():
        torch.manual_seed(0)
        export_torchscript(Student(channels=TINY_STUDENT_CHANNELS), path)
    return path


def _sides(text: str) -> list[int]:
    return [int(v) for v in text.replace(" ", ",").split(",") if v]


def measure(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    print(f"# {platform.node()} {platform.machine()} python {platform.python_version()}, {os.cpu_count()} cpus, "
          f"model={args.model}, device={args.device}, tile={TILE}, batch={args.batch_size}, threads={args.threads}, "
          f"repeats={args.repeats} (sides > 2048: {args.large_repeats})")
    print("| side | tiles run | tissue | pipeline tiles/s | forward tiles/s | ratio (range) | CPU ratio | "
          "peak RSS GiB (loaded) | pipeline s | serial start + end s | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for side in args.sides:
        path = work / f"slide_{side}.tif"
        if not path.exists():
            t = time.perf_counter()
            write_slide(path, side)
            print(f"# wrote {path} ({path.stat().st_size / 2**20:.0f} MiB, {tissue_fraction(side):.1%} tissue) in "
                  f"{time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        load0 = os.getloadavg()[0]
        pipes, fwds, ratios, cpu_ratios = [], [], [], []
        for r in range(args.large_repeats if side > 2048 else args.repeats):
            order = ("pipeline", "forward") if r % 2 == 0 else ("forward", "pipeline")
            got = {k: _spawn(k, args, path, work / f"out_{side}") for k in order}
            pipes.append(got["pipeline"])
            fwds.append(got["forward"])
            ratios.append(got["pipeline"]["tiles_s"] / got["forward"]["tiles_s"])
            p, f = got["pipeline"], got["forward"]
            cpu_ratios.append((f["cpu_seconds"] / f["tiles"]) / (p["cpu_seconds"] / p["tiles"]))
            print(f"#   {side} repeat {r}: pipeline {p['tiles_s']:.2f} tiles/s, forward {f['tiles_s']:.2f} tiles/s, "
                  f"ratio {ratios[-1]:.2f}, CPU-time ratio {cpu_ratios[-1]:.2f}, load {os.getloadavg()[0]:.1f}; "
                  f"pipeline {p['seconds']:.2f} s = {p['start_s']:.2f} s before the first forward + "
                  f"{p['end_s']:.2f} s after the last "
                  f"(not counted: imports {p['import_s']:.1f} s, model load {p['load_s']:.1f} s)",
                  file=sys.stderr, flush=True)
        load1 = os.getloadavg()[0]
        row = {"side": side, "tiles": pipes[0]["tiles"], "nuclei": pipes[0]["nuclei"],
               "tissue_fraction": pipes[0]["tissue_fraction"],
               "pipeline_tiles_s": statistics.median(p["tiles_s"] for p in pipes),
               "forward_tiles_s": statistics.median(f["tiles_s"] for f in fwds),
               "ratio": statistics.median(ratios), "ratios": ratios, "cpu_ratio": statistics.median(cpu_ratios),
               "cpu_ratios": cpu_ratios,
               "peak_rss_gib": max(p["peak_rss_gib"] for p in pipes),
               "rss_loaded_gib": max(p["rss_loaded_gib"] for p in pipes),
               "pipeline_seconds": statistics.median(p["seconds"] for p in pipes),
               "start_s": statistics.median(p["start_s"] for p in pipes),
               "end_s": statistics.median(p["end_s"] for p in pipes), "load": [load0, load1]}
        rows.append(row)
        print(f"| {side:,} | {row['tiles']} | {row['tissue_fraction']:.3f} | {row['pipeline_tiles_s']:.2f} | "
              f"{row['forward_tiles_s']:.2f} | {row['ratio']:.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
              f"{row['cpu_ratio']:.2f} | "
              f"{row['peak_rss_gib']:.2f} ({row['rss_loaded_gib']:.2f}) | {row['pipeline_seconds']:.1f} | "
              f"{row['start_s']:.2f} + {row['end_s']:.2f} | {load0:.1f}-{load1:.1f} |", flush=True)
    return rows

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
    ap.add_argument("--sides", type=_sides, default=[2048, 8192], help="Comma-separated slide sides in px.")
    ap.add_argument("--model", default=None, help="Checkpoint folder or TorchScript file (default: random tiny student).")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--forward-tiles", type=int, default=400, help="Tiles timed for the forward-alone rate.")
    ap.add_argument("--repeats", type=int, default=3, help="Interleaved pipeline/forward pairs per side <= 2048.")
    ap.add_argument("--large-repeats", type=int, default=1, help="Pairs per side > 2048 (hundreds of tiles each).")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own default).")
    ap.add_argument("--labels-zarr", action="store_true", help="The pipeline also writes the OME-Zarr label image.")
    ap.add_argument("--workdir", type=Path, default=None, help="Where to write the slides (default: a temp folder).")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--picture", type=Path, default=None, help="Only draw the stitching picture to this PNG.")
    ap.add_argument("--child", choices=["pipeline", "forward"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--slide", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads is None:
        import torch

        args.threads = torch.get_num_threads()
    if args.child:
        result = child_pipeline(args) if args.child == "pipeline" else child_forward(args)
        print(json.dumps(result))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_slide_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.picture:
        picture(args.picture, work)
        return
    args.model = str(Path(args.model).resolve()) if args.model else str(_student_file(work))
    rows = measure(args, work)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

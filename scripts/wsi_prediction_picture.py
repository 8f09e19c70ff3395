"""Picture of a slide region predicted by a trained student: docs/img/wsi_prediction.png.

    python scripts/wsi_prediction_picture.py STUDENT --out docs/img/wsi_prediction.png

STUDENT is a checkpoint folder or exported file (e.g. ``curate distill ... --out student``). The
script writes a synthetic 3,072 × 3,072 pyramidal TIFF (0.25 µm/px; the tissue ellipse of
``benchmarks/bench_slide.py``, stained nuclei from the synthetic generator on white), runs
``curate predict STUDENT SLIDE --labels-zarr`` on it in a subprocess (Otsu tissue detection, the
streaming slide path), and draws a region of the slide with the predicted nuclei's outlines
(the table's WKB polygons) coloured by class, next to the same region of the OME-Zarr class label
image.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "wsi_prediction.png")
    ap.add_argument("--side", type=int, default=3072)
    ap.add_argument("--region", default="1536,1280,640,480", help="X,Y,W,H of the drawn region (level-0 px).")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pyarrow.parquet as pq
    import shapely
    import zarr

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_slide import write_slide

    from cellcurate.models.slide import open_slide
    from cellcurate.models.wsi import table_metadata

    work = Path(args.workdir or tempfile.mkdtemp(prefix="wsi_picture_"))
    work.mkdir(parents=True, exist_ok=True)
    slide = work / "synthetic_slide.tif"
    if not slide.exists():
        write_slide(slide, args.side)
    out = work / "pred"
    cmd = [sys.executable, "-m", "cellcurate.cli.main", "predict", str(args.model), str(slide), "--out", str(out),
           "--device", "cpu", "--labels-zarr", "0.5"]
    print("$", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    table = out / "synthetic_slide_nuclei.parquet"
    t = pq.read_table(table).to_pandas()
    meta = table_metadata(table)
    colors = dict(zip(meta["classes"], meta["colors"]))
    x0, y0, w, h = (int(v) for v in args.region.split(","))
    with open_slide(slide) as s:
        rgb = s.read_level(x0, y0, w, h, 0)
    cls = zarr.open_group(str(out / "synthetic_slide_labels.ome.zarr"), mode="r")["classes/0"][y0 : y0 + h, x0 : x0 + w]

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.4), dpi=110)
    ext = (x0, x0 + w, y0 + h, y0)
    axes[0].imshow(rgb, extent=ext)
    inside = (t["centroid_x"] >= x0) & (t["centroid_x"] < x0 + w) & (t["centroid_y"] >= y0) & (t["centroid_y"] < y0 + h)
    shown = t[inside]
    for g, c in zip(shapely.from_wkb(shown["polygon"]), shown["class_name"]):
        for part in getattr(g, "geoms", [g]):
            xs, ys = part.exterior.xy
            axes[0].plot(xs, ys, color=colors[c], lw=1.0)
    axes[0].set_title(f"{len(shown)} of {len(t)} nuclei (outline colour = predicted class)", fontsize=10)
    lut = np.zeros((256, 4))
    for i, name in enumerate(meta["classes"], start=1):
        hexc = colors[name].lstrip("#")
        lut[i] = [int(hexc[k : k + 2], 16) / 255 for k in (0, 2, 4)] + [1.0]
    axes[1].imshow(rgb, extent=ext, alpha=0.35)
    axes[1].imshow(lut[cls], extent=ext)
    axes[1].set_title("the same region of NAME_labels.ome.zarr (classes/0)", fontsize=10)
    counts = t["class_name"].value_counts()
    for name in meta["classes"]:
        axes[0].plot([], [], color=colors[name], label=f"{name} ({int(counts.get(name, 0))})")
    axes[0].legend(loc="lower left", fontsize=7, framealpha=0.9, title="whole slide", title_fontsize=7)
    for ax in axes:
        ax.set_xlim(x0, x0 + w)
        ax.set_ylim(y0 + h, y0)
        ax.set_xlabel("x (level-0 px)")
    axes[0].set_ylabel("y (level-0 px)")
    fig.suptitle(f"curate predict {args.model.name} on a synthetic {args.side:,} px slide (0.25 µm/px)", fontsize=11)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"picture -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

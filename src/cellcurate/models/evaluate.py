"""Evaluate one or more models on a released split and write the report.

Dimensions: N images of any size (tiled by :func:`cellcurate.models.predict.infer_tiled`),
K = 7 classes, M models.

:func:`evaluate_models` runs every model over every image (each image is read once), turns its
outputs into nuclei (:mod:`~cellcurate.models.postprocess`) and feeds a
:class:`~cellcurate.models.metrics.SplitMetrics` per model; the metric definitions are in
:mod:`cellcurate.models.metrics`. :func:`write_report` writes ``metrics.json`` (everything,
NaN as ``null``), ``metrics.md`` (models side by side) and two PNG plots: ``pq_per_class.png``
(per-class PQ bars per model) and ``counts.png`` (predicted vs true nucleus counts per image,
one panel per class).

Dataset items are dicts with ``image`` (3, H, W) uint8, ``instances`` (H, W) int, ``classes``
(H, W) uint8 (255 = ignore), ``image_id`` str and ``mpp`` float (torch tensors or numpy arrays).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..errors import ConfigError, InputFormatError, ModelError
from .metrics import SUMMARY_METRICS, SplitMetrics
from .postprocess import PostprocessConfig
from ..core.atomic import atomic_path
from .predict import class_names_and_colors, model_meta, predict_image


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _item_arrays(item: Mapping[str, Any], index: int) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, float | None]:
    missing = {"image", "instances", "classes"} - set(item)
    image_id = str(item.get("image_id", index))
    if missing:
        raise InputFormatError(None, f"dataset item {image_id!r} lacks {sorted(missing)}")
    image = _as_numpy(item["image"])
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[2] != 3:
        image = np.moveaxis(image, 0, -1)
    image = np.ascontiguousarray(image)
    inst = _as_numpy(item["instances"])
    cls = _as_numpy(item["classes"])
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise InputFormatError(None, f"dataset item {image_id!r}: image must be (3, H, W) uint8, got {image.shape} {image.dtype}")
    if inst.shape != image.shape[:2] or cls.shape != image.shape[:2]:
        raise InputFormatError(
            None, f"dataset item {image_id!r}: instances {inst.shape} and classes {cls.shape} must match the image {image.shape[:2]}"
        )
    mpp = item.get("mpp")
    return image_id, image, inst, cls, (float(mpp) if mpp is not None else None)


def evaluate_models(
    models: Mapping[str, Any],
    dataset: Iterable[Mapping[str, Any]],
    *,
    tile: int = 256,
    overlap: int = 64,
    batch_size: int = 8,
    device: str | None = None,
    radius: float = 12.0,
    pairing: str = "hovernet",
    tissues: Mapping[str, str | None] | None = None,
    config: PostprocessConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics of every model on every image of ``dataset``.

    Parameters
    ----------
    models
        Display name -> model following the package contract (``model.meta`` names the classes;
        every model must name the same ones).
    dataset
        Iterable of items (see the module docstring); ``len()`` is used for the progress bar when
        available.
    tile, overlap, batch_size, device
        Tiled inference (see :func:`~cellcurate.models.predict.infer_tiled`).
    radius
        Centroid matching radius in pixels for detection/classification F1.
    pairing
        Centroid pairing: ``"hovernet"`` (HoVer-Net's ``pair_coordinates``, published-comparable)
        or ``"maximum"`` (maximum matching); see :mod:`cellcurate.models.metrics`.
    tissues
        image_id -> tissue, for PanNuke's per-tissue mPQ/bPQ (an item's own ``tissue`` key wins;
        images without one form one group).
    config
        Post-processing thresholds.
    progress
        Show a tqdm bar over images on stderr.

    Returns
    -------
    dict with ``classes`` (K names), ``models`` (name -> :meth:`SplitMetrics.result` plus
    ``seconds_per_image``), ``n_images``, ``image_ids`` and ``settings``.
    """
    from tqdm.auto import tqdm

    if not models:
        raise ConfigError("evaluate_models needs at least one model")
    names_by_model = {name: class_names_and_colors(model_meta(m))[0] for name, m in models.items()}
    class_names = next(iter(names_by_model.values()))
    for name, names in names_by_model.items():
        if names != class_names:
            raise ModelError(f"model {name!r} predicts classes {names}, the others {class_names}; cannot compare them")
    accs = {name: SplitMetrics(class_names, radius=radius, pairing=pairing) for name in models}  # type: ignore[arg-type]
    seconds = {name: 0.0 for name in models}
    image_ids: list[str] = []
    total = len(dataset) if hasattr(dataset, "__len__") else None  # type: ignore[arg-type]
    bar = tqdm(dataset, total=total, desc="evaluate", unit="image", disable=None if progress else True)
    for index, item in enumerate(bar):
        image_id, image, inst, cls, mpp = _item_arrays(item, index)
        image_ids.append(image_id)
        tissue = item.get("tissue", (tissues or {}).get(image_id))
        for name, model in models.items():
            t0 = time.perf_counter()
            pred = predict_image(
                model, image, mpp=mpp, tile=tile, overlap=overlap, batch_size=batch_size,
                device=device, config=config, with_polygons=False,
            )
            seconds[name] += time.perf_counter() - t0
            accs[name].add(inst, cls, pred.instances, pred.class_map(), image_id=image_id, tissue=tissue)
    if not image_ids:
        raise ConfigError("the dataset holds no images to evaluate")
    results: dict[str, Any] = {}
    for name, acc in accs.items():
        res = acc.result()
        res["seconds_per_image"] = seconds[name] / len(image_ids)
        res["meta"] = {k: v for k, v in model_meta(models[name]).items() if k in ("kind", "architecture", "mpp", "input_size")}
        results[name] = res
    return {
        "classes": list(class_names),
        "models": results,
        "n_images": len(image_ids),
        "image_ids": image_ids,
        "settings": {"tile": tile, "overlap": overlap, "radius_px": radius, "pairing": pairing, "iou_threshold": 0.5,
                     "postprocess": vars(config or PostprocessConfig())},
    }


# -- report --------------------------------------------------------------------------------------


def _clean(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(float(v)) or math.isinf(float(v)) else float(v)
    return v


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def metrics_markdown(results: Mapping[str, Any], *, title: str = "Evaluation") -> str:
    """The report as a Markdown string: a summary table (rows metrics, columns models) and
    per-class tables of PQ, F1 and R² of counts."""
    models = list(results["models"])
    lines = [f"# {title}", "", f"{results['n_images']} images; models side by side.", ""]
    lines.append("| metric | " + " | ".join(models) + " | definition |")
    lines.append("| --- | " + " | ".join("---:" for _ in models) + " | --- |")
    for key, desc in SUMMARY_METRICS.items():
        vals = [_fmt(results["models"][m].get(key)) for m in models]
        lines.append(f"| {key} | " + " | ".join(vals) + f" | {desc} |")
    vals = [_fmt(results["models"][m].get("seconds_per_image"), 3) for m in models]
    lines.append("| seconds per image | " + " | ".join(vals) + " | inference + post-processing |")
    for key, label in (("PQ", "PQ per class (split sums)"), ("F1", "Classification F1 per class"), ("R2_counts", "R² of counts per class")):
        lines += ["", f"## {label}", "", "| class | " + " | ".join(models) + " | true nuclei |",
                  "| --- | " + " | ".join("---:" for _ in models) + " | ---: |"]
        for cname in results["classes"]:
            vals = [_fmt(results["models"][m]["per_class"][cname].get(key)) for m in models]
            n_true = results["models"][models[0]]["per_class"][cname]["n_true"]
            lines.append(f"| {cname} | " + " | ".join(vals) + f" | {n_true} |")
    tissues = sorted({t for m in models for t in results["models"][m].get("per_tissue", {})})
    if tissues:
        lines += ["", "## mPQ / bPQ per tissue (PanNuke)", "",
                  "| tissue | images | " + " | ".join(f"{m} mPQ | {m} bPQ" for m in models) + " |",
                  "| --- | ---: | " + " | ".join("---: | ---:" for _ in models) + " |"]
        for t in tissues:
            first = results["models"][models[0]]["per_tissue"].get(t, {})
            vals = []
            for m in models:
                e = results["models"][m].get("per_tissue", {}).get(t, {})
                vals.append(f"{_fmt(e.get('mPQ'))} | {_fmt(e.get('bPQ'))}")
            lines.append(f"| {t} | {first.get('n_images', 0)} | " + " | ".join(vals) + " |")
    pairing = results["settings"].get("pairing", "hovernet")
    lines += ["", "Definitions: see `cellcurate.models.metrics` (PanNuke/HoVer-Net/CoNIC conventions; "
              f"centroid radius {results['settings']['radius_px']} px, {pairing} pairing; – = undefined).", ""]
    return "\n".join(lines)


def _plot_pq(results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = results["classes"]
    models = list(results["models"])
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2, 4))
    x = np.arange(len(classes))
    for i, m in enumerate(models):
        vals = [results["models"][m]["per_class"][c]["PQ"] for c in classes]
        vals = [np.nan if v is None else v for v in vals]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, vals, width, label=f"{m} (mPQ {_fmt(results['models'][m]['mPQ'], 3)})")
    ax.set_xticks(x, classes, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("PQ")
    ax.set_title("Per-class PQ")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _plot_counts(results: Mapping[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = results["classes"]
    models = list(results["models"])
    cols = 4
    rows = -(-len(classes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for k, cname in enumerate(classes):
        ax = axes[k // cols][k % cols]
        top = 1.0
        for m in models:
            t = np.asarray(results["models"][m]["counts"]["true"], float).reshape(-1, len(classes))[:, k]
            p = np.asarray(results["models"][m]["counts"]["pred"], float).reshape(-1, len(classes))[:, k]
            top = max(top, t.max(initial=0), p.max(initial=0))
            r2 = results["models"][m]["per_class"][cname]["R2_counts"]
            ax.scatter(t, p, s=10, alpha=0.6, label=f"{m} R² {_fmt(r2, 2)}")
        ax.plot([0, top], [0, top], color="grey", lw=0.8)
        ax.set_title(cname, fontsize=9)
        ax.set_xlabel("true count", fontsize=8)
        ax.set_ylabel("predicted count", fontsize=8)
        ax.legend(fontsize=7)
    for k in range(len(classes), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike[str], *, title: str = "Evaluation") -> dict[str, Path]:
    """Write ``metrics.json``, ``metrics.md``, ``pq_per_class.png`` and ``counts.png`` into
    ``out_dir`` (each atomically); return their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "metrics.json",
        "markdown": out / "metrics.md",
        "pq_plot": out / "pq_per_class.png",
        "counts_plot": out / "counts.png",
    }
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(_clean(results), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text(metrics_markdown(results, title=title), encoding="utf-8")
    _plot_pq(results, paths["pq_plot"])
    _plot_counts(results, paths["counts_plot"])
    return paths

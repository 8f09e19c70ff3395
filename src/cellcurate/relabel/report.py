"""The round report: ``STORE/rounds/<N>/report.html`` with PNG figures beside it.

Figures (matplotlib, Agg): class distribution before/after, source label → proposed class
confusion (and given → suggested for flags), reliability diagram with ECE, flags by reason, and a
gallery of the top-ranked flagged nuclei (image crops with the nucleus outlined and its labels).

Dimensions: N nuclei, K = 7 classes.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    from ..datasets.store import Store


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _names(store: "Store") -> dict[int, str]:
    tax = store.taxonomy
    out = {c.id: c.name for c in tax.classes}
    out.update({0: "unresolved", -1: "rejected"})
    return out


def _fig_distribution(path: Path, metrics: dict[str, Any], names: dict[int, str], colors: dict[int, str]) -> None:
    plt = _plt()
    keys = [k for k in range(-1, 8)]
    before = [metrics["class_before"].get(k, 0) for k in keys]
    after = [metrics["class_after"].get(k, 0) for k in keys]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    x = np.arange(len(keys))
    ax.bar(x - 0.2, before, 0.4, label="before", color="#bbbbbb")
    ax.bar(x + 0.2, after, 0.4, label="after", color=[colors.get(k, "#555555") for k in keys])
    ax.set_xticks(x, [names[k] for k in keys], rotation=30, ha="right")
    ax.set_ylabel("nuclei")
    ax.set_title(f"Round {metrics['round']}: labels before and after auto-accepted proposals")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _matrix(ax: Any, m: np.ndarray, rows: list[str], cols: list[str], title: str) -> None:
    ax.imshow(m / np.maximum(m.sum(axis=1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                share = m[i, j] / max(m[i].sum(), 1)
                ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=8,
                        color="white" if share > 0.6 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(title, fontsize=9)


def _fig_confusion(path: Path, props: pd.DataFrame, flags: pd.DataFrame, metrics: dict[str, Any],
                   names: dict[int, str]) -> None:
    plt = _plt()
    panels = []
    if len(props):
        rows = sorted(set(props["source"] + ":" + props["source_label"]))
        cols = sorted(props["proposed"].unique())
        m = np.zeros((len(rows), len(cols)), np.int64)
        key = (props["source"] + ":" + props["source_label"]).to_numpy()
        for r, c in zip(key, props["proposed"].to_numpy()):
            m[rows.index(r), cols.index(c)] += 1
        panels.append((m, rows, [names[int(c)] for c in cols], "source label → proposed class"))
    for clf in metrics.get("classifiers", []):
        cl = clf["classes"]
        panels.append((np.asarray(clf["confusion"]), [names[c] for c in cl], [names[c] for c in cl],
                       f"held-out ({clf['folds']} grouped folds), acc {clf['accuracy']:.3f}\n"
                       f"{clf['model'][:40]}"))
    cl_flags = flags[flags["reason"] != "low_confidence_proposal"]
    if len(cl_flags):
        cls = sorted(set(cl_flags["given"]) | set(cl_flags["suggested"]))
        m = np.zeros((len(cls), len(cls)), np.int64)
        for g, s in zip(cl_flags["given"], cl_flags["suggested"]):
            m[cls.index(g), cls.index(s)] += 1
        panels.append((m, [names[int(c)] for c in cls], [names[int(c)] for c in cls], "flags: given → suggested"))
    if not panels:
        panels.append((np.zeros((1, 1), np.int64), ["-"], ["-"], "no proposals"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=110, squeeze=False)
    for ax, (m, r, c, t) in zip(axes[0], panels):
        _matrix(ax, m, r, c, t)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Per confidence bin: mean confidence, accuracy and count."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    rows = []
    for b in range(bins):
        m = which == b
        rows.append({"lo": edges[b], "hi": edges[b + 1], "n": int(m.sum()),
                     "confidence": float(confidence[m].mean()) if m.any() else np.nan,
                     "accuracy": float(correct[m].mean()) if m.any() else np.nan})
    return pd.DataFrame(rows)


def _fig_calibration(path: Path, conf: np.ndarray, corr: np.ndarray, ece: float | None) -> None:
    plt = _plt()
    rel = reliability(conf, corr.astype(float))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(8, 3.6), dpi=110)
    ok = rel["n"] > 0
    ax.plot([0, 1], [0, 1], "--", color="#999999", lw=1)
    ax.bar(rel["lo"][ok], rel["accuracy"][ok], width=0.1, align="edge", edgecolor="black", color="#4c72b0",
           label="accuracy")
    ax.plot(rel["confidence"][ok], rel["accuracy"][ok], "o", color="#dd8452", label="mean confidence")
    ax.set_xlim(0, 1); ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max out-of-sample probability)"); ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability, ECE = {ece:.3f}" if ece is not None else "Reliability")
    ax.legend(fontsize=8, loc="upper left")
    ax2.bar(rel["lo"], rel["n"], width=0.1, align="edge", color="#999999", edgecolor="black")
    ax2.set_xlabel("confidence"); ax2.set_ylabel("nuclei"); ax2.set_title("Confidence histogram")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fig_flags(path: Path, metrics: dict[str, Any]) -> None:
    plt = _plt()
    by = metrics.get("flags_by_reason", {})
    fig, ax = plt.subplots(figsize=(6, 2.6), dpi=110)
    keys = ["low_confidence_proposal", "confident_disagreement", "likely_class_swap"]
    vals = [by.get(k, 0) for k in keys]
    ax.barh(keys, vals, color=["#c8a000", "#c0392b", "#8e44ad"])
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v}", va="center", fontsize=9)
    ax.set_xlabel("flags"); ax.set_title("Flags by reason")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fig_gallery(path: Path, store: "Store", labels: pd.DataFrame, flags: pd.DataFrame, names: dict[int, str],
                 k: int) -> int:
    from skimage.segmentation import find_boundaries

    plt = _plt()
    top = flags.sort_values("rank").head(k)
    if top.empty:
        return 0
    rows = labels.set_index("nucleus_id")
    ncol = 6
    nrow = -(-len(top) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.1 * ncol, 2.45 * nrow), dpi=110, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, f in zip(axes.ravel(), top.itertuples(index=False)):
        r = rows.loc[f.nucleus_id]
        cy, cx = int(round(float(r["centroid_y"]))), int(round(float(r["centroid_x"])))
        half = max(32, int(max(r["bbox_y1"] - r["bbox_y0"], r["bbox_x1"] - r["bbox_x0"])))
        img, ins = store.read_region(str(r["image_id"]), cy - half, cx - half, cy + half, cx + half)
        edge = find_boundaries(ins == int(r["instance_id"]), mode="outer")
        shown = img.copy()
        shown[edge] = (0, 255, 0)
        ax.imshow(shown)
        given = names.get(int(f.given), str(f.given))
        given = f"{r['source_label']}" if int(f.given) == 0 else given
        ax.set_title(f"#{int(f.rank)} {given} → {names.get(int(f.suggested), '?')}\n"
                     f"{f.reason.replace('_', ' ')} {f.score:.2f}", fontsize=7)
    fig.suptitle("Top flagged nuclei (green outline): given → suggested, reason, issue score", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return len(top)


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, classes="t", float_format=lambda v: f"{v:.3f}")


def write_report(store: "Store", folder: Path, *, round: int, labels: pd.DataFrame, props: pd.DataFrame,
                 flags: pd.DataFrame, metrics: dict[str, Any], calibration: tuple[np.ndarray, np.ndarray],
                 gallery: int = 24) -> Path:
    """Write ``report.html`` and its PNGs into ``folder``; return the HTML path."""
    names = _names(store)
    colors = {c.id: c.color for c in store.taxonomy.classes}
    _fig_distribution(folder / "class_distribution.png", metrics, names, colors)
    _fig_confusion(folder / "confusion.png", props, flags, metrics, names)
    _fig_calibration(folder / "calibration.png", calibration[0], calibration[1], metrics.get("ece"))
    _fig_flags(folder / "flags.png", metrics)
    n_gal = _fig_gallery(folder / "gallery.png", store, labels, flags, names, gallery)

    dist = pd.DataFrame({"class": [names[k] for k in range(-1, 8)],
                         "before": [metrics["class_before"].get(k, 0) for k in range(-1, 8)],
                         "after": [metrics["class_after"].get(k, 0) for k in range(-1, 8)]})
    clf = pd.DataFrame([{k: v for k, v in c.items() if k not in ("confusion",)} for c in metrics["classifiers"]])
    top = flags.sort_values("rank").head(50).merge(
        labels[["nucleus_id", "image_id", "source_label", "centroid_y", "centroid_x"]], on="nucleus_id")
    top = top.assign(given=top["given"].map(names), suggested=top["suggested"].map(names))[
        ["rank", "nucleus_id", "image_id", "source_label", "given", "suggested", "reason", "score"]]
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>cellcurate round {round}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table.t{border-collapse:collapse;font-size:13px}table.t td,table.t th{padding:3px 8px;"
        "border-bottom:1px solid #ddd;text-align:right}img{max-width:100%}h2{margin-top:1.6em}</style>",
        "</head><body>",
        f"<h1>Relabeling round {round}</h1>",
        f"<p>Store <code>{e(str(store.path))}</code>; backbone <code>{e(str(metrics['backbone']))}</code>; "
        f"model <code>{e(str(metrics['model']))}</code>; ledger run seq {metrics.get('run_seq')}; "
        f"auto-accept at confidence ≥ {metrics['auto_accept']:.2f}.</p>",
    ]
    if metrics.get("truth"):
        t = metrics["truth"]
        parts.append("<h2>Against the synthetic truth</h2>" + _table(pd.DataFrame([t])))
    parts += [
        "<h2>Classifiers (held-out, grouped by patient / PanNuke fold)</h2>", _table(clf) if len(clf) else "",
        "<h2>Class distribution</h2><img src='class_distribution.png'>", _table(dist),
        "<h2>Source label → proposed class, held-out confusion</h2><img src='confusion.png'>",
        "<h2>Calibration</h2>",
        f"<p>Expected calibration error (10 bins): {metrics['ece']:.3f}</p>" if metrics.get("ece") is not None else "",
        "<img src='calibration.png'>",
        "<h2>Flags</h2>",
        (f"<p>Flip rate against round {round - 1}: {metrics['flip_rate']:.3f} of {metrics['flip_compared']} "
         "nuclei proposed in both rounds changed their proposed class.</p>") if metrics.get("flip_rate") is not None
        else "",
        "<img src='flags.png'>",
        f"<h2>Top flagged nuclei ({n_gal})</h2><img src='gallery.png'>" if n_gal else "<p>No flags.</p>",
        _table(top) if len(top) else "",
        "<h2>Config and metrics</h2><pre>" + e(json.dumps(
            {k: v for k, v in metrics.items() if k != "classifiers"}, indent=2, default=str)) + "</pre>",
        "</body></html>",
    ]
    out = folder / "report.html"
    out.write_text("\n".join(parts), "utf-8")
    return out

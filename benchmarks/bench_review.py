"""Benchmark the review widget headless on a store of 200,000 nuclei with ~10% flagged.

Measures (targets from the review issue):
  * open: Store.open + queue + first flagged nucleus shown in the widget   (target <= 2 s)
  * next-nucleus latency, median over 200 steps (navigation, and skip = decision + next)
                                                                           (target <= 100 ms)
  * resident memory before / after the steps (images are read lazily: it should stay flat)

Run: QT_QPA_PLATFORM=offscreen .venv/bin/python benchmarks/bench_review.py [--store DIR] [--nuclei N]
The store is built once (painted discs through the store writer, flags through the ledger API)
and reused when --store points at an existing one.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def allow_no_gl() -> bool:
    """Without an OpenGL context (offscreen Qt), answer napari's texture queries so layers work."""
    from napari._vispy.utils import gl

    try:
        if isinstance(gl.get_max_texture_sizes()[0], int):
            return False
    except Exception:  # no GL context
        pass
    for name in ("napari._vispy.utils.gl", "napari._vispy.layers.image", "napari._vispy.layers.base",
                 "napari._vispy.layers.labels", "napari._vispy.canvas"):
        mod = importlib.import_module(name)
        if hasattr(mod, "get_max_texture_sizes"):
            mod.get_max_texture_sizes = lambda: (4096, 2048)
        if hasattr(mod, "get_gl_extensions"):
            mod.get_gl_extensions = lambda: "texture_float"
    return True


def build(path: Path, n_nuclei: int) -> None:
    from cellcurate.napari_plugin.sample import write_disc_store, write_flags

    per_image = 50
    t = time.perf_counter()
    store = write_disc_store(path, n_images=n_nuclei // per_image, per_image=per_image, seed=0)
    write_flags(store, fraction=0.10, seed=0)
    store.close()
    print(f"built {path} ({n_nuclei} nuclei, 10% flagged) in {time.perf_counter() - t:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--nuclei", type=int, default=200_000)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    tmp = None
    path = args.store
    if path is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-review-"))
        path = tmp / "store"
    if not (path / "store.json").exists():
        build(path, args.nuclei)

    import napari
    from qtpy.QtWidgets import QApplication

    from cellcurate.curation.review import ReviewSession
    from cellcurate.datasets.store import Store
    from cellcurate.napari_plugin.widget import ReviewWidget

    no_gl = allow_no_gl()
    viewer = napari.Viewer(show=False)
    app = QApplication.instance()
    rss0 = rss_mb()

    t0 = time.perf_counter()
    store = Store.open(path, mode="a")
    session = ReviewSession(store, reviewer="bench")
    widget = ReviewWidget(viewer, session)
    app.processEvents()
    t_open = time.perf_counter() - t0
    done, total = session.progress()
    print(f"store: {len(store.nuclei())} nuclei, queue {total} flagged ({done} reviewed); "
          f"{'no OpenGL: layers updated, not drawn' if no_gl else 'OpenGL'}")
    print(f"open + queue + first nucleus shown: {t_open:.2f} s   (target <= 2 s)")

    rss1 = rss_mb()
    nav = []
    for _ in range(args.steps):
        t = time.perf_counter()
        session.next()
        widget.show_current()
        app.processEvents()
        nav.append(time.perf_counter() - t)
    rss2 = rss_mb()
    dec = []
    for _ in range(args.steps):
        t = time.perf_counter()
        widget.decide("skip")
        app.processEvents()
        dec.append(time.perf_counter() - t)
    rss3 = rss_mb()
    print(f"next nucleus (navigate), median over {args.steps}: {statistics.median(nav) * 1000:.0f} ms "
          f"(p90 {sorted(nav)[int(0.9 * len(nav))] * 1000:.0f} ms)   (target <= 100 ms)")
    print(f"decision (skip) + next nucleus, median over {args.steps}: {statistics.median(dec) * 1000:.0f} ms "
          f"(p90 {sorted(dec)[int(0.9 * len(dec))] * 1000:.0f} ms)")
    print(f"RSS: {rss0:.0f} MB before open, {rss1:.0f} MB after open, {rss2:.0f} MB after {args.steps} steps, "
          f"{rss3:.0f} MB after {args.steps} decisions")
    widget.close_session()
    viewer.close()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

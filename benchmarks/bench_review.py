"""Benchmark the review dock: key press -> next nucleus drawn, with the real widget.

Store: 200,000 nuclei (painted discs through the store writer), 10 % flagged through the ledger
API; built once and reused with --store. Measures (targets from issue 14):

  * open: Store.open + queue + first flagged nucleus shown in the widget        (target <= 2 s)
  * key -> drawn frame: a real key event (QTest.keyClick "s" = skip, a decision written with
    fsync, then the next nucleus) on the canvas, until the canvas has drawn the next frame;
    median over --steps, with the read-ahead worker on (the default) and off (the baseline,
    measured in the same run)                                                    (target <= 100 ms)
  * resident memory before / after the steps (images are read lazily: it should stay flat)

Between two keys the benchmark waits for the read-ahead to finish, as an annotator's look at a
nucleus (a second or more) lets it. Drawing needs OpenGL: run under Xvfb with the xcb platform
(software OpenGL, llvmpipe) to time drawn frames:

    xvfb-run -a -s "-screen 0 1920x1080x24" env QT_QPA_PLATFORM=xcb python benchmarks/bench_review.py

With QT_QPA_PLATFORM=offscreen there is no OpenGL context: the layers are updated but nothing is
drawn, and the figure is key -> layers updated (said so in the output).
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
from typing import Any

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def allow_no_gl() -> bool:
    """With offscreen Qt (no OpenGL context), answer napari's texture queries so layers work."""
    if os.environ.get("QT_QPA_PLATFORM") != "offscreen":
        return False
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


def run(path: Path, steps: int, prefetch: int, gl: bool, reviewer: str) -> dict[str, Any]:
    import napari
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QApplication

    from cellcurate.curation.review import ReviewSession
    from cellcurate.datasets.store import Store
    from cellcurate.napari_plugin.widget import ReviewWidget

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1920, 1080)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    store = Store.open(path, mode="a")
    session = ReviewSession(store, reviewer=reviewer)
    widget = ReviewWidget(viewer, session, prefetch=prefetch)
    viewer.window.add_dock_widget(widget, name="cellcurate review", area="right")
    app.processEvents()
    t_open = time.perf_counter() - t0
    canvas = viewer.window._qt_viewer.canvas
    draws = [0]
    canvas._scene_canvas.events.draw.connect(lambda _e: draws.__setitem__(0, draws[0] + 1))
    native = canvas.native
    native.setFocus()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.01)
    rss1 = rss_mb()
    lat = []
    for _ in range(steps):
        widget._wait_worker()  # the annotator looks at the nucleus: the read-ahead finishes
        for _ in range(3):
            app.processEvents()
        before, shown = draws[0], widget.shown_at
        t = time.perf_counter()
        QTest.keyClick(native, "s")
        if gl:
            end = t + 5.0
            while draws[0] == before and time.perf_counter() < end:
                app.processEvents()
        else:
            app.processEvents()
        lat.append(time.perf_counter() - t)
        assert widget.shown_at != shown, "the key did not show the next nucleus"
    rss2 = rss_mb()
    widget.close_session()
    viewer.close()
    return {"open": t_open, "lat": lat, "rss": (rss0, rss1, rss2), "queue": session.progress()[1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--nuclei", type=int, default=200_000)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    tmp = None
    path = args.store
    if path is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-review-"))
        path = tmp / "store"
    if not (path / "store.json").exists():
        build(path, args.nuclei)

    from qtpy.QtWidgets import QApplication

    QApplication.instance() or QApplication([])
    no_gl = allow_no_gl()
    what = "key -> layers updated (no OpenGL: nothing drawn)" if no_gl else "key -> drawn frame"
    print(f"platform {os.environ.get('QT_QPA_PLATFORM')}, {'no OpenGL' if no_gl else 'OpenGL'}; "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    res = {}
    for label, prefetch, who in (("read-ahead on", 3, "bench-a"), ("read-ahead off (baseline)", 0, "bench-b")):
        r = run(path, args.steps, prefetch, not no_gl, who)
        res[label] = r
        lat = sorted(r["lat"])
        print(f"{label}: open + queue ({r['queue']} flagged) + first nucleus {r['open']:.2f} s (target <= 2 s); "
              f"{what}, median over {args.steps}: {statistics.median(lat) * 1000:.0f} ms "
              f"(p90 {lat[int(0.9 * len(lat))] * 1000:.0f} ms; target <= 100 ms); "
              f"RSS {r['rss'][0]:.0f} / {r['rss'][1]:.0f} / {r['rss'][2]:.0f} MB before / after open / after steps")
    on = statistics.median(res["read-ahead on"]["lat"])
    off = statistics.median(res["read-ahead off (baseline)"]["lat"])
    print(f"ratio read-ahead on / off: {on / off:.2f}")
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

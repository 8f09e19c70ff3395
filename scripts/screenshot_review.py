"""Render the review widget on a demo store headless and save docs/review_widget.png.

    xvfb-run -a -s "-screen 0 1600x1000x24" env QT_QPA_PLATFORM=xcb \
        .venv/bin/python scripts/screenshot_review.py [--store STORE] [--out docs/review_widget.png]

Without --store it builds the tiny synthetic sample (ingested, with flags written through the
ledger API) in a temp folder. Drawing the canvas needs OpenGL: run it under Xvfb (as above); with
QT_QPA_PLATFORM=offscreen and no display napari cannot draw its canvas.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description="screenshot of the cellcurate review widget")
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "review_widget.png")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "demo"])
    args = ap.parse_args()

    import napari
    from qtpy.QtWidgets import QApplication

    from cellcurate.curation.review import ReviewSession
    from cellcurate.datasets.store import Store
    from cellcurate.napari_plugin.sample import make_sample_store
    from cellcurate.napari_plugin.widget import ReviewWidget, _camera

    tmp = None
    if args.store is None:
        tmp = Path(tempfile.mkdtemp(prefix="cellcurate-shot-"))
        store = make_sample_store(tmp, preset=args.preset)
    else:
        store = Store.open(args.store, mode="a")
    viewer = napari.Viewer(title="cellcurate review", show=True)
    viewer.window.resize(1500, 900)
    widget = ReviewWidget(viewer, ReviewSession(store, reviewer="demo", durable=False))
    viewer.window.add_dock_widget(widget, name="cellcurate review", area="right")
    widget.decide("accept")  # one decision, so the message line shows what a save looks like
    _camera(viewer).zoom = 2.5
    for _ in range(5):
        QApplication.processEvents()
    shot = viewer.screenshot(canvas_only=False, flash=False)
    from skimage.io import imsave

    args.out.parent.mkdir(parents=True, exist_ok=True)
    imsave(args.out, shot, check_contrast=False)
    print(f"wrote {args.out} ({shot.shape[1]}x{shot.shape[0]})")
    widget.close_session()
    viewer.close()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Render the review dock at 1920×1080 on a nucleus at a tile edge and save docs/review_widget.png.

    xvfb-run -a -s "-screen 0 1920x1080x24" env QT_QPA_PLATFORM=xcb \
        .venv/bin/python scripts/screenshot_review.py [--store STORE] [--out docs/review_widget.png]

Without --store it builds the tiny synthetic sample (ingested, with flags written through the
ledger API) in a temporary folder, removed afterwards. The reviewer "demo" decides three nuclei
(so the session's progress and per-class counts show), "bob" has decided the edge nucleus (so
the panel shows a prior decision), and the dock then jumps to that nucleus. Drawing the canvas
needs OpenGL: run it under Xvfb (as above); with QT_QPA_PLATFORM=offscreen napari cannot draw.
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
    ap.add_argument("--size", default="1920x1080")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from cellcurate.curation.review import ReviewSession, decide
    from cellcurate.datasets.store import Store
    from cellcurate.napari_plugin.sample import make_sample_store
    from cellcurate.napari_plugin.widget import ReviewWidget, _camera

    tmp = None
    if args.store is None:
        tmp = Path(tempfile.mkdtemp(prefix="cellcurate-shot-"))
        store = make_sample_store(tmp, preset=args.preset)
    else:
        store = Store.open(args.store, mode="a")
    session = ReviewSession(store, reviewer="demo", durable=False, window=96)
    q = session.queue
    images = store.images().set_index("image_id")
    h = images.loc[q["image_id"], "height"].to_numpy()
    w = images.loc[q["image_id"], "width"].to_numpy()
    y, x = q["centroid_y"].to_numpy(), q["centroid_x"].to_numpy()
    margin = np.minimum.reduce([y, x, h - y, w - x])
    edge = int(q["nucleus_id"].iat[int(np.argmin(margin))])  # the flagged nucleus nearest a tile edge

    viewer = napari.Viewer(title="cellcurate review", show=True)
    viewer.window.resize(width, height)
    widget = ReviewWidget(viewer, session)
    viewer.window.add_dock_widget(widget, name="cellcurate review", area="right")
    for _ in range(3):  # three decisions of this session: progress, rate and per-class counts show
        item = session.current()
        if item is not None and item.nucleus_id != edge:
            widget.decide("accept")
    decide(store, edge, "set_class", reviewer="bob", label=int(q.set_index("nucleus_id").loc[edge, "proposed"]))
    widget.jump(edge)
    _camera(viewer).zoom = 7.0
    for _ in range(10):
        QApplication.processEvents()
    shot = viewer.screenshot(canvas_only=False, flash=False)
    from skimage.io import imsave

    args.out.parent.mkdir(parents=True, exist_ok=True)
    imsave(args.out, shot, check_contrast=False)
    print(f"wrote {args.out} ({shot.shape[1]}x{shot.shape[0]}); nucleus {edge} at {margin.min():.0f} px from "
          f"its tile's edge")
    widget.close_session()
    viewer.close()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

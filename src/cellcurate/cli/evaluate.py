"""`curate evaluate MODEL... --release DIR --split test --out DIR`: metrics of models side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


@click.command()
@click.argument("models", metavar="MODEL...", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--release", "release_path", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Release folder (holding manifest.json).")
@click.option("--split", default="test", show_default=True, help="Split (or alias) of the release to evaluate on.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for metrics.json, metrics.md and the plots.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--tile", default=256, show_default=True, help="Tile side in pixels (a multiple of 32).")
@click.option("--overlap", default=64, show_default=True, help="Overlap between tiles in pixels.")
@click.option("--batch-size", default=8, show_default=True, help="Tiles per forward pass.")
@click.option("--radius", default=12.0, show_default=True, help="Centroid matching radius in pixels (F1).")
@click.option("--pairing", type=click.Choice(["hovernet", "maximum"]), default="hovernet", show_default=True,
              help="Centroid pairing for F1: HoVer-Net's pair_coordinates (published numbers) or maximum matching.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N images.")
@click.option("--encoder-weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A teacher's encoder weights, overriding the path in its config.json.")
def command(
    models: tuple[Path, ...], release_path: Path, split: str, out_dir: Path, device: str, tile: int, overlap: int,
    batch_size: int, radius: float, pairing: str, limit: int | None, encoder_weights: Path | None,
) -> None:
    """Evaluate one or more MODELs (checkpoint folders, TorchScript or ONNX files) on a release split.

    Reports, each under its own name: PQ/DQ/SQ (split sums), PanNuke mPQ and bPQ (per image,
    averaged per tissue, with the per-tissue table), CoNIC mPQ+ (split sums), AJI and AJI+, Dice,
    detection F1, HoVer-Net per-class F1 and type accuracy, and R² of per-image counts; the
    models side by side (e.g. teacher and student).
    """
    from torch.utils.data import Subset

    from ..datasets.release import load_release
    from ..models.evaluate import evaluate_models, metrics_markdown, write_report
    from ..models.predict import load_for_inference, model_names, resolve_device

    dev = resolve_device(device)
    loaded = {name: load_for_inference(p, device=dev, encoder_weights=encoder_weights)
              for name, p in zip(model_names(models), models)}
    dataset: Any = load_release(release_path, split)
    if limit is not None and limit < len(dataset):
        dataset = Subset(dataset, range(limit))
    images = getattr(dataset, "images", None)
    if images is None and hasattr(dataset, "dataset"):  # a Subset of the release
        images = getattr(dataset.dataset, "images", None)
    tissues = None
    if images is not None and "tissue" in images:
        import pandas as pd

        tissues = {str(i): (None if pd.isna(t) else str(t)) for i, t in zip(images["image_id"], images["tissue"])}
    results = evaluate_models(loaded, dataset, tile=tile, overlap=overlap, batch_size=batch_size,
                              device=dev, radius=radius, pairing=pairing, tissues=tissues)
    results["release"] = str(release_path)
    results["split"] = split
    paths = write_report(results, out_dir, title=f"Evaluation on {release_path.name} / {split}")
    click.echo(metrics_markdown(results, title=f"Evaluation on {release_path.name} / {split}"))
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())}")

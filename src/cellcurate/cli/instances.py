"""`curate instances STORE --round K`: instance-level label issues (see cellcurate.relabel.instances)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


@click.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False, path_type=Path))
@click.option("--round", "round_", required=True, type=int, help="Instance round number (its own numbering, from 1).")
@click.option("--predictions", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of predictions made by another tool: DIR/<image_id>.npy|.tif (instance map) or "
                   ".geojson (QuPath polygons), one per store image. Default: the built-in out-of-fold model.")
@click.option("--predictor", type=click.Choice(["pixel", "student"]), default="pixel", show_default=True,
              help="Out-of-fold model when no --predictions: `pixel` (gradient-boosted pixel classifier + "
                   "watershed, about a minute) or `student` (the student network trained with grouped K-fold; "
                   "minutes to tens of minutes on a CPU).")
@click.option("--folds", type=click.IntRange(min=2), default=3, show_default=True,
              help="Folds of the out-of-fold model (spatial blocks, or groups = patient / slide / PanNuke fold).")
@click.option("--pixel-cv", "pixel_cv", type=click.Choice(["spatial", "grouped"]), default="spatial", show_default=True,
              help="--predictor pixel: hold out square 32-µm blocks inside every image (each block predicted by a "
                   "model that never saw its labels but learnt the image's stain from its other blocks), or whole "
                   "images by patient/slide group.")
@click.option("--student-epochs", type=click.IntRange(min=1), default=30, show_default=True,
              help="--predictor student: training epochs per fold.")
@click.option("--student-preset", type=click.Choice(["tiny", "default", "paper"]), default="tiny", show_default=True,
              help="--predictor student: network widths (models.student.STUDENT_PRESETS).")
@click.option("--extra-training", "extra_training", multiple=True,
              type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="--predictor student: another store whose images join every fold's training set (repeatable; "
                   "its images are in no fold of STORE, so predictions stay out of sample).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="--predictor student: where to train and predict.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="--predictor student: torch CPU threads.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Run round K again (its earlier events stay in the history).")
@click.option("--min-confidence", type=click.FloatRange(0.0, 1.0), default=None,
              help="Model confidence a predicted nucleus needs (default 0.6).")
@click.option("--bad-outline-iou", type=click.FloatRange(0.0, 1.0), default=None,
              help="A matched annotation with IoU below this is a bad outline (default 0.6).")
@click.option("--missing-max-overlap", type=click.FloatRange(0.0, 1.0), default=None,
              help="A confident prediction at most this much annotated is a missing nucleus (default 0.2).")
@click.option("--spurious-min-background", type=click.FloatRange(0.0, 1.0), default=None,
              help="An unmatched annotation the model calls at least this much background is spurious (default 0.6).")
@click.option("--part-cover", type=click.FloatRange(0.0, 1.0), default=None,
              help="Share of each part inside the whole for merged/split (default 0.6).")
@click.option("--no-cleanlab", is_flag=True, help="Skip cleanlab's scores in the evidence (faster).")
@click.option("--no-map-rules", is_flag=True,
              help="Only the instance-matching rules: no registration (bad outline) or blob (missing) rules "
                   "on the probability map.")
@click.option("--appearance", is_flag=True,
              help="Rank the probability-blob missing flags by how the image looks there (a forest learnt out "
                   "of fold on the store's own nuclei; slower, docs/INSTANCES.md).")
@click.option("--truth", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="instance_truth.parquet of a synthetic sample: print recall and precision per issue type.")
def command(store_path: Path, round_: int, predictions: Path | None, predictor: str, folds: int, pixel_cv: str,
            student_epochs: int, student_preset: str, extra_training: tuple[Path, ...], device: str, threads: int, seed: int, overwrite: bool,
            min_confidence: float | None, bad_outline_iou: float | None, missing_max_overlap: float | None,
            spurious_min_background: float | None, part_cover: float | None, no_cleanlab: bool,
            no_map_rules: bool, appearance: bool, truth: Path | None) -> None:
    """Flag missed, spurious, badly outlined, merged and split nuclei of STORE as ledger events."""
    from dataclasses import replace

    import pandas as pd

    from ..curation.geometry import store_geometry
    from ..curation.qupath import geometry_mask, read_geojson
    from ..datasets.store import Store
    from ..errors import ConfigError, InputFormatError
    from ..relabel.instance_predict import PixelModelConfig, get_predictions
    from ._instance_student import StudentPredictorConfig, student_predictor
    from ..relabel.instances import InstanceConfig, planted_for_store, run_instance_round

    if appearance and no_map_rules:
        raise ConfigError("--appearance ranks the probability-map blob flags; it needs the map rules (drop --no-map-rules)")
    cfg = InstanceConfig(cleanlab=not no_cleanlab, registration=not no_map_rules, blob_missing=not no_map_rules,
                         appearance=appearance)
    given: dict[str, Any] = {"min_confidence": min_confidence, "bad_outline_iou": bad_outline_iou,
             "missing_max_overlap": missing_max_overlap, "spurious_min_background": spurious_min_background,
             "part_cover": part_cover}
    cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None}).validate()
    truth_df = None
    if truth is not None:
        try:
            truth_df = pd.read_parquet(truth)
        except (OSError, ValueError) as exc:
            raise InputFormatError(truth, f"cannot read the instance truth table ({exc})") from None
    student = None
    if predictor == "student":  # with --predictions too: get_predictions refuses the pair
        student = StudentPredictorConfig(folds=folds, seed=seed, epochs=student_epochs, preset=student_preset,
                                         device=device, threads=threads,
                                         extra_stores=tuple(str(p) for p in extra_training)).validate()
    elif extra_training:
        raise ConfigError("--extra-training needs --predictor student")
    store = Store.open(store_path, mode="a")
    try:
        custom = student_predictor(store, student) if student is not None else None
        cache, cached = get_predictions(store, folder=predictions, config=PixelModelConfig(folds=folds, seed=seed, cv=pixel_cv),
                                        geojson_reader=read_geojson, rasterise=geometry_mask, custom=custom)
        planted = planted_for_store(store, truth_df) if truth_df is not None else None
        # matched against the geometry as review left it (a nucleus added in review is annotated)
        result = run_instance_round(store, round_, predictions=cache, cached=cached, config=cfg, overwrite=overwrite,
                                    planted=planted, geometry=store_geometry(store))
    finally:
        store.close()
    click.echo(result.summary())

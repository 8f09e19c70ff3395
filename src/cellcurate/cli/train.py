"""``curate train teacher``: train the foundation-model teacher on a release.

Heavy imports (torch, timm) happen inside the command so ``curate --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path

import click

#: Decoder widths of the ``--tiny`` teacher (with the random 4-block ``tiny-vit`` encoder).
TINY_DECODER = (64, 32, 32, 16, 16)

#: Summary metrics a run can select its best epoch on (cellcurate.models.metrics.SUMMARY_METRICS).
#: the names of ``cellcurate.models.metrics.SUMMARY_METRICS`` (spelled out so --help imports nothing
#: heavy; a test keeps the two equal)
VAL_METRICS = ("PQ", "DQ", "SQ", "bPQ", "mPQ", "mPQ+", "AJI", "AJI+", "Dice", "F1_detection",
               "precision_detection", "recall_detection", "F1_classification", "type_accuracy", "R2_counts")


def validation_options(f):  # type: ignore[no-untyped-def]
    """``--val-split``, ``--val-metric`` and ``--patience`` (shared by train teacher and distill)."""
    f = click.option("--patience", default=0, show_default=True, type=click.IntRange(min=0),
                     help="Stop after this many epochs without a better validation score (0: never).")(f)
    f = click.option("--val-metric", default="mPQ", show_default=True, type=click.Choice(VAL_METRICS),
                     help="Validation metric that picks the best epoch (saved in OUT/best/).")(f)
    f = click.option("--val-split", default="val", show_default=True,
                     help="Release split evaluated after every epoch ('none' to skip); curves in OUT/curves.png.")(f)
    return f


def load_validation(release: Path, split: str):  # type: ignore[no-untyped-def]
    """The validation dataset, or None for ``none`` or an empty split (with a note on stderr)."""
    from cellcurate.datasets.release import load_release

    if split.lower() == "none":
        return None
    val = load_release(release, split=split)
    if len(val) == 0:
        click.echo(f"note: split {split!r} of {release} is empty; training without validation", err=True)
        return None
    return val


def echo_best(result) -> None:  # type: ignore[no-untyped-def]
    if result.best:
        b = result.best
        click.echo(f"best epoch {b['epoch']}: validation {b['metric']} {b['value']:.4f} -> {b['path']}")


@click.group(name="train")
def command() -> None:
    """Train models on a released dataset."""


@command.command(name="teacher")
@click.option("--release", "release", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Release folder (curate export).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Checkpoint folder to write (model.pt + config.json).")
@click.option("--encoder", default="h-optimus-0", show_default=True,
              help="h-optimus-0, tiny-vit, micro-vit or any timm model name.")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False),
              help="Local encoder weights (.safetensors, .pt, .bin); required for foundation encoders.")
@click.option("--split", default="train", show_default=True, help="Release split to train on.")
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--tile-size", default=256, show_default=True, type=click.IntRange(min=32))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--amp/--no-amp", default=True, show_default=True, help="Mixed precision on CUDA.")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Keep encoder features on disk here (default: in memory).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch.")
@click.option("--tiny", is_flag=True, help="Tiny random-weight teacher (demo/tests; trains on CPU in minutes).")
@click.option("--encoder-input", type=click.Choice(["native", "resize"]), default="native", show_default=True,
              help="native: the ViT sees windows of its own input size (224 px at 0.5 µm/px for H-Optimus-0), "
                   "stitched back; resize: the whole tile resampled, position embeddings interpolated.")
@validation_options
def teacher(release: Path, out: Path, encoder: str, weights: Path | None, split: str, epochs: int,
            batch_size: int, lr: float, tile_size: int, seed: int, device: str, amp: bool,
            cache_dir: Path | None, resume: bool, tiny: bool, encoder_input: str, val_split: str,
            val_metric: str, patience: int) -> None:
    """Train the teacher: frozen encoder + HoVer-Net decoder."""
    from cellcurate.datasets.release import load_release
    from cellcurate.models.teacher import TeacherConfig
    from cellcurate.models.train import TrainConfig, train_teacher

    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,  # type: ignore[arg-type]
                      amp=amp, tile_size=tile_size, cache_dir=None if cache_dir is None else str(cache_dir),
                      val_metric=val_metric, patience=patience)
    tcfg = (TeacherConfig(decoder_channels=TINY_DECODER, tile_size=tile_size, encoder_input=encoder_input) if tiny
            else TeacherConfig(tile_size=tile_size, encoder_input=encoder_input))
    base = load_release(release, split=split)
    result = train_teacher(
        base,
        out_dir=out,
        encoder="tiny-vit" if tiny and encoder == "h-optimus-0" else encoder,
        weights=weights,
        random_init=tiny,
        teacher_config=tcfg,
        config=cfg,
        resume=resume,
        val=load_validation(release, val_split),
    )
    last = result.history[-1] if result.history else {}
    click.echo(
        f"teacher: {result.parameters:,} parameters, {len(result.history)} epochs, "
        f"loss {last.get('loss', float('nan')):.4f} -> {result.out_dir}"
    )
    echo_best(result)

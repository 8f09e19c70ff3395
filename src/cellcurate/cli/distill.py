"""``curate distill``: distil the lightweight student from a trained teacher.

Heavy imports (torch, timm) happen inside the command so ``curate --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .train import echo_best, load_validation, validation_options

#: ``--preset`` choices with their exact parameter counts (HoVer head, 8 types; a test recounts them).
PRESET_HELP = ("U-Net student size: tiny (309,172 parameters, the demo), default (5,554,604: 205× fewer "
               "than H-Optimus-0's 1,137,534,444-parameter teacher), paper (23,569,484: 48×, the CellGenNet ratio).")


@click.command(name="distill")
@click.option("--teacher", "teacher", required=True, type=click.Path(path_type=Path),
              help="Teacher checkpoint folder (curate train teacher --out).")
@click.option("--release", "release", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Release folder (curate export).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Student checkpoint folder to write.")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False),
              help="The teacher's encoder weights, if moved since training.")
@click.option("--split", default="train", show_default=True, help="Release split to train on.")
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--tile-size", default=256, show_default=True, type=click.IntRange(min=32))
@click.option("--temperature", default=2.0, show_default=True, type=float, help="Distillation temperature.")
@click.option("--alpha", "tversky_alpha", default=0.3, show_default=True, type=float, help="Tversky α (false positives).")
@click.option("--beta", "tversky_beta", default=0.7, show_default=True, type=float, help="Tversky β (false negatives).")
@click.option("--consistency", default=0.5, show_default=True, type=float, help="Weight of the consistency loss.")
@click.option("--dropout", default=0.2, show_default=True, type=float, help="Layer-wise dropout at the bottleneck.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--amp/--no-amp", default=True, show_default=True, help="Mixed precision on CUDA.")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Keep the teacher's predictions on disk here (default: in memory).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last epoch.")
@click.option("--tiny", is_flag=True, help="Tiny student (demo/tests): --preset tiny.")
@click.option("--preset", type=click.Choice(["tiny", "default", "paper"]), default=None, help=PRESET_HELP)
@click.option("--head", type=click.Choice(["hover", "flow"]), default="hover", show_default=True,
              help="hover: HoVer-Net distance maps + watershed; flow: Cellpose flows + flow following.")
@click.option("--student-encoder", default="unet", show_default=True,
              help="unet (the presets), or a timm encoder built with random weights, e.g. mobilevit_xs "
                   "(the authors' deployed student: --student-encoder mobilevit_xs --head flow).")
@click.option("--unlabelled", "unlabelled", multiple=True, type=click.Path(path_type=Path, exists=True),
              help="Unlabelled images (files or folders; repeatable): the teacher's confidence-weighted soft "
                   "targets are their only supervision (the CellGenNet setting).")
@click.option("--unlabelled-split", default=None,
              help="A release split whose images are used without their labels (e.g. store images not yet curated).")
@click.option("--unlabelled-mpp", default=0.25, show_default=True, type=float, help="Pixel size of --unlabelled images.")
@click.option("--teacher-on-ignore", is_flag=True,
              help="Let the teacher's soft targets also cover the ignore regions of labelled tiles.")
@validation_options
def command(teacher: Path, release: Path, out: Path, weights: Path | None, split: str, epochs: int,
            batch_size: int, lr: float, tile_size: int, temperature: float, tversky_alpha: float,
            tversky_beta: float, consistency: float, dropout: float, seed: int, device: str, amp: bool,
            cache_dir: Path | None, resume: bool, tiny: bool, preset: str | None, head: str,
            student_encoder: str, unlabelled: tuple[Path, ...], unlabelled_split: str | None,
            unlabelled_mpp: float, teacher_on_ignore: bool, val_split: str, val_metric: str,
            patience: int) -> None:
    """Distil a student from TEACHER: soft targets + ground truth, consistency, layer-wise dropout.

    With --unlabelled / --unlabelled-split the student also trains on images without annotation,
    supervised only by the teacher (each pixel weighted by the teacher's confidence)."""
    from torch.utils.data import ConcatDataset

    from cellcurate.datasets.release import load_release
    from cellcurate.models.losses import LossConfig
    from cellcurate.models.student import (
        TIMM_DECODER_CHANNELS,
        StudentConfig,
        student_preset,
    )
    from cellcurate.models.train import TrainConfig, distill

    loss = LossConfig(temperature=temperature, tversky_alpha=tversky_alpha, tversky_beta=tversky_beta,
                      consistency=consistency)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,  # type: ignore[arg-type]
                      amp=amp, tile_size=tile_size, loss=loss,
                      cache_dir=None if cache_dir is None else str(cache_dir), val_metric=val_metric,
                      patience=patience, teacher_on_ignore=teacher_on_ignore)
    if tiny and preset not in (None, "tiny"):
        raise click.UsageError(f"--tiny and --preset {preset} disagree; give one of them")
    name = "tiny" if tiny else preset or "default"
    if student_encoder == "unet":
        channels, encoder = student_preset(name), None
    else:
        if preset is not None or tiny:
            raise click.UsageError("--preset/--tiny size the U-Net student; a timm --student-encoder has its own size")
        channels, encoder = TIMM_DECODER_CHANNELS, student_encoder
    # normalisation: the teacher's
    scfg = StudentConfig(channels=channels, dropout=dropout, tile_size=tile_size, head=head, encoder=encoder)
    base = load_release(release, split=split)
    extra: list[Any] = []
    if unlabelled:
        from cellcurate.models.data import UnlabelledImages

        extra.append(UnlabelledImages(list(unlabelled), mpp=unlabelled_mpp))
    if unlabelled_split:
        from cellcurate.models.data import StrippedLabels

        extra.append(StrippedLabels(load_release(release, split=unlabelled_split)))
    result = distill(teacher, base, out_dir=out, student_config=scfg, config=cfg, resume=resume,
                     encoder_weights=weights, val=load_validation(release, val_split),
                     unlabelled=(extra[0] if len(extra) == 1 else ConcatDataset(extra)) if extra else None)
    last = result.history[-1] if result.history else {}
    click.echo(
        f"student: {result.parameters:,} parameters, {len(result.history)} epochs, "
        f"loss {last.get('loss', float('nan')):.4f} -> {result.out_dir}"
    )
    echo_best(result)

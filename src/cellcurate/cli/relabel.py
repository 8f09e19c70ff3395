"""`curate relabel STORE --round N`: one cross-relabeling round (see cellcurate.relabel.rounds)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False, path_type=Path))
@click.option("--round", "round_", required=True, type=int, help="Round number: 1 = cross-source, >= 2 = unified.")
@click.option("--backbone", type=click.Choice(["handcrafted", "cnn", "timm"]), default="handcrafted",
              show_default=True, help="Per-nucleus features (cached per backbone in STORE/features/).")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Local weights file of the timm encoder (.safetensors or torch.save).")
@click.option("--encoder", default=None, help="timm encoder: h-optimus-0 (default), any timm name, or tiny-vit-test.")
@click.option("--classifier", type=click.Choice(["hgb", "logreg"]), default="hgb", show_default=True)
@click.option("--auto-accept", type=click.FloatRange(0.0, 1.0), default=0.9, show_default=True,
              help="Proposals at least this confident are accepted automatically; the rest go to review.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Grouped cross-validation folds (capped at the number of patients / PanNuke folds).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the plan; write nothing.")
@click.option("--overwrite", is_flag=True, help="Supersede a finished run of this round (history is kept).")
@click.option("--truth", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="truth.parquet of a synthetic sample: add proposal accuracy and flag precision/recall.")
@click.option("--no-report", is_flag=True, help="Skip report.html and its figures.")
@click.option("--device", default="cpu", show_default=True,
              help="Where cnn/timm backbones run: cpu, cuda, cuda:N or auto (CUDA: batched, fp16).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="timm encoder arithmetic (autocast): fp16 needs CUDA, bf16 runs on CUDA and CPU "
                   "[default: fp16 on CUDA, fp32 on CPU]. Each precision has its own feature cache.")
def command(store_path: Path, round_: int, backbone: str, weights: Path | None, encoder: str | None,
            classifier: str, auto_accept: float, folds: int, seed: int, dry_run: bool, overwrite: bool,
            truth: Path | None, no_report: bool, device: str, precision: str | None) -> None:
    """Run relabeling round N on STORE: proposals, cleanlab flags, ledger events and a report."""
    import pandas as pd

    from ..datasets.store import Store
    from ..errors import InputFormatError
    from ..relabel.rounds import RoundConfig, run_round

    truth_df = None
    if truth is not None:
        try:
            truth_df = pd.read_parquet(truth)
        except (OSError, ValueError) as exc:
            raise InputFormatError(truth, f"cannot read the truth table ({exc})") from None
    cfg = RoundConfig(backbone=backbone, encoder=encoder, weights=None if weights is None else str(weights),
                      classifier=classifier, folds=folds, seed=seed, auto_accept=auto_accept, report=not no_report,
                      device=device, precision=precision)
    store = Store.open(store_path, mode="r" if dry_run else "a")
    try:
        result = run_round(store, round_, config=cfg, overwrite=overwrite, dry_run=dry_run, truth=truth_df)
    finally:
        store.close()
    click.echo(result.summary())
    if not dry_run and result.folder is not None and (result.folder / "report.html").exists():
        click.echo(f"  report: {result.folder / 'report.html'}")

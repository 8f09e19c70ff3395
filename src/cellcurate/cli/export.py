"""`curate export STORE --version NAME [--out DIR]`: write an immutable, self-verifying release."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False, path_type=Path))
@click.option("--version", "version", required=True, help="Release name, e.g. v1 (never overwritten).")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder that holds the releases (default: STORE/releases).")
@click.option("--allow-unreviewed", is_flag=True,
              help="Release even though flagged nuclei are unreviewed (recorded in the manifest).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the val split draw.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Fraction of MoNuSAC train patients that form the val split.")
@click.option("--pannuke-val-fraction", type=float, default=0.0, show_default=True,
              help="Fraction of PanNuke fold1/fold2 images moved to val (0 keeps the folds whole).")
@click.option("--ome-zarr", "ome_zarr", type=click.Choice(["0.5", "0.4"]), default=None, is_flag=False,
              flag_value="0.5", help="Also write OME-Zarr copies (NGFF 0.5 on Zarr v3, or 0.4) under ome/.")
def command(store_path: Path, version: str, out: Path | None, allow_unreviewed: bool, seed: int,
            val_fraction: float, pannuke_val_fraction: float, ome_zarr: str | None) -> None:
    """Write release VERSION of STORE: tables, zarr arrays, manifest with hashes, dataset card.

    Refuses while flagged nuclei are unreviewed (unless --allow-unreviewed) and never overwrites
    an existing version. Check it later with `curate verify RELEASE`.
    """
    from ..curation.release import export_release
    from ._common import open_store

    with open_store(store_path) as store:
        res = export_release(store, version, out=out, seed=seed, val_fraction=val_fraction,
                             pannuke_val_fraction=pannuke_val_fraction, allow_unreviewed=allow_unreviewed,
                             ome_zarr=ome_zarr)  # type: ignore[arg-type]
    m = res.manifest
    for note in res.warnings:  # e.g. temp folders of killed exports, removed
        click.echo(f"note: {note}", err=True)
    click.echo(f"release {version}: {res.path}")
    click.echo(f"  {res.n_images:,} images, {res.n_nuclei:,} nuclei, {len(m['files']):,} files hashed")
    for split, n in m["splits"]["n_images"].items():
        counts = m["counts"][split]
        ign = sum(m["ignore_counts"][split].values())
        click.echo(f"  {split:<6} {n:>6,} images  {sum(counts.values()):>8,} nuclei  {ign:>6,} ignore")
    if m["review"]["allow_unreviewed"] and m["review"]["unreviewed_flags"]:
        click.echo(f"  warning: {m['review']['unreviewed_flags']} flagged nuclei were unreviewed "
                   "(recorded in the manifest)", err=True)

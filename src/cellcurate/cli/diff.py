"""`curate diff RELEASE_A RELEASE_B`: label changes between two releases, per class pair."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("release_a", type=click.Path(file_okay=False, path_type=Path))
@click.argument("release_b", type=click.Path(file_okay=False, path_type=Path))
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write every changed nucleus (nucleus_id, image_id, from, to) to this CSV.")
@click.option("--limit", type=int, default=20, show_default=True, help="Changed nuclei listed on screen.")
def command(release_a: Path, release_b: Path, csv_path: Path | None, limit: int) -> None:
    """List label changes from RELEASE_A to RELEASE_B (joined on nucleus_id): counts per
    (from class, to class), then nuclei added and removed, and geometry changes: nuclei added
    (those added in geometry review counted apart), deleted, and reshaped (same id, bbox, area
    or centroid changed: a replaced outline)."""
    from ..curation.release import diff_releases

    d = diff_releases(release_a, release_b)
    click.echo(f"{d.version_a} -> {d.version_b}: {len(d.changes):,} label changes among {d.n_common:,} "
               f"common nuclei; {d.added.size:,} added, {d.removed.size:,} removed")
    g = d.geometry_counts()
    click.echo(f"geometry: {g['added']:,} added ({d.reviewed_added.size:,} in review), {g['deleted']:,} deleted, "
               f"{g['reshaped']:,} reshaped")
    if len(d.pairs):
        w = max(10, *(len(str(x)) for x in d.pairs["from_class"]), *(len(str(x)) for x in d.pairs["to_class"]))
        click.echo(f"  {'from':<{w}}  {'to':<{w}}  {'count':>8}")
        for r in d.pairs.itertuples(index=False):
            click.echo(f"  {r.from_class:<{w}}  {r.to_class:<{w}}  {r.count:>8,}")
    for r in d.changes.head(limit).itertuples(index=False):
        click.echo(f"  nucleus {r.nucleus_id} ({r.image_id}): {r.from_class} -> {r.to_class} [{r.to_decided}]")
    if len(d.changes) > limit:
        click.echo(f"  ... {len(d.changes) - limit:,} more (use --csv)")
    if csv_path is not None:
        d.changes.to_csv(csv_path, index=False)
        click.echo(f"wrote {csv_path}")

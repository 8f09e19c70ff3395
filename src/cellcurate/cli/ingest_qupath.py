"""`curate ingest qupath GEOJSON... --store STORE`: bring QuPath edits back as review decisions."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("geojson", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--store", "store_path", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The store the GeoJSON was exported from.")
@click.option("--images", "images", multiple=True,
              help="Store image id of each GEOJSON, in order (default: from feature metadata or file name).")
@click.option("--reviewer", default="qupath", show_default=True, help="Recorded as actor qupath:<reviewer>.")
@click.option("--class-map", "class_map", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help='JSON mapping foreign class names to taxonomy classes, e.g. {"nuclei_tumor": "Neoplastic"}.')
@click.option("--dry-run", is_flag=True, help="Validate and report, append nothing.")
def command(geojson: tuple[Path, ...], store_path: Path, images: tuple[str, ...], reviewer: str,
            class_map: Path | None, dry_run: bool) -> None:
    """Validate every file first (JSON, polygons, coordinates inside the image, known classes), then
    append the label changes as decisions in one transaction. Exporting and importing back
    unchanged appends nothing."""
    from ..curation.qupath import import_geojson
    from ._common import open_store

    with open_store(store_path, mode="r" if dry_run else "a") as store:
        res = import_geojson(store, list(geojson), images=list(images) or None, reviewer=reviewer,
                             class_map=class_map, dry_run=dry_run)
    for r in res.per_file.itertuples(index=False):
        click.echo(f"{Path(r.file).name}: {r.image_id}: {r.features} features, {r.matched} matched, "
                   f"{r.unmatched} unmatched, {r.changed} changed, {r.unchanged} unchanged")
    verb = "would append" if dry_run else "appended"
    click.echo(f"{verb} {len(res.decisions):,} decisions")

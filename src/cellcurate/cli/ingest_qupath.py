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
@click.option("--geometry", is_flag=True,
              help="Also apply geometry edits: moved outlines replace the nucleus's outline, nuclei missing "
                   "from an exported file are deleted, proposals of a `curate review --instances "
                   "--export-geojson` file are decided by their class (Accept, 'Accept: <class>', Keep).")
def command(geojson: tuple[Path, ...], store_path: Path, images: tuple[str, ...], reviewer: str,
            class_map: Path | None, dry_run: bool, geometry: bool) -> None:
    """Validate every file first (size and nesting limits, JSON, valid polygons, coordinates inside
    the image, known classes), then append the label changes against the exported state as
    decisions in one transaction. Exporting and importing back unchanged appends nothing. Edits of
    nuclei with a newer decision than the export, deleted features and moved outlines are listed as
    not applied, with the reason."""
    from ..curation.qupath import import_geojson
    from ._common import open_store

    with open_store(store_path, mode="r" if dry_run else "a") as store:
        res = import_geojson(store, list(geojson), images=list(images) or None, reviewer=reviewer,
                             class_map=class_map, dry_run=dry_run, geometry=geometry)
    for r in res.per_file.itertuples(index=False):
        click.echo(f"{Path(r.file).name}: {r.image_id}: {r.features} features, {r.matched} matched, "
                   f"{r.unmatched} unmatched, {r.changed} changed, {r.unchanged} unchanged, "
                   f"{r.unclassified} unclassified, {r.refused} refused (newer decision), "
                   f"{r.deleted} deleted, {r.moved} outlines moved")
    for r in res.not_applied.itertuples(index=False):
        where = f"feature {r.feature}" + (f" (id {r.id})" if r.id else "") if r.feature is not None else "no feature"
        click.echo(f"not applied: {Path(r.file).name}: {where}, nucleus {r.nucleus_id}: {r.reason}")
    verb = "would append" if dry_run else "appended"
    geo = f", {len(res.geometry):,} geometry events" if geometry else ""
    click.echo(f"{verb} {len(res.decisions):,} decisions{geo}; {len(res.not_applied):,} features not applied")

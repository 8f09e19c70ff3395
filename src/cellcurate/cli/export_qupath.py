"""`curate export-qupath STORE|RELEASE --out DIR`: one QuPath GeoJSON per image."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("source", metavar="STORE|RELEASE", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the GeoJSON files (one per image).")
@click.option("--gzip", "compress", is_flag=True, help="Write .geojson.gz files.")
@click.option("--object-type", type=click.Choice(["detection", "cell", "annotation"]), default="detection",
              show_default=True, help="QuPath object type of each nucleus.")
@click.option("--image", "image_ids", multiple=True, help="Only this image id (repeatable).")
def command(source: Path, out: Path, compress: bool, object_type: str, image_ids: tuple[str, ...]) -> None:
    """Export nuclei as QuPath GeoJSON: polygons (validated, holes kept), class name and colour,
    measurements (area, class probabilities, issue score) and review status in metadata.

    Import them in QuPath 0.5/0.6 with File > Import objects (or drag and drop); bring edits back
    with `curate ingest qupath`.
    """
    from ..curation.qupath import export_qupath

    res = export_qupath(source, out, compress=compress, object_type=object_type,
                        image_ids=list(image_ids) or None)
    click.echo(f"wrote {len(res.files):,} GeoJSON files with {res.n_features:,} features to {out}")

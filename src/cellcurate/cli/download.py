"""`curate download NAME --to DIR`: fetch, verify (SHA-256) and unpack a source's release files."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("download")
@click.argument("name")
@click.option("--to", "to", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to download and unpack into (resumes what an earlier run left).")
@click.option("--part", "parts", multiple=True, help="Only these parts of the source (e.g. fold1, train); repeatable.")
@click.option("--sha256", default=None, help="Checksum to require for a file whose registry entry pins none.")
def command(name: str, to: Path, parts: tuple[str, ...], sha256: str | None) -> None:
    """Download a dataset's release zips (PanNuke folds, MoNuSAC train/test, CoNSeP, Lizard).

    Downloads resume after a cut connection; every file must match its pinned SHA-256 before
    anything is unpacked into the layout `curate ingest NAME DIR` reads.
    """
    from ..datasets.download import download

    result = download(name, to, parts=list(parts) or None, sha256=sha256)
    for f in result.files:
        how = f"resumed at {f['resumed_from']:,} bytes" if f["resumed_from"] else "fetched"
        click.echo(f"  {f['file']}: {how}, {f['bytes_fetched']:,} bytes, sha256 {f['sha256'][:16]}... ok")
    if result.unpacked:
        click.echo(f"unpacked into {to}: {', '.join(result.unpacked)}")
    if result.layout_ok:
        click.echo(f"next: curate ingest {result.source} {to} --store STORE")
    else:
        click.echo(f"warning: {to} does not look like a {result.source} release yet (other parts missing?)", err=True)

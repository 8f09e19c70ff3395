"""`curate info STORE`: a readable summary (or `--json` for scripts)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("store_path", metavar="STORE", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def command(store_path: Path, as_json: bool) -> None:
    """Summarise a store: images, nuclei per source label, current unified labels, curation."""
    from ..datasets.checks import dumps, format_summary, store_summary
    from ._common import open_store

    with open_store(store_path) as store:
        summary = store_summary(store)
        for note in store.notes:  # e.g. read-only media
            click.echo(f"note: {note}", err=True)
    click.echo(dumps(summary) if as_json else format_summary(summary))

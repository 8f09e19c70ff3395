"""`curate ingest pannuke|monusac|qupath`: bring a source's release files into a store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .main import LazyGroup
from ._common import STORE_OPTION


@click.group(cls=LazyGroup, lazy={"qupath": "cellcurate.cli.ingest_qupath:command"})
def command() -> None:
    """Ingest a dataset from its real release format into a store."""


def _store_for_ingest(store_path: Path, taxonomy: Path | None) -> Any:
    from ..datasets.store import Store
    from ..datasets.taxonomy import Taxonomy

    tax = Taxonomy.load(taxonomy) if taxonomy else None
    store = Store.create(store_path, taxonomy=tax, exist_ok=(store_path / "store.json").exists())
    for note in store.notes:  # e.g. an interrupted creation that was cleaned
        click.echo(f"note: {note}", err=True)
    return store


def _wrong_source_hint(path: Path, expected: str) -> None:
    from ..datasets.ingest import detect_source
    from ..errors import InputNotFoundError

    try:
        found = detect_source(path)
    except InputNotFoundError:
        return
    if found != expected:
        raise InputNotFoundError(path, f"holds {found} data, not {expected}; use `curate ingest {found}`")


def _print_result(result: Any, as_json: bool) -> None:
    import json

    if as_json:
        click.echo(json.dumps({
            "source": result.source,
            "units": [{"unit": u.unit, "status": u.status, "images": u.n_images, "nuclei": u.n_nuclei}
                      for u in result.units],
            "report": result.report.as_dict(),
        }, indent=2))
        return
    counts = result.status_counts()
    click.echo(f"{result.source}: {len(result.units)} unit(s): "
               + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    for u in result.units:
        click.echo(f"  {u.unit:<48} {u.status:<9} {u.n_images:>7,} images {u.n_nuclei:>9,} nuclei")
    if result.report.counts:
        click.echo("  converter counts: " + ", ".join(f"{k}={v:,}" for k, v in sorted(result.report.counts.items())))
    for w in result.report.warnings[:10]:
        click.echo(f"  warning: {w}", err=True)
    extra = len(result.report.warnings) - 10
    if extra > 0:
        click.echo(f"  ... {extra} more warnings (see report.json in each unit folder)", err=True)


_COMMON = [
    click.argument("source", type=click.Path(path_type=Path)),
    STORE_OPTION,
    click.option("--overwrite", is_flag=True, help="Replace units already ingested from other files."),
    click.option("--taxonomy", type=click.Path(dir_okay=False, path_type=Path),
                 help="A taxonomy JSON to use instead of the default (new stores only)."),
    click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
]


def _with_common(f: Any) -> Any:
    for deco in reversed(_COMMON):
        f = deco(f)
    return f


@command.command("pannuke")
@_with_common
@click.option("--overlap", type=click.Choice(["highest", "lowest"]), default="highest", show_default=True,
              help="Mask channel that wins a pixel claimed by two: highest (official PanNuke evaluation) "
                   "or lowest (the rule before issue 10). Recorded in the unit's report.json.")
def pannuke_cmd(source: Path, store_path: Path, overwrite: bool, taxonomy: Path | None, as_json: bool,
                overlap: str) -> None:
    """Ingest PanNuke: a release root (`Fold 1/`, `Fold 2/`, ...) or one `Fold k` folder."""
    from ..datasets.ingest import ingest_pannuke
    from ..datasets.pannuke import looks_like_pannuke

    if not looks_like_pannuke(source):
        _wrong_source_hint(source, "pannuke")
    with _store_for_ingest(store_path, taxonomy) as store:
        _print_result(ingest_pannuke(store, source, overwrite=overwrite, overlap=overlap), as_json)


@command.command("monusac")
@_with_common
@click.option("--split", type=click.Choice(["train", "test"]), default=None,
              help="Override the split inferred from the folder name.")
def monusac_cmd(source: Path, store_path: Path, overwrite: bool, taxonomy: Path | None, as_json: bool,
                split: str | None) -> None:
    """Ingest MoNuSAC: training/testing release folders, both, or one patient folder."""
    from ..datasets.ingest import ingest_monusac
    from ..datasets.monusac import looks_like_monusac

    if not looks_like_monusac(source):
        _wrong_source_hint(source, "monusac")
    with _store_for_ingest(store_path, taxonomy) as store:
        _print_result(ingest_monusac(store, source, split=split, overwrite=overwrite), as_json)

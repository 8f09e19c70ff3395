"""`curate ingest SOURCE PATH`: bring a source's release files into a store (one subcommand per
installed reader of :mod:`cellcurate.datasets.sources`, plus `qupath` for GeoJSON edits)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ._common import STORE_OPTION
from .main import LazyGroup


class SourceGroup(LazyGroup):
    """`curate ingest`: one subcommand per installed source reader (built-in and entry points)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from ..datasets.sources import source_names

        return sorted(set(super().list_commands(ctx)) | set(source_names()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            return cmd
        from ..datasets.sources import find_source

        spec = find_source(cmd_name)
        return None if spec is None else _source_command(spec)


@click.group(cls=SourceGroup, lazy={"qupath": "cellcurate.cli.ingest_qupath:command"}, invoke_without_command=True)
@click.pass_context
def command(ctx: click.Context) -> None:
    """Ingest a dataset from its real release format into a store.

    `curate ingest SOURCE PATH --store S`; run `curate ingest` alone to list the installed readers.
    """
    if ctx.invoked_subcommand is None:
        from ..datasets.sources import installed_sources

        click.echo("installed source readers (curate ingest SOURCE PATH --store S):")
        for spec in installed_sources():
            click.echo(f"  {spec.name:<10} {spec.title:<10} {spec.origin:<12} {spec.description}")
        click.echo("  qupath     QuPath     cellcurate   GeoJSON edits exported by QuPath")


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
    click.option("--jobs", type=click.IntRange(min=1), default=None,
                 help="Worker processes converting the files (default: the usable cores; 1 = in this process). "
                      "The store is the same for every value."),
]


def _with_common(f: Any) -> Any:
    for deco in reversed(_COMMON):
        f = deco(f)
    return f


def _source_command(spec: Any) -> click.Command:
    """The `curate ingest NAME` command of one registry entry (its reader options included)."""

    def run(source: Path, store_path: Path, overwrite: bool, taxonomy: Path | None, as_json: bool,
            jobs: int | None, **options: Any) -> None:
        from ..datasets.ingest import ingest_source

        if not spec.looks_like(source):
            _wrong_source_hint(source, spec.name)
        with _store_for_ingest(store_path, taxonomy) as store:
            _print_result(ingest_source(store, spec.name, source, overwrite=overwrite, jobs=jobs, **options),
                          as_json)

    f: Any = run
    for opt in reversed(spec.options):
        f = click.option(f"--{opt.name}", opt.name.replace("-", "_"), default=opt.default,
                         type=click.Choice(list(opt.choices)) if opt.choices else str, help=opt.help)(f)
    f = _with_common(f)
    return click.command(spec.name, help=spec.description or f"Ingest {spec.title}.")(f)

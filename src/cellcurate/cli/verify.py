"""`curate verify STORE|RELEASE`: check a store's consistency or re-hash a release."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.argument("path", metavar="STORE|RELEASE", type=click.Path(path_type=Path))
@click.option("--quick", is_flag=True, help="Store: skip reading every instance map.")
def command(path: Path, quick: bool) -> None:
    """Exit 0 when PATH is intact; otherwise name every problem and exit 1.

    A store is checked for tables vs arrays vs ledger consistency; a release (a folder with
    manifest.json) is re-hashed file by file.
    """
    from ..errors import InputNotFoundError

    if (path / "manifest.json").is_file():
        from ..curation.release import clean_export_leftovers, verify_release

        notes, leftover_problems = clean_export_leftovers(path.resolve().parent)
        for n in notes:
            click.echo(f"note: {n}", err=True)
        problems = verify_release(path) + leftover_problems
        if problems:
            for p in problems:
                click.echo(f"FAIL {p}", err=True)
            click.echo(f"release {path}: {len(problems)} problem(s)", err=True)
            sys.exit(1)
        click.echo(f"release {path}: OK (every file matches its sha256 in manifest.json)")
        return
    if not (path / "store.json").is_file():
        raise InputNotFoundError(path, "neither a store (store.json) nor a release (manifest.json)")
    from ..datasets.checks import verify_store
    from ._common import open_store

    with open_store(path) as store:
        res = verify_store(store, deep=not quick)
    for n in res.notes:
        click.echo(f"note: {n}", err=True)
    checked = ", ".join(f"{v:,} {k}" for k, v in res.checked.items())
    if res.problems:
        for p in res.problems:
            click.echo(f"FAIL {p}", err=True)
        click.echo(f"store {path}: {len(res.problems)} problem(s) ({checked})", err=True)
        sys.exit(1)
    click.echo(f"store {path}: OK ({checked})")

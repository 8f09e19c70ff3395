"""Small helpers shared by CLI commands (kept import-light)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

STORE_OPTION = click.option(
    "--store", "store_path", required=True, type=click.Path(file_okay=False, path_type=Path),
    help="Store directory (created on first ingest).",
)


def open_store(path: Path, *, mode: str = "r") -> Any:
    from ..datasets.store import Store

    return Store.open(path, mode=mode)


def echo_err(msg: str) -> None:
    click.echo(msg, err=True)

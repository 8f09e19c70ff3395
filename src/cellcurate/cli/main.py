"""The `curate` command group.

Commands live in one module each and are imported only when run (or when `--help` lists them,
which imports the small click modules but none of the heavy libraries), so `curate --help` and
`curate --version` answer at once.

Errors: any :class:`cellcurate.errors.CellcurateError` (and OSError from a bad path) becomes one
line `error: ...` on stderr and exit status 1; usage errors exit 2 (click's convention).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

#: command name -> "module:attribute" (each attribute a click.Command or click.Group)
COMMANDS: dict[str, str] = {
    "demo": "cellcurate.cli.demo:command",
    "ingest": "cellcurate.cli.ingest:command",
    "download": "cellcurate.cli.download:command",
    "info": "cellcurate.cli.info:command",
    "verify": "cellcurate.cli.verify:command",
    "relabel": "cellcurate.cli.relabel:command",
    "instances": "cellcurate.cli.instances:command",
    "issues": "cellcurate.cli.issues:command",
    "review": "cellcurate.cli.review:command",
    "export": "cellcurate.cli.export:command",
    "export-qupath": "cellcurate.cli.export_qupath:command",
    "diff": "cellcurate.cli.diff:command",
    "train": "cellcurate.cli.train:command",
    "distill": "cellcurate.cli.distill:command",
    "evaluate": "cellcurate.cli.evaluate:command",
    "predict": "cellcurate.cli.predict:command",
    "export-model": "cellcurate.cli.export_model:command",
    "qupath-script": "cellcurate.cli.qupath_script:command",
}


def load_command(target: str) -> click.Command | None:
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None  # command not installed in this build
        raise
    return getattr(module, attr)


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx))
        names.update(n for n, t in self.lazy.items() if _module_exists(t))
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            return load_command(self.lazy[cmd_name])
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        from ..errors import CellcurateError

        try:
            return super().invoke(ctx)
        except CellcurateError as exc:
            _fail(str(exc))
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
            where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
            _fail(f"{where}{exc.strerror or exc}")
        except OSError as exc:
            if exc.errno == 28:  # ENOSPC
                _fail(f"{exc.filename or 'disk'}: no space left on device; nothing was committed")
            if exc.errno == 30:  # EROFS
                _fail(f"{exc.filename or 'store'}: read-only file system; nothing was committed")
            raise
        except KeyboardInterrupt:
            click.echo("interrupted; nothing half-written was committed", err=True)
            sys.exit(130)


def _module_exists(target: str) -> bool:
    import importlib.util

    module_name = target.split(":")[0]
    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:
        return False


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _version() -> str:
    from .. import __version__

    return __version__


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cellcurate", prog_name="curate", message="%(prog)s %(version)s")
def cli() -> None:
    """Curate PanNuke and MoNuSAC into one versioned 7-class nucleus dataset.

    \b
    Typical flow:
      curate ingest pannuke PATH --store S     # and: curate ingest monusac PATH --store S
      curate relabel S --round 1               # then --round 2
      curate review S                          # napari, keyboard-driven
      curate export S --version v1 --out R
      curate train teacher --release R/v1 ...  # then: curate distill, evaluate, export-model

    `curate demo` runs the whole flow on a built-in synthetic sample.
    """


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("KMP_WARNINGS", "0")
    cli.main(args=argv, prog_name="curate")


if __name__ == "__main__":
    main()

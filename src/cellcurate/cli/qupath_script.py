"""`curate qupath-script --out FILE`: the Groovy script that runs `curate predict` from QuPath.

The script ships as package data (``cellcurate/curation/qupath_predict.groovy``); this command
fills in the command that runs curate (default: this Python with ``-m cellcurate.cli.main``), the
model and the device, and writes it atomically. Steps for a pathologist: docs/QUPATH.md.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click


def _groovy(s: str) -> str:
    """A Groovy single-quoted string literal."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def render_script(*, curate: list[str], model: str, device: str) -> str:
    """The Groovy script with its settings filled in."""
    from importlib.resources import files

    text = files("cellcurate.curation").joinpath("qupath_predict.groovy").read_text(encoding="utf-8")
    values = {"{{CURATE}}": "[" + ", ".join(_groovy(c) for c in curate) + "]", "{{MODEL}}": _groovy(model),
              "{{DEVICE}}": _groovy(device)}
    for key, value in values.items():
        text = text.replace(key, value)
    return text


@click.command()
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the .groovy script.")
@click.option("--model", "model_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="The exported student (TorchScript, ONNX or checkpoint folder); edit MODEL in the script otherwise.")
@click.option("--curate", "curate_cmd", default=None,
              help="Command that runs curate on the QuPath machine (default: this Python -m cellcurate.cli.main).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
def command(out_path: Path, model_path: Path | None, curate_cmd: str | None, device: str) -> None:
    """Write a QuPath 0.5/0.6 script that runs `curate predict` on the selected annotations (or the
    whole image) and imports the nuclei as detections."""

    curate = shlex.split(curate_cmd) if curate_cmd else [sys.executable, "-m", "cellcurate.cli.main"]
    model = str(model_path.resolve()) if model_path else "/path/to/student.pt"
    text = render_script(curate=curate, model=model, device=device)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    from ..core.atomic import atomic_write_text

    atomic_write_text(out_path, text)
    click.echo(f"QuPath script -> {out_path} (open it in Automate > Script editor)")

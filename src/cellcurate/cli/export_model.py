"""`curate export-model MODEL --out DIR [--format onnx,torchscript]`: deployable model files."""

from __future__ import annotations

import json
from pathlib import Path

import click

FORMATS = ("onnx", "torchscript")


def _formats(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    chosen = tuple(v.strip().lower() for v in value.split(",") if v.strip())
    bad = [v for v in chosen if v not in FORMATS]
    if bad or not chosen:
        raise click.BadParameter(f"expected a comma-separated subset of {', '.join(FORMATS)}, got {value!r}")
    return chosen


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for model.onnx / model.torchscript.pt and meta.json.")
@click.option("--format", "formats", default="onnx,torchscript", show_default=True, callback=_formats,
              help="Comma-separated: onnx, torchscript.")
@click.option("--opset", default=17, show_default=True, help="ONNX opset.")
@click.option("--atol", default=1e-4, show_default=True, help="Largest allowed difference from PyTorch.")
@click.option("--encoder-weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A teacher's encoder weights, overriding the path in its config.json.")
def command(model_path: Path, out_dir: Path, formats: tuple[str, ...], opset: int, atol: float,
            encoder_weights: Path | None) -> None:
    """Export a checkpoint (usually the student) to ONNX and/or TorchScript with its metadata
    (classes, colours, pixel size, normalisation, input size), then run each export and compare
    its outputs with PyTorch's (ONNX through onnxruntime on CPU). Also writes a bioimage.io model
    description (rdf.yaml, format 0.5) with test tensors; every file is mode 0644."""
    from ..models.checkpoint import load_model
    from ..models.export import (
        check_onnx,
        check_torchscript,
        export_metadata,
        export_onnx,
        export_torchscript,
        write_bioimageio_rdf,
    )
    from ..models.predict import atomic_path

    model = load_model(model_path, encoder_weights=encoder_weights).cpu().eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
    weights = {f: w for f, w in weights.items() if f in formats}
    if "onnx" in formats:
        path = export_onnx(model, out_dir / "model.onnx", opset=opset)
        diff = check_onnx(model, path, atol=atol)
        click.echo(f"onnx: {path} (max |onnxruntime - torch| = {diff:.3g}, atol {atol:g})")
    if "torchscript" in formats:
        path = export_torchscript(model, out_dir / "model.torchscript.pt")
        diff = check_torchscript(model, path, atol=atol)
        click.echo(f"torchscript: {path} (max |torchscript - torch| = {diff:.3g}, atol {atol:g})")
    meta = export_metadata(model, fmt="+".join(formats))
    with atomic_path(out_dir / "meta.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    click.echo(f"meta: {out_dir / 'meta.json'}")
    rdf = write_bioimageio_rdf(out_dir, model, weights={f: out_dir / w for f, w in weights.items()})
    click.echo(f"bioimage.io: {rdf} (model description format 0.5, test tensors beside it)")

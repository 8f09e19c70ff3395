"""`curate predict MODEL IMAGES... --out DIR`: instance maps, nucleus tables and QuPath GeoJSON.

Per image ``NAME.png`` the command writes ``NAME_instances.tif`` (int32 instance map),
``NAME_nuclei.parquet`` (one row per nucleus) and ``NAME.geojson``: a QuPath FeatureCollection
with one ``detection`` per nucleus (Polygon in pixel coordinates, classification name and colour,
measurements: area, nucleus probability and the class probabilities). Feature ids are UUIDs
derived from the image name and the instance id, so a rerun gives the same ids.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import click

_NAMESPACE = uuid.UUID("6f1c1c1e-5a52-4d3e-9a0e-63656c6c6375")


def geojson_features(prediction: Any, *, image_name: str) -> list[dict[str, Any]]:
    """QuPath detection features of a :class:`cellcurate.models.predict.Prediction`."""
    import numpy as np

    colors = dict(zip(prediction.class_names, prediction.colors))
    prob_cols = [f"prob_{n}" for n in prediction.class_names]
    features: list[dict[str, Any]] = []
    for row in prediction.nuclei.itertuples(index=False):
        ring = np.asarray(row.polygon, float)
        if len(ring) < 4:  # not a valid closed ring
            continue
        hexc = colors[row.class_name].lstrip("#")
        measurements = {"Area px": int(row.area), "Nucleus probability": round(float(row.nucleus_prob), 4)}
        for name, col in zip(prediction.class_names, prob_cols):
            measurements[f"Probability {name}"] = round(float(getattr(row, col)), 4)
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(_NAMESPACE, f"{image_name}/{int(row.instance_id)}")),
            "geometry": {"type": "Polygon", "coordinates": [np.round(ring, 2).tolist()]},
            "properties": {
                "objectType": "detection",
                "name": f"nucleus {int(row.instance_id)}",
                "classification": {"name": row.class_name, "color": [int(hexc[i:i + 2], 16) for i in (0, 2, 4)]},
                "measurements": measurements,
            },
        })
    return features


def write_geojson(path: Path, prediction: Any, *, image_name: str) -> int:
    """Write the FeatureCollection atomically; return the number of features."""
    from ..models.predict import atomic_path

    features = geojson_features(prediction, image_name=image_name)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}) + "\n", encoding="utf-8")
    return len(features)


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, path_type=Path))
@click.argument("images", metavar="IMAGES...", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the instance maps, tables and GeoJSON files.")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Pixel size of the images in µm/px (default: the model's); images are resampled to the model's.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--tile", default=256, show_default=True, help="Tile side in pixels (a multiple of 32).")
@click.option("--overlap", default=64, show_default=True, help="Overlap between tiles in pixels.")
@click.option("--batch-size", default=8, show_default=True, help="Tiles per forward pass.")
@click.option("--encoder-weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A teacher's encoder weights, overriding the path in its config.json.")
def command(model_path: Path, images: tuple[Path, ...], out_dir: Path, mpp: float | None, device: str,
            tile: int, overlap: int, batch_size: int, encoder_weights: Path | None) -> None:
    """Segment and classify the nuclei of RGB IMAGES (PNG, TIF, JPG) with MODEL (a checkpoint
    folder, a TorchScript or an ONNX file); write one instance map, one nucleus table and one
    QuPath GeoJSON per image."""
    from tqdm.auto import tqdm

    from ..models.predict import load_for_inference, predict_image, read_image, resolve_device, save_prediction

    dev = resolve_device(device)
    model = load_for_inference(model_path, device=dev, encoder_weights=encoder_weights)
    stems: set[str] = set()
    for path in tqdm(images, desc="predict", unit="image", disable=None):
        stem = path.stem
        k = 2
        while stem in stems:  # same file name from two folders
            stem, k = f"{path.stem}-{k}", k + 1
        stems.add(stem)
        image = read_image(path)
        pred = predict_image(model, image, mpp=mpp, tile=tile, overlap=overlap, batch_size=batch_size, device=dev)
        save_prediction(pred, out_dir, stem)
        n = write_geojson(out_dir / f"{stem}.geojson", pred, image_name=path.name)
        click.echo(f"{path.name}: {n} nuclei -> {out_dir / (stem + '.geojson')}")

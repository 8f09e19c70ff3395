"""`curate predict MODEL IMAGES... --out DIR`: instance maps, nucleus tables and QuPath GeoJSON.

Per image ``NAME.png`` the command writes ``NAME_instances.tif`` (int32 instance map),
``NAME_nuclei.parquet`` (one row per nucleus, see :func:`cellcurate.models.postprocess.instance_table`)
and ``NAME.geojson``, written by the QuPath export's own writer
(:func:`cellcurate.curation.qupath.write_geojson`): one ``detection`` per nucleus whose polygon
traces the nucleus' pixel edges exactly (:func:`cellcurate.core.geometry.mask_to_geometry`),
classified with the class name and colour, with measurements ``area_px`` (and ``area_um2`` when
the pixel size is known), ``nucleus_prob`` and ``prob_<Class>``, and metadata ``image`` and
``instance_id``. Feature ids are UUIDs derived from the image name and the instance id, so a
rerun gives the same ids.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import click

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://cellcurate/prediction")


def prediction_features(prediction: Any, *, image_name: str) -> Any:
    """A frame for :func:`cellcurate.curation.qupath.write_geojson`: one row per nucleus with
    ``geometry`` (shapely, pixel edges), ``id``, ``class_name``, ``color``, ``measurements`` and
    ``metadata``."""
    import pandas as pd
    from scipy import ndimage as ndi

    from ..core.geometry import mask_to_geometry

    colors = dict(zip(prediction.class_names, prediction.colors))
    inst = prediction.instances
    boxes = ndi.find_objects(inst, max_label=len(prediction.nuclei))
    rows = []
    for row, box in zip(prediction.nuclei.itertuples(index=False), boxes):
        if box is None:
            continue
        iid = int(row.instance_id)
        geom = mask_to_geometry(inst[box] == iid, offset=(box[0].start, box[1].start))
        if geom is None:
            continue
        meas = {"area_px": float(row.area), "nucleus_prob": float(row.nucleus_prob)}
        if prediction.mpp:
            meas["area_um2"] = float(row.area) * float(prediction.mpp) ** 2
        for name in prediction.class_names:
            meas[f"prob_{name}"] = float(getattr(row, f"prob_{name}"))
        rows.append({
            "geometry": geom,
            "id": str(uuid.uuid5(_NAMESPACE, f"{image_name}/{iid}")),
            "class_name": row.class_name,
            "color": colors[row.class_name],
            "measurements": meas,
            "metadata": {"image": image_name, "instance_id": iid},
        })
    return pd.DataFrame(rows, columns=["geometry", "id", "class_name", "color", "measurements", "metadata"])


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
@click.option("--max-pixels", type=click.IntRange(min=1), default=2**28, show_default=True,
              help="Refuse images with more pixels (height x width) than this, before decoding them.")
def command(model_path: Path, images: tuple[Path, ...], out_dir: Path, mpp: float | None, device: str,
            tile: int, overlap: int, batch_size: int, encoder_weights: Path | None, max_pixels: int) -> None:
    """Segment and classify the nuclei of RGB IMAGES (PNG, TIF, JPG) with MODEL (a checkpoint
    folder, a TorchScript or an ONNX file); write one instance map, one nucleus table and one
    QuPath GeoJSON per image."""
    from tqdm.auto import tqdm

    from ..curation.qupath import write_geojson
    from ..models.predict import (
        load_for_inference,
        predict_image,
        read_image,
        resolve_device,
        save_prediction,
    )

    dev = resolve_device(device)
    model = load_for_inference(model_path, device=dev, encoder_weights=encoder_weights)
    stems: set[str] = set()
    for path in tqdm(images, desc="predict", unit="image", disable=None):
        stem = path.stem
        k = 2
        while stem in stems:  # same file name from two folders
            stem, k = f"{path.stem}-{k}", k + 1
        stems.add(stem)
        image = read_image(path, max_pixels=max_pixels)
        pred = predict_image(model, image, mpp=mpp, tile=tile, overlap=overlap, batch_size=batch_size, device=dev)
        save_prediction(pred, out_dir, stem)
        features = prediction_features(pred, image_name=path.name)
        write_geojson(out_dir / f"{stem}.geojson", features, object_type="detection")
        click.echo(f"{path.name}: {len(features)} nuclei -> {out_dir / (stem + '.geojson')}")

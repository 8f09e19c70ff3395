"""`curate predict MODEL IMAGES... --out DIR`: instance maps, nucleus tables and QuPath GeoJSON.

Per image ``NAME.png`` the command writes ``NAME_instances.tif`` (int32 instance map),
``NAME_nuclei.parquet`` (one row per nucleus, see :func:`cellcurate.models.postprocess.instance_table`)
and ``NAME.geojson``, written by the QuPath export's own writer
(:func:`cellcurate.curation.qupath.write_geojson`): one ``detection`` per nucleus whose polygon
traces the nucleus' pixel edges exactly (:func:`cellcurate.core.geometry.mask_to_geometry`),
classified with the class name and colour, with measurements ``area_px`` (and ``area_um2`` when
the pixel size is known), ``nucleus_prob`` and ``prob_<Class>``, and metadata ``image`` and
``instance_id``. Feature ids are UUIDs derived from the image name and the instance id, so a
rerun gives the same ids. ``--offset X,Y`` adds X, Y to every coordinate of the table and the
GeoJSON (not of the instance map), so the nuclei of a region exported from a slide land where the
region came from.

Slides (``.svs``, ``.ndpi``, ``.scn``, ``.mrxs``, OME-TIFF, any tiled or pyramidal TIFF; or any
file listed with ``--slides``) take the streaming slide path (:mod:`cellcurate.models.wsi`, driven
by :mod:`cellcurate.cli._slidejob`): tissue detection, ``--roi``/``--region``, chunked stitching,
``--resume``, and per slide ``NAME_nuclei.parquet``, ``NAME.geojson.gz`` and ``NAME_summary.json``
(and with ``--labels-zarr`` ``NAME_labels.ome.zarr``).
Several slides run as one Dask task each (:mod:`cellcurate.cli._cohort`), on a local cluster of
``--workers`` processes or on ``--scheduler``; ``cohort_summary.parquet`` lists them.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import click

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://cellcurate/prediction")


def prediction_features(prediction: Any, *, image_name: str, offset: tuple[float, float] = (0.0, 0.0)) -> Any:
    """A frame for :func:`cellcurate.curation.qupath.write_geojson`: one row per nucleus with
    ``geometry`` (shapely, pixel edges), ``id``, ``class_name``, ``color``, ``measurements`` and
    ``metadata``. ``offset`` (x, y) is added to the coordinates."""
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
        geom = mask_to_geometry(inst[box] == iid, offset=(box[0].start + offset[1], box[1].start + offset[0]))
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


def _pair(text: str | None, n: int, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != n:
        raise click.BadParameter(f"expected {n} comma-separated numbers, got {text!r}", param_hint=name)
    return vals


def _slide_list(path: Path) -> list[Path]:
    """Slides named by a CSV with a ``slide`` (or ``path``) column, or one path per line;
    relative paths are relative to the CSV's folder."""
    import csv

    from ..errors import InputFormatError

    text = path.read_text(encoding="utf-8-sig")
    rows = list(csv.reader(text.splitlines()))
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise InputFormatError(path, "slide list is empty")
    header = [c.strip().lower() for c in rows[0]]
    col = next((header.index(k) for k in ("slide", "path") if k in header), None)
    body = rows[1:] if col is not None else rows
    col = col or 0
    out = []
    for i, r in enumerate(body, start=2 if body is not rows else 1):
        p = Path(r[col].strip())
        p = p if p.is_absolute() else path.parent / p
        if not p.exists():
            raise InputFormatError(path, f"line {i}: slide {p} not found")
        out.append(p)
    return out


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, path_type=Path))
@click.argument("images", metavar="IMAGES...", nargs=-1,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the instance maps, tables and GeoJSON files.")
@click.option("--mpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Pixel size of the images in µm/px (default: the model's; slides: their metadata); "
                   "images are resampled to the model's.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--tile", default=256, show_default=True, help="Tile side in pixels (a multiple of 32).")
@click.option("--overlap", default=64, show_default=True, help="Overlap between tiles in pixels.")
@click.option("--batch-size", default=8, show_default=True, help="Tiles per forward pass.")
@click.option("--encoder-weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A teacher's encoder weights, overriding the path in its config.json.")
@click.option("--offset", default=None, metavar="X,Y",
              help="Add X,Y (level-0 pixels) to every output coordinate: where the image or region came from.")
@click.option("--slides", "slides_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A CSV (column 'slide' or 'path') or a list of slides, one per line.")
@click.option("--region", default=None, metavar="X,Y,W,H", help="Slides: only this level-0 box.")
@click.option("--roi", "roi_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Slides: a GeoJSON of annotations (e.g. from QuPath); only nuclei inside them.")
@click.option("--tissue", type=click.Choice(["otsu", "all"]), default="otsu", show_default=True,
              help="Slides: run tiles on detected tissue only (Otsu on saturation) or everywhere.")
@click.option("--tissue-mask", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Slides: a mask image (non-zero = tissue, the slide's aspect ratio) instead of detection.")
@click.option("--object-type", type=click.Choice(["detection", "cell"]), default="detection", show_default=True,
              help="Slides: QuPath object type of the nuclei.")
@click.option("--chunk-tiles", default=4, show_default=True, help="Slides: tiles per side of a post-processing chunk.")
@click.option("--resume", is_flag=True, help="Slides: keep the finished chunks (and slides) of an interrupted run.")
@click.option("--workers", default=1, show_default=True, help="Cohorts: worker processes of the local Dask cluster.")
@click.option("--scheduler", default=None, metavar="tcp://HOST:PORT", help="Cohorts: an existing Dask scheduler.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=2**28, show_default=True,
              help="Refuse images with more pixels (height x width) than this, before decoding them.")
@click.option("--labels-zarr", "labels_zarr", type=click.Choice(["0.5", "0.4"]), default=None, is_flag=False,
              flag_value="0.5", help="Slides: also write NAME_labels.ome.zarr, the nuclei as OME-Zarr instance and "
                                     "class label images (NGFF 0.5 on Zarr v3, or 0.4), ids as in the table.")
@click.option("--gpus-per-task", default=0, show_default=True,
              help="Cohorts: Dask resource 'GPU' each slide task needs (workers started with --resources GPU=N).")
def command(model_path: Path, images: tuple[Path, ...], out_dir: Path, mpp: float | None, device: str,
            tile: int, overlap: int, batch_size: int, encoder_weights: Path | None, offset: str | None,
            slides_csv: Path | None, region: str | None, roi_path: Path | None, tissue: str,
            tissue_mask: Path | None, object_type: str, chunk_tiles: int, resume: bool, workers: int,
            scheduler: str | None, max_pixels: int, labels_zarr: str | None, gpus_per_task: int) -> None:
    """Segment and classify the nuclei of RGB IMAGES (PNG, TIF, JPG) or whole slides with MODEL (a
    checkpoint folder, a TorchScript or an ONNX file); write one instance map, one nucleus table and
    one QuPath GeoJSON per image (slides: a nucleus table, a GeoJSON and a summary)."""
    from ..models.slide import is_slide

    off = _pair(offset, 2, "--offset") or (0.0, 0.0)
    reg = _pair(region, 4, "--region")
    slides = [p for p in images if is_slide(p)]
    if slides_csv is not None:
        slides += _slide_list(slides_csv)
    plain = [p for p in images if p not in slides]
    if not images and slides_csv is None:
        raise click.UsageError("give IMAGES or --slides")
    if plain:
        if roi_path or reg or tissue_mask or labels_zarr:
            raise click.UsageError(f"--roi, --region, --tissue-mask and --labels-zarr apply to slides; {plain[0]} is a "
                                   "plain image")
        _predict_images(model_path, plain, out_dir, mpp, device, tile, overlap, batch_size, encoder_weights, off,
                        max_pixels=max_pixels)
    if not slides:
        return
    kwargs: dict[str, Any] = {"mpp": mpp, "device": device, "tile": tile, "overlap": overlap, "batch_size": batch_size,
              "chunk_tiles": chunk_tiles, "offset": off, "region": None if reg is None else tuple(int(v) for v in reg),
              "roi_path": None if roi_path is None else str(roi_path), "tissue": tissue,
              "tissue_mask": None if tissue_mask is None else str(tissue_mask), "object_type": object_type,
              "resume": resume, "encoder_weights": None if encoder_weights is None else str(encoder_weights),
              "labels_zarr": labels_zarr}
    stems = _stems(slides)
    if len(slides) == 1 and scheduler is None and slides_csv is None:
        from ._slidejob import run_slide

        s = run_slide(str(model_path), str(slides[0]), str(out_dir), stem=stems[0], **kwargs)
        click.echo(f"{slides[0].name}: {s['nuclei']} nuclei -> {s['geojson']}"
                   + (" (already done)" if s.get("skipped") else ""))
        return
    from ._cohort import run_cohort

    kwargs["resume"] = True  # a cohort always picks up finished slides and chunks
    frame = run_cohort(str(model_path), [str(p) for p in slides], stems, str(out_dir), workers=workers,
                       scheduler=scheduler, gpus_per_task=gpus_per_task, job=kwargs)
    failed = frame[frame["status"] != "done"]
    click.echo(f"{len(frame) - len(failed)}/{len(frame)} slides done, {int(frame['nuclei'].sum())} nuclei -> "
               f"{out_dir / 'cohort_summary.parquet'}")
    if len(failed):
        from ..errors import StateError

        raise StateError(f"{len(failed)} slides failed, first: {failed.iloc[0]['slide']}: {failed.iloc[0]['error']}")


def _stems(paths: list[Path]) -> list[str]:
    stems: list[str] = []
    for path in paths:
        stem, k = path.stem, 2
        stem = stem.removesuffix(".ome")
        base = stem
        while stem in stems:  # same file name from two folders
            stem, k = f"{base}-{k}", k + 1
        stems.append(stem)
    return stems


def _predict_images(model_path: Path, images: list[Path], out_dir: Path, mpp: float | None, device: str, tile: int,
                    overlap: int, batch_size: int, encoder_weights: Path | None, offset: tuple[float, ...], *,
                    max_pixels: int = 2**28) -> None:
    from tqdm.auto import tqdm

    from ..curation.qupath import write_geojson
    from ..models.predict import (
        load_for_inference,
        oom_error,
        predict_image,
        read_image,
        resolve_device,
        save_prediction,
    )

    dev = resolve_device(device)
    model = load_for_inference(model_path, device=dev, encoder_weights=encoder_weights)
    ox, oy = float(offset[0]), float(offset[1])
    for path, stem in tqdm(list(zip(images, _stems(images))), desc="predict", unit="image", disable=None):
        image = read_image(path, max_pixels=max_pixels)
        try:
            pred = predict_image(model, image, mpp=mpp, tile=tile, overlap=overlap, batch_size=batch_size, device=dev)
        except MemoryError as exc:
            raise oom_error(exc, f"{path} ({image.shape[1]}x{image.shape[0]} px)") from None
        if ox or oy:
            pred.nuclei["centroid_x"] += ox
            pred.nuclei["centroid_y"] += oy
            if "polygon" in pred.nuclei:
                pred.nuclei["polygon"] = [p + [ox, oy] for p in pred.nuclei["polygon"]]
        save_prediction(pred, out_dir, stem)
        features = prediction_features(pred, image_name=path.name, offset=(ox, oy))
        write_geojson(out_dir / f"{stem}.geojson", features, object_type="detection")
        click.echo(f"{path.name}: {len(features)} nuclei -> {out_dir / (stem + '.geojson')}")

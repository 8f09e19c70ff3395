"""One slide through the slide path, as ``curate predict`` and its Dask tasks run it.

:func:`run_slide` opens the slide, builds the tissue map and ROI, runs
:func:`cellcurate.models.wsi.predict_slide`, writes the QuPath GeoJSON from the nucleus table and
finally ``<stem>_summary.json``. The summary is written last: a slide whose summary exists (with
the same fingerprint) is done, and a rerun or a Dask retry of it returns at once; an unfinished one
resumes from its finished chunks. Every output appears by atomic rename, so a killed worker leaves
no half-written file, only ``<stem>.partial/`` to resume from.

Models are loaded once per process (cached by path and device).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

_MODELS: dict[tuple[str, str], Any] = {}


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 (16 hex) of a model file, or of a checkpoint folder's files."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _model(path: str, device: str, encoder_weights: str | None) -> Any:
    from ..models.predict import load_for_inference

    key = (str(Path(path).resolve()), device)
    if key not in _MODELS:
        _MODELS[key] = load_for_inference(path, device=device, encoder_weights=encoder_weights)
    return _MODELS[key]


def _geojson_sink(path: Path, work: Path, meta: dict[str, Any], *, image_name: str, object_type: str) -> Any:
    from ..curation.qupath_slide import NucleiGeoJSONWriter

    return NucleiGeoJSONWriter(path, image_name=image_name, object_type=object_type, meta=meta,
                               tmp=work / "geojson.tmp")


def run_slide(model_path: str, slide_path: str, out_dir: str, *, stem: str | None = None, mpp: float | None = None,
              device: str = "cpu", tile: int = 256, overlap: int = 64, batch_size: int = 8, chunk_tiles: int = 4,
              offset: tuple[float, float] = (0.0, 0.0), region: tuple[int, int, int, int] | None = None,
              roi_path: str | None = None, tissue: str = "otsu", tissue_mask: str | None = None,
              object_type: str = "detection", resume: bool = True, encoder_weights: str | None = None,
              labels_zarr: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Predict one slide; returns its summary (also written as ``<stem>_summary.json``).

    ``labels_zarr`` ("0.5" or "0.4"): also write ``<stem>_labels.ome.zarr``, the nuclei as an
    OME-Zarr labels group of that NGFF version (:func:`cellcurate.curation.omezarr.write_slide_labels`).
    """
    import functools

    from ..curation.omezarr import OME_VERSIONS, write_slide_labels
    from ..curation.qupath import mask_to_geometry
    from ..curation.qupath_slide import read_roi
    from ..errors import ConfigError
    from ..models.predict import resolve_device
    from ..models.slide import open_slide
    from ..models.tissue import TissueMap, detect_tissue, detection_side, load_tissue_mask
    from ..models.wsi import SlideOptions, predict_slide

    t0 = time.perf_counter()
    out = Path(out_dir)
    stem = stem or Path(slide_path).stem
    summary_path = out / f"{stem}_summary.json"
    model_id = file_digest(model_path)
    opts = SlideOptions(tile=tile, overlap=overlap, batch_size=batch_size, chunk_tiles=chunk_tiles,
                        offset=(float(offset[0]), float(offset[1])))
    st = Path(slide_path).stat()
    request = {"model": model_id, "slide": str(Path(slide_path).resolve()), "slide_size": st.st_size,
               "slide_mtime": int(st.st_mtime), "mpp": mpp, "tile": tile,
               "overlap": overlap, "chunk_tiles": chunk_tiles, "offset": list(opts.offset),
               "region": list(region) if region else None, "roi": file_digest(roi_path) if roi_path else None,
               "tissue": tissue, "tissue_mask": file_digest(tissue_mask) if tissue_mask else None,
               "object_type": object_type, "labels_zarr": labels_zarr}
    request_id = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]
    if resume and summary_path.is_file():
        done = json.loads(summary_path.read_text())
        if done.get("request") == request_id:
            return {**done, "skipped": True}
    if tissue not in ("otsu", "all"):
        raise ConfigError(f"tissue must be 'otsu' or 'all', got {tissue!r}")
    if labels_zarr is not None and labels_zarr not in OME_VERSIONS:
        raise ConfigError(f"labels_zarr must be one of {OME_VERSIONS}, got {labels_zarr!r}")
    labels_path = out / f"{stem}_labels.ome.zarr"
    labels = None if labels_zarr is None else functools.partial(write_slide_labels, labels_path, version=labels_zarr,
                                                                name=stem)
    dev = resolve_device(device)
    model = _model(model_path, dev, encoder_weights)
    with open_slide(slide_path, mpp=mpp) as slide:
        tmap = None
        if tissue_mask:
            tmap = TissueMap(load_tissue_mask(tissue_mask, slide.dimensions), slide.dimensions)
        elif tissue == "otsu":
            thumb, _down = slide.thumbnail(detection_side(slide.dimensions))
            tmap = TissueMap(detect_tissue(thumb), slide.dimensions)
        roi = read_roi(roi_path) if roi_path else None
        geojson = out / f"{stem}.geojson.gz"
        # the GeoJSON is written chunk by chunk as the table is merged, in the work folder, and
        # renamed into place after the table
        to_geojson = functools.partial(_geojson_sink, geojson, image_name=Path(slide_path).name,
                                       object_type=object_type)
        res = predict_slide(model, slide, out, stem, options=opts, region=region, roi=roi, tissue=tmap, device=dev,
                            resume=resume, model_id=request_id, polygonize=mask_to_geometry, labels=labels,
                            sinks=[to_geojson], progress=progress)
        summary = {"slide": str(slide_path), "stem": stem, "status": "done", "request": request_id,
                   "nuclei": res.n_nuclei, **{f"n_{k}": v for k, v in res.class_counts.items()},
                   "tiles": res.n_tiles, "chunks": res.n_chunks, "resumed_chunks": res.resumed_chunks,
                   "tissue_fraction": res.tissue_fraction, "seconds": round(time.perf_counter() - t0, 3),
                   "slide_mpp": slide.mpp, "nuclei_table": str(res.nuclei_path), "geojson": str(geojson),
                   "labels_zarr": str(labels_path) if labels is not None else None}
    if res.first_forward is not None and res.last_forward is not None:
        # the serial start (open, thumbnail, tissue, planning, first read) and end (last chunk,
        # merge, outputs) around the model's forwards
        summary.update({"start_s": round(res.first_forward - t0, 3),
                        "forward_s": round(res.last_forward - res.first_forward, 3),
                        "end_s": round(time.perf_counter() - res.last_forward, 3)})
    from ..core.atomic import atomic_write_text

    atomic_write_text(summary_path, json.dumps(summary, indent=1))
    return {**summary, "skipped": False}

"""QuPath GeoJSON for whole slides: ROIs in, millions of detections out, streamed.

``read_roi`` turns annotations exported from QuPath (``File > Export objects as GeoJSON``, or
the ``curate qupath-script`` Groovy script) into one shapely geometry in level-0 pixels.
``write_nuclei_geojson`` writes a nucleus table of the slide path
(:mod:`cellcurate.models.wsi`) as a gzipped FeatureCollection feature by feature, with the same
feature layout as :func:`cellcurate.curation.qupath.make_feature` (classification name and
taxonomy colour, measurements ``area_px``, ``area_um2``, ``nucleus_prob``, ``prob_<Class>``,
metadata ``image`` and ``nucleus_id``), so memory stays flat; the file appears atomically.
Feature ids are uuid5 of the image name and nucleus id (stable across reruns and resumes).

Dimensions: F features, n nuclei.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import uuid
from pathlib import Path
from typing import Any

from ..errors import InputFormatError
from .qupath import OBJECT_TYPES, make_feature, read_geojson

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://cellcurate/prediction")


def read_roi(path: str | os.PathLike[str]) -> Any:
    """Union of the annotation polygons of a GeoJSON file (all polygon features when none is
    marked ``objectType: annotation``), in the file's (level-0 pixel) coordinates."""
    import shapely

    path = Path(path)
    frame = read_geojson(path)
    if frame.empty:
        raise InputFormatError(path, "the ROI file has no polygon features")
    ann = frame[frame["object_type"] == "annotation"]
    geoms = list((ann if len(ann) else frame)["geometry"])
    roi = shapely.make_valid(shapely.union_all(geoms))
    if roi.is_empty or roi.area <= 0:
        raise InputFormatError(path, "the ROI polygons have no area")
    return roi


def write_nuclei_geojson(
    nuclei_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    image_name: str,
    object_type: str = "detection",
) -> int:
    """Stream a ``<stem>_nuclei.parquet`` table into a QuPath GeoJSON (gzip when ``out_path``
    ends with ``.gz``). Returns the number of features written."""
    import pyarrow.parquet as pq
    import shapely

    if object_type not in OBJECT_TYPES[:2]:
        raise InputFormatError(out_path, f"object type must be 'detection' or 'cell', got {object_type!r}")
    out_path = Path(out_path)
    pf = pq.ParquetFile(nuclei_path)
    meta = json.loads((pf.schema_arrow.metadata or {}).get(b"cellcurate", b"{}"))
    names = list(meta.get("classes") or [])
    colors = dict(zip(names, meta.get("colors") or []))
    mpp = meta.get("slide_mpp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "wb") as raw, _text(raw, gz=out_path.name.endswith(".gz")) as fh:
            fh.write('{"type":"FeatureCollection","features":[')
            for batch in pf.iter_batches(batch_size=5000):
                cols = batch.to_pydict()
                geoms = shapely.from_wkb(cols["polygon"])
                for i, geom in enumerate(geoms):
                    cname = cols["class_name"][i]
                    meas = {"area_px": cols["area_px"][i], "nucleus_prob": cols["nucleus_prob"][i]}
                    if mpp:
                        meas["area_um2"] = cols["area_um2"][i]
                    for name, p in zip(names, cols["probs"][i]):
                        meas[f"prob_{name}"] = p
                    nid = int(cols["nucleus_id"][i])
                    feat = make_feature(geom, id=str(uuid.uuid5(_NAMESPACE, f"{image_name}/{nid}")), class_name=cname,
                                        color=colors.get(cname, "#808080"), measurements=meas,
                                        metadata={"image": image_name, "nucleus_id": nid}, object_type=object_type)
                    if object_type == "cell":  # QuPath cells carry their nucleus separately
                        feat["nucleusGeometry"] = feat["geometry"]
                    fh.write(("," if n else "") + json.dumps(feat, separators=(",", ":")))
                    n += 1
            fh.write("]}")
        with open(tmp, "rb+") as fb:  # the gzip stream is closed: flush it to disk
            os.fsync(fb.fileno())
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


def _text(raw: Any, *, gz: bool) -> io.TextIOWrapper:
    """A text stream over ``raw``, through gzip (mtime 0: same bytes for the same nuclei) or not."""
    if gz:
        return io.TextIOWrapper(gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0), encoding="utf-8")
    return io.TextIOWrapper(raw, encoding="utf-8", write_through=False)

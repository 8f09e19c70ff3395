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

    pf = pq.ParquetFile(nuclei_path)
    meta = json.loads((pf.schema_arrow.metadata or {}).get(b"cellcurate", b"{}"))
    writer = NucleiGeoJSONWriter(out_path, image_name=image_name, object_type=object_type, meta=meta)
    try:
        for batch in pf.iter_batches(batch_size=5000):
            writer.write(batch)
    except BaseException:
        writer.abort()
        raise
    writer.commit()
    return writer.n


class NucleiGeoJSONWriter:
    """The QuPath GeoJSON of a nucleus table written batch by batch, as the slide path merges its
    chunks (:func:`cellcurate.models.wsi.predict_slide` ``sinks``): :meth:`write` takes tables or
    record batches in id order, :meth:`commit` fsyncs the file and renames it into place,
    :meth:`abort` removes it.

    Parameters
    ----------
    out_path
        The GeoJSON to write (gzip when it ends with ``.gz``).
    meta
        The table's ``cellcurate`` schema metadata (classes, colours, ``slide_mpp``).
    tmp
        Where to write before the rename (default: a hidden name beside ``out_path``); must be on
        the same file system.
    """

    def __init__(self, out_path: str | os.PathLike[str], *, image_name: str, object_type: str = "detection",
                 meta: dict[str, Any], tmp: str | os.PathLike[str] | None = None) -> None:
        if object_type not in OBJECT_TYPES[:2]:
            raise InputFormatError(out_path, f"object type must be 'detection' or 'cell', got {object_type!r}")
        self.out_path = Path(out_path)
        self.image_name = image_name
        self.object_type = object_type
        self.names = list(meta.get("classes") or [])
        self.colors = dict(zip(self.names, meta.get("colors") or []))
        self.mpp = meta.get("slide_mpp")
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tmp) if tmp is not None else self.out_path.with_name(f".{self.out_path.name}.{os.getpid()}.tmp")
        self.n = 0
        self._raw = open(self.tmp, "wb")
        self._fh = _text(self._raw, gz=self.out_path.name.endswith(".gz"))
        self._fh.write('{"type":"FeatureCollection","features":[')

    def write(self, table: Any) -> None:
        """Append the features of a pyarrow table or record batch of the nucleus table."""
        import shapely

        cols = table.to_pydict()
        geoms = shapely.from_wkb(cols["polygon"])
        fh, names, mpp, object_type = self._fh, self.names, self.mpp, self.object_type
        for i, geom in enumerate(geoms):
            cname = cols["class_name"][i]
            meas = {"area_px": cols["area_px"][i], "nucleus_prob": cols["nucleus_prob"][i]}
            if mpp:
                meas["area_um2"] = cols["area_um2"][i]
            for name, p in zip(names, cols["probs"][i]):
                meas[f"prob_{name}"] = p
            nid = int(cols["nucleus_id"][i])
            feat = make_feature(geom, id=str(uuid.uuid5(_NAMESPACE, f"{self.image_name}/{nid}")), class_name=cname,
                                color=self.colors.get(cname, "#808080"), measurements=meas,
                                metadata={"image": self.image_name, "nucleus_id": nid}, object_type=object_type)
            if object_type == "cell":  # QuPath cells carry their nucleus separately
                feat["nucleusGeometry"] = feat["geometry"]
            fh.write(("," if self.n else "") + json.dumps(feat, separators=(",", ":")))
            self.n += 1

    def commit(self) -> None:
        """Close the collection, fsync and rename the file into place."""
        from ..core.atomic import fsync_file

        try:
            self._fh.write("]}")
            self._fh.close()  # ends the gzip stream
            self._raw.close()
            fsync_file(self.tmp)
            os.replace(self.tmp, self.out_path)
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the unfinished file (a no-op after :meth:`commit`)."""
        if not self._fh.closed:
            try:
                self._fh.close()
            except Exception:  # noqa: BLE001 - best effort on the error path
                pass
        self._raw.close()
        if self.tmp.exists():
            self.tmp.unlink()


def _text(raw: Any, *, gz: bool) -> io.TextIOWrapper:
    """A text stream over ``raw``, through gzip (mtime 0: same bytes for the same nuclei) or not."""
    if gz:
        return io.TextIOWrapper(gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0), encoding="utf-8")
    return io.TextIOWrapper(raw, encoding="utf-8", write_through=False)

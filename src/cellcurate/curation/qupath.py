"""QuPath GeoJSON both ways: export nuclei as detections, bring QuPath edits back as decisions.

Export (``curate export-qupath STORE|RELEASE --out DIR``): one GeoJSON ``FeatureCollection`` per
image, one ``Feature`` per nucleus::

    {"type": "Feature", "id": "<uuid5 of the nucleus id>",
     "geometry": {"type": "Polygon", "coordinates": [[[x, y], ...]]},   # image pixels, closed rings
     "properties": {"objectType": "detection",                          # or "cell"
                    "classification": {"name": "Lymphocyte", "color": [r, g, b]},
                    "measurements": {"area_px": .., "area_um2": .., "prob_<Class>": .., "issue_score": ..},
                    "metadata": {"nucleus_id": "...", "image_id": "...", "status": "reviewed", ...}}}

Polygons trace pixel edges (QuPath's convention: pixel (row r, col c) is the square
[c, c+1] x [r, r+1]), so rasterising a polygon by pixel centres gives back the exact mask. Rejected
nuclei and ignore regions are classified ``Ignore*`` (QuPath's built-in ignore class); unresolved
nuclei carry no classification.

Import (``curate ingest qupath GEOJSON... --store S``): every file is parsed and validated first
(JSON, geometry type, coordinates inside the image, known classes); only then are label changes
appended to the ledger as ``decision`` events in one transaction (actor ``qupath:<reviewer>``,
payload source ``"qupath"``). Features are matched to nuclei by ``metadata.nucleus_id`` when
present, otherwise by overlap (IoU >= 0.5) with the image's instance map. A feature without a
classification changes nothing; ``Ignore*`` marks the nucleus as not a nucleus.

Dimensions: F features, H×W pixels, K classes.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..core.atomic import atomic_write_bytes
from ..core.geometry import GEOMETRY_TYPES, mask_to_geometry
from ..core.geometry import polygonal as _polygonal
from ..errors import ConfigError, InputFormatError, InputNotFoundError, StoreError

ObjectType = Literal["detection", "cell", "annotation"]
OBJECT_TYPES: tuple[str, ...] = ("detection", "cell", "annotation")
IGNORE_CLASS = "Ignore*"
IGNORE_COLOR = [180, 180, 180]
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://cellcurate/nucleus")


def feature_uuid(nucleus_id: int) -> str:
    """Deterministic UUID of a nucleus (uuid5 of its id)."""
    return str(uuid.uuid5(NAMESPACE, str(int(nucleus_id))))


def _rgb(color: Any) -> list[int]:
    if isinstance(color, str):
        h = color.lstrip("#")
        return [int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)]
    return [int(c) for c in color][:3]


# -- mask <-> polygon (the convention lives in cellcurate.core.geometry) ---------------------------
def geometry_mask(geom: Any, shape: tuple[int, int], *, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Pixels whose centre lies inside ``geom`` (holes excluded), over ``window`` (y0, x0, y1, x1)
    of an image of ``shape`` (default: the geometry's bounds). Returns (y1-y0, x1-x0) bool."""
    import shapely

    if window is None:
        minx, miny, maxx, maxy = geom.bounds
        window = (max(0, int(math.floor(miny))), max(0, int(math.floor(minx))),
                  min(shape[0], int(math.ceil(maxy))), min(shape[1], int(math.ceil(maxx))))
    y0, x0, y1, x1 = window
    if y1 <= y0 or x1 <= x0:
        return np.zeros((max(0, y1 - y0), max(0, x1 - x0)), bool)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    return shapely.contains_xy(geom, xx.ravel() + 0.5, yy.ravel() + 0.5).reshape(yy.shape)


def _geometry_json(geom: Any) -> dict[str, Any]:
    import shapely

    def ring(coords: Any) -> list[list[float]]:
        pts = [[_num(x), _num(y)] for x, y in coords]
        if pts and pts[0] != pts[-1]:
            pts.append(list(pts[0]))
        return pts

    def poly(p: Any) -> list[list[list[float]]]:
        p = shapely.geometry.polygon.orient(p, 1.0)
        return [ring(p.exterior.coords)] + [ring(r.coords) for r in p.interiors]

    if geom.geom_type == "Polygon":
        return {"type": "Polygon", "coordinates": poly(geom)}
    return {"type": "MultiPolygon", "coordinates": [poly(p) for p in geom.geoms]}


def _num(v: float) -> float | int:
    f = float(v)
    return int(f) if f.is_integer() else round(f, 3)


# -- writing ----------------------------------------------------------------------------------------
def make_feature(geometry: Any, *, id: str | None = None, class_name: str | None = None,
                 color: Any = None, measurements: dict[str, float] | None = None,
                 metadata: dict[str, Any] | None = None, object_type: str = "detection",
                 nucleus_geometry: Any = None) -> dict[str, Any]:
    """One QuPath GeoJSON Feature from a shapely polygon (validated: closed rings, no
    self-intersections; an invalid polygon is repaired with ``make_valid``).

    ``nucleus_geometry`` (a cell's nucleus) is written as the Feature's ``nucleusGeometry``, the
    member QuPath and qubalab read a cell's nucleus from."""
    import shapely

    if object_type not in OBJECT_TYPES:
        raise ConfigError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    geom = geometry
    if geom is None or geom.is_empty or geom.geom_type not in GEOMETRY_TYPES:
        raise ConfigError(f"feature {id}: geometry must be a non-empty Polygon or MultiPolygon")
    if not shapely.is_valid(geom):
        geom = _polygonal(shapely.make_valid(geom))
        if geom is None:
            raise ConfigError(f"feature {id}: polygon is invalid and cannot be repaired")
    props: dict[str, Any] = {"objectType": object_type}
    if class_name is not None:
        props["classification"] = {"name": str(class_name), "color": _rgb(color) if color is not None else IGNORE_COLOR}
    if measurements:
        props["measurements"] = {str(k): float(v) for k, v in measurements.items()
                                 if v is not None and np.isfinite(float(v))}
    if metadata:
        props["metadata"] = {str(k): str(v) for k, v in metadata.items() if v is not None}
    feat: dict[str, Any] = {"type": "Feature", "id": id or str(uuid.uuid4()), "geometry": _geometry_json(geom)}
    if nucleus_geometry is not None:
        ng = nucleus_geometry
        if not shapely.is_valid(ng):
            ng = _polygonal(shapely.make_valid(ng))
        if ng is None or ng.is_empty or ng.geom_type not in GEOMETRY_TYPES:
            raise ConfigError(f"feature {id}: nucleus geometry must be a non-empty Polygon or MultiPolygon")
        feat["nucleusGeometry"] = _geometry_json(ng)
    feat["properties"] = props
    return feat


def write_geojson(path: str | Path, features: list[dict[str, Any]] | pd.DataFrame, *,
                  object_type: str = "detection", compress: bool | None = None) -> Path:
    """Write a QuPath-readable GeoJSON FeatureCollection atomically.

    Parameters
    ----------
    features
        Feature dicts (:func:`make_feature`), or a frame with a ``geometry`` column (shapely) and
        optional ``id``, ``class_name``, ``color`` ("#rrggbb" or [r, g, b]), ``measurements``
        (dict), ``metadata`` (dict), ``object_type`` columns (as ``curate predict`` produces).
    compress
        gzip the file; default: when ``path`` ends with ``.gz``.
    """
    path = Path(path)
    if isinstance(features, pd.DataFrame):
        feats = []
        for rec in features.to_dict("records"):
            r = {k: (None if not isinstance(v, (list, dict, tuple, np.ndarray)) and _missing(v) else v)
                 for k, v in rec.items()}
            feats.append(make_feature(
                r["geometry"], id=r.get("id"), class_name=r.get("class_name"), color=r.get("color"),
                measurements=r.get("measurements"), metadata=r.get("metadata"),
                object_type=r.get("object_type") or object_type,
            ))
    else:
        feats = list(features)
    compress = path.name.endswith(".gz") if compress is None else compress
    data = json.dumps({"type": "FeatureCollection", "features": feats}, separators=(",", ":")).encode("utf-8")
    if compress:
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(path, data)
    return path


def shown_target(class_value: int, kind: str, ignore_reason: str | None) -> int | None:
    """What an exported nucleus shows in QuPath, in :func:`import_geojson`'s terms: its class id
    (1..K), -1 (``Ignore*``: rejected, or an ignore region) or None (no classification:
    unresolved, conflict)."""
    if 0 < int(class_value) < 255:
        return int(class_value)
    if kind != "nucleus" or ignore_reason == "rejected":
        return -1
    return None


def image_features(instances: np.ndarray, nuclei: pd.DataFrame, taxonomy: Any, *, mpp: float | None = None,
                   object_type: str = "detection", ledger_seq: int | None = None) -> list[dict[str, Any]]:
    """Features of one image's nuclei.

    Each feature's metadata carries what :func:`import_geojson` needs to tell an edit from the
    exported state: ``nucleus_id``, ``label`` (the ledger fold's label), ``class_value`` (the
    class-map value) and ``ledger_seq`` (the ledger position the export was made at). With
    ``object_type="cell"`` the nucleus is also the cell's ``nucleusGeometry`` (cellcurate has
    nuclei only, so the cell outline is the nucleus outline).

    Parameters
    ----------
    instances
        (H, W) int32 instance map of the image.
    nuclei
        Rows of a release nuclei table (or :func:`cellcurate.curation.release.snapshot`) for
        this image: nucleus_id, image_id, kind, instance_id, bbox_*, area, class_value,
        ignore_reason, decided, probs, issue_score, source_label.
    """
    names = {c.id: c.name for c in taxonomy.classes}
    colors = {c.id: c.color for c in taxonomy.classes}
    h, w = instances.shape
    feats = []
    for r in nuclei.itertuples(index=False):
        y0, x0, y1, x1 = int(r.bbox_y0), int(r.bbox_x0), int(r.bbox_y1), int(r.bbox_x1)
        crop = instances[y0:y1, x0:x1] == int(r.instance_id)
        geom = mask_to_geometry(crop, offset=(y0, x0))
        if geom is None:
            continue
        cv = int(r.class_value)
        shown = shown_target(cv, r.kind, r.ignore_reason)
        if shown is not None and shown in names:
            cname, color = names[shown], colors[shown]
        elif shown == -1:
            cname, color = IGNORE_CLASS, IGNORE_COLOR
        else:
            cname, color = None, None  # unresolved / conflict: no class yet
        meas: dict[str, float] = {"area_px": float(r.area)}
        if mpp:
            meas["area_um2"] = float(r.area) * float(mpp) ** 2
        probs = r.probs
        if probs is not None and not (isinstance(probs, float) and math.isnan(probs)) and len(probs):
            for cid, p in zip(taxonomy.ids, list(probs)):
                meas[f"prob_{names[cid]}"] = float(p)
        if r.issue_score is not None and not pd.isna(r.issue_score):
            meas["issue_score"] = float(r.issue_score)
        meta = {"nucleus_id": int(r.nucleus_id), "image_id": r.image_id, "kind": r.kind,
                "status": r.decided, "source_label": r.source_label, "label": int(r.label), "class_value": cv}
        if ledger_seq is not None:
            meta["ledger_seq"] = int(ledger_seq)
        if r.ignore_reason:
            meta["ignore_reason"] = r.ignore_reason
        feats.append(make_feature(geom, id=feature_uuid(r.nucleus_id), class_name=cname, color=color,
                                  measurements=meas, metadata=meta, object_type=object_type,
                                  nucleus_geometry=geom if object_type == "cell" else None))
    return feats


@dataclass
class QupathExport:
    files: list[Path]
    n_features: int


def export_qupath(source: Any, out: str | Path, *, compress: bool = False, object_type: str = "detection",
                  image_ids: list[str] | None = None, progress: bool = True) -> QupathExport:
    """One GeoJSON per image of a store (a :class:`Store` or its folder) or a release folder."""
    from tqdm import tqdm

    from ..datasets.store import Store
    from .release import safe_name

    if object_type not in OBJECT_TYPES:
        raise ConfigError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    out = Path(out)
    close = False
    if isinstance(source, (str, Path)):
        p = Path(source)
        if (p / "manifest.json").is_file():
            return _export_release(p, out, compress=compress, object_type=object_type, image_ids=image_ids,
                                   progress=progress)
        if not (p / "store.json").is_file():
            raise InputNotFoundError(p, "neither a store (store.json) nor a release (manifest.json)")
        source, close = Store.open(p), True
    try:
        from .release import snapshot

        snap = snapshot(source)
        images = snap.images
        if image_ids is not None:
            images = images[images["image_id"].isin(image_ids)]
        groups = snap.nuclei.groupby("image_id", sort=False)
        files, n = [], 0
        for row in tqdm(images.itertuples(index=False), total=len(images), desc="QuPath GeoJSON", unit="img",
                        disable=None if progress else True):
            nuc = groups.get_group(row.image_id) if row.image_id in groups.groups else snap.nuclei.iloc[:0]
            ins = snap.paint(row.image_id, source.read_instances(row.image_id))
            feats = image_features(ins, nuc, source.taxonomy, mpp=float(row.mpp), object_type=object_type,
                                   ledger_seq=snap.ledger_seq)
            name = f"{safe_name(row.image_id)}.geojson" + (".gz" if compress else "")
            files.append(write_geojson(out / name, feats, compress=compress))
            n += len(feats)
        return QupathExport(files, n)
    finally:
        if close:
            source.close()


def _export_release(path: Path, out: Path, *, compress: bool, object_type: str, image_ids: list[str] | None,
                    progress: bool) -> QupathExport:
    from tqdm import tqdm

    from ..datasets.release import ReleaseDataset
    from ..datasets.taxonomy import Taxonomy
    from .release import safe_name

    ds = ReleaseDataset(path, split="all")
    tax = Taxonomy.load(path / "taxonomy.json")
    seq = ds.manifest.get("store", {}).get("ledger_seq")  # the ledger position the release pins
    groups = ds.nuclei.groupby("image_id", sort=False)
    files, n = [], 0
    for i in tqdm(range(len(ds)), desc="QuPath GeoJSON", unit="img", disable=None if progress else True):
        image_id = str(ds.images.at[i, "image_id"])
        if image_ids is not None and image_id not in image_ids:
            continue
        _img, ins, _cls = ds.read(i)
        nuc = groups.get_group(image_id) if image_id in groups.groups else ds.nuclei.iloc[:0]
        feats = image_features(np.asarray(ins), nuc, tax, mpp=float(ds.images.at[i, "mpp"]), object_type=object_type,
                               ledger_seq=seq)
        name = f"{safe_name(image_id)}.geojson" + (".gz" if compress else "")
        files.append(write_geojson(out / name, feats, compress=compress))
        n += len(feats)
    return QupathExport(files, n)


# -- reading --------------------------------------------------------------------------------------
#: Limits on an untrusted GeoJSON file (keyword options of :func:`read_geojson` and
#: :func:`import_geojson`): decompressed bytes (read in 1 MiB steps, so a gzip bomb stops at the
#: limit), JSON nesting depth (a QuPath GeoJSON needs 8: collection, features, feature, geometry,
#: MultiPolygon coordinates), and features per file.
MAX_JSON_BYTES = 1 << 30
MAX_JSON_DEPTH = 64
MAX_FEATURES = 2_000_000
_READ_STEP = 1 << 20
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NEST = np.zeros(256, dtype=np.int8)
_NEST[[ord("["), ord("{")]] = 1
_NEST[[ord("]"), ord("}")]] = -1
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def _read_capped(path: Path, max_bytes: int) -> bytes:
    """The bytes of ``path``, gunzipped when it starts with the gzip magic, read in steps and
    refused as soon as they pass ``max_bytes``."""
    if not path.is_file():
        raise InputNotFoundError(path, "GeoJSON file not found")
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"
        fh.seek(0)
        src: Any = gzip.GzipFile(fileobj=fh, mode="rb") if gz else fh
        parts: list[bytes] = []
        total = 0
        try:
            while block := src.read(_READ_STEP):
                total += len(block)
                if total > max_bytes:
                    what = "decompresses to" if gz else "is"
                    raise InputFormatError(path, f"{what} more than {max_bytes:,} bytes (the limit on a GeoJSON "
                                           "file, max_bytes); split it or raise the limit")
                parts.append(block)
        except (OSError, EOFError, zlib.error) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputFormatError(path, f"not a readable gzip file ({msg})") from None
    return b"".join(parts)


def _check_depth(path: Path, raw: bytes, max_depth: int) -> None:
    """Refuse JSON nested deeper than ``max_depth`` before parsing it (the stdlib parser recurses
    once per level). A fast count over the brackets alone comes first; only when it says too deep
    are strings blanked (brackets inside them do not count) and the count redone exactly. (A file
    whose strings hide its depth from the fast count still cannot overflow: the parser's
    RecursionError becomes the same one-line error.)"""
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return
    brackets = np.frombuffer(raw.translate(None, _NOT_BRACKETS), dtype=np.uint8)
    if len(brackets) == 0 or int(np.cumsum(_NEST[brackets], dtype=np.int64).max()) <= max_depth:
        return
    bare = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    depth = 0
    for s in range(0, len(bare), 1 << 24):
        run = np.cumsum(_NEST[bare[s : s + (1 << 24)]], dtype=np.int64) + depth
        if len(run) == 0:
            continue
        if run.max() > max_depth:
            at = s + int(np.argmax(run > max_depth))
            raise InputFormatError(path, f"JSON is nested more than {max_depth} levels deep (near byte {at:,} "
                                   "with strings blanked; a GeoJSON needs about 8)")
        depth = int(run[-1])


def _load_json(path: Path, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    raw = _read_capped(path, max_bytes)
    _check_depth(path, raw, max_depth)
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise InputFormatError(path, f"JSON is nested too deeply to parse (the limit is {max_depth} levels; "
                               "a GeoJSON needs about 8)") from None
    except MemoryError:
        raise InputFormatError(path, f"not enough memory to parse {len(raw):,} bytes of JSON") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and ints over 4300 digits
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputFormatError(path, f"not valid JSON ({msg[:200]})") from None


def _features_of(path: Path, data: Any, max_features: int = MAX_FEATURES) -> list[Any]:
    feats: Any
    if isinstance(data, list):  # QuPath can export a bare array of features
        feats = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        feats = data.get("features")
        if not isinstance(feats, list):
            raise InputFormatError(path, "FeatureCollection has no 'features' list")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        feats = [data]
    else:
        kind = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise InputFormatError(path, f"expected a GeoJSON FeatureCollection, got {kind!r}")
    if len(feats) > max_features:
        raise InputFormatError(path, f"holds {len(feats):,} features, more than the limit of {max_features:,} "
                               "(max_features)")
    return feats


def feature_label(i: int, fid: Any = None) -> str:
    """How messages name a feature: ``"feature 3"`` or ``"feature 3 (id 1b2c...)"``."""
    return f"feature {i}" if fid in (None, "") else f"feature {i} (id {str(fid)[:64]})"


def _parse_geometry(path: Path, what: str, geometry: Any) -> Any:
    import shapely

    if not isinstance(geometry, dict):
        raise InputFormatError(path, f"{what}: no geometry")
    gtype = geometry.get("type")
    if gtype not in GEOMETRY_TYPES:
        raise InputFormatError(path, f"{what}: geometry type {str(gtype)[:40]!r} is not a Polygon or MultiPolygon")
    coords = geometry.get("coordinates")

    def ring(r: Any) -> np.ndarray:
        a = np.asarray(r, dtype=float)
        if a.ndim != 2 or a.shape[1] < 2 or len(a) < 4 or not np.isfinite(a).all():
            raise ValueError("a ring needs at least 4 finite [x, y] positions")
        return a[:, :2]

    def poly(p: Any) -> Any:
        if not isinstance(p, list) or not p:
            raise ValueError("a polygon needs at least one ring")
        rings = [ring(r) for r in p]
        return shapely.Polygon(rings[0], rings[1:])

    try:
        if gtype == "Polygon":
            return poly(coords)
        if not isinstance(coords, list) or not coords:
            raise ValueError("a MultiPolygon needs at least one polygon")
        return shapely.MultiPolygon([poly(p) for p in coords])
    except (ValueError, TypeError) as exc:
        raise InputFormatError(path, f"{what}: bad {gtype} coordinates ({exc})") from None


def _meta_int(meta: dict[str, Any], key: str) -> int | None:
    v = meta.get(key)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _class_name(cls: Any) -> str | None:
    """QuPath's ``classification``: ``{"name": "Tumor"}``, derived classes as ``{"names": ["Tumor",
    "Positive"]}`` (QuPath 0.4+; read as ``"Tumor: Positive"``), or a bare string."""
    if isinstance(cls, str):
        return cls
    if not isinstance(cls, dict):
        return None
    name = cls.get("name")
    if isinstance(name, str) and name:
        return name
    names = cls.get("names")
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        return ": ".join(names)
    return None


def read_geojson(path: str | Path, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH,
                 max_features: int = MAX_FEATURES) -> pd.DataFrame:
    """One row per feature of a (QuPath) GeoJSON file (``.gz`` accepted).

    Columns: ``index`` (position in the file), ``id``, ``object_type``, ``class_name`` (None when
    unclassified; QuPath's derived ``classification.names`` joined with ``": "``), ``color``,
    ``geometry`` (shapely; for a cell with a ``nucleusGeometry``, the nucleus), ``geometry_type``,
    ``n_polygons``, ``n_holes``, ``area`` (polygon area in pixels², holes subtracted), ``valid``
    (shapely validity), ``invalid_reason`` (shapely ``is_valid_reason``, empty when valid),
    ``nucleus_id`` (from metadata, or None), ``image_id`` (from metadata, or None),
    ``export_label``, ``export_class_value``, ``export_seq`` (what :func:`export_qupath` wrote:
    the label, the class-map value and the ledger position of the export; None in other files),
    ``flag_id`` and ``role`` (``"proposed"`` on the proposals of an instance-flag review file,
    :mod:`cellcurate.curation.geometry_qupath`; None otherwise), ``measurements`` (dict).

    The file is untrusted: it is read with limits (``max_bytes`` decompressed, ``max_depth``
    levels of JSON nesting, ``max_features``). Raises :class:`InputFormatError` (one line, naming
    the file and the feature) on a limit, invalid JSON or gzip, a non-polygon geometry or
    malformed coordinates. Invalid polygons (self-intersections) are returned with
    ``valid=False``; :func:`import_geojson` refuses them.
    """
    import shapely

    path = Path(path)
    feats = _features_of(path, _load_json(path, max_bytes=max_bytes, max_depth=max_depth), max_features)
    rows = []
    for i, f in enumerate(feats):
        if not isinstance(f, dict) or f.get("type") != "Feature":
            raise InputFormatError(path, f"feature {i}: not a GeoJSON Feature")
        fid = f.get("id")
        fid = fid if isinstance(fid, (str, int)) and not isinstance(fid, bool) else None
        what = feature_label(i, fid)
        props = f.get("properties") or {}
        if not isinstance(props, dict):
            raise InputFormatError(path, f"{what}: properties must be an object")
        nuc_geom = f.get("nucleusGeometry", props.get("nucleusGeometry"))  # QuPath: a member; qubalab: either
        if nuc_geom is not None:
            geom = _parse_geometry(path, f"{what} nucleusGeometry", nuc_geom)
            _parse_geometry(path, what, f.get("geometry"))  # the cell outline must parse too
        else:
            geom = _parse_geometry(path, what, f.get("geometry"))
        cls = props.get("classification")
        cname = _class_name(cls)
        color = cls.get("color") if isinstance(cls, dict) else None
        meta = props.get("metadata") if isinstance(props.get("metadata"), dict) else {}
        nid = meta.get("nucleus_id", props.get("nucleus_id"))
        polys = list(geom.geoms) if geom.geom_type == "MultiPolygon" else [geom]
        reason = "" if shapely.is_valid(geom) else str(shapely.is_valid_reason(geom))
        rows.append({
            "index": i, "id": fid, "object_type": props.get("objectType"),
            "class_name": cname, "color": color, "geometry": geom, "geometry_type": geom.geom_type,
            "n_polygons": len(polys), "n_holes": sum(len(p.interiors) for p in polys),
            "area": float(geom.area), "valid": not reason, "invalid_reason": reason,
            "nucleus_id": None if nid in (None, "") else str(nid),
            "image_id": meta.get("image_id"),
            "export_label": _meta_int(meta, "label"), "export_class_value": _meta_int(meta, "class_value"),
            "export_seq": _meta_int(meta, "ledger_seq"),
            "flag_id": None if _missing(meta.get("flag_id")) else str(meta.get("flag_id")),
            "role": None if _missing(meta.get("role")) else str(meta.get("role")),
            "measurements": props.get("measurements") if isinstance(props.get("measurements"), dict) else {},
        })
    cols = ["index", "id", "object_type", "class_name", "color", "geometry", "geometry_type", "n_polygons",
            "n_holes", "area", "valid", "invalid_reason", "nucleus_id", "image_id", "export_label",
            "export_class_value", "export_seq", "flag_id", "role", "measurements"]
    return pd.DataFrame(rows, columns=cols)


# -- import -----------------------------------------------------------------------------------------
@dataclass
class QupathImport:
    """What :func:`import_geojson` found and did.

    ``decisions``: the decision events appended (or that would be, with ``dry_run``);
    ``per_file``: one row per file (file, image_id, features, matched, unmatched, unchanged,
    changed, unclassified, refused, deleted, moved); ``class_counts``: features per mapped class
    name; ``not_applied``: one row per feature (or deleted nucleus) whose edit was not applied,
    with why (file, feature index or None for a deleted nucleus, id, nucleus_id, reason; the
    reason starts with one of :data:`NOT_APPLIED_REASONS`).
    """

    decisions: pd.DataFrame
    per_file: pd.DataFrame
    class_counts: dict[str, int] = field(default_factory=dict)
    applied: bool = False
    not_applied: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        columns=["file", "feature", "id", "nucleus_id", "reason"]))
    #: the ``geometry`` events appended (``geometry=True``): outline edits, deletions, proposals
    geometry: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(
        columns=["kind", "nucleus_id", "round", "actor", "action", "label", "ref", "payload"]))


def load_class_map(path: str | Path) -> dict[str, str]:
    """A ``--class-map`` JSON file: ``{"foreign name": "Taxonomy class name" | "Ignore*" | null}``."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise InputFormatError(path, "class map must be a JSON object of name -> class name")
    return {k: v for k, v in data.items()}


def _class_resolver(taxonomy: Any, class_map: dict[str, Any] | None) -> Any:
    cmap = {str(k).strip().lower(): v for k, v in (class_map or {}).items()}
    ignore_names = {"ignore*", "ignore", "not a nucleus", "not_nucleus"}

    def resolve(name: str | None) -> int | None | str:
        """class id, -1 (not a nucleus), None (no change) or "unknown"."""
        if _missing(name):
            return None
        key = str(name).strip().lower()
        if key in cmap:
            target = cmap[key]
            if target is None:
                return None
            key = str(target).strip().lower()
        if key in ignore_names:
            return -1
        try:
            return taxonomy.class_id(key)
        except ConfigError:
            if ":" in key:  # a derived QuPath class "Tumor: Positive": its base class
                return resolve(key.split(":", 1)[0])
            return "unknown"

    return resolve


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA


def _image_for_file(path: Path, frame: pd.DataFrame, given: str | None, known: dict[str, str]) -> str:
    if given is not None:
        if given not in known.values():
            raise InputFormatError(path, f"image {given!r} (from --images) is not in the store")
        return given
    ids = {str(v) for v in frame["image_id"] if not _missing(v)}
    if len(ids) == 1:
        iid = str(ids.pop())
        if iid not in known.values():
            raise InputFormatError(path, f"features name image {iid!r}, which is not in the store")
        return iid
    if len(ids) > 1:
        raise InputFormatError(path, f"features name {len(ids)} different images; one file must hold one image")
    stem = path.name
    for suffix in (".gz", ".geojson", ".json"):
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    if stem in known:
        return known[stem]
    raise InputFormatError(path, "cannot tell which image this file belongs to; pass --images IMAGE_ID")


#: Why a feature was not applied (column ``reason`` of :attr:`QupathImport.not_applied` starts with one).
NOT_APPLIED_REASONS: tuple[str, ...] = (
    "unmatched", "newer decision", "deleted", "outline moved", "classification removed", "ignore region",
    "proposal",
)


def import_geojson(store: Any, geojson_paths: list[str | Path] | str | Path, *,
                   images: list[str] | str | None = None, reviewer: str = "qupath",
                   class_map: dict[str, Any] | str | Path | None = None, min_iou: float = 0.5,
                   dry_run: bool = False, geometry: bool = False, max_bytes: int = MAX_JSON_BYTES,
                   max_depth: int = MAX_JSON_DEPTH, max_features: int = MAX_FEATURES) -> QupathImport:
    """Bring QuPath edits back into ``store`` as review decisions.

    Parameters
    ----------
    geojson_paths
        One GeoJSON (``.geojson``/``.json``, optionally ``.gz``) per image.
    images
        The store image id of each file, in order (default: the features' ``metadata.image_id``,
        else the file name as written by :func:`export_qupath`).
    reviewer
        Recorded as the decisions' actor ``qupath:<reviewer>``.
    class_map
        Foreign class name -> taxonomy class name (or ``"Ignore*"``, or null to skip); a dict or a
        JSON file. Taxonomy names match case-insensitively without it; a derived QuPath class
        ``"Tumor: Positive"`` falls back to its base class ``"Tumor"``.
    min_iou
        Overlap needed to match a feature without a nucleus id to an instance.
    dry_run
        Validate and compute the decisions without appending them.
    geometry
        Also apply geometry edits as ``geometry`` events (:mod:`cellcurate.curation.geometry`):
        an outline moved in QuPath replaces the nucleus's outline by the drawn polygon, a nucleus
        missing from an exported file is deleted, and the proposals of an instance-flag review
        file (:func:`cellcurate.curation.geometry_qupath.export_review_geojson`) are decided by
        their classification (``Accept``, ``Accept: <class>``, ``Keep``; an edited proposal is
        accepted with the drawn outline). Without it these are listed as not applied.
    max_bytes, max_depth, max_features
        Limits on each (untrusted) file, see :func:`read_geojson`.

    A change is a change against the exported state: a feature written by
    :func:`export_qupath` carries the label it was exported with and the ledger position of the
    export, so a class that is still the exported one changes nothing, even when the store has
    moved on. An edited nucleus that has a decision (or an accepted proposal) newer than the
    export is not applied, and reported: applying it would silently revert the newer decision (the
    same reviewer) or start a conflict (another one). Nuclei missing from an exported file
    (deleted in QuPath) and outlines that no longer trace the nucleus (moved) are reported, never
    applied (a class edit on a moved outline still is). Files without export metadata (foreign
    annotations) are compared with the current labels.

    Everything is validated before anything is applied: a limit, invalid JSON or gzip, an unknown
    class, a non-polygon or invalid (self-intersecting) polygon or coordinates outside the image
    raise one-line :class:`InputFormatError` naming the file and the feature, and the ledger is
    untouched.
    """
    from .geometry import store_geometry
    from .geometry_qupath import GeometryEdits, proposal_decision
    from .release import current_instances, fold_current_labels, safe_name

    if store.readonly and not dry_run:
        raise StoreError("the store is open read-only", path=store.path)
    paths = [Path(geojson_paths)] if isinstance(geojson_paths, (str, Path)) else [Path(p) for p in geojson_paths]
    if not paths:
        raise ConfigError("no GeoJSON files given")
    given: list[str | None]
    if images is None:
        given = [None] * len(paths)
    else:
        given = [images] if isinstance(images, str) else list(images)
        if len(given) != len(paths):
            raise ConfigError(f"--images names {len(given)} images for {len(paths)} GeoJSON files")
    if isinstance(class_map, (str, Path)):
        class_map = load_class_map(class_map)
    resolve = _class_resolver(store.taxonomy, class_map)
    reviewer = str(reviewer).strip() or "qupath"
    actor = reviewer if reviewer.startswith("qupath:") else f"qupath:{reviewer}"

    simages = store.images()
    known = {safe_name(i): str(i) for i in simages["image_id"]}
    dims = {str(r.image_id): (int(r.height), int(r.width)) for r in simages.itertuples(index=False)}

    # pass 1: parse + validate every file
    parsed: list[tuple[Path, str, pd.DataFrame, list[Any]]] = []
    for path, g in zip(paths, given):
        frame = read_geojson(path, max_bytes=max_bytes, max_depth=max_depth, max_features=max_features)
        image_id = _image_for_file(path, frame, g, known)
        h, w = dims[image_id]
        targets: list[Any] = []
        for r in frame.itertuples(index=False):
            what = feature_label(int(r.index), r.id)
            if r.role == "proposed" and r.valid:  # a proposal of an instance-flag review file: decided by its class
                if geometry:
                    proposal_decision(r.class_name, store.taxonomy, path=path, what=what)
                targets.append(None)
                continue
            if not r.valid:
                raise InputFormatError(path, f"{what}: invalid polygon ({r.invalid_reason}); fix it in QuPath "
                                       "(e.g. Objects > Simplify shape) and export again")
            minx, miny, maxx, maxy = r.geometry.bounds
            if minx < 0 or miny < 0 or maxx > w or maxy > h:
                raise InputFormatError(
                    path, f"{what}: coordinates ({minx:g}, {miny:g})-({maxx:g}, {maxy:g}) "
                    f"fall outside image {image_id} ({w}x{h} pixels)")
            t = resolve(r.class_name)
            if t == "unknown":
                raise InputFormatError(
                    path, f"{what}: unknown class {str(r.class_name)[:80]!r}; expected one of "
                    f"{', '.join(store.taxonomy.names)}, {IGNORE_CLASS}, or a --class-map entry")
            targets.append(t)
        parsed.append((path, image_id, frame, targets))

    cur = fold_current_labels(store)
    fold = store_geometry(store)
    edits = GeometryEdits(store, actor) if geometry else None
    nuc_by_image = cur.groupby("image_id", sort=False)
    seqs = [int(s) for _p, _i, fr, _t in parsed for s in fr["export_seq"] if not _missing(s)]
    newest = _latest_label_events(store, since_seq=min(seqs)) if seqs else {}

    # pass 2: match features to nuclei, compute decisions
    events: list[dict[str, Any]] = []
    per_file = []
    skipped: list[dict[str, Any]] = []
    class_counts: dict[str, int] = {}
    seen: dict[int, tuple[Path, int]] = {}
    for path, image_id, frame, targets in parsed:
        nuc = nuc_by_image.get_group(image_id) if image_id in nuc_by_image.groups else cur.iloc[:0]
        by_nid = {int(n): k for k, n in enumerate(nuc["nucleus_id"].to_numpy())}
        by_inst = {int(n): k for k, n in enumerate(nuc["instance_id"].to_numpy())}
        instances: np.ndarray | None = None
        stats = {"file": str(path), "image_id": image_id, "features": len(frame), "matched": 0, "unmatched": 0,
                 "unchanged": 0, "changed": 0, "unclassified": 0, "refused": 0, "deleted": 0, "moved": 0}

        def skip(r: Any, nid: int | None, reason: str, *, path: Path = path) -> None:
            skipped.append({"file": str(path), "feature": None if r is None else int(r.index),
                            "id": None if r is None or _missing(r.id) else str(r.id), "nucleus_id": nid,
                            "reason": reason})

        exported_ids: set[int] = set()
        for r, t in zip(frame.itertuples(index=False), targets):
            what = feature_label(int(r.index), r.id)
            if r.role == "proposed":
                if edits is not None:
                    edits.proposal(path, image_id, r)
                else:
                    skip(r, None, "proposal: an instance-flag proposal is decided only with --geometry")
                continue
            exported = not any(_missing(v) for v in (r.export_seq, r.export_class_value, r.export_label))
            k = None
            if not _missing(r.nucleus_id):
                try:
                    k = by_nid.get(int(r.nucleus_id))
                except ValueError:
                    k = None
            by_id = k is not None
            if instances is None and (k is None or exported):
                instances = current_instances(store, image_id, geometry=fold)
            if k is None:
                assert instances is not None
                k = _match_by_overlap(r.geometry, instances, by_inst, nuc, min_iou)
            if k is None:
                stats["unmatched"] += 1
                skip(r, None, f"unmatched: no nucleus_id of this image and no nucleus overlaps it with IoU >= {min_iou:g}")
                continue
            stats["matched"] += 1
            row = nuc.iloc[k]
            nid = int(row["nucleus_id"])
            if nid in seen:
                p0, i0 = seen[nid]
                raise InputFormatError(path, f"{what}: nucleus {nid} is also matched by feature {i0} of {p0.name}")
            seen[nid] = (path, int(r.index))
            exported_ids.add(nid)
            name = store.taxonomy.class_name(t) if isinstance(t, int) and t > 0 else (
                IGNORE_CLASS if t == -1 else "(none)")
            class_counts[name] = class_counts.get(name, 0) + 1
            if exported and by_id:
                assert instances is not None
                moved = _outline_change(r.geometry, instances, row)
                if moved:
                    stats["moved"] += 1
                    why = edits.outline(path, image_id, nid, r) if edits is not None else (
                        "geometry edits are applied only with --geometry")
                    if why:
                        skip(r, nid, f"outline moved ({moved}); {why}" + (", only the class" if t is not None else ""))
            shown = shown_target(int(r.export_class_value), str(row["kind"]),
                                 "rejected" if int(r.export_label) == -1 else "") if exported else None
            if t is None:
                stats["unclassified"] += 1
                if exported and shown is not None:
                    skip(r, nid, "classification removed: an unclassified feature changes nothing")
                continue
            if exported and t == shown:
                stats["unchanged"] += 1
                continue
            if row["kind"] != "nucleus":
                stats["unchanged"] += 1
                skip(r, nid, f"ignore region: an ambiguous source region cannot take class {name}")
                continue
            current = int(row["label"]) if not pd.isna(row["label"]) else 0
            if int(t) == current and row["status"] != "conflict":
                stats["unchanged"] += 1
                continue
            if exported and nid in newest and newest[nid][0] > int(r.export_seq):
                s, who = newest[nid]
                stats["refused"] += 1
                skip(r, nid, f"newer decision: seq {s} by {who} is newer than this export (ledger seq "
                     f"{int(r.export_seq)}); export again and redo the edit")
                continue
            stats["changed"] += 1
            events.append({
                "kind": "decision", "nucleus_id": nid, "actor": actor,
                "action": "not_nucleus" if t == -1 else "set_class", "label": int(t), "prev_label": current,
                "round": None, "ref": None,
                "payload": {"source": "qupath", "reason": "qupath edit", "file": path.name,
                            "feature": str(r.index) if _missing(r.id) else str(r.id)},
            })
        if frame["export_seq"].notna().any():  # an export of ours: every nucleus of the image was in it
            for nid in sorted(set(by_nid) - exported_ids):
                stats["deleted"] += 1
                if edits is not None:
                    edits.delete(path, image_id, nid)
                else:
                    skip(None, nid, "deleted: the nucleus is not in the file; deletions are applied only "
                         "with --geometry")
        if edits is not None:
            for nid, reason in edits.finish_file(path, image_id):
                skip(None, nid, reason)
        per_file.append(stats)
    decisions = pd.DataFrame(events, columns=["kind", "nucleus_id", "actor", "action", "label", "prev_label",
                                              "round", "ref", "payload"])
    geo_events = edits.events if edits is not None else []
    applied = False
    if (events or geo_events) and not dry_run:
        store.ledger.append(events + geo_events)  # one transaction: class and geometry edits together
        applied = True
    not_applied = pd.DataFrame(skipped, columns=["file", "feature", "id", "nucleus_id", "reason"])
    geo = pd.DataFrame(geo_events, columns=["kind", "nucleus_id", "round", "actor", "action", "label", "ref",
                                            "payload"])
    return QupathImport(decisions, pd.DataFrame(per_file), class_counts, applied, not_applied, geo)


def _latest_label_events(store: Any, *, since_seq: int) -> dict[int, tuple[int, str]]:
    """Per nucleus: (seq, actor) of its latest decision or accepted proposal after ``since_seq``."""
    ev = store.ledger.events(kinds=("decision", "proposal"), since_seq=since_seq)
    ev = ev[(ev["kind"] == "decision") | (ev["action"] == "auto_accepted")]
    last = ev.drop_duplicates("nucleus_id", keep="last")
    return {int(n): (int(s), str(a)) for n, s, a in zip(last["nucleus_id"], last["seq"], last["actor"])}


def _outline_change(geom: Any, instances: np.ndarray, row: Any) -> str:
    """"" when ``geom`` rasterises (by pixel centres) to exactly the nucleus's pixels, else a
    short description of the difference."""
    iid = int(row["instance_id"])
    h, w = instances.shape
    minx, miny, maxx, maxy = geom.bounds
    y0 = max(0, min(int(row["bbox_y0"]), math.floor(miny)))
    x0 = max(0, min(int(row["bbox_x0"]), math.floor(minx)))
    y1 = min(h, max(int(row["bbox_y1"]), math.ceil(maxy)))
    x1 = min(w, max(int(row["bbox_x1"]), math.ceil(maxx)))
    drawn = geometry_mask(geom, (h, w), window=(y0, x0, y1, x1))
    mask = instances[y0:y1, x0:x1] == iid
    diff = int((drawn ^ mask).sum())
    if diff == 0:
        return ""
    inter = int((drawn & mask).sum())
    union = int((drawn | mask).sum())
    return f"{diff} pixels differ, IoU {inter / union:.2f}" if union else f"{diff} pixels differ"


def _match_by_overlap(geom: Any, instances: np.ndarray, by_inst: dict[int, int], nuc: pd.DataFrame,
                      min_iou: float) -> int | None:
    minx, miny, maxx, maxy = geom.bounds
    h, w = instances.shape
    y0, x0 = max(0, int(math.floor(miny))), max(0, int(math.floor(minx)))
    y1, x1 = min(h, int(math.ceil(maxy))), min(w, int(math.ceil(maxx)))
    inside = geometry_mask(geom, (h, w), window=(y0, x0, y1, x1))
    n_in = int(inside.sum())
    if n_in == 0:
        return None
    ids, counts = np.unique(instances[y0:y1, x0:x1][inside], return_counts=True)
    best, best_iou = None, 0.0
    for iid, c in zip(ids, counts):
        if iid == 0 or int(iid) not in by_inst:
            continue
        k = by_inst[int(iid)]
        area = int(nuc.iloc[k]["area"])
        iou = c / (n_in + area - c)
        if iou > best_iou:
            best, best_iou = k, iou
    return best if best_iou >= min_iou else None

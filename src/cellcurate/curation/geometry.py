"""Instance-level geometry: instance flags, geometry decisions, and the fold that gives every
image its current nuclei and outlines (ingest + ``geometry`` events).

The ledger kinds are fixed by the contract with the detection side (docs/GEOMETRY_REVIEW.md):

* ``instance_flag`` events (written by :mod:`cellcurate.relabel.instances`): one per flag, the
  proposed geometry in the payload; :func:`instance_flags` returns the flags of the newest run
  of the newest instance round.
* ``geometry`` events (written by the reviewer, :mod:`cellcurate.curation.geometry_review`):
  ``action`` "add" (a new nucleus with a new stable id, origin "review"), "delete", "replace"
  (the outline), "keep" (no change; the flag is decided) or "undo" (``ref`` = the seq of the
  undone geometry event of the same actor). Payload: ``flag_id``, ``image_id``, ``polygon``
  (add/replace), ``rle`` (COCO uncompressed, column-major, of the new mask), ``origin``.

Coordinates: image pixels, x = column, y = row; a polygon is a list of [x, y] vertices on pixel
*edges* (:mod:`cellcurate.core.geometry`), not closed; a pixel belongs to it when its centre
(c + 0.5, r + 0.5) lies inside (:func:`polygon_mask`), so ``mask_to_polygon`` and
:func:`polygon_mask` are inverse.

The fold (:func:`fold_geometry`): geometry events in seq order, undone ones removed, ``keep``
ignored; per nucleus the latest effective event wins (an add after a delete brings it back, a
delete after an add removes the added nucleus). Painting an image (:meth:`GeometryFold.paint`):
deleted and replaced nuclei are cleared, then added and replaced masks are painted in the seq
order of their deciding event, so a later reviewed outline wins over an earlier one where they
overlap; a nucleus whose every pixel was painted over is gone from the image (``covered``).
Geometry events on an ingested nucleus older than its latest ingest (``--overwrite``) no longer
count, like the label fold.

>>> import numpy as np
>>> mask_rle(np.array([[0, 1], [1, 1]], bool))
{'size': [2, 2], 'counts': [1, 3]}
>>> rle_mask({'size': [2, 2], 'counts': [1, 3]}).astype(int).tolist()
[[0, 1], [1, 1]]
>>> polygon_mask([[1, 0], [2, 0], [2, 2], [1, 2]], (2, 3)).astype(int).tolist()
[[0, 1, 0], [0, 1, 0]]

Dimensions: F flags, G geometry events, H×W pixels of an image, V vertices of a polygon.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..errors import ConfigError

InstanceIssue = Literal["missing_annotation", "spurious_annotation", "bad_outline", "merged", "split"]
INSTANCE_ISSUES: tuple[str, ...] = ("missing_annotation", "spurious_annotation", "bad_outline", "merged", "split")
ProposedAction = Literal["add", "delete", "replace", "merge", "split"]
PROPOSED_ACTIONS: tuple[str, ...] = ("add", "delete", "replace", "merge", "split")
GeometryAction = Literal["add", "delete", "replace", "keep", "undo"]
GEOMETRY_ACTIONS: tuple[str, ...] = ("add", "delete", "replace", "keep", "undo")
#: ``origin`` of a nucleus added in review (payload of its "add" event, ``origin_file`` in a release).
ORIGIN_REVIEW = "review"

#: Columns of :func:`instance_flags`, in order.
FLAG_COLUMNS: tuple[str, ...] = (
    "seq", "flag_id", "image_id", "issue", "score", "nucleus_id", "nucleus_ids", "proposed_action", "polygons",
    "evidence", "label", "round", "run",
)
#: Columns of :attr:`GeometryFold.changes`, in order.
CHANGE_COLUMNS: tuple[str, ...] = (
    "nucleus_id", "image_id", "change", "polygon", "rle", "label", "seq", "actor", "flag_id",
)


# -- instance flags -------------------------------------------------------------------------------
def _payload(p: Any) -> dict[str, Any]:
    if isinstance(p, dict):
        return p
    if isinstance(p, str) and p:
        try:
            out = json.loads(p)
        except json.JSONDecodeError:
            return {}
        return out if isinstance(out, dict) else {}
    return {}


def _int_or_none(v: Any) -> int | None:
    return None if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else int(v)


def instance_flags(events: pd.DataFrame) -> pd.DataFrame:
    """The flags of the newest run of the newest instance round, by seq.

    Parameters
    ----------
    events
        Ledger events (columns ``EVENT_COLUMNS``; payload JSON text or parsed); only the
        ``instance_flag`` rows are read.

    Returns
    -------
    pandas.DataFrame
        F rows, columns :data:`FLAG_COLUMNS`: ``nucleus_ids`` a list of ints, ``polygons`` a list
        of polygons (lists of [x, y]), ``evidence`` a dict, ``label`` the predicted class (0 none),
        ``round`` K, ``run`` the run token.
    """
    ev = events[events["kind"] == "instance_flag"]
    if ev.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in FLAG_COLUMNS})
    payloads = [_payload(p) for p in ev["payload"]]
    rounds = ev["round"].fillna(0).astype("int64").to_numpy()
    runs = np.array([str(p.get("run", "")) for p in payloads], dtype=object)
    top = int(rounds.max())
    in_top = np.flatnonzero(rounds == top)
    newest_run = runs[in_top[-1]]  # the run of the newest event of the newest round
    keep = in_top[runs[in_top] == newest_run]
    rows = []
    for i in keep:
        r, p = ev.iloc[int(i)], payloads[int(i)]
        prop: dict[str, Any] = p["proposed"] if isinstance(p.get("proposed"), dict) else {}
        rows.append({
            "seq": int(r["seq"]), "flag_id": str(p.get("flag_id", "")), "image_id": str(p.get("image_id", "")),
            "issue": str(r["action"]), "score": float(r["score"]) if not pd.isna(r["score"]) else 0.0,
            "nucleus_id": _int_or_none(r["nucleus_id"]),
            "nucleus_ids": [int(n) for n in p.get("nucleus_ids") or []],
            "proposed_action": str(prop.get("action", "")),
            "polygons": [[[float(x), float(y)] for x, y in poly] for poly in prop.get("polygons") or []],
            "evidence": p.get("evidence") if isinstance(p.get("evidence"), dict) else {},
            "label": _int_or_none(r["label"]) or 0, "round": top, "run": newest_run,
        })
    out = pd.DataFrame(rows, columns=list(FLAG_COLUMNS))
    out["nucleus_id"] = out["nucleus_id"].astype("Int64")
    return out.reset_index(drop=True)


# -- polygons, masks, RLE -------------------------------------------------------------------------
def as_polygon(polygon: Any, *, what: str = "polygon") -> list[list[float]]:
    """A polygon as a list of [x, y] floats (a closing vertex equal to the first is dropped).

    Raises :class:`ConfigError` (one line) unless it is at least 3 finite [x, y] pairs."""
    if isinstance(polygon, str):
        try:
            polygon = json.loads(polygon)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{what}: not JSON ({exc.msg}); expected [[x, y], ...]") from None
    try:
        a = np.asarray(polygon, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected a list of [x, y] pairs") from None
    if a.ndim != 2 or a.shape[1] != 2:
        raise ConfigError(f"{what}: expected a list of [x, y] pairs, got an array of shape {a.shape}")
    if not np.isfinite(a).all():
        raise ConfigError(f"{what}: coordinates must be finite numbers")
    if len(a) > 1 and (a[0] == a[-1]).all():
        a = a[:-1]
    if len(a) < 3:
        raise ConfigError(f"{what}: a polygon needs at least 3 vertices, got {len(a)}")
    return [[float(x), float(y)] for x, y in a]


def polygon_geometry(polygon: Sequence[Sequence[float]]) -> Any:
    """The shapely Polygon of a vertex list (not validated)."""
    import shapely

    return shapely.Polygon(np.asarray(polygon, dtype=np.float64))


def polygon_mask(polygon: Sequence[Sequence[float]] | Any, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the pixels whose centre lies inside the polygon (the store's rasteriser,
    :func:`cellcurate.curation.qupath.geometry_mask`, over the whole image)."""
    from .qupath import geometry_mask

    geom: Any = polygon if hasattr(polygon, "geom_type") else polygon_geometry(polygon)
    h, w = int(shape[0]), int(shape[1])
    out = np.zeros((h, w), bool)
    minx, miny, maxx, maxy = geom.bounds
    y0, x0 = max(0, int(math.floor(miny))), max(0, int(math.floor(minx)))
    y1, x1 = min(h, int(math.ceil(maxy))), min(w, int(math.ceil(maxx)))
    if y1 > y0 and x1 > x0:
        out[y0:y1, x0:x1] = geometry_mask(geom, (h, w), window=(y0, x0, y1, x1))
    return out


def mask_polygon(mask: np.ndarray) -> list[list[float]]:
    """The pixel-edge outline of a mask's largest component as a polygon (not closed)."""
    from ..core.geometry import mask_to_polygon

    ring = mask_to_polygon(mask)
    return [[float(x), float(y)] for x, y in ring[:-1]]


def mask_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE of an (H, W) bool mask: column-major run lengths, starting with the
    background run (0 when the first pixel is set)."""
    m = np.asarray(mask, dtype=bool)
    flat = m.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.r_[0, change, flat.size]
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": [int(c) for c in counts]}


def rle_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """The (H, W) bool mask of a COCO uncompressed RLE (:func:`mask_rle`)."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = np.asarray(rle["counts"], dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        raise ConfigError("rle: expected {'size': [h, w], 'counts': [...]}") from None
    if (counts < 0).any() or int(counts.sum()) != h * w:
        raise ConfigError(f"rle: run lengths sum to {int(counts.sum())}, expected {h}x{w} = {h * w}")
    values = np.zeros(len(counts), bool)
    values[1::2] = True
    return np.repeat(values, counts).reshape((h, w), order="F")


def check_polygon(polygon: Any, shape: tuple[int, int], *, what: str = "polygon") -> tuple[list[list[float]], np.ndarray]:
    """Validate a proposed outline on an image of ``shape`` (H, W).

    Returns the polygon (list of [x, y]) and its (H, W) bool mask. Raises :class:`ConfigError`
    (one line naming ``what``) when it is not a list of >= 3 finite points, self-intersects (or
    is otherwise invalid for shapely), reaches outside the image, or covers no pixel centre.
    """
    import shapely

    poly = as_polygon(polygon, what=what)
    geom = polygon_geometry(poly)
    if not shapely.is_valid(geom):
        raise ConfigError(f"{what}: invalid polygon ({shapely.is_valid_reason(geom)}); "
                          "a nucleus outline must not cross itself")
    h, w = int(shape[0]), int(shape[1])
    minx, miny, maxx, maxy = geom.bounds
    if minx < 0 or miny < 0 or maxx > w or maxy > h:
        raise ConfigError(f"{what}: coordinates ({minx:g}, {miny:g})-({maxx:g}, {maxy:g}) fall outside the "
                          f"{w}x{h} image")
    mask = polygon_mask(geom, (h, w))
    if not mask.any():
        raise ConfigError(f"{what}: the polygon covers no pixel centre (empty)")
    return poly, mask


def review_nucleus_id(image_id: str, key: str, taken: Iterable[int] | set[int] = ()) -> int:
    """The stable 63-bit id of a nucleus added in review: a hash of the image id and ``key`` (the
    flag id and the polygon's index, or the mask's RLE for an edit without a flag), rehashed
    until it collides with none of ``taken`` (the store's ingest ids). Two stores replaying the
    same events allocate the same ids."""
    taken = taken if isinstance(taken, set) else set(taken)
    text = f"{ORIGIN_REVIEW}|{image_id}|{key}"
    for attempt in range(1000):
        salt = "" if attempt == 0 else f"|{attempt}"
        nid = int.from_bytes(hashlib.blake2b((text + salt).encode("utf-8"), digest_size=8).digest(),
                             "little") & (2**63 - 1)
        if nid not in taken and nid != 0:
            return nid
    raise ConfigError(f"cannot allocate a nucleus id for {text!r}")  # pragma: no cover - 2**-63 odds


def rle_key(rle: Mapping[str, Any]) -> str:
    """A short digest of an RLE (the id key of an added nucleus without a flag)."""
    return hashlib.sha256(json.dumps(rle, sort_keys=True).encode()).hexdigest()[:16]


# -- the fold -------------------------------------------------------------------------------------
def live_geometry_events(events: pd.DataFrame) -> pd.DataFrame:
    """Geometry events that count: undone events and undo rows removed (an ``undo`` removes the
    event of the same actor whose seq is its ``ref``), in seq order."""
    geo = events[events["kind"] == "geometry"]
    undo = geo[geo["action"] == "undo"]
    rest = geo[geo["action"] != "undo"]
    if undo.empty:
        return rest.sort_values("seq", kind="stable")
    undone = set(zip(undo["actor"].astype(str), undo["ref"].fillna(-1).astype("int64")))
    key = list(zip(rest["actor"].astype(str), rest["seq"].astype("int64")))
    return rest[[k not in undone for k in key]].sort_values("seq", kind="stable")


@dataclass
class GeometryFold:
    """The current nuclei of every image that geometry review changed.

    ``changes``: one row per nucleus whose geometry differs from ingest (columns
    :data:`CHANGE_COLUMNS`; ``change`` "added", "deleted" or "replaced"; ``polygon``/``rle`` the
    current outline, None when deleted; ``label`` the class an added nucleus was given (0 none)).
    ``decided_flags``: flag ids with a live decision (any action, "keep" included).
    """

    changes: pd.DataFrame
    decided_flags: set[str] = field(default_factory=set)

    @property
    def images(self) -> list[str]:
        """Image ids with at least one change, sorted."""
        return sorted(set(self.changes["image_id"].astype(str)))

    @property
    def empty(self) -> bool:
        return self.changes.empty

    def of_image(self, image_id: str) -> pd.DataFrame:
        return self.changes[self.changes["image_id"] == image_id]

    def counts(self) -> dict[str, int]:
        """{"added": n, "deleted": n, "replaced": n}."""
        vc = self.changes["change"].value_counts()
        return {k: int(vc.get(k, 0)) for k in ("added", "deleted", "replaced")}

    def paint(self, image_id: str, instances: np.ndarray, nuclei: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
        """The current instance map of one image and its nuclei.

        Parameters
        ----------
        instances
            (H, W) int32 instance map of the image as ingested.
        nuclei
            The image's ingested nuclei (at least ``nucleus_id``, ``instance_id``, ``kind``).

        Returns
        -------
        instances
            (H, W) int32: deleted nuclei cleared (0), replaced ones redrawn, added ones painted
            with new instance ids (after the largest id of the image, in order of their add).
        nuclei
            One row per nucleus present afterwards: ``nucleus_id``, ``instance_id``, ``kind``,
            ``origin`` ("ingest" | "review"), ``change`` ("" | "added" | "replaced"),
            ``label`` (the added nucleus's class, 0 for ingested ones), ``seq``, ``actor``,
            ``bbox_y0``, ``bbox_x0``, ``bbox_y1``, ``bbox_x1``, ``centroid_y``, ``centroid_x``,
            ``area``. Nuclei painted over entirely are absent.
        """
        ins = np.array(instances, dtype=np.int32, copy=True)
        ch = self.of_image(image_id)
        inst_of = dict(zip(nuclei["nucleus_id"].astype("int64"), nuclei["instance_id"].astype("int64")))
        kinds = dict(zip(nuclei["nucleus_id"].astype("int64"), nuclei["kind"].astype(str)))
        top = max(int(ins.max(initial=0)), max(inst_of.values(), default=0))
        extra: dict[int, dict[str, Any]] = {}
        for r in ch.itertuples(index=False):
            nid = int(r.nucleus_id)
            if r.change in ("deleted", "replaced") and nid in inst_of:
                ins[ins == inst_of[nid]] = 0
        for r in ch[ch["change"] != "deleted"].sort_values("seq", kind="stable").itertuples(index=False):
            nid = int(r.nucleus_id)
            mask = rle_mask(r.rle)
            if mask.shape != ins.shape:
                raise ConfigError(f"geometry event {int(r.seq)}: mask is {mask.shape[0]}x{mask.shape[1]}, image "
                                  f"{image_id} is {ins.shape[0]}x{ins.shape[1]}")
            if nid not in inst_of:  # added
                top += 1
                inst_of[nid] = top
                kinds[nid] = "nucleus"
            ins[mask] = inst_of[nid]
            extra[nid] = {"change": str(r.change), "label": int(r.label or 0), "seq": int(r.seq),
                          "actor": str(r.actor)}
        deleted = set(ch.loc[ch["change"] == "deleted", "nucleus_id"].astype("int64"))
        ids = [n for n in inst_of if n not in deleted]
        stats = _instance_stats(ins, [inst_of[n] for n in ids])
        rows = []
        for n, st in zip(ids, stats):
            if st is None:
                continue  # painted over entirely
            e = extra.get(n, {})
            added = e.get("change") == "added"
            rows.append({"nucleus_id": n, "instance_id": inst_of[n], "kind": kinds[n],
                         "origin": ORIGIN_REVIEW if added else "ingest", "change": e.get("change", ""),
                         "label": e.get("label", 0) if added else 0, "seq": e.get("seq"), "actor": e.get("actor"),
                         **st})
        cols = ["nucleus_id", "instance_id", "kind", "origin", "change", "label", "seq", "actor", "bbox_y0",
                "bbox_x0", "bbox_y1", "bbox_x1", "centroid_y", "centroid_x", "area"]
        return ins, pd.DataFrame(rows, columns=cols)


def _instance_stats(ins: np.ndarray, instance_ids: list[int]) -> list[dict[str, Any] | None]:
    """Bbox (exclusive end), centroid and area of each instance id (None when it has no pixel)."""
    from scipy import ndimage

    out: list[dict[str, Any] | None] = []
    if not instance_ids:
        return out
    top = int(max(max(instance_ids), int(ins.max(initial=0))))
    ys, xs = np.nonzero(ins)
    lab = ins[ys, xs]
    area = np.bincount(lab, minlength=top + 1)
    sy = np.bincount(lab, weights=ys, minlength=top + 1)
    sx = np.bincount(lab, weights=xs, minlength=top + 1)
    boxes = ndimage.find_objects(ins, max_label=top)
    for i in instance_ids:
        if i <= 0 or area[i] == 0 or boxes[i - 1] is None:
            out.append(None)
            continue
        sl = boxes[i - 1]
        out.append({"bbox_y0": sl[0].start, "bbox_x0": sl[1].start, "bbox_y1": sl[0].stop, "bbox_x1": sl[1].stop,
                    "centroid_y": float(sy[i] / area[i]), "centroid_x": float(sx[i] / area[i]), "area": int(area[i])})
    return out


def fold_geometry(events: pd.DataFrame, *, ingest_seq: Mapping[int, int] | None = None) -> GeometryFold:
    """Fold ``geometry`` events into the current geometry changes (see the module docstring).

    Parameters
    ----------
    events
        Ledger events (only the ``geometry`` rows are read).
    ingest_seq
        nucleus id -> seq of its latest ingest event: geometry events on an ingested nucleus
        before it no longer count. An id not in it is a nucleus added in review.
    """
    live = live_geometry_events(events)
    decided = {str(_payload(p).get("flag_id")) for p in live["payload"] if _payload(p).get("flag_id")}
    state: dict[int, dict[str, Any]] = {}
    base = ingest_seq or {}
    for r in live[live["action"] != "keep"].itertuples(index=False):
        if pd.isna(r.nucleus_id):
            continue
        nid = int(r.nucleus_id)
        if nid in base and int(r.seq) < int(base[nid]):
            continue
        p = _payload(r.payload)
        ingested = nid in base
        prev = state.get(nid)
        if r.action == "delete":
            if not ingested:  # an added nucleus deleted again: as if it was never added
                state.pop(nid, None)
                continue
            change = "deleted"
        else:  # add, replace
            change = "replaced" if ingested else "added"
        label = _int_or_none(r.label)
        if label is None and prev is not None and change == "added":
            label = prev["label"]  # a replaced outline of an added nucleus keeps its class
        state[nid] = {"nucleus_id": nid, "image_id": str(p.get("image_id", "")), "change": change,
                      "polygon": None if change == "deleted" else p.get("polygon"),
                      "rle": None if change == "deleted" else p.get("rle"),
                      "label": label or 0, "seq": int(r.seq), "actor": str(r.actor),
                      "flag_id": p.get("flag_id")}
    changes = pd.DataFrame(list(state.values()), columns=list(CHANGE_COLUMNS))
    changes["nucleus_id"] = changes["nucleus_id"].astype("int64")
    changes["seq"] = changes["seq"].astype("int64")
    return GeometryFold(changes.sort_values("seq", kind="stable").reset_index(drop=True), decided)


def store_geometry(store: Any, *, until_seq: int | None = None) -> GeometryFold:
    """:func:`fold_geometry` of a store's ledger (its ingest positions read from the ledger)."""
    ledger = store.ledger
    geo = ledger.events(kinds=("geometry",), until_seq=until_seq)
    if geo.empty:
        return fold_geometry(geo)
    ids = [int(n) for n in geo["nucleus_id"].dropna().unique()]
    ing = ledger.events(kinds=("ingest",), nucleus_ids=ids, until_seq=until_seq)
    ing = ing.drop_duplicates("nucleus_id", keep="last")
    return fold_geometry(geo, ingest_seq=dict(zip(ing["nucleus_id"].astype("int64"), ing["seq"].astype("int64"))))

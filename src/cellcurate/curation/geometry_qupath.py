"""Instance flags reviewed in QuPath: a GeoJSON per image with the current nuclei and the
proposals, and the geometry edits that come back (``curate ingest qupath --geometry``).

Export (:func:`export_review_geojson`): the image's nuclei as :func:`~cellcurate.curation.qupath.export_qupath`
writes them (after geometry review), plus one ``annotation`` feature per proposed polygon of each
flag not yet decided, classified ``Proposed: <action>`` (a "delete" proposal outlines the nucleus
it would delete), with ``metadata`` ``role`` "proposed", ``flag_id``, ``issue``, ``nucleus_ids``.
Its ``id`` is the uuid5 of ``<flag_id>|<k>``.

Decisions, in QuPath (:class:`GeometryEdits`, driven by ``import_geojson(..., geometry=True)``):

* set a proposal's class to ``Accept`` (or ``Accept: <class>``: the class of an added nucleus)
  to accept the flag's proposal; edit a proposal's outline and it is accepted with the drawn one;
* set it to ``Keep`` (or ``Reject``) to keep the annotation as it is;
* edit a nucleus's outline: its outline is replaced by the drawn polygon;
* delete a nucleus: it is deleted.

An edit on a nucleus a pending flag concerns decides that flag (the event refers to it).
Everything is validated before anything is appended (one transaction with the class edits).

Dimensions: F features of a file, H×W pixels.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CellcurateError, InputFormatError
from .geometry import polygon_mask
from .geometry_review import geometry_events, instance_queue, store_flags

PROPOSED_CLASS = "Proposed"
PROPOSED_COLOR = [255, 0, 255]
ACCEPT_NAMES = ("accept", "accepted", "add")
KEEP_NAMES = ("keep", "reject", "rejected")
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://cellcurate/proposal")


def proposal_uuid(flag_id: str, k: int) -> str:
    return str(uuid.uuid5(_NAMESPACE, f"{flag_id}|{int(k)}"))


def proposal_decision(name: Any, taxonomy: Any, *, path: Path | str = "", what: str = "") -> tuple[str | None, int | None]:
    """("accept", class id or None) | ("keep", None) | (None, None) (still ``Proposed``) from a
    proposal's QuPath class; an unknown name is a one-line :class:`InputFormatError`."""
    if name is None or (isinstance(name, float) and np.isnan(name)):
        return None, None
    text = str(name).strip()
    base, _, rest = text.partition(":")
    key = base.strip().lower()
    if key == PROPOSED_CLASS.lower():
        return None, None
    if key in KEEP_NAMES and not rest.strip():
        return "keep", None
    if key in ACCEPT_NAMES:
        if not rest.strip():
            return "accept", None
        try:
            return "accept", taxonomy.class_id(rest.strip())
        except CellcurateError:
            raise InputFormatError(path, f"{what}: unknown class {rest.strip()!r} in {text!r}; expected one of "
                                   f"{', '.join(taxonomy.names)}") from None
    raise InputFormatError(path, f"{what}: a proposal's class must be Accept, 'Accept: <class>', Keep or "
                           f"{PROPOSED_CLASS} (unchanged), got {text[:80]!r}")


def _outline(geom: Any) -> list[list[float]] | None:
    """The exterior of a single polygon without holes, as [x, y] vertices (None otherwise)."""
    if geom is None or geom.geom_type != "Polygon" or len(geom.interiors):
        return None
    return [[float(x), float(y)] for x, y in list(geom.exterior.coords)[:-1]]


class GeometryEdits:
    """Collects the geometry edits of a QuPath import, file by file (see the module docstring)."""

    def __init__(self, store: Any, actor: str) -> None:
        self.store, self.actor = store, actor
        flags = store_flags(store)
        self.flags = {str(f["flag_id"]): f for f in flags.to_dict("records")}
        self.flag_of: dict[int, dict[str, Any]] = {}
        for f in sorted(self.flags.values(), key=lambda f: f["score"]):
            for n in f["nucleus_ids"]:
                self.flag_of[int(n)] = f  # the highest score wins
        self.events: list[dict[str, Any]] = []
        self._proposals: dict[str, list[Any]] = {}
        self._outlines: list[tuple[int, list[list[float]], str]] = []
        self._deletes: list[int] = []

    def proposal(self, path: Path, image_id: str, r: Any) -> None:
        fid = r.flag_id
        if fid is None or fid not in self.flags:
            raise InputFormatError(path, f"feature {int(r.index)}: proposal of flag {fid!r}, which is not a flag of "
                                   "the newest instance run; export the review file again")
        if str(self.flags[fid]["image_id"]) != image_id:
            raise InputFormatError(path, f"feature {int(r.index)}: flag {fid} belongs to image "
                                   f"{self.flags[fid]['image_id']}, not {image_id}")
        self._proposals.setdefault(fid, []).append(r)

    def outline(self, path: Path, image_id: str, nucleus_id: int, r: Any) -> str | None:
        """Record an outline edit; the reason it cannot be applied, or None."""
        poly = _outline(r.geometry)
        if poly is None:
            return "a nucleus outline must be one polygon without holes; not applied"
        self._outlines.append((int(nucleus_id), poly, f"feature {int(r.index)}"))
        return None

    def delete(self, path: Path, image_id: str, nucleus_id: int) -> None:
        self._deletes.append(int(nucleus_id))

    def finish_file(self, path: Path, image_id: str) -> list[tuple[int | None, str]]:
        """Build the file's events; (nucleus id, reason) of the edits not applied."""
        skipped: list[tuple[int | None, str]] = []
        shape = None
        decided: set[int] = set()
        try:
            for fid, rows in self._proposals.items():
                flag = self.flags[fid]
                decision, label = None, None
                for r in rows:
                    d, lab = proposal_decision(r.class_name, self.store.taxonomy, path=path)
                    if d == "accept" or (d == "keep" and decision is None):
                        decision, label = d, lab if lab is not None else label
                proposed = flag["polygons"]
                by_uuid = {proposal_uuid(fid, k): k for k in range(max(len(proposed), 1))}
                drawn: list[tuple[int, list[list[float]]]] = []
                edited = False
                for r in rows:
                    poly = _outline(r.geometry)
                    if poly is None:
                        raise InputFormatError(path, f"feature {int(r.index)}: a proposal must be one polygon "
                                               "without holes")
                    k = by_uuid.get(str(r.id), len(proposed))
                    drawn.append((k, poly))
                    if flag["proposed_action"] == "delete":
                        continue  # a delete proposal shows the nucleus: its outline is not the decision
                    if shape is None:
                        shape = _shape(self.store, image_id)
                    if k >= len(proposed) or not np.array_equal(polygon_mask(poly, shape),
                                                                polygon_mask(proposed[k], shape)):
                        edited = True
                if decision is None and edited:
                    decision = "accept"
                if decision is None:
                    continue
                use = ([p for _k, p in sorted(drawn, key=lambda kp: kp[0])]
                       if decision == "accept" and flag["proposed_action"] != "delete" else None)
                self.events += geometry_events(self.store, flag, decision, reviewer=self.actor, polygons=use,
                                               label=label, source="qupath")
                decided |= {int(n) for n in flag["nucleus_ids"]}
            for nid, poly, what in self._outlines:
                if nid in decided:
                    skipped.append((nid, f"outline moved ({what}); the accepted proposal of its flag decides it"))
                    continue
                flag = self.flag_of.get(nid)
                self.events += geometry_events(self.store, flag if flag and flag["image_id"] == image_id else None,
                                               "replace", reviewer=self.actor, polygons=[poly], nucleus_ids=[nid],
                                               image_id=image_id, source="qupath")
            for nid in self._deletes:
                if nid in decided:
                    continue
                flag = self.flag_of.get(nid)
                self.events += geometry_events(self.store, flag if flag and flag["image_id"] == image_id else None,
                                               "delete", reviewer=self.actor, nucleus_ids=[nid], image_id=image_id,
                                               source="qupath")
        except InputFormatError:
            raise
        except CellcurateError as exc:
            raise InputFormatError(path, str(exc)) from None
        finally:
            self._proposals, self._outlines, self._deletes = {}, [], []
        return skipped


def _shape(store: Any, image_id: str) -> tuple[int, int]:
    im = store.images()
    row = im[im["image_id"] == image_id].iloc[0]
    return int(row["height"]), int(row["width"])


def proposal_features(flag: dict[str, Any], outlines: dict[int, Any]) -> list[dict[str, Any]]:
    """The proposal features of one flag (``outlines``: nucleus id -> shapely outline, for a
    "delete" proposal)."""
    from .geometry import polygon_geometry
    from .qupath import make_feature

    fid = str(flag["flag_id"])
    action = str(flag["proposed_action"])
    geoms = ([outlines[int(n)] for n in flag["nucleus_ids"] if int(n) in outlines] if action == "delete"
             else [polygon_geometry(p) for p in flag["polygons"]])
    meta = {"flag_id": fid, "image_id": flag["image_id"], "role": "proposed", "issue": flag["issue"],
            "proposed_action": action, "nucleus_ids": ",".join(str(int(n)) for n in flag["nucleus_ids"])}
    out = []
    for k, g in enumerate(geoms):
        try:
            out.append(make_feature(g, id=proposal_uuid(fid, k), class_name=f"{PROPOSED_CLASS}: {action}",
                                    color=PROPOSED_COLOR, measurements={"score": float(flag["score"])},
                                    metadata={**meta, "index": k}, object_type="annotation"))
        except CellcurateError:
            continue  # a proposal shapely cannot repair is left out of the file (it stays in the queue)
    return out


def export_review_geojson(store: Any, out: str | Path, *, reviewer: str | None = None, include_decided: bool = False,
                          compress: bool = False, image_ids: list[str] | None = None) -> tuple[list[Path], int]:
    """One GeoJSON per image with instance flags: its nuclei and the flags' proposals. Returns
    (files, number of proposal features)."""
    from ..core.geometry import mask_to_geometry
    from .qupath import image_features, write_geojson
    from .release import safe_name, snapshot

    q = instance_queue(store, reviewer=reviewer, include_decided=include_decided)
    if image_ids is not None:
        q = q[q["image_id"].isin(image_ids)]
    snap = snapshot(store)
    images = snap.images.set_index("image_id")
    groups = snap.nuclei.groupby("image_id", sort=False)
    files, n = [], 0
    for image_id, flags in q.groupby("image_id", sort=True):
        if image_id not in images.index:
            continue
        ins = snap.paint(image_id, store.read_instances(image_id))
        nuc = groups.get_group(image_id) if image_id in groups.groups else snap.nuclei.iloc[:0]
        feats = image_features(ins, nuc, store.taxonomy, mpp=float(images.at[image_id, "mpp"]),
                               ledger_seq=snap.ledger_seq)
        inst_of = dict(zip(nuc["nucleus_id"].astype("int64"), nuc["instance_id"].astype("int64")))
        for f in flags.to_dict("records"):
            outlines = {int(m): mask_to_geometry(ins == inst_of[int(m)]) for m in f["nucleus_ids"]
                        if int(m) in inst_of}
            props = proposal_features(f, {k: v for k, v in outlines.items() if v is not None})
            feats += props
            n += len(props)
        name = f"{safe_name(image_id)}.geojson" + (".gz" if compress else "")
        files.append(write_geojson(Path(out) / name, feats, compress=compress))
    return files, n


"""Versioned, immutable, self-verifying releases of a store (``curate export`` / ``verify`` / ``diff``).

A release is one folder ``<out>/<version>/`` (schema: docs/RELEASE_FORMAT.md)::

    manifest.json        version, provenance (store content hash, taxonomy hash, ledger position
                         and chain hash), split rule, counts per split x class, ignore counts,
                         licence, and the sha256 of every other file
    MANIFEST.sha256      sha256 of manifest.json (``sha256sum -c`` format)
    taxonomy.json        the store's taxonomy
    images.parquet       one row per image: release split, official source split, zarr location
    nuclei.parquet       one row per nucleus / ignore region: final label, source label, how it
                         was decided, last-round probabilities, origin reference
    arrays.zarr/         zarr v3: image (H, W, 3) uint8, instances (H, W) int32,
                         classes (H, W) uint8 (0 background, 1..K classes, 255 ignore)
    DATASET_CARD.md, class_distribution.png
    ome/<image>.ome.zarr optional OME-Zarr copies (``--ome-zarr``)

The release is written into ``<out>/.tmp-<version>-<token>/``, its files made read-only, and
renamed into place: it appears whole or not at all, and an existing version is never touched.

Dimensions: N images, M nuclei, K classes, H×W pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..core.atomic import fsync_dir, fsync_tree, remove_tree
from ..datasets.containment import containment_problems, resolves_inside, unsafe_relative_path
from ..datasets.release_format import RELEASE_FORMAT, read_release_manifest, release_schema
from ..datasets.release_format import SUPPORTED_FORMAT_VERSION as RELEASE_FORMAT_VERSION
from ..errors import ConfigError, InputFormatError, StateError

# Licence and attribution lines come from the registry entries of the sources a release holds
# (cellcurate.datasets.sources.release_licence / release_attribution); LICENCE is the fallback of
# a manifest without one.
LICENCE = "CC BY-NC-SA 4.0"
STACK_TILES_PER_SHARD = 64
NATIVE_CHUNK = 512

OmeVersion = Literal["0.5", "0.4"]
OME_VERSIONS: tuple[str, ...] = ("0.5", "0.4")

#: How a label was decided (column ``decided`` of nuclei.parquet).
DECIDED_VALUES: tuple[str, ...] = (
    "source", "auto_accepted", "reviewed", "rejected", "unresolved", "conflict", "ignore_region",
)
_STATUS_TO_DECIDED = {"source": "source", "auto": "auto_accepted", "reviewed": "reviewed",
                      "rejected": "rejected", "unresolved": "unresolved", "conflict": "conflict"}
#: Ignore-count categories of the manifest (the reason a region is 255 in the class maps).
IGNORE_REASONS: tuple[str, ...] = ("rejected", "unresolved", "conflict", "ambiguous")

_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_SKIP_HASH = ("manifest.json", "MANIFEST.sha256")


# -- small helpers --------------------------------------------------------------------------------
def safe_name(image_id: str) -> str:
    """File-system name of an image id: ``"pannuke/fold1/00012"`` -> ``"pannuke__fold1__00012"``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(image_id).replace("/", "__"))


def sha256_file(path: str | Path, *, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def store_content_hash(store: Any) -> str:
    """sha256 over every committed unit's ``unit``, ``fingerprint``, ``taxonomy_hash`` and the
    sha256 of its ``images.parquet`` and ``nuclei.parquet`` (one tab-separated line per unit,
    sorted by unit). Labels are not part of it: they are pinned by the ledger position."""
    h = hashlib.sha256()
    units = store.ledger.units().sort_values("unit")
    for row in units.itertuples(index=False):
        udir = Path(store.path) / str(row.dir)
        parts = [str(row.unit), str(row.fingerprint), str(row.taxonomy_hash),
                 sha256_file(udir / "images.parquet"), sha256_file(udir / "nuclei.parquet")]
        h.update(("\t".join(parts) + "\n").encode("utf-8"))
    return h.hexdigest()


# -- ledger queries ---------------------------------------------------------------------------------
def ledger_events(ledger: Any, *, until_seq: int | None = None) -> pd.DataFrame:
    """All events up to ``until_seq``, in seq order, with exact 63-bit nucleus ids.

    ``round`` events (nucleus_id NULL) are read apart from the others: a query that mixes NULL
    and 63-bit ids comes back from SQLite through float64 in pandas and loses the ids' low bits.
    """
    per_nucleus = ledger.events(kinds=("ingest", "proposal", "flag", "decision"), until_seq=until_seq)
    rounds = ledger.events(kinds=("round",), until_seq=until_seq)
    if rounds.empty:
        return per_nucleus
    ev = pd.concat([per_nucleus, rounds], ignore_index=True).sort_values("seq", kind="stable")
    for col in ("nucleus_id", "round", "label", "prev_label", "ref"):
        ev[col] = ev[col].astype("Int64")
    return ev.reset_index(drop=True)


def fold_current_labels(store: Any, *, until_seq: int | None = None) -> pd.DataFrame:
    """The store's nuclei joined with the ledger fold (as ``Store.current_labels``), with exact
    ids, after geometry review (deleted nuclei gone, replaced outlines' bbox and area, added
    nuclei in with ``origin_file`` "review"; :mod:`cellcurate.curation.geometry`)."""
    from ..datasets.ledger import fold_labels
    from .geometry import store_geometry

    ev = ledger_events(store.ledger, until_seq=until_seq)
    label_events = ev[ev["kind"].isin(["ingest", "proposal", "decision", "round"])]
    nuc = store.nuclei()
    geometry = store_geometry(store, until_seq=until_seq)
    if not geometry.empty:
        nuc, _images, added = _apply_geometry(store, nuc, store.images(), geometry)
        label_events = pd.concat([label_events, added], ignore_index=True).sort_values("seq", kind="stable")
    out = nuc.join(fold_labels(label_events).drop(columns=["source_label", "candidates"]), on="nucleus_id")
    if not geometry.empty:
        _added_status(out, geometry)
    return out


def _added_status(nuc: pd.DataFrame, geometry: Any) -> None:
    """An added nucleus's class was decided in review, not by a source: status "reviewed"
    (or "unresolved" without a class) until a later decision."""
    add = geometry.changes[geometry.changes["change"] == "added"]
    at_add = nuc["nucleus_id"].isin(add["nucleus_id"]) & nuc["seq"].isin(add["seq"])
    nuc.loc[at_add, "status"] = np.where(nuc.loc[at_add, "label"] > 0, "reviewed", "unresolved")


def current_instances(store: Any, image_id: str, *, geometry: Any = None) -> np.ndarray:
    """(H, W) int32: the instance map of an image after geometry review (``geometry``: a
    :class:`~cellcurate.curation.geometry.GeometryFold`, read from the ledger when None)."""
    from .geometry import store_geometry

    ins = store.read_instances(image_id)
    geometry = store_geometry(store) if geometry is None else geometry
    if geometry.empty or image_id not in geometry.images:
        return ins
    nuc = store.nuclei()
    return geometry.paint(image_id, ins, nuc[nuc["image_id"] == image_id])[0]


def unreviewed_flags(store: Any) -> pd.DataFrame:
    """Flagged nuclei still waiting for review: the rows of the review queue
    (:func:`cellcurate.curation.queue.build_queue`) that are not decided. The rule is the
    queue's: a flag of a run that was not superseded, with no effective (not undone) review
    decision on the nucleus after it."""
    from .queue import build_queue

    q = build_queue(store)
    return q[~q["decided"].astype(bool)].reset_index(drop=True)


def last_round_outputs(events: pd.DataFrame) -> pd.DataFrame:
    """Per nucleus: the probability vector of the latest non-superseded proposal/flag event that
    carries one (``probs``, ``probs_round``), and the latest non-superseded flag (``issue_score``,
    ``flag_reason``). Indexed by ``nucleus_id``; nuclei without such events are absent."""
    from ..datasets.ledger import superseded_runs

    ev = events[events["kind"].isin(["proposal", "flag"])]
    retired = superseded_runs(events)
    if retired:
        ev = ev[~ev["ref"].isin(list(retired))]
    cols = ["probs", "probs_round", "issue_score", "flag_reason"]
    if ev.empty:
        return pd.DataFrame(columns=cols, index=pd.Index([], name="nucleus_id", dtype="int64"))
    has_probs = ev["payload"].fillna("").astype(str).str.contains('"probs"', regex=False)
    withp = ev[has_probs].drop_duplicates("nucleus_id", keep="last")
    probs = pd.DataFrame({
        "probs": [[float(x) for x in json.loads(p).get("probs", [])] for p in withp["payload"]],
        "probs_round": withp["round"].to_numpy(),
    }, index=withp["nucleus_id"].astype("int64").to_numpy())
    fl = ev[ev["kind"] == "flag"].drop_duplicates("nucleus_id", keep="last")
    flags = pd.DataFrame({"issue_score": fl["score"].astype(float).to_numpy(),
                          "flag_reason": fl["action"].astype(str).to_numpy()},
                         index=fl["nucleus_id"].astype("int64").to_numpy())
    out = probs.join(flags, how="outer")
    out.index.name = "nucleus_id"
    return out[cols]


# -- the nuclei table -------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """Everything a release (or a QuPath export) needs from a store, at one ledger position."""

    images: pd.DataFrame
    nuclei: pd.DataFrame  # release nuclei columns (without split)
    ledger_seq: int
    ledger_chain: str
    unreviewed: pd.DataFrame
    #: the geometry fold at ``ledger_seq`` (None when the ledger has no geometry event)
    geometry: Any = None
    #: the ingested nuclei of the images geometry review changed (what :meth:`paint` starts from)
    ingest_nuclei: pd.DataFrame | None = None

    @property
    def touched(self) -> set[str]:
        """Image ids whose instance map geometry review changed."""
        return set() if self.geometry is None else set(self.geometry.images)

    def paint(self, image_id: str, instances: np.ndarray) -> np.ndarray:
        """The current instance map of an image (the stored one, with geometry decisions applied)."""
        if self.geometry is None or image_id not in self.touched:
            return instances
        assert self.ingest_nuclei is not None
        nuc = self.ingest_nuclei[self.ingest_nuclei["image_id"] == image_id]
        return self.geometry.paint(image_id, instances, nuc)[0]


def snapshot(store: Any) -> Snapshot:
    """Fold the ledger at its current head and build the release nuclei table (see
    docs/RELEASE_FORMAT.md for the columns)."""
    from ..datasets.ledger import fold_labels

    from .geometry import store_geometry

    seq, chain = store.ledger.head()
    events = ledger_events(store.ledger, until_seq=seq)
    geometry = store_geometry(store, until_seq=seq)
    label_events = events[events["kind"].isin(["ingest", "proposal", "decision", "round"])]
    nuc = store.nuclei().copy()
    images = store.images().copy()
    ingest_nuclei = None
    if not geometry.empty:
        ingest_nuclei = nuc[nuc["image_id"].isin(geometry.images)]
        nuc, images, added = _apply_geometry(store, nuc, images, geometry)
        label_events = pd.concat([label_events, added], ignore_index=True).sort_values("seq", kind="stable")
    labels = fold_labels(label_events)
    unreviewed = unreviewed_flags(store)
    outputs = last_round_outputs(events)
    nuc = nuc.join(labels.drop(columns=["source_label", "candidates"]), on="nucleus_id")
    if not geometry.empty:
        _added_status(nuc, geometry)
    nuc = nuc.join(outputs, on="nucleus_id")
    tax = store.taxonomy
    kind = nuc["kind"].astype(str).to_numpy()
    label = nuc["label"].fillna(0).astype("int64").to_numpy()
    status = nuc["status"].fillna("unresolved").astype(str).to_numpy()
    is_nucleus = kind == "nucleus"
    valid = is_nucleus & (label >= 1) & np.isin(label, list(tax.ids)) & ~np.isin(status, ["conflict"])
    class_value = np.where(valid, label, tax.ignore).astype(np.uint8)
    decided = np.array([_STATUS_TO_DECIDED.get(s, "unresolved") for s in status], dtype=object)
    decided[~is_nucleus] = "ignore_region"
    reason = np.full(len(nuc), "", dtype=object)
    reason[~valid & is_nucleus & (label == -1)] = "rejected"
    reason[~valid & is_nucleus & (label != -1)] = "unresolved"
    reason[~valid & is_nucleus & (status == "conflict")] = "conflict"
    reason[~is_nucleus] = "ambiguous"
    names = {c: tax.class_name(c) for c in tax.ids}
    out = pd.DataFrame({
        "nucleus_id": nuc["nucleus_id"].astype("int64").to_numpy(),
        "image_id": nuc["image_id"].astype(str).to_numpy(),
        "kind": kind,
        "instance_id": nuc["instance_id"].astype("int32").to_numpy(),
        "bbox_y0": nuc["bbox_y0"].to_numpy(), "bbox_x0": nuc["bbox_x0"].to_numpy(),
        "bbox_y1": nuc["bbox_y1"].to_numpy(), "bbox_x1": nuc["bbox_x1"].to_numpy(),
        "centroid_y": nuc["centroid_y"].to_numpy(), "centroid_x": nuc["centroid_x"].to_numpy(),
        "area": nuc["area"].to_numpy(),
        "label": np.where(is_nucleus, label, 0).astype(np.int16),
        "class_value": class_value,
        "class_name": [names.get(int(v), "ignore") for v in class_value],
        "ignore_reason": reason,
        "source": nuc["source"].astype(str).to_numpy(),
        "source_label": nuc["source_label"].astype(str).to_numpy(),
        "candidates": nuc["candidates"].astype(str).to_numpy(),
        "decided": decided,
        "decided_round": nuc["round"].astype("Int64").to_numpy(),
        "decided_by": nuc["decided_by"].astype("string").to_numpy(),
        "decided_seq": nuc["seq"].astype("Int64").to_numpy(),
        "probs": [p if isinstance(p, list) else None for p in nuc["probs"]],
        "probs_round": nuc["probs_round"].astype("Int64").to_numpy(),
        "issue_score": nuc["issue_score"].astype(float).to_numpy(),
        "flag_reason": nuc["flag_reason"].astype("string").to_numpy(),
        "origin_file": nuc["origin_file"].astype(str).to_numpy(),
        "origin_index": nuc["origin_index"].to_numpy(),
        "origin_channel": nuc["origin_channel"].to_numpy(),
        "origin_instance": nuc["origin_instance"].to_numpy(),
        "origin_region": nuc["origin_region"].astype(str).to_numpy(),
    })
    out["decided_round"] = out["decided_round"].astype("Int64")
    out["decided_seq"] = out["decided_seq"].astype("Int64")
    out["probs_round"] = out["probs_round"].astype("Int64")
    return Snapshot(images, out, seq, chain, unreviewed, None if geometry.empty else geometry, ingest_nuclei)


def _apply_geometry(store: Any, nuclei: pd.DataFrame, images: pd.DataFrame, geometry: Any
                    ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The store's nuclei and images tables after geometry review, and the ingest-like label
    events of the added nuclei (their class as the review gave it, at the seq of their add).

    Deleted nuclei (and nuclei painted over entirely) leave the table, replaced ones get the
    bbox, centroid and area of their new outline, added ones come in with ``origin_file``
    "review" and ``origin_region`` the flag id (docs/RELEASE_FORMAT.md)."""
    from ..datasets.store import NUCLEUS_COLUMNS
    from .geometry import ORIGIN_REVIEW

    source_of = dict(zip(images["image_id"].astype(str), images["source"].astype(str)))
    flag_of = dict(zip(geometry.changes["nucleus_id"].astype("int64"), geometry.changes["flag_id"]))
    keep = ~nuclei["image_id"].isin(geometry.images)
    parts = [nuclei[keep]]
    added_rows: list[dict[str, Any]] = []
    n_nuclei: dict[str, int] = {}
    for image_id in geometry.images:
        if image_id not in source_of:
            continue  # the image left the store (re-ingested without it)
        before = nuclei[nuclei["image_id"] == image_id]
        _ins, now = geometry.paint(image_id, store.read_instances(image_id), before)
        stats = now.set_index("nucleus_id")
        cols = ["instance_id", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "centroid_y", "centroid_x", "area"]
        kept = before[before["nucleus_id"].isin(stats.index)].copy()
        for c in cols:
            kept[c] = stats.loc[kept["nucleus_id"], c].to_numpy()
        new = now[now["origin"] == ORIGIN_REVIEW]
        rows = pd.DataFrame({
            "nucleus_id": new["nucleus_id"].to_numpy(np.int64), "image_id": image_id,
            "source": source_of[image_id], "kind": "nucleus", **{c: new[c].to_numpy() for c in cols},
            "source_label": "", "unified_label": new["label"].to_numpy(), "candidates": "",
            "origin_file": ORIGIN_REVIEW, "origin_index": -1, "origin_channel": -1, "origin_instance": -1,
            "origin_region": [str(flag_of.get(int(n)) or "") for n in new["nucleus_id"]], "origin_annotation": "",
        }, columns=list(NUCLEUS_COLUMNS))
        parts += [kept, rows.astype(NUCLEUS_COLUMNS)]
        n_nuclei[image_id] = int((kept["kind"] == "nucleus").sum()) + len(rows)
        added_rows += [{"seq": int(r.seq), "kind": "ingest", "nucleus_id": int(r.nucleus_id), "actor": str(r.actor),
                        "action": "ingest", "label": int(r.label), "round": pd.NA, "ref": pd.NA,
                        "payload": '{"source_label":"","candidates":[],"kind":"nucleus"}'}
                       for r in new.itertuples(index=False)]
    out = pd.concat(parts, ignore_index=True).astype(NUCLEUS_COLUMNS)
    images = images.copy()
    touched = images["image_id"].isin(list(n_nuclei))
    images.loc[touched, "n_nuclei"] = images.loc[touched, "image_id"].map(n_nuclei).astype("int32")
    added = pd.DataFrame(added_rows, columns=["seq", "kind", "nucleus_id", "actor", "action", "label", "round",
                                              "ref", "payload"])
    for c in ("nucleus_id", "label", "round", "ref"):
        added[c] = added[c].astype("Int64")
    return out, images, added


# -- export -----------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: Path
    manifest: dict[str, Any]
    n_images: int = 0
    n_nuclei: int = 0
    warnings: list[str] = field(default_factory=list)


def check_version_name(version: str) -> str:
    if not _VERSION_RE.match(str(version)):
        raise ConfigError(
            f"release version {version!r} must be 1-64 characters of letters, digits, '.', '_', '+', '-', "
            "starting with a letter or digit"
        )
    return str(version)


def default_release_root(store_path: str | Path) -> Path:
    """Where ``curate export`` writes when ``--out`` is not given: ``<store>/releases``."""
    return Path(store_path) / "releases"


def export_release(
    store: Any,
    version: str,
    *,
    out: str | Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    pannuke_val_fraction: float = 0.0,
    allow_unreviewed: bool = False,
    ome_zarr: OmeVersion | None = None,
    progress: bool = True,
) -> ExportResult:
    """Write release ``version`` of ``store`` to ``<out>/<version>/`` (default out:
    ``<store>/releases``).

    Raises
    ------
    StateError
        The version exists, or flagged nuclei are unreviewed and ``allow_unreviewed`` is False.
    """
    from .. import __version__
    from ..datasets.sources import release_attribution, release_licence
    from .splits import SPLIT_ALIASES, SPLIT_NAMES, assign_splits

    version = check_version_name(version)
    if ome_zarr is not None and ome_zarr not in OME_VERSIONS:
        raise ConfigError(f"ome_zarr must be one of {OME_VERSIONS}, got {ome_zarr!r}")
    root = Path(out) if out is not None else default_release_root(store.path)
    final = root / version
    if final.exists() or final.is_symlink():
        raise StateError(f"{final}: release {version!r} already exists; releases are immutable, pick a new version")

    snap = snapshot(store)
    n_unreviewed = len(snap.unreviewed)
    if n_unreviewed and not allow_unreviewed:
        raise StateError(
            f"{store.path}: {n_unreviewed} flagged nuclei are not reviewed yet; review them "
            "(curate review) or export with --allow-unreviewed (recorded in the manifest)"
        )

    images = snap.images
    splits = assign_splits(images, seed=seed, val_fraction=val_fraction, pannuke_val_fraction=pannuke_val_fraction)
    images = images.merge(splits[["image_id", "split"]], on="image_id", how="left")
    images = images.rename(columns={"split_x": "source_split", "split_y": "split"})
    order = {s: i for i, s in enumerate(SPLIT_NAMES)}
    images["_o"] = images["split"].map(order).fillna(len(order))
    images = images.sort_values(["_o", "image_id"]).drop(columns="_o").reset_index(drop=True)
    nuclei = snap.nuclei.merge(images[["image_id", "split"]], on="image_id", how="left")
    nuclei.insert(2, "split", nuclei.pop("split"))
    nuclei["_o"] = nuclei["split"].map(order).fillna(len(order))
    nuclei = nuclei.sort_values(["_o", "image_id", "instance_id"]).drop(columns="_o").reset_index(drop=True)

    from ..datasets.leftovers import locked_tempdir, release_tempdir

    root.mkdir(parents=True, exist_ok=True)
    cleaned, _ = clean_export_leftovers(root)  # folders of killed exports (a live export's is locked)
    tmp, lock_fd = locked_tempdir(root, f".tmp-{version}-")
    try:
        images_out = _write_arrays(store, tmp, images, nuclei, progress=progress,
                                   paint=snap.paint if snap.touched else None)
        if ome_zarr is not None:
            from .omezarr import write_release_ome_zarr

            write_release_ome_zarr(tmp, images_out, store.taxonomy, version=ome_zarr, progress=progress)
        counts, ignore_counts, n_images = _counts(images_out, nuclei, store.taxonomy)
        _write_table(nuclei, tmp / "nuclei.parquet", "nuclei")
        _write_table(images_out, tmp / "images.parquet", "images")
        for name in ("nuclei", "images"):
            _write_split_tables(tmp, name, images_out["split"])
        (tmp / "taxonomy.json").write_text(store.taxonomy.to_json(), encoding="utf-8")
        manifest: dict[str, Any] = {
            "format": RELEASE_FORMAT,
            "format_version": RELEASE_FORMAT_VERSION,
            "version": version,
            "created": _now(),
            "cellcurate_version": __version__,
            "store": {
                "path": str(Path(store.path).resolve()),
                "content_hash": store_content_hash(store),
                "taxonomy_hash": store.taxonomy.hash,
                "ledger_seq": snap.ledger_seq,
                "ledger_chain": snap.ledger_chain,
            },
            "taxonomy": {"hash": store.taxonomy.hash, "classes": {str(c.id): c.name for c in store.taxonomy.classes},
                         "background": store.taxonomy.background, "ignore": store.taxonomy.ignore},
            "splits": {
                "rule": "PanNuke official folds kept; MoNuSAC official train/test kept; val drawn from "
                        "MoNuSAC train patients ordered by sha256(f'{seed}:{patient_id}')",
                "seed": int(seed), "val_fraction": float(val_fraction),
                "pannuke_val_fraction": float(pannuke_val_fraction),
                "aliases": {k: list(v) for k, v in SPLIT_ALIASES.items()},
                "n_images": n_images,
            },
            "review": {"allow_unreviewed": bool(allow_unreviewed), "unreviewed_flags": int(n_unreviewed)},
            "counts": counts,
            "ignore_counts": ignore_counts,
            **({"geometry": {**snap.geometry.counts(), "images": len(snap.touched)}}
               if snap.geometry is not None else {}),
            "licence": release_licence(sorted(set(images["source"].astype(str)))),
            "attribution": release_attribution(sorted(set(images["source"].astype(str)))),
        }
        from .card import write_card

        write_card(tmp, manifest, images_out, nuclei, store.taxonomy)
        write_hf_readme(tmp, manifest, sorted(set(images_out["split"]), key=_split_order))
        unsafe = containment_problems(tmp)
        if unsafe:  # a release never holds a link: verify would refuse it
            raise StateError(f"{tmp}: {unsafe[0]}")
        manifest["files"] = _hash_tree(tmp)
        text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
        (tmp / "manifest.json").write_text(text, encoding="utf-8")
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        (tmp / "MANIFEST.sha256").write_text(f"{digest}  manifest.json\n", encoding="ascii")
        _fsync_and_freeze(tmp)
        if final.exists():
            raise StateError(f"{final}: release {version!r} already exists; releases are immutable")
        try:
            os.rename(tmp, final)
        except OSError as exc:
            raise StateError(f"{final}: cannot put the release in place ({exc.strerror or exc})") from None
        fsync_dir(root)
    except BaseException:
        remove_tree(tmp)
        raise
    finally:
        release_tempdir(lock_fd)
    return ExportResult(final, manifest, n_images=len(images_out), n_nuclei=int((nuclei["kind"] == "nucleus").sum()),
                        warnings=cleaned)


def _write_arrays(store: Any, tmp: Path, images: pd.DataFrame, nuclei: pd.DataFrame, *,
                  progress: bool, paint: Any = None) -> pd.DataFrame:
    """Write image / instances / classes arrays; return the images table with zarr locations.

    ``paint(image_id, instances)`` gives an image's current instance map (geometry review);
    None: the stored maps as they are."""
    import zarr
    from tqdm import tqdm
    from zarr.codecs import BloscCodec

    group = zarr.open_group(str(tmp / "arrays.zarr"), mode="w", zarr_format=3)
    img_codec = [BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")]
    lab_codec = [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")]
    positions = nuclei.groupby("image_id", sort=False).indices
    inst_ids = nuclei["instance_id"].to_numpy()
    cvals = nuclei["class_value"].to_numpy()

    def class_map(image_id: str, instances: np.ndarray) -> np.ndarray:
        pos = positions.get(image_id)
        top = int(instances.max(initial=0))
        lut = np.full(top + 1, store.taxonomy.ignore, dtype=np.uint8)  # pixels of an unknown id: ignore
        lut[0] = 0
        if pos is not None and len(pos):
            ids = inst_ids[pos]
            keep = ids <= top
            lut[ids[keep]] = cvals[pos][keep]
        return lut[instances]

    zgroup = np.empty(len(images), dtype=object)
    zindex = np.full(len(images), -1, dtype=np.int32)
    stacked = images["zarr_index"].to_numpy() >= 0
    bar = tqdm(total=len(images), desc="export arrays", unit="img", disable=None if progress else True)
    # stacks: one per tile shape, one chunk per tile, shards of STACK_TILES_PER_SHARD tiles
    shapes = images.loc[stacked, ["height", "width"]].drop_duplicates().to_numpy()
    for h, w in shapes:
        h, w = int(h), int(w)
        rows = np.flatnonzero(stacked & (images["height"].to_numpy() == h) & (images["width"].to_numpy() == w))
        name = f"stack/{h}x{w}"
        n = len(rows)
        shard = min(STACK_TILES_PER_SHARD, n)
        a_img = group.create_array(f"{name}/image", shape=(n, h, w, 3), dtype="uint8", chunks=(1, h, w, 3),
                                   shards=(shard, h, w, 3), compressors=img_codec, fill_value=0)
        a_ins = group.create_array(f"{name}/instances", shape=(n, h, w), dtype="int32", chunks=(1, h, w),
                                   shards=(shard, h, w), compressors=lab_codec, fill_value=0)
        a_cls = group.create_array(f"{name}/classes", shape=(n, h, w), dtype="uint8", chunks=(1, h, w),
                                   shards=(shard, h, w), compressors=lab_codec, fill_value=0)
        for s in range(0, n, shard):
            batch = rows[s : s + shard]
            imgs, inss = _read_batch(store, images.iloc[batch])
            if paint is not None:
                for k, r in enumerate(batch):
                    inss[k] = paint(str(images.at[int(r), "image_id"]), inss[k])
            clss = np.stack([class_map(str(images.at[int(r), "image_id"]), inss[k]) for k, r in enumerate(batch)])
            a_img[s : s + len(batch)] = imgs
            a_ins[s : s + len(batch)] = inss
            a_cls[s : s + len(batch)] = clss
            zgroup[batch] = name
            zindex[batch] = np.arange(s, s + len(batch), dtype=np.int32)
            bar.update(len(batch))
    # native: one array triple per image, chunks of NATIVE_CHUNK pixels
    for k, r in enumerate(np.flatnonzero(~stacked)):
        image_id = str(images.at[int(r), "image_id"])
        img, ins = store.read(image_id)
        if paint is not None:
            ins = paint(image_id, ins)
        h, w = ins.shape
        ch = (min(NATIVE_CHUNK, h), min(NATIVE_CHUNK, w))
        name = f"native/{k}"
        group.create_array(f"{name}/image", data=img, chunks=(*ch, 3), compressors=img_codec, fill_value=0)
        group.create_array(f"{name}/instances", data=ins, chunks=ch, compressors=lab_codec, fill_value=0)
        group.create_array(f"{name}/classes", data=class_map(image_id, ins), chunks=ch, compressors=lab_codec,
                           fill_value=0)
        zgroup[r] = name
        bar.update(1)
    bar.close()
    ignore = store.taxonomy.ignore
    n_ignore = nuclei.groupby("image_id")["class_value"].apply(lambda v: int((v == ignore).sum()))
    out = pd.DataFrame({
        "image_id": images["image_id"].astype(str),
        "split": images["split"].astype(str),
        "source_split": images["source_split"].astype(str),
        "source": images["source"].astype(str),
        "patient_id": images["patient_id"].astype("string"),
        "tissue": images["tissue"].astype("string"),
        "mpp": images["mpp"].astype("float64"),
        "height": images["height"].astype("int32"),
        "width": images["width"].astype("int32"),
        "n_nuclei": images["n_nuclei"].astype("int32"),
        "n_ignore": images["image_id"].map(n_ignore).fillna(0).astype("int32"),
        "origin_file": images["origin_file"].astype("string"),
        "origin_index": images["origin_index"].astype("int32"),
        "annotation_file": images["annotation_file"].astype("string"),
        "zarr_group": zgroup.astype(str),
        "zarr_index": zindex,
    })
    return out.reset_index(drop=True)


def _write_table(frame: pd.DataFrame, path: Path, table: str) -> None:
    """One release table as parquet with its declared Arrow schema (one string type everywhere)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = release_schema(table)
    cols = {f.name: pa.array(frame[f.name].tolist() if pa.types.is_list(f.type) else frame[f.name],
                             type=f.type, from_pandas=True) for f in schema}
    pq.write_table(pa.table(cols, schema=schema), path)


def _split_order(split: str) -> tuple[int, str]:
    from .splits import SPLIT_NAMES

    return (SPLIT_NAMES.index(split) if split in SPLIT_NAMES else len(SPLIT_NAMES), split)


def _write_split_tables(tmp: Path, table: str, splits: pd.Series) -> None:
    """``hf/<table>/<split>.parquet``: the rows of ``<table>.parquet`` of each split, for the
    Hugging Face configs of README.md (``datasets`` cannot filter one file by a column)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(tmp / f"{table}.parquet")
    (tmp / "hf" / table).mkdir(parents=True, exist_ok=True)
    for split in sorted(set(splits), key=_split_order):
        pq.write_table(t.filter(pc.equal(t["split"], split)), tmp / "hf" / table / f"{split}.parquet")


#: The licence of a release as a Hugging Face licence id.
HF_LICENSE = "cc-by-nc-sa-4.0"


def write_hf_readme(folder: str | Path, manifest: dict[str, Any], splits: list[str]) -> Path:
    """``README.md`` with Hugging Face dataset-card YAML: the licence and one config per table
    (``nuclei``, the default, and ``images``) with one data file per split, so that
    ``datasets.load_dataset(<release folder>)`` reads the nuclei table (without it the folder's
    many ``zarr.json`` files make ``datasets`` pick its JSON builder, which fails)."""
    folder = Path(folder)
    licence = str(manifest.get("licence", LICENCE))
    hf_licence = HF_LICENSE if licence == LICENCE else "other"  # the Hub's id, or "other" with the text below
    lines = ["---", f"license: {hf_licence}", "pretty_name: cellcurate release " + json.dumps(str(manifest["version"])),
             "tags:", "- histopathology", "- nuclei", "- cell-classification", "configs:"]
    for table, default in (("nuclei", True), ("images", False)):
        lines.append(f"- config_name: {table}")
        if default:
            lines.append("  default: true")
        lines.append("  data_files:")
        for split in splits:
            lines += [f"  - split: {split}", f"    path: hf/{table}/{split}.parquet"]
    lines += ["---", "", f"# cellcurate release {manifest['version']}", "",
              ("One row per nucleus (`nuclei`, the default config) or per image (`images`), one split per "
               "release split. The pixels are in `arrays.zarr` (zarr v3); `DATASET_CARD.md` describes the "
               "content and `manifest.json` the provenance and the sha256 of every file. Format: "
               "docs/RELEASE_FORMAT.md of cellcurate."), "",
              "```python", "import datasets",
              "nuclei = datasets.load_dataset('path/to/release')  # DatasetDict: one Dataset per split",
              "images = datasets.load_dataset('path/to/release', 'images')", "```", "",
              f"Licence: {licence}.", ""]
    path = folder / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _read_batch(store: Any, rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Images and instance maps of stacked store tiles; contiguous runs read in one slice."""
    imgs: list[np.ndarray] = []
    inss: list[np.ndarray] = []
    units = rows["unit"].astype(str).to_numpy()
    idx = rows["zarr_index"].to_numpy()
    paths = rows["zarr_path"].astype(str).to_numpy()
    i = 0
    while i < len(rows):
        j = i + 1
        while j < len(rows) and units[j] == units[i] and paths[j] == paths[i] and idx[j] == idx[j - 1] + 1:
            j += 1
        a_img = store._array(units[i], paths[i])
        a_ins = store._array(units[i], "instances" if paths[i] == "images" else paths[i].replace("img/", "ins/", 1))
        imgs.append(np.asarray(a_img[int(idx[i]) : int(idx[j - 1]) + 1]))
        inss.append(np.asarray(a_ins[int(idx[i]) : int(idx[j - 1]) + 1]))
        i = j
    return np.concatenate(imgs), np.concatenate(inss)


def _counts(images: pd.DataFrame, nuclei: pd.DataFrame, taxonomy: Any) -> tuple[dict, dict, dict]:
    from .splits import SPLIT_NAMES

    present = [s for s in SPLIT_NAMES if s in set(images["split"])]
    present += sorted(set(images["split"]) - set(present))
    counts: dict[str, dict[str, int]] = {}
    ignore: dict[str, dict[str, int]] = {}
    n_images: dict[str, int] = {}
    for s in present:
        sub = nuclei[nuclei["split"] == s]
        vc = sub.loc[sub["class_value"] != taxonomy.ignore, "class_value"].value_counts()
        counts[s] = {c.name: int(vc.get(c.id, 0)) for c in taxonomy.classes}
        rc = sub["ignore_reason"].value_counts()
        ignore[s] = {r: int(rc.get(r, 0)) for r in IGNORE_REASONS}
        n_images[s] = int((images["split"] == s).sum())
    counts["total"] = {c.name: sum(counts[s][c.name] for s in present) for c in taxonomy.classes}
    ignore["total"] = {r: sum(ignore[s][r] for s in present) for r in IGNORE_REASONS}
    return counts, ignore, n_images


def _hash_tree(root: Path) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    for dirpath, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel in _SKIP_HASH:
                continue
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return files


def _fsync_and_freeze(root: Path) -> None:
    """Make every file of the finished release read-only, then fsync files and folders."""
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            os.chmod(os.path.join(dirpath, name), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    fsync_tree(root)


# -- verify -----------------------------------------------------------------------------------------
def read_manifest(path: str | Path) -> dict[str, Any]:
    """The release's parsed ``manifest.json`` (format and version checked)."""
    return read_release_manifest(path)


def verify_release(path: str | Path) -> list[str]:
    """Re-hash every file of a release; return the problems (empty when intact).

    Each problem names the file: ``"nuclei.parquet: sha256 differs from the manifest (changed)"``,
    ``"arrays.zarr/...: missing"``, ``"extra.txt: not listed in the manifest"``,
    ``"manifest.json: sha256 differs from MANIFEST.sha256 (changed)"``.
    """
    path = Path(path)
    problems: list[str] = []
    mpath = path / "manifest.json"
    if not mpath.is_file():
        return [f"{mpath}: missing (not a release)"]
    text = mpath.read_bytes()
    side = path / "MANIFEST.sha256"
    if not side.is_file():
        problems.append("MANIFEST.sha256: missing")
    else:
        want = side.read_text("ascii", errors="replace").split()[:1]
        if not want or want[0] != hashlib.sha256(text).hexdigest():
            problems.append("manifest.json: sha256 differs from MANIFEST.sha256 (changed)")
    try:
        manifest = json.loads(text.decode("utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        return [*problems, f"manifest.json: unreadable ({exc})"]
    problems.extend(containment_problems(path))  # symlinks, special files, hard links to outside
    for rel, meta in files.items():
        why = unsafe_relative_path(rel)
        if why is None and not resolves_inside(path, rel):
            why = "resolves outside the release"
        if why is not None:
            problems.append(f"manifest.json: files entry {rel!r} {why}")
            continue
        if (not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str)
                or not re.fullmatch(r"[0-9a-f]{64}", meta["sha256"])
                or not isinstance(meta.get("bytes", 0), int) or isinstance(meta.get("bytes", 0), bool)):
            problems.append(f"manifest.json: files entry {rel!r} is malformed "
                            f"(expected {{\"sha256\": 64 hex digits, \"bytes\": an integer}}, got {meta!r:.80})")
            continue
        p = path / rel
        if p.is_symlink():
            continue  # named above; never read through a link
        if not p.is_file():
            problems.append(f"{rel}: missing")
            continue
        try:
            digest = sha256_file(p)
        except OSError as exc:
            problems.append(f"{rel}: unreadable ({exc.strerror or exc})")
            continue
        if digest != meta["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest (changed)")
    listed = set(files) | set(_SKIP_HASH)
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(path).as_posix()
            if rel not in listed:
                problems.append(f"{rel}: not listed in the manifest (added)")
    return problems


def clean_export_leftovers(root: str | Path) -> tuple[list[str], list[str]]:
    """Remove the ``.tmp-*`` folders that killed exports left in the releases folder ``root``
    (an export still running holds a lock on its folder and is left alone). Returns
    (notes naming each removed folder, problems naming each that could not be removed)."""
    from ..datasets.leftovers import remove_stale_tempdirs

    removed, problems = remove_stale_tempdirs(Path(root), ".tmp-")
    return [f"{p}: removed the temporary folder of an interrupted export" for p in removed], problems


# -- diff -------------------------------------------------------------------------------------------
@dataclass
class ReleaseDiff:
    """Label changes between two releases (joined on ``nucleus_id``).

    ``changes``: one row per nucleus whose class value changed (columns nucleus_id, image_id,
    from_value, to_value, from_class, to_class, from_decided, to_decided);
    ``pairs``: counts per (from_class, to_class); ``added`` / ``removed``: nucleus ids only in
    B / only in A; ``reviewed_added``: the ids of ``added`` that geometry review added (origin
    "review"); ``reshaped``: ids in both whose outline changed (bbox, area or centroid differ).
    """

    version_a: str
    version_b: str
    changes: pd.DataFrame
    pairs: pd.DataFrame
    added: np.ndarray
    removed: np.ndarray
    n_common: int
    reshaped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    reviewed_added: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def geometry_counts(self) -> dict[str, int]:
        """{"added": n, "deleted": n, "reshaped": n} (added and deleted: nuclei only in B / only in A)."""
        return {"added": int(self.added.size), "deleted": int(self.removed.size), "reshaped": int(self.reshaped.size)}


_SHAPE_COLUMNS = ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "area", "centroid_y", "centroid_x")


def _read_release_nuclei(path: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    manifest = read_manifest(path)
    npath = path / "nuclei.parquet"
    try:
        nuc = pd.read_parquet(npath, columns=["nucleus_id", "image_id", "class_value", "class_name", "decided",
                                              *_SHAPE_COLUMNS, "origin_file"])
    except (OSError, ValueError) as exc:
        raise InputFormatError(npath, f"cannot read the nuclei table ({exc})") from None
    return manifest, nuc


def diff_releases(a: str | Path, b: str | Path) -> ReleaseDiff:
    """Label changes from release ``a`` to release ``b``."""
    ma, na = _read_release_nuclei(Path(a))
    mb, nb = _read_release_nuclei(Path(b))
    j = na.merge(nb, on="nucleus_id", how="inner", suffixes=("_a", "_b"))
    changed = j[j["class_value_a"] != j["class_value_b"]]
    changes = pd.DataFrame({
        "nucleus_id": changed["nucleus_id"].to_numpy(),
        "image_id": changed["image_id_b"].to_numpy(),
        "from_value": changed["class_value_a"].to_numpy(),
        "to_value": changed["class_value_b"].to_numpy(),
        "from_class": changed["class_name_a"].to_numpy(),
        "to_class": changed["class_name_b"].to_numpy(),
        "from_decided": changed["decided_a"].to_numpy(),
        "to_decided": changed["decided_b"].to_numpy(),
    }).sort_values(["from_class", "to_class", "nucleus_id"]).reset_index(drop=True)
    pairs = (changes.groupby(["from_class", "to_class"]).size().rename("count").reset_index()
             .sort_values(["count", "from_class", "to_class"], ascending=[False, True, True]).reset_index(drop=True))
    ids_a, ids_b = na["nucleus_id"].to_numpy(), nb["nucleus_id"].to_numpy()
    moved = np.zeros(len(j), bool)
    for c in _SHAPE_COLUMNS:
        moved |= (j[f"{c}_a"] != j[f"{c}_b"]).to_numpy()
    added = np.setdiff1d(ids_b, ids_a)
    reviewed = nb.loc[nb["nucleus_id"].isin(added) & (nb["origin_file"] == "review"), "nucleus_id"].to_numpy()
    return ReleaseDiff(str(ma.get("version")), str(mb.get("version")), changes, pairs, added,
                       np.setdiff1d(ids_a, ids_b), len(j), np.sort(j.loc[moved, "nucleus_id"].to_numpy()),
                       np.sort(reviewed))


def iter_release_files(path: str | Path) -> Iterable[str]:
    """Relative paths listed in a release's manifest."""
    return list(read_manifest(path).get("files", {}))

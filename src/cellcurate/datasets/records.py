"""What a source reader yields, and what it reports.

Readers (``pannuke``, ``monusac``, later others) turn a source's release files into a stream
of :class:`SourceImage`; the store writer (``store.UnitWriter``) computes the geometry of every
instance (bbox, centroid, area) and gives nuclei their stable ids. Readers never touch the store.

Dimensions: H×W pixels, n instances in one image.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np
import pandas as pd

NucleusKind = Literal["nucleus", "ignore"]
NUCLEUS_KINDS: tuple[str, ...] = ("nucleus", "ignore")

#: Columns of :attr:`SourceImage.nuclei`, with their dtypes.
SOURCE_NUCLEI_COLUMNS: dict[str, str] = {
    "instance_id": "int32",  # id in SourceImage.instances, 1..n, contiguous
    "kind": "object",  # "nucleus" or "ignore" (e.g. MoNuSAC Ambiguous)
    "source_label": "object",  # class name as the source wrote it, e.g. "Inflammatory"
    "origin_channel": "int16",  # PanNuke mask channel 0-4; -1 when not applicable
    "origin_instance": "int64",  # raw instance id in the source mask; -1 when not applicable
    "origin_region": "object",  # MoNuSAC XML Region Id (as text); "" when not applicable
    "origin_annotation": "object",  # MoNuSAC XML Annotation Id (Region Ids restart per block); "" otherwise
}
#: Columns a reader may leave out; the store fills them with these defaults.
OPTIONAL_SOURCE_COLUMNS: dict[str, object] = {"origin_annotation": ""}


@dataclass
class SourceImage:
    """One image of a source, converted to the store's conventions.

    Attributes
    ----------
    key
        Unique within the ingest unit and stable across re-ingests, e.g. ``"fold1/000012"``
        or ``"TCGA-KK-A6E0-01Z-00-DX1-5"``. Becomes part of the image id.
    split
        The source's own split: ``"fold1"``/``"fold2"``/``"fold3"`` or ``"train"``/``"test"``.
    image
        (H, W, 3) uint8 RGB.
    instances
        (H, W) int32, 0 = background, 1..n = one id per row of ``nuclei``.
    nuclei
        One row per instance, columns :data:`SOURCE_NUCLEI_COLUMNS`.
    origin_file
        Path of the file the pixels came from, relative to the source root given by the user.
    origin_index
        Index of the image inside ``origin_file`` (PanNuke); -1 when the file holds one image.
    mpp
        Microns per pixel.
    patient_id, tissue
        Where known, else ``None``.
    """

    key: str
    split: str
    image: np.ndarray
    instances: np.ndarray
    nuclei: pd.DataFrame
    origin_file: str
    origin_index: int = -1
    mpp: float = 0.25
    patient_id: str | None = None
    tissue: str | None = None
    annotation_file: str | None = None

    def validate(self) -> None:
        """Check shapes/dtypes and that ``nuclei`` lists exactly the ids in ``instances``."""
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(
                f"{self.key}: image must be (H, W, 3) uint8, got {self.image.shape} {self.image.dtype}"
            )
        if self.instances.shape != self.image.shape[:2] or self.instances.dtype != np.int32:
            raise ValueError(
                f"{self.key}: instances must be {self.image.shape[:2]} int32, "
                f"got {self.instances.shape} {self.instances.dtype}"
            )
        n = len(self.nuclei)
        ids = self.nuclei["instance_id"].to_numpy()
        if n and not np.array_equal(np.sort(ids), np.arange(1, n + 1)):
            raise ValueError(f"{self.key}: nuclei instance ids must be 1..{n}")
        if int(self.instances.max(initial=0)) > n:
            raise ValueError(f"{self.key}: instance map holds ids above {n}")


@dataclass(frozen=True)
class UnitPart:
    """A piece of a unit that a worker process converts on its own (``curate ingest --jobs N``).

    Attributes
    ----------
    read
        ``read(report)`` yields the part's :class:`SourceImage` records. It must pickle (a
        module-level function, or a :func:`functools.partial` of one over paths and small values,
        never over open arrays), because it is sent to a worker process.
    files
        The file(s) it reads, named in the one-line error when the part fails in a worker.
    convert
        Optional fast path of the reader: ``convert(report, source=, taxonomy=, cache=)`` returns the
        part's images already converted (:class:`~cellcurate.datasets.store.ConvertedImage`, in
        order): exactly what :func:`~cellcurate.datasets.store.convert_image` makes of the records
        ``read`` yields (same ids, columns, counters, warnings and errors), without a
        :class:`SourceImage` and its table per image (PanNuke converts a block of 64 tiles at
        once). Must pickle, like ``read``.
    """

    read: Callable[["IngestReport"], Iterable[SourceImage]]
    files: str
    convert: Callable[..., list[Any]] | None = None


@dataclass
class UnitPlan:
    """One ingest unit a reader found (``plan_units``), checked but not read yet.

    Attributes
    ----------
    unit
        Unit name, unique in a store, e.g. ``"consep-test"``; conventionally ``<source>-...``.
    n_images
        Images the unit will yield (for the progress bar and the "unchanged" summary).
    fingerprint
        Content fingerprint of the unit's files (re-ingest of the same files is a no-op); may be
        ``""`` when ``fingerprint_fn`` computes it later.
    origin
        Where the unit came from (a folder), recorded in the unit catalog.
    read
        ``read(report)`` streams the unit's :class:`SourceImage` records. Readers that give
        ``parts`` leave it out: it then reads the parts one after the other, in order.
    stacked
        ``(N, H, W)`` when every image has the same size (stacked arrays), else ``None``.
    settings
        Reader settings that shaped the unit (e.g. PanNuke's overlap rule), recorded in the unit's
        ``report.json``.
    parts
        The unit cut into independent pieces, in order (one image file, a run of 64 tiles), so
        that ``--jobs N`` converts them in worker processes; the records they yield, concatenated
        in order, are exactly what ``read`` yields. A reader without parts is converted in the
        main process.
    fingerprint_fn
        Computes the fingerprint when it is expensive (PanNuke hashes whole folds): ingest calls
        it first for a unit already in the store (to decide unchanged / changed), and alongside
        the conversion for a new one. Must pickle, like a part.
    fingerprint_from_blocks
        Where the parts compute the fingerprint on the side (PanNuke: each part appends its
        block digest to ``report.blocks`` while converting): combines those digests, in the
        parts' order, into the fingerprint, so a new unit's files are read once. Called in the
        writing process after the last part.
    legacy_fingerprint_fn
        ``legacy_fingerprint_fn(stored)``: the fingerprint of these files in the older format of
        a fingerprint ``stored`` in the store (PanNuke: v2 sha256), or None when ``stored`` is of
        the current format; lets a store written by an older version recognise unchanged files.
    """

    unit: str
    n_images: int
    fingerprint: str
    origin: str
    read: Callable[["IngestReport"], Iterator[SourceImage]] | None = None
    stacked: tuple[int, int, int] | None = None
    settings: dict[str, str] = field(default_factory=dict)
    parts: tuple[UnitPart, ...] = ()
    fingerprint_fn: Callable[[], str] | None = None
    fingerprint_from_blocks: Callable[[list[str]], str] | None = None
    legacy_fingerprint_fn: Callable[[str], str | None] | None = None

    def __post_init__(self) -> None:
        if self.read is None:
            if not self.parts and self.n_images:
                raise ValueError(f"unit {self.unit}: a plan needs read or parts")
            self.read = partial(read_parts, self.parts)
        if not self.fingerprint and self.fingerprint_fn is None:
            raise ValueError(f"unit {self.unit}: a plan needs fingerprint or fingerprint_fn")

    def resolve_fingerprint(self) -> str:
        """The fingerprint, computed (once) by ``fingerprint_fn`` where it was deferred."""
        if not self.fingerprint:
            assert self.fingerprint_fn is not None
            self.fingerprint = self.fingerprint_fn()
        return self.fingerprint

    def fingerprint_like(self, stored: str) -> str:
        """The fingerprint to compare with ``stored`` (the one in the store): in ``stored``'s
        older format where the reader has one (``legacy_fingerprint_fn``), else the current one
        (:meth:`resolve_fingerprint`)."""
        if self.legacy_fingerprint_fn is not None:
            legacy = self.legacy_fingerprint_fn(stored)
            if legacy is not None:
                return legacy
        return self.resolve_fingerprint()


def read_parts(parts: Iterable[UnitPart], report: "IngestReport") -> Iterator[SourceImage]:
    """The records of ``parts``, in order: a plan's ``read`` when the reader gave parts."""
    for part in parts:
        yield from part.read(report)


@dataclass
class IngestReport:
    """Counters and warnings a reader collects while converting; printed in the ingest summary.

    ``counts`` holds named counters (e.g. ``"overlap_pixels"``, ``"regions_skipped_degenerate"``,
    ``"area_mismatches"``); ``warnings`` holds one-line messages that name the file.
    """

    counts: Counter[str] = field(default_factory=Counter)
    warnings: list[str] = field(default_factory=list)
    max_warnings: int = 200
    #: conversion choices that shape the stored data (e.g. ``{"pannuke_overlap": "highest"}``);
    #: written to the unit's ``report.json``
    settings: dict[str, str] = field(default_factory=dict)
    #: content digests of the parts converted, in order (``UnitPlan.fingerprint_from_blocks``);
    #: not written to ``report.json``
    blocks: list[str] = field(default_factory=list)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += int(n)

    def warn(self, message: str) -> None:
        self.counts["warnings"] += 1
        if len(self.warnings) < self.max_warnings:
            self.warnings.append(message)

    def merge(self, other: "IngestReport") -> None:
        self.counts.update(other.counts)
        room = self.max_warnings - len(self.warnings)
        self.warnings.extend(other.warnings[: max(room, 0)])
        self.settings.update(other.settings)
        self.blocks.extend(other.blocks)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"counts": dict(sorted(self.counts.items())), "warnings": list(self.warnings)}
        if self.settings:
            out["settings"] = dict(sorted(self.settings.items()))
        return out


def files_fingerprint(paths: Iterable[Path]) -> str:
    """sha256 over the names and full contents of a unit's files (for units of small files)."""
    import hashlib

    from ..errors import InputNotFoundError

    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode("utf-8") + b"\0")
        try:
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        except FileNotFoundError:
            raise InputNotFoundError(p, "file disappeared during ingest") from None
    return h.hexdigest()

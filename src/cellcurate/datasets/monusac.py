"""Read the MoNuSAC 2020 release (Aperio ImageScope XML + .tif/.svs) into :class:`SourceImage`.

Dimensions: H×W pixels (level 0 of the image, native size, never resized or tiled), V vertices
of one region, n kept instances of one image.

Release layout (training ``MoNuSAC_images_and_annotations/``, testing
``MoNuSAC Testing Data and Annotations/``)::

    <release>/<TCGA barcode>/<stem>.xml     # ImageScope XML, one per image
    <release>/<TCGA barcode>/<stem>.tif     # RGB or RGBA; where missing, <stem>.svs (level 0)

Stems come as ``<barcode>_1``, ``<barcode>-1`` or ``<barcode>_001``; an image is matched to its
XML by identical stem only.

XML conventions (checked on real files):

- the class of an ``<Annotation>`` block is ``Attributes/Attribute@Name`` (``Annotation@Name`` is
  free text such as ``"Layer 4"``); known classes :data:`MONUSAC_CLASSES`, matched
  case-insensitively; ``Ambiguous`` regions become ``kind="ignore"`` instances;
- the pixel size is the root's ``MicronsPerPixel``, per file;
- vertices ``X, Y`` are level-0 pixel coordinates (x = column, y = row);
- every ``<Region>`` carries ``Area`` (shoelace area of its vertices) and ``Length`` (closed
  perimeter); both are verified with tolerance ``max(0.051, 1 %)`` (the attributes are written
  with one decimal) and mismatches are reported, never fatal.

Rasterisation rules (deterministic):

- consecutive duplicate vertices and a closing vertex equal to the first are dropped (counted);
  a region with fewer than 3 distinct vertices is skipped (counted, warned);
- a pixel belongs to a region when its centre lies inside or on the boundary of the closed
  polygon (``skimage.draw.polygon``): the square with corners (10, 10) and (20, 20) covers
  11 × 11 = 121 pixels;
- vertices outside the image are clipped to the image grid (``regions_clipped`` counts regions
  with a vertex outside ``[0, W-1] × [0, H-1]``); a region that lies entirely outside, or covers
  no pixel centre, is skipped (counted, warned);
- **overlap rule: the smaller region wins.** Regions are ordered by the shoelace area of their
  polygon, largest first (equal areas: later in the document first), and drawn in that order,
  each overwriting what is under it; so a pixel covered by several regions belongs to the
  smallest of them, and between equal areas to the one earlier in the document. A nucleus
  inside an ``Ambiguous`` region therefore keeps its pixels. ``overlap_pixels`` counts pixels
  covered by two or more regions; a region left with no pixel is dropped and counted as
  ``regions_lost_to_overlap`` (warned);
- kept regions get instance ids 1..n in document order.

Counters written to :class:`IngestReport`: ``images``, ``images_from_svs``, ``images_rgba``,
``annotation_blocks``, ``annotation_blocks_empty``, ``regions``, ``nuclei``,
``ignore_regions``, ``duplicate_vertices_dropped``, ``closing_vertices_dropped``,
``regions_skipped_degenerate``, ``area_mismatches``, ``length_mismatches``,
``regions_clipped``, ``regions_skipped_outside``, ``regions_skipped_empty``,
``regions_lost_to_overlap``, ``overlap_pixels``.

>>> from cellcurate.datasets.records import IngestReport
>>> report = IngestReport()
>>> for img in iter_monusac("MoNuSAC_images_and_annotations", report=report):  # doctest: +SKIP
...     img.key, img.image.shape, len(img.nuclei), img.mpp  # "TCGA-…_1", (H, W, 3), n, mpp of its XML
>>> report.as_dict()["counts"]["overlap_pixels"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from functools import partial
from typing import Any, Literal

import numpy as np
import pandas as pd

from ..errors import ConfigError, InputFormatError, InputNotFoundError
from .records import SOURCE_NUCLEI_COLUMNS, IngestReport, SourceImage, UnitPart, UnitPlan, files_fingerprint

__all__ = [
    "MONUSAC_CLASSES",
    "IGNORE_CLASSES",
    "SPLITS",
    "MonusacRegion",
    "MonusacAnnotation",
    "MonusacItem",
    "parse_annotation_xml",
    "discover_monusac",
    "read_monusac_image",
    "iter_monusac",
    "looks_like_monusac",
    "rasterize_regions",
]

MonusacSplit = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")

#: Class names as normalised by the reader (the spelling of the release).
MONUSAC_CLASSES: tuple[str, ...] = ("Epithelial", "Lymphocyte", "Macrophage", "Neutrophil", "Ambiguous")
#: Classes whose regions are ignore regions, not nuclei.
IGNORE_CLASSES: tuple[str, ...] = ("Ambiguous",)
_CLASS_BY_LOWER = {c.lower(): c for c in MONUSAC_CLASSES}

#: Area/Length attributes are written with one decimal: allow that rounding, or 1 % if larger.
CHECKSUM_ABS_TOL = 0.051
CHECKSUM_REL_TOL = 0.01

#: Image suffixes next to an XML, in order of preference.
IMAGE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".svs")

_TCGA_PATIENT = re.compile(r"^TCGA-[A-Za-z0-9]{2}-[A-Za-z0-9]{4}")

PathArg = str | PathLike[str]


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------
@dataclass
class MonusacRegion:
    """One ``<Region>`` of an annotation XML.

    Attributes
    ----------
    region_id
        The Region ``Id`` attribute as written (unique only within its ``<Annotation>`` block).
    label
        Normalised class name, one of :data:`MONUSAC_CLASSES`.
    vertices
        (V, 2) float64, columns x, y, as written (duplicates and closing vertex included).
    area_attr, length_attr
        The ``Area`` / ``Length`` attributes, ``None`` where absent or not a number.
    annotation_id
        ``Id`` of the enclosing ``<Annotation>`` block.
    """

    region_id: str
    label: str
    vertices: np.ndarray
    area_attr: float | None
    length_attr: float | None
    annotation_id: str

    @property
    def is_ignore(self) -> bool:
        return self.label in IGNORE_CLASSES


@dataclass
class MonusacAnnotation:
    """A parsed annotation XML: pixel size and its usable regions (≥ 3 distinct vertices),
    in document order."""

    path: Path
    mpp: float
    regions: list[MonusacRegion]
    n_annotation_blocks: int


@dataclass
class MonusacItem:
    """One image of the release: its XML, its image file, its patient folder name and split."""

    xml: Path
    image: Path
    patient_folder: str
    split: MonusacSplit

    @property
    def key(self) -> str:
        return self.image.stem


# --------------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------------
def _shoelace(v: np.ndarray) -> float:
    """Area of the closed polygon (V, 2) x, y."""
    if len(v) < 3:
        return 0.0
    x, y = v[:, 0], v[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def _perimeter(v: np.ndarray) -> float:
    """Length of the closed polyline (V, 2) x, y (closing edge included)."""
    if len(v) < 2:
        return 0.0
    d = np.roll(v, -1, axis=0) - v
    return float(np.hypot(d[:, 0], d[:, 1]).sum())


def _distinct_ring(v: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Drop consecutive duplicates and a closing vertex equal to the first.

    Returns the ring (U, 2), the number of duplicates dropped and 1 if a closing vertex was.
    """
    if len(v) == 0:
        return v, 0, 0
    keep = np.ones(len(v), dtype=bool)
    keep[1:] = np.any(v[1:] != v[:-1], axis=1)
    ring = v[keep]
    n_dup = int(len(v) - len(ring))
    closing = 0
    if len(ring) > 1 and np.array_equal(ring[-1], ring[0]):
        ring = ring[:-1]
        closing = 1
    return ring, n_dup, closing


def _two_points(ring: np.ndarray) -> bool:
    """True when a ring (U ≥ 2, no consecutive duplicates) has only 2 distinct vertices (A, B, A, B...)."""
    return bool(np.all(np.all(ring == ring[0], axis=1) | np.all(ring == ring[1], axis=1)))


def _drop_straight_vertices(ring: np.ndarray) -> np.ndarray:
    """Drop vertices that sit on a straight run (collinear and same direction on both sides).

    The closed polygon keeps exactly the same point set, so rasterisation is unchanged; pixel
    traces lose a good share of their vertices, which makes ``skimage.draw.polygon`` faster.
    """
    if len(ring) <= 3:
        return ring
    d_in = ring - np.roll(ring, 1, axis=0)
    d_out = np.roll(ring, -1, axis=0) - ring
    cross = d_in[:, 0] * d_out[:, 1] - d_in[:, 1] * d_out[:, 0]
    dot = d_in[:, 0] * d_out[:, 0] + d_in[:, 1] * d_out[:, 1]
    keep = ~((cross == 0) & (dot > 0))
    if keep.sum() < 3:
        return ring
    return ring[keep]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= max(CHECKSUM_ABS_TOL, CHECKSUM_REL_TOL * max(abs(a), abs(b)))


# --------------------------------------------------------------------------------------------
# XML
# --------------------------------------------------------------------------------------------
#: A UTF-8 byte order mark.
_BOM = b"\xef\xbb\xbf"
_LEADING_SPACE = re.compile(rb"[ \t\r\n]*")
_DECLARED_ENCODING = re.compile(rb"<\?xml[^>]*?encoding\s*=\s*[\"']([A-Za-z0-9._-]+)[\"']")
#: Encodings in which ``<!DOCTYPE`` / ``<!ENTITY`` can only be written as those very bytes.
_ASCII_ENCODINGS = frozenset({"utf-8", "utf8", "us-ascii", "ascii", "iso-8859-1", "latin-1", "latin1"})
_FAST_PARSER: Any = None


def _provably_harmless(data: bytes) -> bool:
    """True when ``data`` cannot hold a DTD, an entity declaration or an external reference.

    It must be in an ASCII-compatible encoding (no NUL byte, which UTF-16/32 always have; an
    encoding declaration, if any, naming UTF-8, ASCII or Latin-1; the first non-space byte ``<``),
    and every ``<!`` in it must open a comment or a CDATA section, so no ``<!DOCTYPE``, no
    ``<!ENTITY``, no other markup declaration. Such a document has no entities but the five
    predefined ones and character references. Anything else goes to defusedxml, which decides.
    """
    start = len(_BOM) if data.startswith(_BOM) else 0
    start = _LEADING_SPACE.match(data, start).end()  # type: ignore[union-attr]
    if data[start : start + 1] != b"<" or b"\x00" in data:
        return False
    decl = _DECLARED_ENCODING.match(data, start)
    if decl is not None and decl.group(1).decode("ascii").lower() not in _ASCII_ENCODINGS:
        return False
    i = data.find(b"<!")
    while i >= 0:
        if not (data.startswith(b"<!--", i) or data.startswith(b"<![CDATA[", i)):
            return False
        i = data.find(b"<!", i + 2)
    return True


def _fast_parser() -> Any:
    """lxml's parser with every door closed (no entity substitution, no DTD loading, no network,
    libxml2's size limits on); None where lxml is not installed."""
    global _FAST_PARSER
    if _FAST_PARSER is None:
        try:
            from lxml import etree
        except ImportError:  # pragma: no cover - lxml is a dependency; defusedxml alone still works
            _FAST_PARSER = False
        else:
            _FAST_PARSER = etree.XMLParser(resolve_entities=False, load_dtd=False, no_network=True,
                                           dtd_validation=False, huge_tree=False, remove_blank_text=False)
    return _FAST_PARSER or None


def parse_xml_bytes(data: bytes, path: Path) -> Any:
    """The root element of an untrusted XML document, parsed safely.

    A document :func:`_provably_harmless` is parsed with lxml (several times faster than the
    Python-driven expat parser on MoNuSeg's 3-4 MB annotation files; ``benchmarks/bench_ingest.py``);
    any other goes to defusedxml with DTDs, entities and external references forbidden, so a
    billion-laughs bomb or an external entity is refused as before. The element answers the
    ElementTree API (``get``, ``findall``, ``iterfind``, ``tag``) either way.
    """
    import defusedxml
    import defusedxml.ElementTree as DET

    parser = _fast_parser() if _provably_harmless(data) else None
    if parser is not None:
        from lxml import etree

        try:
            return etree.fromstring(data, parser)
        except etree.XMLSyntaxError as exc:
            line, col = getattr(exc, "position", (0, 0))
            msg = str(exc.msg if getattr(exc, "msg", None) else exc).split(",")[0]
            raise InputFormatError(path, f"malformed XML at line {line}, column {col} ({msg})") from None
    try:
        return DET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DefusedXmlException as exc:
        raise InputFormatError(
            path, f"forbidden entity/DTD in XML ({type(exc).__name__}); ImageScope XML has none"
        ) from None
    except ET.ParseError as exc:
        line, col = getattr(exc, "position", (0, 0))
        msg = str(exc).split(":")[0]
        raise InputFormatError(path, f"malformed XML at line {line}, column {col} ({msg})") from None


def _parse_xml_root(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputNotFoundError(path, "annotation XML not found") from None
    except OSError as exc:
        raise InputFormatError(path, f"cannot read annotation XML ({exc.strerror or exc})") from None
    return parse_xml_bytes(data, path)


def _float_attr(el: ET.Element, name: str) -> float | None:
    raw = el.get(name)
    if raw is None:
        return None
    try:
        val = float(raw)
    except ValueError:
        return None
    return val if math.isfinite(val) else None


def _annotation_class(path: Path, ann: ET.Element) -> str | None:
    names = [a.get("Name", "").strip() for a in ann.findall("Attributes/Attribute")]
    names = [n for n in names if n]
    if not names:
        return None
    raw = names[0]
    label = _CLASS_BY_LOWER.get(raw.lower())
    if label is None:
        raise InputFormatError(
            path,
            f"unknown class {raw!r} in Annotation Id={ann.get('Id', '?')}; "
            f"expected one of {', '.join(MONUSAC_CLASSES)}",
        )
    return label


def _vertices(path: Path, ann_id: str, reg: Any) -> np.ndarray:
    pts = [(v.get("X"), v.get("Y")) for v in reg.iterfind("Vertices/Vertex")]
    if not pts:
        return np.zeros((0, 2), dtype=np.float64)
    try:
        v = np.array(pts, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputFormatError(
            path, f"Annotation {ann_id} Region {reg.get('Id', '?')}: a Vertex has a missing or "
            "non-numeric X/Y"
        ) from None
    if not np.all(np.isfinite(v)):
        raise InputFormatError(path, f"Annotation {ann_id} Region {reg.get('Id', '?')}: non-finite vertex")
    return v


def parse_annotation_xml(path: PathArg, *, report: IngestReport | None = None) -> MonusacAnnotation:
    """Parse one MoNuSAC ImageScope XML safely (defusedxml; no DTD, no entities).

    Parameters
    ----------
    path
        The ``.xml`` file.
    report
        Collects counters (duplicate vertices, degenerate regions, Area/Length mismatches,
        empty annotation blocks) and one-line warnings naming the file.

    Returns
    -------
    MonusacAnnotation
        Regions with ≥ 3 distinct vertices in document order, vertices as written.

    Raises
    ------
    InputFormatError
        Malformed XML (with line/column), a DTD or entity, a root other than ``<Annotations>``,
        missing/invalid ``MicronsPerPixel``, an unknown class, a non-numeric vertex.
    InputNotFoundError
        The file does not exist.
    """
    path = Path(path)
    report = report if report is not None else IngestReport()
    root = _parse_xml_root(path)
    if root.tag != "Annotations":
        raise InputFormatError(path, f"root element is <{root.tag}>, expected <Annotations> (ImageScope XML)")
    raw_mpp = root.get("MicronsPerPixel")
    if raw_mpp is None:
        raise InputFormatError(path, "<Annotations> has no MicronsPerPixel attribute")
    try:
        mpp = float(raw_mpp)
    except ValueError:
        mpp = float("nan")
    if not (math.isfinite(mpp) and mpp > 0):
        raise InputFormatError(path, f"invalid MicronsPerPixel {raw_mpp!r}, expected a positive number")

    regions: list[MonusacRegion] = []
    seen_ids: dict[tuple[str, str], int] = {}  # (Annotation Id, Region Id) -> line of the first Region
    blocks = root.findall("Annotation")
    report.count("annotation_blocks", len(blocks))
    for ann in blocks:
        ann_id = ann.get("Id", "")
        label = _annotation_class(path, ann)
        region_els = ann.findall("Regions/Region")
        if not region_els:
            report.count("annotation_blocks_empty")
            continue
        if label is None:
            raise InputFormatError(
                path, f"Annotation Id={ann_id} has {len(region_els)} regions but no "
                "Attributes/Attribute@Name class"
            )
        for reg in region_els:
            reg_id = reg.get("Id", "")
            where = f"{path}: {label} region Id={reg_id} (Annotation {ann_id})"
            v = _vertices(path, ann_id, reg)
            ring, n_dup, closing = _distinct_ring(v)
            report.count("duplicate_vertices_dropped", n_dup)
            report.count("closing_vertices_dropped", closing)
            if len(ring) < 3 or _two_points(ring):
                report.count("regions_skipped_degenerate")
                report.warn(f"{where}: fewer than 3 distinct vertices ({len(v)} written), skipped")
                continue
            key = (ann_id, reg_id)
            if key in seen_ids:  # the same (Annotation, Region) Id: two nuclei would get one id
                raise InputFormatError(
                    path, f"Annotation Id={ann_id or '(none)'}: two Regions have Id={reg_id or '(none)'} "
                    f"(region {seen_ids[key] + 1} and region {len(regions) + 1} of the file); Region Ids must be "
                    "unique within an Annotation"
                )
            seen_ids[key] = len(regions)
            area_attr = _float_attr(reg, "Area")
            length_attr = _float_attr(reg, "Length")
            if area_attr is not None:
                area = _shoelace(v)
                if not _close(area_attr, area):
                    report.count("area_mismatches")
                    report.warn(f"{where}: Area attribute {area_attr:g} != shoelace area {area:.1f}")
            if length_attr is not None:
                length = _perimeter(v)
                if not _close(length_attr, length):
                    report.count("length_mismatches")
                    report.warn(f"{where}: Length attribute {length_attr:g} != closed perimeter {length:.1f}")
            regions.append(MonusacRegion(reg_id, label, v, area_attr, length_attr, ann_id))
    report.count("regions", len(regions))
    return MonusacAnnotation(path=path, mpp=mpp, regions=regions, n_annotation_blocks=len(blocks))


# --------------------------------------------------------------------------------------------
# rasterisation
# --------------------------------------------------------------------------------------------
def rasterize_regions(
    regions: Sequence[MonusacRegion],
    shape: tuple[int, int],
    *,
    report: IngestReport | None = None,
    source: str = "",
    simplify: bool = True,
) -> tuple[np.ndarray, list[int]]:
    """Rasterise regions onto an (H, W) grid with the module's overlap rule (smaller wins).

    Parameters
    ----------
    regions
        Regions in document order (vertices x, y in pixel coordinates of the grid).
    shape
        (H, W) of the image.
    report, source
        Counters and warnings; ``source`` names the file in warnings.
    simplify
        Drop vertices on straight runs before drawing (faster). Not exact: a pixel centre that is
        itself such a vertex can fall out (seen on real MoNuSeg polygons); MoNuSeg passes False.

    Returns
    -------
    instances
        (H, W) int32; 0 background, 1..n = the kept regions in document order.
    kept
        Indices into ``regions`` of the n kept regions (``instances == i + 1`` is ``regions[kept[i]]``).
    """
    from skimage.draw import polygon

    report = report if report is not None else IngestReport()
    h, w = int(shape[0]), int(shape[1])
    labels = np.zeros((h, w), dtype=np.int32)
    overlap = np.zeros((h, w), dtype=bool)
    rings: dict[int, np.ndarray] = {}
    areas = np.zeros(len(regions), dtype=np.float64)
    for k, reg in enumerate(regions):
        ring = _distinct_ring(np.asarray(reg.vertices, dtype=np.float64))[0]
        name = f"{source}: {reg.label} region Id={reg.region_id} (Annotation {reg.annotation_id})"
        if len(ring) < 3 or _two_points(ring):
            report.count("regions_skipped_degenerate")
            report.warn(f"{name}: fewer than 3 distinct vertices, skipped")
            continue
        lo, hi = ring.min(axis=0), ring.max(axis=0)
        if hi[0] < 0 or hi[1] < 0 or lo[0] > w - 1 or lo[1] > h - 1:
            report.count("regions_skipped_outside")
            report.warn(f"{name}: entirely outside the {w}x{h} image, skipped")
            continue
        if lo[0] < 0 or lo[1] < 0 or hi[0] > w - 1 or hi[1] > h - 1:
            report.count("regions_clipped")
        rings[k] = _drop_straight_vertices(ring) if simplify else ring
        areas[k] = _shoelace(ring)

    drawn: list[int] = []
    # largest first; equal areas: later in the document first, so the earlier one is drawn last
    for k in sorted(rings, key=lambda k: (-areas[k], -k)):
        ring = rings[k]
        rr, cc = polygon(ring[:, 1], ring[:, 0], shape=(h, w))
        if len(rr) == 0:
            reg = regions[k]
            report.count("regions_skipped_empty")
            report.warn(
                f"{source}: {reg.label} region Id={reg.region_id} (Annotation {reg.annotation_id}): "
                "covers no pixel centre, skipped"
            )
            continue
        under = labels[rr, cc]
        hit = under != 0
        if hit.any():
            overlap[rr[hit], cc[hit]] = True
        labels[rr, cc] = k + 1
        drawn.append(k)

    present = np.bincount(labels.ravel(), minlength=len(regions) + 1)[1:] > 0
    for k in sorted(drawn):
        if not present[k]:
            reg = regions[k]
            report.count("regions_lost_to_overlap")
            report.warn(
                f"{source}: {reg.label} region Id={reg.region_id} (Annotation {reg.annotation_id}): "
                "all pixels covered by smaller regions, dropped"
            )
    report.count("overlap_pixels", int(overlap.sum()))
    kept = [int(k) for k in np.flatnonzero(present)]
    lut = np.zeros(len(regions) + 1, dtype=np.int32)
    lut[np.asarray(kept, dtype=np.int64) + 1] = np.arange(1, len(kept) + 1, dtype=np.int32)
    return lut[labels], kept


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------
def _read_rgb(path: Path, report: IngestReport) -> np.ndarray:
    """Level 0 of a TIFF/SVS as (H, W, 3) uint8; RGBA loses its alpha."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            level = tif.series[0].levels[0]
            axes = str(level.axes)
            arr = level.asarray()
    except FileNotFoundError:
        raise InputNotFoundError(path, "image not found") from None
    except Exception as exc:  # a corrupt or unsupported file must become one line, not a traceback
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputFormatError(path, f"cannot read image level 0 ({detail})") from None
    if arr.ndim == 3 and axes.endswith("SYX") and arr.shape[0] in (3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.dtype != np.uint8:
        raise InputFormatError(
            path, f"expected an RGB or RGBA uint8 image, got shape {arr.shape} {arr.dtype} (axes {axes})"
        )
    if arr.shape[2] == 4:
        report.count("images_rgba")
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def _patient_id(folder: str) -> str:
    m = _TCGA_PATIENT.match(folder)
    return m.group(0) if m else folder


def read_monusac_image(item: MonusacItem, *, report: IngestReport | None = None) -> SourceImage:
    """Read one image and its XML into a :class:`SourceImage`.

    ``image`` (H, W, 3) uint8 at level 0, native size; ``instances`` (H, W) int32 with ids 1..n
    in document order; ``nuclei`` with ``origin_region`` = Region ``Id`` as written.
    ``origin_file`` / ``annotation_file`` are relative to the release folder, e.g.
    ``"TCGA-KK-A6E0-01Z-00-DX1/TCGA-KK-A6E0-01Z-00-DX1_1.tif"``.
    """
    report = report if report is not None else IngestReport()
    ann = parse_annotation_xml(item.xml, report=report)
    image = _read_rgb(Path(item.image), report)
    if Path(item.image).suffix.lower() == ".svs":
        report.count("images_from_svs")
    instances, kept = rasterize_regions(ann.regions, image.shape[:2], report=report, source=str(item.xml))
    regs = [ann.regions[k] for k in kept]
    n = len(regs)
    nuclei = pd.DataFrame(
        {
            "instance_id": np.arange(1, n + 1, dtype=np.int32),
            "kind": pd.Series(["ignore" if r.is_ignore else "nucleus" for r in regs], dtype=object),
            "source_label": pd.Series([r.label for r in regs], dtype=object),
            "origin_channel": np.full(n, -1, dtype=np.int16),
            "origin_instance": np.full(n, -1, dtype=np.int64),
            "origin_region": pd.Series([str(r.region_id) for r in regs], dtype=object),
            "origin_annotation": pd.Series([str(r.annotation_id) for r in regs], dtype=object),
        },
        columns=list(SOURCE_NUCLEI_COLUMNS),
    )
    n_ignore = sum(r.is_ignore for r in regs)
    report.count("images")
    report.count("nuclei", n - n_ignore)
    report.count("ignore_regions", n_ignore)
    out = SourceImage(
        key=item.image.stem,
        split=item.split,
        image=image,
        instances=instances,
        nuclei=nuclei,
        origin_file=f"{item.patient_folder}/{item.image.name}",
        origin_index=-1,
        mpp=ann.mpp,
        patient_id=_patient_id(item.patient_folder),
        tissue=None,
        annotation_file=f"{item.patient_folder}/{item.xml.name}",
    )
    out.validate()
    return out


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------
def _hidden(p: Path) -> bool:
    return p.name.startswith(".") or p.name == "__MACOSX"


def _subdirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not _hidden(d))


def _xml_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.suffix.lower() == ".xml" and f.is_file() and not _hidden(f))


def _infer_split(folder: Path) -> MonusacSplit:
    return "test" if "test" in folder.name.lower() else "train"


def _items_in_patient(folder: Path, split: MonusacSplit) -> list[MonusacItem]:
    by_stem: dict[str, dict[str, Path]] = {}
    for f in folder.iterdir():
        if f.is_file() and not _hidden(f):
            by_stem.setdefault(f.stem, {})[f.suffix.lower()] = f
    items = []
    for xml in _xml_files(folder):
        found = by_stem.get(xml.stem, {})
        image = next((found[s] for s in IMAGE_SUFFIXES if s in found), None)
        if image is None:
            raise InputNotFoundError(
                xml, f"no image with the same stem next to this annotation (looked for {', '.join(IMAGE_SUFFIXES)})"
            )
        items.append(MonusacItem(xml=xml, image=image, patient_folder=folder.name, split=split))
    return items


def discover_monusac(path: PathArg, *, split: str | None = None) -> list[MonusacItem]:
    """Find every (XML, image) pair under a MoNuSAC folder, sorted (train first, then patient, file).

    Parameters
    ----------
    path
        A release folder (split inferred from its name: containing "test" -> ``"test"``, else
        ``"train"``), a single patient folder (split inferred from its parent's name), or a folder
        holding both release folders (both splits).
    split
        ``"train"`` or ``"test"``: overrides the inferred split of a release or patient folder;
        for a folder holding both releases, keeps only the release of that split.

    Raises
    ------
    InputNotFoundError
        Missing path, no MoNuSAC XML, or an XML without its image.
    InputFormatError
        Two images with the same stem (keys must be unique).
    ConfigError
        ``split`` not one of :data:`SPLITS`.
    """
    if split is not None and split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    root = Path(path)
    if not root.exists():
        raise InputNotFoundError(root, "path does not exist")
    if not root.is_dir():
        raise InputNotFoundError(
            root, "expected a MoNuSAC release folder, a patient folder, or a folder holding both releases; got a file"
        )
    chosen: MonusacSplit | None = split  # type: ignore[assignment]  # validated above
    releases: list[tuple[list[Path], MonusacSplit]] = []
    if _xml_files(root):  # a patient folder
        releases.append(([root], chosen or _infer_split(root.resolve().parent)))
    else:
        patients = [d for d in _subdirs(root) if _xml_files(d)]
        if patients:  # a release folder
            releases.append((patients, chosen or _infer_split(root.resolve())))
        else:  # a folder holding release folders
            found_any = False
            for rel in _subdirs(root):
                pats = [d for d in _subdirs(rel) if _xml_files(d)]
                if pats:
                    found_any = True
                    s = _infer_split(rel)
                    if chosen is None or s == chosen:
                        releases.append((pats, s))
            if found_any and not releases:
                raise InputNotFoundError(root, f"holds MoNuSAC release folders but none of split {chosen!r}")
    if not releases:
        raise InputNotFoundError(
            root, "no MoNuSAC annotation XML found (expected <release>/<patient>/<image>.xml)"
        )
    items = [it for pats, s in releases for p in pats for it in _items_in_patient(p, s)]
    items.sort(key=lambda it: (SPLITS.index(it.split), it.patient_folder, it.xml.name))
    seen: dict[str, Path] = {}
    for it in items:
        if it.key in seen:
            raise InputFormatError(it.image, f"image stem {it.key!r} also used by {seen[it.key]}; keys must be unique")
        seen[it.key] = it.image
    return items


def iter_monusac(
    path: PathArg, *, split: str | None = None, report: IngestReport | None = None
) -> Iterator[SourceImage]:
    """Yield every image of :func:`discover_monusac` (discovered up front, so a missing image
    fails before any work), in its sorted, deterministic order."""
    items = discover_monusac(path, split=split)
    for item in items:
        yield read_monusac_image(item, report=report)


def looks_like_monusac(path: PathArg) -> bool:
    """Cheap check: is there an ImageScope ``<Annotations>`` XML at most two folders below ``path``?

    Never raises; reads the first bytes of at most a few XML files.
    """
    try:
        root = Path(path)
        if not root.is_dir():
            return False
        checked = 0
        level = [root]
        for _ in range(3):
            nxt: list[Path] = []
            for folder in level:
                for entry in sorted(folder.iterdir()):
                    if _hidden(entry):
                        continue
                    if entry.is_dir():
                        nxt.append(entry)
                    elif entry.suffix.lower() == ".xml":
                        with open(entry, "rb") as fh:
                            head = fh.read(4096)
                        if b"<Annotations" in head:
                            return True
                        checked += 1
                        if checked >= 5:
                            return False
            level = nxt
        return False
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# registry hooks (cellcurate.datasets.sources)
# --------------------------------------------------------------------------------------------
looks_like = looks_like_monusac


def plan_units(path: PathArg, *, split: str | None = None) -> list[UnitPlan]:
    """One unit per patient folder and split (``monusac-<split>-<patient folder>``)."""
    by_unit: dict[str, list[MonusacItem]] = {}
    for it in discover_monusac(path, split=split):
        by_unit.setdefault(f"monusac-{it.split}-{it.patient_folder}", []).append(it)
    plans = []
    for unit, items in by_unit.items():
        parts = tuple(UnitPart(partial(_read_part, it), f"{it.xml}, {it.image}") for it in items)
        plans.append(UnitPlan(unit=unit, n_images=len(items),
                              fingerprint=files_fingerprint([p for it in items for p in (it.xml, it.image)]),
                              origin=str(items[0].xml.parent), parts=parts))
    return plans


def _read_part(item: MonusacItem, report: IngestReport) -> Iterator[SourceImage]:
    """One image as a part of its unit (``curate ingest --jobs``)."""
    yield read_monusac_image(item, report=report)

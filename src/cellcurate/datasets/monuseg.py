"""Read MoNuSeg 2018 (Aperio ImageScope XML + TIFF, instances only) into :class:`SourceImage`.

Layouts: ``<release>/Tissue Images/<stem>.tif`` (also ``Tissue_Images``) + ``Annotations/<stem>.xml``
(training data), or ``<release>/<stem>.tif`` + ``<stem>.xml`` side by side (test data); ``path``
may also hold such release folders (``MoNuSegTrainingData``, ``MoNuSegTestData``). The split is
``test`` when the release folder's name contains "test", else ``train``; one unit per split
(``monuseg-train``, ``monuseg-test``).

The XML is MoNuSAC's dialect (parsed with the same safe parser, :mod:`cellcurate.datasets.monusac`)
but with one class-less annotation (``Attribute Name="Description"``): every region is a nucleus
labelled :data:`~cellcurate.datasets.sources.UNKNOWN_LABEL`, so relabeling proposes its class.
Rasterisation and the overlap rule are MoNuSAC's (:func:`~cellcurate.datasets.monusac.rasterize_regions`:
pixel centres inside or on the polygon; overlapping polygons: the smaller region wins). The pixel
size is the XML's ``MicronsPerPixel``. A region lying entirely outside the image is an error (the
XML does not belong to that image); vertices slightly outside are clipped (``regions_clipped``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from functools import partial

import numpy as np

from ..errors import InputFormatError, InputNotFoundError
from . import _readers as R
from .records import IngestReport, SourceImage, UnitPart, UnitPlan, files_fingerprint

LABEL = "unknown nucleus"
_IMAGE_DIRS = ("tissue images", "tissue_images", "images")
_SUFFIXES = (".tif", ".tiff", ".png")


def _xmls(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".xml" and not p.name.startswith("."))


def _release(folder: Path) -> list[tuple[Path, Path]] | None:
    """(image, xml) pairs of one release folder, or None when ``folder`` is not one."""
    if not folder.is_dir():
        return None
    ann = next((c for c in folder.iterdir() if c.is_dir() and c.name.lower() == "annotations"), None)
    imgs = next((c for c in folder.iterdir() if c.is_dir() and c.name.lower() in _IMAGE_DIRS), None)
    if ann is not None and imgs is not None:
        xml_dir, img_dir = ann, imgs
    elif _xmls(folder):
        xml_dir = img_dir = folder
    else:
        return None
    pairs = []
    for xml in _xmls(xml_dir):
        img = next((img_dir / f"{xml.stem}{s}" for s in _SUFFIXES if (img_dir / f"{xml.stem}{s}").is_file()), None)
        if img is None:
            raise InputNotFoundError(xml, f"no image {xml.stem}.tif for this annotation in {img_dir}")
        pairs.append((img, xml))
    return pairs or None


def _releases(path: Path) -> list[tuple[str, Path, list[tuple[Path, Path]]]]:
    found = []
    pairs = _release(path)
    if pairs:
        found.append((path, pairs))
    else:
        for child in sorted(c for c in path.iterdir() if c.is_dir() and not c.name.startswith(".")):
            p = _release(child)
            if p:
                found.append((child, p))
    return [("test" if "test" in f.name.lower() else "train", f, p) for f, p in found]


def _is_aperio(xml: Path) -> bool:
    with open(xml, "rb") as fh:
        head = fh.read(4096)
    return b"<Annotations" in head and b'Name="Description"' in head


def looks_like(path: Path) -> bool:
    try:
        if not path.is_dir():
            return False
        for _split, _folder, pairs in _releases(path):
            return _is_aperio(pairs[0][1])
        return False
    except (OSError, InputNotFoundError):
        return False


def plan_units(path: Path) -> list[UnitPlan]:
    if not path.exists():
        raise InputNotFoundError(path, "path does not exist")
    releases = _releases(path)
    if not releases:
        raise InputNotFoundError(path, "holds no MoNuSeg data (expected Tissue Images/*.tif + Annotations/*.xml)")
    plans = []
    for split, folder, pairs in releases:
        parts = tuple(UnitPart(partial(_read_part, img, xml, split, folder), f"{xml}, {img}") for img, xml in pairs)
        plans.append(UnitPlan(unit=f"monuseg-{split}", n_images=len(pairs), origin=str(folder),
                              fingerprint=files_fingerprint([p for pair in pairs for p in pair]), parts=parts))
    return plans


def _read_part(img: Path, xml: Path, split: str, root: Path, report: IngestReport) -> Iterator[SourceImage]:
    """One image as a part of its unit (``curate ingest --jobs``)."""
    yield read_image(img, xml, split=split, root=root, report=report)


def parse_regions(xml: Path, report: IngestReport) -> tuple[float, list]:
    """(MicronsPerPixel, regions) of a MoNuSeg XML; every region labelled :data:`LABEL`."""
    from . import monusac as M

    root = M._parse_xml_root(xml)
    if root.tag != "Annotations":
        raise InputFormatError(xml, f"root element is <{root.tag}>, expected <Annotations> (ImageScope XML)")
    raw = root.get("MicronsPerPixel")
    try:
        mpp = float(raw) if raw is not None else float("nan")
    except ValueError:
        mpp = float("nan")
    if not (math.isfinite(mpp) and mpp > 0):
        raise InputFormatError(xml, f"invalid or missing MicronsPerPixel {raw!r}, expected a positive number")
    regions = []
    for ann in root.findall("Annotation"):
        ann_id = ann.get("Id", "")
        for reg in ann.findall("Regions/Region"):
            v = M._vertices(xml, ann_id, reg)
            regions.append(M.MonusacRegion(reg.get("Id", ""), LABEL, v, M._float_attr(reg, "Area"),
                                           M._float_attr(reg, "Length"), ann_id))
    report.count("regions", len(regions))
    return mpp, regions


def read_image(img: Path, xml: Path, *, split: str, root: Path, report: IngestReport) -> SourceImage:
    from . import monusac as M

    mpp, regions = parse_regions(xml, report)
    image = R.read_rgb(img, report)
    h, w = image.shape[:2]
    for r in regions:
        v = np.asarray(r.vertices)
        if len(v) and (v[:, 0].max() < 0 or v[:, 1].max() < 0 or v[:, 0].min() > w - 1 or v[:, 1].min() > h - 1):
            raise InputFormatError(
                xml, f"Region Id={r.region_id} (Annotation {r.annotation_id}) lies entirely outside the {w}x{h} "
                f"image {img.name}: the XML does not belong to this image"
            )
    instances, kept = M.rasterize_regions(regions, (h, w), report=report, source=str(xml), simplify=False)
    regs = [regions[k] for k in kept]
    nuclei = R.nuclei_table(np.full(len(regs), -1), [LABEL] * len(regs))
    nuclei["origin_region"] = [str(r.region_id) for r in regs]
    nuclei["origin_annotation"] = [str(r.annotation_id) for r in regs]
    report.count("images")
    report.count("nuclei", len(regs))
    out = SourceImage(
        key=img.stem, split=split, image=image, instances=instances, nuclei=nuclei,
        origin_file=img.relative_to(root).as_posix(), origin_index=-1, mpp=mpp,
        patient_id=M._patient_id(img.stem), tissue=None, annotation_file=xml.relative_to(root).as_posix(),
    )
    out.validate()
    return out

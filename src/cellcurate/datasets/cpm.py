"""Read CPM-15 / CPM-17 (MICCAI digital-pathology segmentation challenges; instances only).

Layouts:

* CPM-15: ``<root>/imageXX.png`` + ``imageXX_mask.txt``: ASCII instance labels, first line
  ``width height``, then one id per pixel, x fastest (``README_training.txt`` of the release).
  The release's ``README_training.txt`` table of magnifications gives each image's pixel size
  (20× -> 0.5 µm, 40× -> 0.25 µm); without it the pixel size is 0.25 µm and a warning says so.
* CPM-17 (as HoVer-Net distributes it): ``<root>/{train,test}/Images/*.png`` + ``Labels/*.mat``
  with ``inst_map``; pixel size 0.25 µm (warned: the release does not state it per image).

Every nucleus is labelled ``"unknown nucleus"`` (relabeling proposes classes). Ids are renumbered
1..n in ascending source id (kept in ``origin_instance``). One unit per folder/split:
``cpm-<folder name>`` or ``cpm-<split>``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from functools import partial

import numpy as np

from ..errors import InputFormatError, InputNotFoundError
from . import _readers as R
from .records import IngestReport, SourceImage, UnitPart, UnitPlan, files_fingerprint

LABEL = "unknown nucleus"
MPP_BY_MAGNIFICATION = {20: 0.5, 40: 0.25}
DEFAULT_MPP = 0.25
_MAG_ROW = re.compile(r"^\s*(image\d+)\.png\s+(\d+)x\s*$", re.IGNORECASE | re.MULTILINE)


def _cpm15_pairs(folder: Path) -> list[tuple[Path, Path]]:
    pairs = []
    for txt in sorted(folder.glob("*_mask.txt")):
        img = folder / f"{txt.name[: -len('_mask.txt')]}.png"
        if not img.is_file():
            raise InputNotFoundError(txt, f"no image {img.name} for this mask")
        pairs.append((img, txt))
    return pairs


def _cpm17_splits(root: Path) -> list[tuple[str, Path]]:
    out = []
    for d in sorted(c for c in root.iterdir() if c.is_dir()):
        if (d / "Images").is_dir() and (d / "Labels").is_dir() and any((d / "Labels").glob("*.mat")):
            out.append(("test" if "test" in d.name.lower() else "train", d))
    if (root / "Images").is_dir() and (root / "Labels").is_dir():
        out.append(("test" if "test" in root.name.lower() else "train", root))
    return out


def looks_like(path: Path) -> bool:
    """CPM-15 ``*_mask.txt`` files, or CPM-17 splits whose first .mat has ``inst_map`` but no
    ``inst_type`` (CoNSeP's .mat has both)."""
    try:
        if not path.is_dir():
            return False
        if _cpm15_pairs(path):
            return True
        for _split, folder in _cpm17_splits(path):
            mat = R.first_mat(folder / "Labels")
            keys = R.mat_keys(mat) if mat is not None else set()
            return "inst_map" in keys and "inst_type" not in keys
        return False
    except (OSError, InputNotFoundError):
        return False


def magnifications(readme: Path) -> dict[str, int]:
    """Image stem -> objective magnification, from a CPM-15 ``README_training.txt``."""
    return {m.group(1).lower(): int(m.group(2)) for m in _MAG_ROW.finditer(readme.read_text("utf-8", "replace"))}


def read_mask_txt(path: Path) -> np.ndarray:
    """(H, W) int64 instance map from a CPM-15 ASCII mask."""
    try:
        text = path.read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFormatError(path, f"cannot read the ASCII mask ({R.one_line(exc)})") from None
    head, _, rest = text.partition("\n")
    try:
        w, h = (int(t) for t in head.split())
    except ValueError:
        raise InputFormatError(path, f"first line must be 'width height', got {head.strip()[:40]!r}") from None
    try:
        vals = np.array(rest.split(), dtype=np.int64)
    except ValueError:
        raise InputFormatError(path, "holds a pixel label that is not an integer") from None
    if vals.size != w * h:
        raise InputFormatError(path, f"holds {vals.size} pixel labels, expected {w} x {h} = {w * h} (truncated?)")
    if vals.size and vals.min() < 0:
        raise InputFormatError(path, "holds negative pixel labels")
    return vals.reshape(h, w)


def plan_units(path: Path) -> list[UnitPlan]:
    if not path.exists():
        raise InputNotFoundError(path, "path does not exist")
    pairs = _cpm15_pairs(path)
    if pairs:
        readme = path / "README_training.txt"
        mags = magnifications(readme) if readme.is_file() else {}
        files = [p for pair in pairs for p in pair] + ([readme] if readme.is_file() else [])

        parts = tuple(UnitPart(partial(_read15, img, txt, mags.get(img.stem.lower()), path), f"{txt}, {img}")
                      for img, txt in pairs)
        return [UnitPlan(unit=f"cpm-{path.name}", n_images=len(pairs), origin=str(path),
                         fingerprint=files_fingerprint(files), parts=parts)]
    splits = _cpm17_splits(path)
    if not splits:
        raise InputNotFoundError(path, "holds no CPM data (expected imageXX.png + imageXX_mask.txt, or "
                                       "train|test/Images/*.png + Labels/*.mat)")
    plans = []
    for split, folder in splits:
        pairs17 = []
        for img in R.image_files(folder / "Images"):
            mat = folder / "Labels" / f"{img.stem}.mat"
            if not mat.is_file():
                raise InputNotFoundError(mat, f"label file of {img.name} not found")
            pairs17.append((img, mat))

        parts17 = tuple(UnitPart(partial(_read17, img, mat, split, folder.parent, k == 0), f"{mat}, {img}")
                        for k, (img, mat) in enumerate(pairs17))
        plans.append(UnitPlan(unit=f"cpm-{split}", n_images=len(pairs17), origin=str(folder),
                              fingerprint=files_fingerprint([p for pair in pairs17 for p in pair]), parts=parts17))
    return plans


def _read15(img: Path, txt: Path, mag: int | None, root: Path, report: IngestReport) -> Iterator[SourceImage]:
    """One CPM-15 image, as a part of its unit (``curate ingest --jobs``)."""
    if mag is None:
        report.warn(f"{img}: no magnification in README_training.txt; pixel size {DEFAULT_MPP} µm assumed")
    mpp = MPP_BY_MAGNIFICATION.get(mag, DEFAULT_MPP) if mag else DEFAULT_MPP
    yield _convert(img, txt, read_mask_txt(txt), split="train", root=root, mpp=mpp, report=report)


def _read17(img: Path, mat: Path, split: str, root: Path, first: bool, report: IngestReport) -> Iterator[SourceImage]:
    """One CPM-17 image, as a part of its unit; the first part warns once for the split."""
    if first:
        report.warn(f"{root}: CPM-17 does not state pixel sizes; {DEFAULT_MPP} µm assumed")
    raw = R.instance_ids(R.load_mat(mat, ("inst_map",))["inst_map"], mat)
    yield _convert(img, mat, raw, split=split, root=root, mpp=DEFAULT_MPP, report=report, key=f"{split}/{img.stem}")


def _convert(img: Path, lab: Path, raw: np.ndarray, *, split: str, root: Path, mpp: float,
             report: IngestReport, key: str | None = None) -> SourceImage:
    image = R.read_rgb(img, report)
    R.check_same_size(image, raw, img, lab)
    instances, ids = R.relabel(raw)
    pieces = R.count_pieces(instances, ids.size)
    if pieces:
        report.count("instances_in_pieces", pieces)
    report.count("images")
    report.count("nuclei", ids.size)
    out = SourceImage(
        key=key or img.stem, split=split, image=image, instances=instances, nuclei=R.nuclei_table(ids, [LABEL] * ids.size),
        origin_file=img.relative_to(root).as_posix(), origin_index=-1, mpp=mpp, patient_id=None, tissue=None,
        annotation_file=lab.relative_to(root).as_posix(),
    )
    out.validate()
    return out

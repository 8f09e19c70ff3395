"""Read Lizard (Graham et al. 2021) and its CoNIC patches into :class:`SourceImage` records.

Layouts:

* Lizard: image folders (``Lizard_Images1/``, ``Lizard_Images2/``, anywhere under ``path``) of
  ``<name>.png`` and a ``Labels/`` folder of ``<name>.mat`` holding ``inst_map`` (H, W), ``id``
  (N, 1: the instance ids, in the order of the other per-nucleus arrays) and ``class`` (N, 1);
  ``info.csv`` (``Filename``, ``Source``, ``Split``) next to ``Labels/`` gives the split (``fold1``..
  ``fold3``); without it every image is ``train``. One unit: ``lizard-images``.
* CoNIC: ``images.npy`` (N, 256, 256, 3) uint8 and ``labels.npy`` (N, 256, 256, 2) (channel 0 the
  instance map, channel 1 the class map) in one folder, with ``patch_info.csv`` (one patch name
  ``<image>-<k>`` per row) when present: keys ``<image>/<k>``, so patches of one Lizard image share
  a cross-validation group. A nucleus's class is the class map's most frequent value on its pixels
  (pixels that disagree are counted in ``class_map_disagreement_pixels``). One unit: ``lizard-conic``.

Classes (Lizard ids): 1 Neutrophil, 2 Epithelial, 3 Lymphocyte, 4 Plasma, 5 Eosinophil,
6 Connective. Pixel size 0.5 µm (20×; the files do not state it).
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ..errors import InputFormatError, InputNotFoundError
from . import _readers as R
from .records import IngestReport, SourceImage, UnitPart, UnitPlan, files_fingerprint

LIZARD_MPP = 0.5
CLASSES = {1: "Neutrophil", 2: "Epithelial", 3: "Lymphocyte", 4: "Plasma", 5: "Eosinophil", 6: "Connective"}


# -- discovery --------------------------------------------------------------------------------
def _labels_dir(path: Path) -> Path | None:
    for d in [path, *sorted(p for p in path.rglob("Labels") if p.is_dir())]:
        if d.name == "Labels" and any(d.glob("*.mat")):
            return d
    return None


def _conic(path: Path) -> bool:
    return (path / "images.npy").is_file() and (path / "labels.npy").is_file()


def looks_like(path: Path) -> bool:
    try:
        if not path.is_dir():
            return False
        if _conic(path):
            return True
        labels = _labels_dir(path)
        return labels is not None and (labels.parent / "info.csv").is_file() or any(
            p.name.lower().startswith("lizard_images") for p in path.iterdir())
    except OSError:
        return False


def _read_info(path: Path) -> dict[str, str]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputFormatError(path, f"cannot read info.csv ({R.one_line(exc)})") from None
    out = {}
    for r in rows:
        if "Filename" not in r or "Split" not in r:
            raise InputFormatError(path, "info.csv needs the columns Filename and Split")
        out[r["Filename"].strip()] = f"fold{int(float(r['Split']))}"
    return out


def plan_units(path: Path) -> list[UnitPlan]:
    if not path.exists():
        raise InputNotFoundError(path, "path does not exist")
    if _conic(path):
        return [_conic_plan(path)]
    labels = _labels_dir(path)
    if labels is None:
        raise InputNotFoundError(path, "holds no Lizard data (expected Labels/*.mat) nor CoNIC images.npy + labels.npy")
    images = {p.stem: p for p in sorted(path.rglob("*.png")) if p.parent != labels}
    info_path = labels.parent / "info.csv"
    splits = _read_info(info_path) if info_path.is_file() else {}
    pairs = []
    for mat in sorted(labels.glob("*.mat")):
        img = images.get(mat.stem)
        if img is None:
            raise InputNotFoundError(mat, f"no image {mat.stem}.png for this label file under {path}")
        pairs.append((img, mat))
    files = [p for pair in pairs for p in pair] + ([info_path] if info_path.is_file() else [])

    parts = tuple(UnitPart(partial(_read_image_part, img, mat, splits.get(img.stem, "train"), path), f"{mat}, {img}")
                  for img, mat in pairs)
    return [UnitPlan(unit="lizard-images", n_images=len(pairs), origin=str(path),
                     fingerprint=files_fingerprint(files), parts=parts)]


def _read_image_part(img: Path, mat: Path, split: str, root: Path, report: IngestReport) -> Iterator[SourceImage]:
    """One Lizard image, as a part of its unit (``curate ingest --jobs``)."""
    data = R.load_mat(mat, ("inst_map", "id", "class"))
    yield _lizard_image(img, mat, data, split=split, root=root, report=report)


# -- Lizard .mat ------------------------------------------------------------------------------
def _column(data: dict, key: str, path: Path) -> np.ndarray:
    a = np.asarray(data[key])
    if a.dtype.kind not in "biuf" or a.ndim > 2 or (a.ndim == 2 and 1 not in a.shape and a.size):
        raise InputFormatError(path, f"{key} must be an (N, 1) integer array, got {a.shape} {a.dtype}")
    return a.reshape(-1).astype(np.int64)


def _lizard_image(img: Path, mat: Path, data: dict, *, split: str, root: Path, report: IngestReport) -> SourceImage:
    raw = R.instance_ids(data["inst_map"], mat)
    image = R.read_rgb(img, report)
    R.check_same_size(image, raw, img, mat)
    ids_col, cls_col = _column(data, "id", mat), _column(data, "class", mat)
    if ids_col.size != cls_col.size:
        raise InputFormatError(mat, f"id has {ids_col.size} rows, class has {cls_col.size}")
    instances, ids = R.relabel(raw)
    by_id = dict(zip(ids_col.tolist(), cls_col.tolist()))
    missing = [int(i) for i in ids if int(i) not in by_id]
    if missing:
        raise InputFormatError(mat, f"inst_map ids {missing[:5]} have no row in id/class")
    extra = set(by_id) - set(ids.tolist())
    if extra:
        report.count("ids_without_pixels", len(extra))
    names = _names([by_id[int(i)] for i in ids], mat)
    return _record(img.stem, split, image, instances, ids, names, img.relative_to(root).as_posix(),
                   mat.relative_to(root).as_posix(), -1, report)


def _names(classes: list[int], path: Path) -> list[str]:
    bad = sorted(set(classes) - set(CLASSES))
    if bad:
        raise InputFormatError(path, f"class ids {bad} are not Lizard classes (1..6)")
    return [CLASSES[c] for c in classes]


def _record(key: str, split: str, image: np.ndarray, instances: np.ndarray, ids: np.ndarray, names: list[str],
            origin: str, annotation: str, index: int, report: IngestReport) -> SourceImage:
    pieces = R.count_pieces(instances, ids.size)
    if pieces:
        report.count("instances_in_pieces", pieces)
    report.count("images")
    report.count("nuclei", ids.size)
    out = SourceImage(key=key, split=split, image=image, instances=instances, nuclei=R.nuclei_table(ids, names),
                      origin_file=origin, origin_index=index, mpp=LIZARD_MPP, patient_id=None, tissue="Colon",
                      annotation_file=annotation)
    out.validate()
    return out


# -- CoNIC .npy -------------------------------------------------------------------------------
def _open_npy(path: Path, ndim_shape: str) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputFormatError(path, f"not a readable .npy file, truncated? ({R.one_line(exc)})") from None
    if arr.dtype.kind not in "biu":
        raise InputFormatError(path, f"must hold integers, got dtype {arr.dtype}")
    return arr


def _conic_plan(folder: Path) -> UnitPlan:
    images = _open_npy(folder / "images.npy", "N,H,W,3")
    labels = _open_npy(folder / "labels.npy", "N,H,W,2")
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise InputFormatError(folder / "images.npy", f"must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    if labels.ndim != 4 or labels.shape[3] != 2:
        raise InputFormatError(folder / "labels.npy", f"must be (N, H, W, 2), got {labels.shape}")
    if labels.shape[:3] != images.shape[:3]:
        raise InputFormatError(folder / "labels.npy", f"labels are {labels.shape[:3]} (N, H, W), images.npy is "
                                                      f"{images.shape[:3]}")
    info = folder / "patch_info.csv"
    names: list[str] | None = None
    if info.is_file():
        with open(info, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if r]
        if rows and not rows[0][0].split("-")[-1].isdigit():
            rows = rows[1:]  # header
        names = [r[0].strip() for r in rows]
        if len(names) != images.shape[0]:
            raise InputFormatError(info, f"has {len(names)} patches, images.npy has {images.shape[0]}")
    n, h, w = images.shape[:3]
    files = [folder / "images.npy", folder / "labels.npy"] + ([info] if names is not None else [])

    parts = tuple(UnitPart(_ConicRange(folder, k, min(k + PART_PATCHES, n), (images, labels, names)),
                           f"{folder / 'images.npy'}, {folder / 'labels.npy'}")
                  for k in (range(0, n, PART_PATCHES) or [0]))
    return UnitPlan(unit="lizard-conic", n_images=n, origin=str(folder), fingerprint=files_fingerprint(files),
                    parts=parts, stacked=(n, h, w))


#: Patches per part of the CoNIC unit converted by one ingest worker (one store shard).
PART_PATCHES = 64


@functools.lru_cache(maxsize=2)
def _open_conic(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    plan = _conic_plan(folder)  # checks again, in the worker; the files were fingerprinted before
    rng = plan.parts[0].read
    assert isinstance(rng, _ConicRange) and rng.opened is not None
    return rng.opened


@dataclass
class _ConicRange:
    """Patches ``start:stop`` of a CoNIC folder, as a part of its unit. Pickles as the folder and
    the range; a worker process opens the arrays itself (once, cached)."""

    folder: Path
    start: int
    stop: int
    opened: tuple[np.ndarray, np.ndarray, list[str] | None] | None = None

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "opened": None}

    def __call__(self, report: IngestReport) -> Iterator[SourceImage]:
        images, labels, names = self.opened if self.opened is not None else _open_conic(self.folder)
        return _conic_patches(self.folder, images, labels, names, self.start, self.stop, report)


def _conic_patches(folder: Path, images: np.ndarray, labels: np.ndarray, names: list[str] | None, start: int,
                   stop: int, report: IngestReport) -> Iterator[SourceImage]:
    if start == 0 and names is None:
        report.warn(f"{folder}: no patch_info.csv; each patch is its own cross-validation group")
    for i in range(start, stop):
        lab = np.asarray(labels[i])
        raw = lab[..., 0].astype(np.int64)
        instances, ids = R.relabel(raw)
        cls = lab[..., 1].astype(np.int64)
        classes = []
        disagree = 0
        if ids.size:
            flat_i, flat_c = instances.ravel(), cls.ravel()
            fg = flat_i > 0
            counts = np.zeros((ids.size + 1, 7), np.int64)
            np.add.at(counts, (flat_i[fg], np.clip(flat_c[fg], 0, 6)), 1)
            if (flat_c[fg] > 6).any() or (flat_c[fg] < 0).any():
                raise InputFormatError(folder / "labels.npy", f"patch {i}: class map holds ids outside 0..6")
            best = counts[1:, 1:].argmax(axis=1) + 1
            if (counts[1:, 1:].max(axis=1) == 0).any():
                raise InputFormatError(folder / "labels.npy", f"patch {i}: a nucleus has class 0 on all its pixels")
            classes = best.tolist()
            disagree = int(counts[1:].sum() - counts[1:][np.arange(ids.size), best].sum())
        if disagree:
            report.count("class_map_disagreement_pixels", disagree)
        key = f"{i:05d}"
        if names is not None:
            base, _, k = names[i].rpartition("-")
            key = f"{base}/{k}" if base else names[i]
        yield _record(key, "train", np.ascontiguousarray(images[i]), instances, ids,
                      _names(classes, folder / "labels.npy"), "images.npy", "labels.npy", i, report)

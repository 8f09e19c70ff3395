"""Read CoNSeP (Graham et al. 2019, HoVer-Net) into :class:`SourceImage` records.

Layouts (both found by :func:`looks_like`):

* the release: ``<root>/{Train,Test}/Images/<name>.png`` + ``Labels/<name>.mat``, the ``.mat``
  holding ``inst_map`` (H, W), ``type_map`` (H, W), ``inst_type`` (N, 1) and ``inst_centroid``
  (N, 2, x y). ``<root>`` may also be one ``Train``/``Test`` folder, or hold a ``CoNSeP`` folder
  (what the release zip unpacks to). One unit per split: ``consep-train``, ``consep-test``.
* the patch layout (HoVer-Net style tiles, e.g. the fixtures): ``images/<name>.{png,jpg}``,
  ``inst/<name>.npy`` (int instance map with the original, non-contiguous ids) and
  ``type_mat/<name>.mat`` (``inst_type``, ``inst_centroid``). Patch names ``<slide>_<k>``
  (``test_1_003``) become keys ``<slide>/<k>``; the split is the name's prefix (``train``/``test``).
  One unit per folder: ``consep-patches-<folder name>``.

Conversion rules:

* ``inst_type`` row k belongs to instance id k+1 when the map's ids are 1..N; otherwise (patch
  maps with gaps) to the k-th smallest id. Any other length is an error naming the file.
* Classes (``classes`` option): ``original`` = the 7 CoNSeP types (1 other, 2 inflammatory,
  3 healthy epithelial, 4 dysplastic/malignant epithelial, 5 fibroblast, 6 muscle, 7 endothelial);
  ``merged`` = the common 4-class merge (1 other, 2 inflammatory, 3 epithelial = 3+4,
  4 spindle-shaped = 5+6+7); original ids given with ``merged`` are merged. Default: ``original``
  for the release layout, ``merged`` for patches (HoVer-Net's patch exports are merged).
* Ids are renumbered 1..n in ascending original id; the original id is kept in
  ``origin_instance``. Instances in several pieces (they occur) stay one instance (counted as
  ``instances_in_pieces``); pixels where ``type_map`` disagrees with ``inst_type`` are counted
  (``type_map_disagreement_pixels``), never fatal.
* Pixel size: :data:`CONSEP_MPP` (the images are 40× scans; the files do not state it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from functools import partial

import numpy as np

from ..errors import ConfigError, InputFormatError, InputNotFoundError
from . import _readers as R
from .records import IngestReport, SourceImage, UnitPart, UnitPlan, files_fingerprint

CONSEP_MPP = 0.25
ORIGINAL_CLASSES = {1: "other", 2: "inflammatory", 3: "healthy epithelial", 4: "dysplastic/malignant epithelial",
                    5: "fibroblast", 6: "muscle", 7: "endothelial"}
MERGED_CLASSES = {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle-shaped"}
#: original type id -> merged type id
MERGE = {1: 1, 2: 2, 3: 3, 4: 3, 5: 4, 6: 4, 7: 4}
SCHEMES = ("original", "merged")
_SPLIT_DIRS = {"train": "train", "test": "test"}
_PATCH = re.compile(r"^(?P<slide>.+)_(?P<k>\d+)$")


# -- discovery --------------------------------------------------------------------------------
def _child(folder: Path, name: str) -> Path | None:
    """A child folder named ``name``, case-insensitively."""
    if not folder.is_dir():
        return None
    for c in folder.iterdir():
        if c.is_dir() and c.name.lower() == name.lower():
            return c
    return None


def _split_folders(root: Path) -> list[tuple[str, Path]]:
    """(split, folder with Images/ and Labels/) pairs under ``root``."""
    if _child(root, "images") and _child(root, "labels"):
        return [(_SPLIT_DIRS.get(root.name.lower(), "train"), root)]
    out = []
    for base in (root, _child(root, "consep")):
        if base is None:
            continue
        for name, split in _SPLIT_DIRS.items():
            d = _child(base, name)
            if d is not None and _child(d, "images") and _child(d, "labels"):
                out.append((split, d))
        if out:
            break
    return out


def _is_patch_layout(root: Path) -> bool:
    return bool(_child(root, "images") and _child(root, "inst") and _child(root, "type_mat"))


def looks_like(path: Path) -> bool:
    """The patch layout, or Train/Test folders whose first .mat has ``inst_type`` (CPM-17's has not)."""
    try:
        if not path.is_dir():
            return False
        if _is_patch_layout(path):
            return True
        for _split, folder in _split_folders(path):
            labels = _child(folder, "labels")
            mat = R.first_mat(labels) if labels is not None else None
            return mat is not None and "inst_type" in R.mat_keys(mat)
        return False
    except OSError:
        return False


def plan_units(path: Path, *, classes: str | None = None) -> list[UnitPlan]:
    """Find every image with its label file; nothing is decoded yet (see the module doc)."""
    if classes is not None and classes not in SCHEMES:
        raise ConfigError(f"classes must be one of {', '.join(SCHEMES)}, got {classes!r}")
    if not path.exists():
        raise InputNotFoundError(path, "path does not exist")
    if _is_patch_layout(path):
        return [_patch_plan(path, classes or "merged")]
    folders = _split_folders(path)
    if not folders:
        raise InputNotFoundError(path, "holds no CoNSeP data (expected Train|Test/Images/*.png + Labels/*.mat, "
                                       "or images/ + inst/ + type_mat/)")
    return [_release_plan(split, folder, classes or "original") for split, folder in folders]


def _pairs(images: Path, labels: Path, suffix: str) -> list[tuple[Path, Path]]:
    pairs = []
    for img in R.image_files(images):
        lab = labels / f"{img.stem}{suffix}"
        if not lab.is_file():
            raise InputNotFoundError(lab, f"label file of {img.name} not found")
        pairs.append((img, lab))
    if not pairs:
        raise InputNotFoundError(images, "holds no image")
    return pairs


def _release_plan(split: str, folder: Path, scheme: str) -> UnitPlan:
    images, labels = _child(folder, "images"), _child(folder, "labels")
    assert images is not None and labels is not None
    pairs = _pairs(images, labels, ".mat")
    root = folder.parent

    parts = tuple(UnitPart(partial(_read_release_image, img, lab, scheme, split, root), f"{lab}, {img}")
                  for img, lab in pairs)
    return UnitPlan(unit=f"consep-{split}", n_images=len(pairs), origin=str(folder),
                    fingerprint=files_fingerprint([p for pair in pairs for p in pair]), parts=parts)


def _read_release_image(img: Path, lab: Path, scheme: str, split: str, root: Path,
                        report: IngestReport) -> Iterator[SourceImage]:
    """One image of a release split, as a part of its unit (``curate ingest --jobs``)."""
    data = R.load_mat(lab, ("inst_map", "inst_type"))
    yield _convert(img, lab, R.instance_ids(data["inst_map"], lab), data["inst_type"],
                   data.get("type_map"), scheme, split=split, key=img.stem, root=root, report=report)


def _patch_plan(folder: Path, scheme: str) -> UnitPlan:
    images, inst, types = _child(folder, "images"), _child(folder, "inst"), _child(folder, "type_mat")
    assert images is not None and inst is not None and types is not None
    pairs = _pairs(images, inst, ".npy")
    mats = []
    for img, _ in pairs:
        mat = types / f"{img.stem}.mat"
        if not mat.is_file():
            raise InputNotFoundError(mat, f"type file of {img.name} not found")
        mats.append(mat)

    parts = tuple(UnitPart(partial(_read_patch, img, npy, mat, scheme, folder), f"{npy}, {mat}, {img}")
                  for (img, npy), mat in zip(pairs, mats))
    return UnitPlan(unit=f"consep-patches-{folder.name}", n_images=len(pairs), origin=str(folder),
                    fingerprint=files_fingerprint([p for pair in pairs for p in pair] + mats), parts=parts)


def _read_patch(img: Path, npy: Path, mat: Path, scheme: str, folder: Path,
                report: IngestReport) -> Iterator[SourceImage]:
    """One patch of the patch layout, as a part of its unit (``curate ingest --jobs``)."""
    try:
        raw = np.load(npy, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputFormatError(npy, f"not a readable .npy file, truncated? ({R.one_line(exc)})") from None
    data = R.load_mat(mat, ("inst_type",))
    m = _PATCH.match(img.stem)
    key = f"{m.group('slide')}/{m.group('k')}" if m else img.stem
    split = "test" if img.stem.lower().startswith("test") else "train"
    yield _convert(img, mat, R.instance_ids(raw, npy), data["inst_type"], None, scheme,
                   split=split, key=key, root=folder, report=report, label_file=npy)


# -- conversion -------------------------------------------------------------------------------
def type_names(types: np.ndarray, scheme: str, path: Path) -> list[str]:
    """Class names of CoNSeP type ids under ``scheme`` (``original`` ids given as ``merged`` are merged)."""
    table = ORIGINAL_CLASSES if scheme == "original" else MERGED_CLASSES
    if scheme == "merged" and types.size and int(types.max()) > 4:
        types = np.vectorize(lambda t: MERGE.get(int(t), -1))(types)
    bad = sorted({int(t) for t in types.tolist()} - set(table))
    if bad:
        raise InputFormatError(path, f"inst_type holds {bad}, not a {scheme} CoNSeP type id ({min(table)}..{max(table)})")
    return [table[int(t)] for t in types.tolist()]


def _convert(img: Path, lab: Path, raw: np.ndarray, inst_type: object, type_map: object, scheme: str, *,
             split: str, key: str, root: Path, report: IngestReport, label_file: Path | None = None) -> SourceImage:
    label_file = label_file or lab
    image = R.read_rgb(img, report)
    R.check_same_size(image, raw, img, label_file)
    instances, ids = R.relabel(raw)
    types = np.asarray(inst_type)
    if types.dtype.kind not in "biuf" or (types.ndim == 2 and types.shape[1] != 1) or types.ndim > 2:
        raise InputFormatError(lab, f"inst_type must be (N, 1) integers, got {types.shape} {types.dtype}")
    types = types.reshape(-1)
    if types.dtype.kind == "f" and not np.array_equal(types, np.round(types)):
        raise InputFormatError(lab, "inst_type holds values that are not integers")
    types = types.astype(np.int64)
    n = ids.size
    if n and types.size == int(ids.max()) and types.size != n:
        per_instance = types[ids - 1]  # rows indexed by id - 1 (ids with gaps in a 1..N table)
    elif types.size == n:
        per_instance = types  # row k = k-th smallest id (1..N, or a patch map with gaps)
    else:
        raise InputFormatError(lab, f"inst_type has {types.size} rows but {label_file.name} holds {n} instances "
                                    f"(largest id {int(ids.max()) if n else 0})")
    names = type_names(per_instance, scheme, lab)
    if type_map is not None:
        tm = np.asarray(type_map)
        if tm.shape == instances.shape and n:
            expect = np.concatenate([[0], per_instance])[instances]
            report.count("type_map_disagreement_pixels", int(np.count_nonzero((tm != expect) & (instances > 0))))
    pieces = R.count_pieces(instances, n)
    if pieces:
        report.count("instances_in_pieces", pieces)
    report.count("images")
    report.count("nuclei", n)
    out = SourceImage(
        key=key, split=split, image=image, instances=instances, nuclei=R.nuclei_table(ids, names),
        origin_file=img.relative_to(root).as_posix(), origin_index=-1, mpp=CONSEP_MPP,
        patient_id=None, tissue="Colon", annotation_file=label_file.relative_to(root).as_posix(),
    )
    out.validate()
    return out

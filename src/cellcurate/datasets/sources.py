"""The registry of source readers: everything source-specific about a dataset, in one entry.

A dataset is one reader module (yielding :class:`~cellcurate.datasets.records.SourceImage`
through :class:`~cellcurate.datasets.records.UnitPlan`) plus one :class:`SourceSpec` in
:data:`BUILTIN` (or, for a third-party package, one entry point in the group
``cellcurate.sources`` that resolves to a :class:`SourceSpec`). The entry carries:

* ``name`` (the ``source`` column, the ``curate ingest NAME`` command, the prefix of image ids);
* ``reader``: ``"module"``; the module defines ``looks_like(path) -> bool`` (cheap release-folder
  detection, never raises) and ``plan_units(path, **options) -> list[UnitPlan]``;
* ``labels``: the source's class names and their default mapping into the taxonomy (a list of
  class names, ``"ignore"``, or ``"*"`` = every class of the store's taxonomy, used by
  instance-only sources whose only label is :data:`UNKNOWN_LABEL`). A store's ``taxonomy.json``
  that maps the source wins; otherwise this mapping is used (so adding a reader needs no
  taxonomy edit);
* ``licence`` and ``attribution`` (written into a release's manifest and card for the sources it
  holds);
* ``group_by``: how nuclei are grouped for cross-validation (``"split"``, ``"patient"``,
  ``"patient_or_split"``, ``"slide"`` = the ``slide`` part of the image key before
  ``slide_separator``);
* ``splits``: the source's own split names -> release split (keyed by source, so another source's
  ``fold1`` never joins PanNuke's); ``val_from_train``: whether the release draws ``val`` from this
  source's ``train`` groups;
* ``downloads``: files ``curate download NAME`` fetches (URL, SHA-256, where to unpack).

Adding a reader: write ``datasets/<name>.py`` and add one ``SourceSpec`` to :data:`BUILTIN`
(docs/ARCHITECTURE.md shows CoNSeP as the worked example). No other file changes.

>>> get_source("consep").splits["test"]
'test'
>>> [s.name for s in installed_sources()][:2]
['pannuke', 'monusac']
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from ..errors import ConfigError, InputNotFoundError

ENTRY_POINT_GROUP = "cellcurate.sources"
#: Label of every nucleus of an instance-only source; maps to all classes ("*").
UNKNOWN_LABEL = "unknown nucleus"
ALL_CLASSES = "*"
CC_BY_NC_SA = "CC BY-NC-SA 4.0"

GroupBy = Literal["split", "patient", "patient_or_split", "slide"]
LabelTarget = list[str] | str


@dataclass(frozen=True)
class DownloadFile:
    """One file of a source's release for ``curate download``.

    ``sha256`` is the published/pinned digest, or ``None`` where it could not be verified (then the
    download refuses to run unless ``--sha256`` is given; never a guessed value). ``unpack_to`` is
    the folder (relative to ``--to``) the zip is unpacked into; ``strip`` leading path components
    of the archive members are dropped first.
    """

    url: str
    filename: str
    sha256: str | None
    unpack_to: str = "."
    strip: int = 0
    size: int | None = None
    note: str = ""


@dataclass(frozen=True)
class OptionSpec:
    """A reader option exposed as ``curate ingest NAME --<name>`` (string choices only)."""

    name: str
    choices: tuple[str, ...] | None
    help: str
    default: str | None = None


@dataclass(frozen=True)
class SourceSpec:
    name: str
    title: str
    reader: str  # module path, imported lazily
    labels: Mapping[str, LabelTarget]
    licence: str
    attribution: str
    group_by: GroupBy = "patient_or_split"
    splits: Mapping[str, str] = field(default_factory=dict)
    val_from_train: bool = True
    progress_unit: str = "image"
    description: str = ""
    options: tuple[OptionSpec, ...] = ()
    downloads: Mapping[str, tuple[DownloadFile, ...]] = field(default_factory=dict)
    slide_separator: str = ""
    origin: str = "cellcurate"
    detect_order: int = 100  # lower is tried first by detect_source (more specific layouts first)

    def module(self) -> ModuleType:
        try:
            return importlib.import_module(self.reader)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"source {self.name!r}: cannot import its reader {self.reader!r} ({exc})") from None

    def looks_like(self, path: str | Path) -> bool:
        try:
            return bool(self.module().looks_like(Path(path)))
        except ConfigError:
            return False

    def plan_units(self, path: str | Path, **options: Any) -> list[Any]:
        return list(self.module().plan_units(Path(path), **options))

    def release_split(self, source_split: str) -> str:
        """The release split of one of this source's own splits (identity where unmapped)."""
        return self.splits.get(source_split, source_split)

    def group_key(self, patient: Any, split: Any, image_id: str) -> str:
        """Cross-validation group of a nucleus (without the ``<source>:`` prefix)."""
        has_patient = isinstance(patient, str) and bool(patient)
        if self.group_by == "split":
            return str(split)
        if self.group_by == "patient":
            return patient if has_patient else image_id
        if self.group_by == "slide":
            key = image_id.split("/", 1)[-1]
            return key.split(self.slide_separator)[0] if self.slide_separator else key
        return patient if has_patient else (split if isinstance(split, str) else image_id)


def _dl(url: str, filename: str, sha256: str | None, **kw: Any) -> DownloadFile:
    return DownloadFile(url=url, filename=filename, sha256=sha256, **kw)


# -- the built-in sources ------------------------------------------------------------------------
# Download pins. PanNuke (fold_1..3) and MoNuSAC (train/test) SHA-256: as pinned by torch-em
# (constantinpape/torch-em, torch_em/data/datasets/histopathology/{pannuke,monusac}.py); Lizard's
# three zips: as pinned by an earlier torch-em lizard.py. CoNSeP: no published checksum could be
# found (torch-em reads a Kaggle re-tiling instead), so it is None and `curate download consep`
# needs --sha256 from the user. None of these could be fetched here to re-check (no network).
_PANNUKE_SHA = {
    1: "6e19ad380300e8ce9480f9ab6a14cc91fa4b6a511609b40e3d70bdf9c881ed0b",
    2: "5bc540cc509f64b5f5a274d6e5a245527dbd3e6d3155d43555115c5d54709b07",
    3: "c14d372981c42f611ebc80afad01702b89cad8c1b3089daa31931cf5a4b1a39d",
}
_WARWICK = "https://warwick.ac.uk/fac/cross_fac/tia/data"
_GDRIVE = "https://drive.google.com/uc?export=download&id="

BUILTIN: tuple[SourceSpec, ...] = (
    SourceSpec(
        name="pannuke",
        title="PanNuke",
        reader="cellcurate.datasets.pannuke",
        description="PanNuke: a release root (`Fold 1/`, `Fold 2/`, ...) or one `Fold k` folder.",
        labels={
            "Neoplastic": ["Neoplastic"],
            "Inflammatory": ["Lymphocyte", "Macrophage", "Neutrophil"],
            "Connective": ["Connective"],
            "Dead": ["Dead"],
            "Epithelial": ["Epithelial"],
        },
        licence=CC_BY_NC_SA,
        attribution=(
            "PanNuke: Gamper et al., 'PanNuke: an open pan-cancer histology dataset for nuclei instance "
            "segmentation and classification', ECDP 2019, and Gamper et al., arXiv:2003.10778 (2020). "
            "Licence CC BY-NC-SA 4.0."
        ),
        group_by="split",
        splits={"fold1": "fold1", "fold2": "fold2", "fold3": "fold3"},
        val_from_train=False,
        progress_unit="tile",
        options=(OptionSpec("overlap", ("highest", "lowest"), "Mask channel that wins a pixel claimed by two: "
                            "highest (official PanNuke evaluation) or lowest (the rule before issue 10). "
                            "Recorded in the unit's report.json.", default="highest"),),
        downloads={
            f"fold{k}": (_dl(f"{_WARWICK}/pannuke/fold_{k}.zip", f"fold_{k}.zip", sha),)
            for k, sha in _PANNUKE_SHA.items()
        },
    ),
    SourceSpec(
        name="monusac",
        title="MoNuSAC",
        reader="cellcurate.datasets.monusac",
        description="MoNuSAC: training/testing release folders, both, or one patient folder.",
        labels={
            "Epithelial": ["Neoplastic", "Epithelial"],
            "Lymphocyte": ["Lymphocyte"],
            "Macrophage": ["Macrophage"],
            "Neutrophil": ["Neutrophil"],
            "Ambiguous": "ignore",
        },
        licence=CC_BY_NC_SA,
        attribution=(
            "MoNuSAC: Verma et al., 'MoNuSAC2020: A Multi-organ Nuclei Segmentation and Classification "
            "Challenge', IEEE TMI 40(12), 2021. Licence CC BY-NC-SA 4.0."
        ),
        group_by="patient",
        splits={"train": "train", "test": "test"},
        options=(OptionSpec("split", ("train", "test"), "Override the split inferred from the folder name."),),
        downloads={
            "train": (_dl(f"{_GDRIVE}1lxMZaAPSpEHLSxGA9KKMt_r-4S8dwLhq", "MoNuSAC_images_and_annotations.zip",
                          "5b7cbeb34817a8f880d3fddc28391e48d3329a91bf3adcbd131ea149a725cd92"),),
            "test": (_dl(f"{_GDRIVE}1G54vsOdxWY1hG7dzmkeK3r0xz9s-heyQ", "MoNuSAC Testing Data and Annotations.zip",
                         "bcbc38f6bf8b149230c90c29f3428cc7b2b76f8acd7766ce9fc908fc896c2674"),),
        },
    ),
    SourceSpec(
        name="consep",
        title="CoNSeP",
        reader="cellcurate.datasets.consep",
        description="CoNSeP: a folder holding `Train/` and/or `Test/` (Images/*.png, Labels/*.mat), "
                    "or the patch layout (images/, inst/, type_mat/).",
        labels={  # the original 7 classes of CoNSeP's type_map (HoVer-Net, Graham et al. 2019)
            "other": ALL_CLASSES,  # CoNSeP's "other" is a catch-all: relabeling decides
            "inflammatory": ["Lymphocyte", "Macrophage", "Neutrophil"],
            "healthy epithelial": ["Epithelial"],
            "dysplastic/malignant epithelial": ["Neoplastic"],
            "fibroblast": ["Connective"],
            "muscle": ["Connective"],
            "endothelial": ["Connective"],
            # the common 4-class merge (classes 3+4 -> epithelial, 5+6+7 -> spindle-shaped)
            "epithelial": ["Neoplastic", "Epithelial"],
            "spindle-shaped": ["Connective"],
        },
        licence="research use; terms as stated by the CoNSeP release (Warwick TIA)",
        attribution=(
            "CoNSeP: Graham et al., 'HoVer-Net: Simultaneous segmentation and classification of nuclei in "
            "multi-tissue histology images', Medical Image Analysis 58, 2019."
        ),
        group_by="slide",
        slide_separator="/",
        splits={"train": "train", "test": "test"},
        options=(OptionSpec("classes", ("original", "merged"), "Class scheme of type ids: the original 7 "
                            "or the 4-class merge (default: original for Train/Test, merged for patches).",),),
        downloads={"all": (_dl(f"{_WARWICK}/hovernet/consep_dataset.zip", "consep_dataset.zip", None),)},
    ),
    SourceSpec(
        name="monuseg",
        title="MoNuSeg",
        reader="cellcurate.datasets.monuseg",
        description="MoNuSeg: a folder with Tissue Images/*.tif and Annotations/*.xml (training or test).",
        labels={UNKNOWN_LABEL: ALL_CLASSES},
        licence=CC_BY_NC_SA,
        attribution=(
            "MoNuSeg: Kumar et al., 'A multi-organ nucleus segmentation challenge', IEEE TMI 39(5), 2020, and "
            "Kumar et al., IEEE TMI 36(7), 2017. Licence CC BY-NC-SA 4.0."
        ),
        group_by="patient",
        splits={"train": "train", "test": "test"},
        detect_order=10,  # its Aperio XML would also pass MoNuSAC's cheap check
    ),
    SourceSpec(
        name="cpm",
        title="CPM-15/17",
        reader="cellcurate.datasets.cpm",
        description="CPM-15 / CPM-17: images with instance labels "
                    "(CPM-15 `*_mask.txt` ASCII, CPM-17 `Labels/*.mat`).",
        labels={UNKNOWN_LABEL: ALL_CLASSES},
        licence="research use; no licence stated by the CPM challenge release",
        attribution=(
            "CPM-15/17: Vu et al., 'Methods for segmentation and classification of digital microscopy tissue "
            "images', Frontiers in Bioengineering and Biotechnology 7, 2019."
        ),
        group_by="patient_or_split",
        splits={"train": "train", "test": "test"},
    ),
    SourceSpec(
        name="lizard",
        title="Lizard",
        reader="cellcurate.datasets.lizard",
        description="Lizard: images (*.png) with Labels/*.mat (inst_map, id, class); CoNIC: images.npy + labels.npy.",
        labels={
            "Neutrophil": ["Neutrophil"],
            "Epithelial": ["Neoplastic", "Epithelial"],
            "Lymphocyte": ["Lymphocyte"],
            "Plasma": ["Lymphocyte", "Macrophage", "Neutrophil"],
            "Eosinophil": ["Lymphocyte", "Macrophage", "Neutrophil"],
            "Connective": ["Connective"],
        },
        licence=CC_BY_NC_SA,
        attribution=(
            "Lizard / CoNIC: Graham et al., 'Lizard: a large-scale dataset for colonic nuclear instance "
            "segmentation and classification', ICCV Workshops 2021; Graham et al., 'CoNIC challenge', Medical "
            "Image Analysis 92, 2024. Licence CC BY-NC-SA 4.0."
        ),
        group_by="slide",
        slide_separator="/",
        splits={"fold1": "train", "fold2": "train", "fold3": "test", "train": "train"},
        downloads={"all": (
            _dl(f"{_WARWICK}/lizard/lizard_images1.zip", "lizard_images1.zip",
                "d2c4e7c83dff634624c9c14d4a1a0b821d4e9ac41e05e3b36303d8f0c510113d"),
            _dl(f"{_WARWICK}/lizard/lizard_images2.zip", "lizard_images2.zip",
                "9f529f30d9de66587167991a8bf75aaad07ce1d518b72e825c868ac7c33015ed"),
            _dl(f"{_WARWICK}/lizard/lizard_labels.zip", "lizard_labels.zip",
                "79f22ca83ca535682fba340cbc8bb66b74abd1ead4151ffc8593f204fcb97dec"),
        )},
    ),
)


# -- lookup -------------------------------------------------------------------------------------
_CACHE: dict[str, SourceSpec] | None = None


def _entry_point_specs() -> list[SourceSpec]:
    from importlib.metadata import entry_points

    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            spec = ep.load()
        except Exception as exc:  # a broken plug-in must not break `curate ingest`
            raise ConfigError(f"entry point {ep.name!r} of group {ENTRY_POINT_GROUP}: cannot load ({exc})") from None
        if callable(spec) and not isinstance(spec, SourceSpec):
            spec = spec()
        if not isinstance(spec, SourceSpec):
            raise ConfigError(f"entry point {ep.name!r} of group {ENTRY_POINT_GROUP} is not a SourceSpec")
        found.append(spec if spec.origin != "cellcurate" else _with_origin(spec, ep.value))
    return found


def _with_origin(spec: SourceSpec, origin: str) -> SourceSpec:
    from dataclasses import replace

    return replace(spec, origin=origin)


def installed_sources(*, refresh: bool = False) -> list[SourceSpec]:
    """Built-in sources, then those of installed packages (entry-point group ``cellcurate.sources``).

    A plug-in may not reuse a built-in name.
    """
    global _CACHE
    if _CACHE is None or refresh:
        specs: dict[str, SourceSpec] = {s.name: s for s in BUILTIN}
        for s in _entry_point_specs():
            if s.name in specs:
                raise ConfigError(f"source {s.name!r} from {s.origin} clashes with an installed source of that name")
            specs[s.name] = s
        _CACHE = specs
    return list(_CACHE.values())


def register(spec: SourceSpec) -> None:
    """Add a source at run time (tests, notebooks); entry points are the way for packages."""
    installed_sources()
    assert _CACHE is not None
    if spec.name in _CACHE:
        raise ConfigError(f"source {spec.name!r} is already installed")
    _CACHE[spec.name] = spec


def unregister(name: str) -> None:
    if _CACHE is not None and name in _CACHE and all(s.name != name for s in BUILTIN):
        del _CACHE[name]


def source_names() -> list[str]:
    return [s.name for s in installed_sources()]


def find_source(name: str) -> SourceSpec | None:
    for s in installed_sources():
        if s.name == name:
            return s
    return None


def get_source(name: str) -> SourceSpec:
    spec = find_source(name)
    if spec is None:
        raise ConfigError(f"unknown source {name!r}; installed: {', '.join(source_names())}")
    return spec


def detect_source(path: str | Path) -> str:
    """The name of the first installed source whose reader recognises ``path``."""
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(p, "path does not exist")
    for spec in sorted(installed_sources(), key=lambda s: s.detect_order):
        if spec.looks_like(p):
            return spec.name
    raise InputNotFoundError(p, f"holds no dataset an installed reader recognises ({', '.join(source_names())})")


def release_licence(sources: list[str]) -> str:
    """Licence line of a release holding ``sources`` (each distinct licence once, registry order)."""
    seen: list[str] = []
    for s in installed_sources():
        if s.name in sources and s.licence not in seen:
            seen.append(s.licence)
    return "; ".join(seen) if seen else CC_BY_NC_SA


def release_attribution(sources: list[str]) -> list[str]:
    """Attribution lines of a release holding ``sources``, in registry order."""
    return [s.attribution for s in installed_sources() if s.name in sources]

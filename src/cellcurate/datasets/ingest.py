"""Ingest a source's release files into a store: readers -> store units -> one ledger commit.

Units: one per PanNuke fold (``pannuke-fold1``) and one per MoNuSAC patient folder
(``monusac-train-TCGA-KK-A6E0-01Z-00-DX1``). A unit whose files (fingerprint) and taxonomy are
unchanged is skipped, so re-ingesting the same files is a no-op with the same nucleus ids; a unit
whose files changed is refused unless ``overwrite`` (which replaces it; nucleus ids stay the same
for the same origin references and the ledger keeps the history).

All units of one call are committed together in one ledger transaction: a bad file anywhere
leaves the store exactly as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputNotFoundError, StateError
from .records import IngestReport, SourceImage
from .store import PreparedUnit, Store, UnitSummary

ProgressFactory = Callable[..., Any]


@dataclass
class IngestResult:
    source: str
    units: list[UnitSummary] = field(default_factory=list)
    report: IngestReport = field(default_factory=IngestReport)

    @property
    def n_images(self) -> int:
        return sum(u.n_images for u in self.units if u.status != "unchanged")

    @property
    def n_nuclei(self) -> int:
        return sum(u.n_nuclei for u in self.units if u.status != "unchanged")

    def status_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for u in self.units:
            out[u.status] = out.get(u.status, 0) + 1
        return out


def _progress(progress: bool | ProgressFactory, **kwargs: Any) -> Any:
    if callable(progress):
        return progress(**kwargs)
    from tqdm.auto import tqdm

    return tqdm(disable=None if progress else True, **kwargs)


def _check_unit(store: Store, unit: str, fingerprint: str, overwrite: bool) -> str:
    status = store.unit_status(unit, fingerprint)
    if status == "changed" and not overwrite:
        raise StateError(
            f"{unit} is already in the store from other files or another taxonomy; "
            "use --overwrite to replace it (its review history is kept in the ledger)"
        )
    return status


def _write_unit(store: Store, unit: str, source: str, items: Iterable[SourceImage], *, fingerprint: str,
                origin: str, stacked: tuple[int, int, int] | None, overwrite: bool, report: IngestReport,
                bar: Any) -> PreparedUnit:
    with store.unit_writer(unit, source, fingerprint=fingerprint, origin=origin, stacked=stacked,
                           overwrite=overwrite) as writer:
        for item in items:
            writer.add(item)
            bar.update(1)
            bar.set_postfix_str(unit, refresh=False)
        return writer.prepare(report)


@contextlib.contextmanager
def _transaction(store: Store, result: IngestResult) -> Iterator[list[PreparedUnit]]:
    """Hold the store's write lock while units are prepared into the yielded list; commit them all
    in one ledger transaction at the end, or discard every prepared folder on any error."""
    prepared: list[PreparedUnit] = []
    with store.write_lock("ingest"):
        store.remove_orphans()
        try:
            yield prepared
        except BaseException:
            _discard(prepared)
            raise
        if prepared:
            result.units.extend(store.commit(prepared))


def ingest_pannuke(store: Store, path: str | Path, *, overwrite: bool = False,
                   progress: bool | ProgressFactory = True, overlap: str = "highest") -> IngestResult:
    """Ingest a PanNuke release root (all folds found) or one ``Fold k`` folder.

    ``overlap``: which mask channel wins a pixel claimed by several (``"highest"``, the official
    PanNuke evaluation's rule, or ``"lowest"``; see :mod:`cellcurate.datasets.pannuke`). It is
    recorded in each unit's ``report.json`` (``settings.pannuke_overlap``) and in the fold
    fingerprint, so re-ingesting with the other rule is a change that needs ``overwrite``.
    """
    from . import pannuke

    result = IngestResult("pannuke")
    folds = pannuke.discover_pannuke(path)
    plan = []
    for fold in folds:
        arrays = pannuke.open_fold(fold)  # validates headers, shapes and types.npy before any write
        unit = f"pannuke-fold{fold.fold}"
        fp = pannuke.fold_fingerprint(fold, overlap=overlap)  # type: ignore[arg-type]
        status = _check_unit(store, unit, fp, overwrite)
        if status == "unchanged" and not overwrite:
            result.units.append(UnitSummary(unit, "pannuke", "unchanged", arrays.n, _unit_nuclei(store, unit)))
            continue
        plan.append((fold, arrays, unit, fp))
    with _transaction(store, result) as prepared:
        total = sum(a.n for _, a, _, _ in plan)
        with _progress(progress, total=total, unit="tile", desc="PanNuke") as bar:
            for fold, arrays, unit, fp in plan:
                report = IngestReport(settings={"pannuke_overlap": overlap})
                items = pannuke.iter_pannuke_fold(arrays, report=report,  # already opened and validated
                                                  overlap=overlap)  # type: ignore[arg-type]
                h, w = arrays.images.shape[1:3]
                prepared.append(_write_unit(
                    store, unit, "pannuke", items, fingerprint=fp, origin=str(fold.folder),
                    stacked=(arrays.n, h, w), overwrite=overwrite, report=report, bar=bar))
                result.report.merge(report)
    return result


def ingest_monusac(store: Store, path: str | Path, *, split: str | None = None, overwrite: bool = False,
                   progress: bool | ProgressFactory = True) -> IngestResult:
    """Ingest MoNuSAC release folders (training and/or testing), or a single patient folder."""
    from . import monusac

    result = IngestResult("monusac")
    items = monusac.discover_monusac(path, split=split)
    by_unit: dict[str, list[Any]] = {}
    for it in items:
        by_unit.setdefault(f"monusac-{it.split}-{it.patient_folder}", []).append(it)
    plan = []
    for unit, unit_items in by_unit.items():
        fp = _files_fingerprint([p for it in unit_items for p in (it.xml, it.image)])
        status = _check_unit(store, unit, fp, overwrite)
        if status == "unchanged" and not overwrite:
            result.units.append(UnitSummary(unit, "monusac", "unchanged", len(unit_items), _unit_nuclei(store, unit)))
            continue
        plan.append((unit, unit_items, fp))
    with _transaction(store, result) as prepared:
        total = sum(len(u[1]) for u in plan)
        with _progress(progress, total=total, unit="image", desc="MoNuSAC") as bar:
            for unit, unit_items, fp in plan:
                report = IngestReport()
                stream = _read_each(unit_items, monusac.read_monusac_image, report)
                origin = str(unit_items[0].xml.parent)
                prepared.append(_write_unit(
                    store, unit, "monusac", stream, fingerprint=fp, origin=origin, stacked=None,
                    overwrite=overwrite, report=report, bar=bar))
                result.report.merge(report)
    return result


def _read_each(items: list[Any], read: Callable[..., SourceImage], report: IngestReport) -> Iterator[SourceImage]:
    for it in items:
        yield read(it, report=report)


def _discard(prepared: list[PreparedUnit]) -> None:
    import shutil

    for p in prepared:
        shutil.rmtree(p.folder, ignore_errors=True)


def _unit_nuclei(store: Store, unit: str) -> int:
    row = store.ledger.unit(unit)
    return 0 if row is None else int(row["n_nuclei"])


def _files_fingerprint(paths: list[Path]) -> str:
    """sha256 over the names and full contents of a unit's files (MoNuSAC units are small)."""
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


def detect_source(path: str | Path) -> str:
    """"pannuke" or "monusac" for a folder holding that dataset; InputNotFoundError otherwise."""
    from . import monusac, pannuke

    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(p, "path does not exist")
    if pannuke.looks_like_pannuke(p):
        return "pannuke"
    if monusac.looks_like_monusac(p):
        return "monusac"
    raise InputNotFoundError(
        p, "holds neither dataset (expected PanNuke 'Fold k/images/foldk/images.npy' or MoNuSAC <patient>/<image>.xml)"
    )

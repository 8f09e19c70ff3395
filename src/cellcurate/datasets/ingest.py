"""Ingest a source's release files into a store: readers -> store units -> one ledger commit.

Every source goes through :func:`ingest_source`: its registry entry
(:mod:`cellcurate.datasets.sources`) names the reader, whose ``plan_units`` finds the units: one
per PanNuke fold (``pannuke-fold1``), one per MoNuSAC patient folder
(``monusac-train-TCGA-KK-A6E0-01Z-00-DX1``), one per CoNSeP split, and so on. A unit whose files (fingerprint) and taxonomy are
unchanged is skipped, so re-ingesting the same files is a no-op with the same nucleus ids; a unit
whose files changed is refused unless ``overwrite`` (which replaces it; nucleus ids stay the same
for the same origin references and the ledger keeps the history).

All units of one call are committed together in one ledger transaction: a bad file anywhere
leaves the store exactly as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StateError
from .records import IngestReport, UnitPlan, files_fingerprint
from .store import ConvertedImage, PreparedUnit, Store, UnitSummary

if TYPE_CHECKING:
    from .workers import ConversionPool

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


def _write_unit(store: Store, plan: UnitPlan, source: str, *, overwrite: bool, report: IngestReport, bar: Any,
                pool: ConversionPool | None, results: Iterator[tuple[list[ConvertedImage], IngestReport]] | None
                ) -> PreparedUnit:
    """Convert and write one unit: its parts from ``results``, the pool's stream over every unit's
    parts (:func:`_part_results`, in order), or, without a pool, in this process through the same
    :func:`~.workers.convert_part`; a reader without parts streams its ``read`` here. A deferred
    fingerprint is computed beside the conversion (in ``pool`` when there is one)."""
    from .workers import convert_part

    fp_future = None
    from_blocks = plan.fingerprint_from_blocks if not plan.fingerprint and plan.parts else None
    if from_blocks is not None:
        report.blocks.clear()  # the parts' digests, hashed while converting, make the fingerprint
    elif not plan.fingerprint and plan.fingerprint_fn is not None and pool is not None:
        fp_future = pool.submit(plan.fingerprint_fn)  # a new unit: hash its files while converting
    elif not plan.fingerprint:
        plan.resolve_fingerprint()
    with store.unit_writer(plan.unit, source, fingerprint=plan.fingerprint, origin=plan.origin, stacked=plan.stacked,
                           overwrite=overwrite) as writer:

        def add(images: list[ConvertedImage], part_report: IngestReport) -> None:
            report.merge(part_report)
            for conv in images:
                writer.add_converted(conv)
                bar.update(1)
                bar.set_postfix_str(plan.unit, refresh=False)

        if results is not None and plan.parts:
            for _ in plan.parts:
                add(*next(results))
        elif plan.parts:
            cache: dict[str, tuple[int, ...]] = {}
            for part in plan.parts:
                add(*convert_part(part, source=source, taxonomy=store.taxonomy, cache=cache))
        else:
            assert plan.read is not None
            for item in plan.read(report):
                writer.add(item)
                bar.update(1)
                bar.set_postfix_str(plan.unit, refresh=False)
        if from_blocks is not None:
            plan.fingerprint = from_blocks(report.blocks)
            report.blocks.clear()
        elif fp_future is not None:
            from .workers import _result

            plan.fingerprint = _result(fp_future, plan.origin)
        writer.fingerprint = plan.fingerprint
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


def ingest_source(store: Store, source: str, path: str | Path, *, overwrite: bool = False,
                  progress: bool | ProgressFactory = True, jobs: int | None = None, **options: Any) -> IngestResult:
    """Ingest ``path`` with the reader of ``source`` (a name in :mod:`cellcurate.datasets.sources`).

    The reader plans its units first (finding and checking every file), so a missing or bad file
    fails before anything is written; ``options`` go to the reader's ``plan_units``.

    ``jobs``: worker processes converting the units' parts (default: the usable cores; 1 converts
    in this process). The store's content (arrays, tables, nucleus ids, ledger events) is the same
    for every value (:mod:`cellcurate.datasets.workers`).
    """
    from .sources import get_source
    from .workers import ConversionPool, resolve_jobs

    n_jobs = resolve_jobs(jobs)
    spec = get_source(source)
    result = IngestResult(spec.name)
    plan = []
    for p in spec.plan_units(path, **options):
        row = store.ledger.unit(p.unit)
        if row is not None:  # compared in the stored fingerprint's format (an older store: docs/STORE.md)
            status = _check_unit(store, p.unit, p.fingerprint_like(str(row["fingerprint"])), overwrite)
        else:
            status = "new"  # nothing to compare with: a deferred fingerprint is computed while converting
        if status == "unchanged" and not overwrite:
            result.units.append(UnitSummary(p.unit, spec.name, "unchanged", p.n_images, _unit_nuclei(store, p.unit)))
            continue
        plan.append(p)
    work = sum(len(p.parts) + (p.fingerprint_fn is not None and not p.fingerprint and p.fingerprint_from_blocks is None)
               for p in plan)
    with contextlib.ExitStack() as stack:
        pool = None
        if n_jobs > 1 and work > 1:  # before any writer thread starts (workers are forked)
            pool = stack.enter_context(ConversionPool(n_jobs, source=spec.name, taxonomy=store.taxonomy))
        with _transaction(store, result) as prepared:
            total = sum(p.n_images for p in plan)
            results = stack.enter_context(contextlib.closing(_part_results(pool, plan))) if pool is not None else None
            with _progress(progress, total=total, unit=spec.progress_unit, desc=spec.title) as bar:
                for p in plan:
                    report = IngestReport(settings=dict(p.settings))
                    prepared.append(_write_unit(store, p, spec.name, overwrite=overwrite, report=report, bar=bar,
                                                pool=pool, results=results))
                    result.report.merge(report)
    return result


def _part_results(pool: ConversionPool, plans: list[UnitPlan]
                  ) -> Generator[tuple[list[ConvertedImage], IngestReport], None, None]:
    """The converted parts of every unit in ``plans``, in order, from one stream of the pool: the
    workers go on to the next unit's parts while the writer finishes a unit (its tables, its
    fsync), instead of idling at each unit's end. Each unit's images come compressed as its
    writer will store them (:func:`~.store.unit_encoding`, one probe per kind of unit)."""
    from .store import unit_encoding

    encodings: dict[tuple[int, int, int] | None, Any] = {}

    def tagged() -> Iterator[tuple[Any, Any]]:
        for p in plans:
            if p.stacked not in encodings:
                encodings[p.stacked] = unit_encoding(p.stacked)
            for part in p.parts:
                yield part, encodings[p.stacked]

    return pool.convert_each(tagged())


def ingest_pannuke(store: Store, path: str | Path, *, overwrite: bool = False,
                   progress: bool | ProgressFactory = True, overlap: str = "highest",
                   jobs: int | None = None) -> IngestResult:
    """Ingest a PanNuke release root (all folds found) or one ``Fold k`` folder.

    ``overlap``: which mask channel wins a pixel claimed by several (``"highest"``, the official
    PanNuke evaluation's rule, or ``"lowest"``; see :mod:`cellcurate.datasets.pannuke`). It is
    recorded in each unit's ``report.json`` (``settings.pannuke_overlap``) and in the fold
    fingerprint, so re-ingesting with the other rule is a change that needs ``overwrite``.
    """
    return ingest_source(store, "pannuke", path, overwrite=overwrite, progress=progress, overlap=overlap, jobs=jobs)


def ingest_monusac(store: Store, path: str | Path, *, split: str | None = None, overwrite: bool = False,
                   progress: bool | ProgressFactory = True, jobs: int | None = None) -> IngestResult:
    """Ingest MoNuSAC release folders (training and/or testing), or a single patient folder."""
    return ingest_source(store, "monusac", path, split=split, overwrite=overwrite, progress=progress, jobs=jobs)


def _discard(prepared: list[PreparedUnit]) -> None:
    import shutil

    for p in prepared:
        shutil.rmtree(p.folder, ignore_errors=True)


def _unit_nuclei(store: Store, unit: str) -> int:
    row = store.ledger.unit(unit)
    return 0 if row is None else int(row["n_nuclei"])


_files_fingerprint = files_fingerprint


def detect_source(path: str | Path) -> str:
    """Name of the installed source whose reader recognises ``path``; InputNotFoundError otherwise."""
    from .sources import detect_source as _detect

    return _detect(path)

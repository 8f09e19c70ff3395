"""Worker processes of ``curate ingest --jobs N``: the parts of a unit converted in parallel,
returned in order to the one process that writes the store.

A reader cuts each unit into :class:`~cellcurate.datasets.records.UnitPart` objects (one image
file, a run of 64 PanNuke tiles). :func:`convert_part` reads one part and puts every image
through :func:`~cellcurate.datasets.store.convert_image` (validation, geometry, candidates,
nucleus ids): the same function the writer uses with ``--jobs 1``, so the store's bytes, ids and
ledger events do not depend on N. :class:`ConversionPool` runs :func:`convert_part` in N
processes with at most ``2 N`` parts in flight (the bounded queue: memory does not grow with the
unit), and hands the results back in the parts' order. Only the parent writes: workers never
open the store.

Failures: an error in a worker comes back as the same one-line
:class:`~cellcurate.errors.CellcurateError` (anything else is wrapped in an
:class:`~cellcurate.errors.InputFormatError` naming the part's files); a worker that dies
(killed, out of memory) is an error naming the files it was converting. Workers die with their
parent (``PR_SET_PDEATHSIG`` on Linux, a parent watch elsewhere), so a killed ``curate ingest``
leaves no process behind; what it had written is cleaned by the next ingest as before.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from ..errors import CellcurateError, ConfigError, InputFormatError, StoreError
from .records import IngestReport, UnitPart
from .store import ConvertedImage, Encoding, convert_image, encode_converted
from .taxonomy import Taxonomy

__all__ = ["ConversionPool", "convert_part", "resolve_jobs", "usable_cores"]


def usable_cores() -> int:
    """CPU cores this process may run on (``os.sched_getaffinity``), the default of ``--jobs``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_jobs(jobs: int | None) -> int:
    """``jobs`` checked (>= 1), or the usable cores when ``None``."""
    if jobs is None:
        return usable_cores()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs must be an integer >= 1, got {jobs!r}")
    return jobs


def convert_part(part: UnitPart, *, source: str, taxonomy: Taxonomy, cache: dict[str, tuple[int, ...]] | None = None,
                 encode: Encoding | None = None) -> tuple[list[ConvertedImage], IngestReport]:
    """Read one part and convert its images; its own report (merged by the caller, in order).

    ``encode``: compress each image into the chunks a stacked unit stores (``"tiles"``) or the
    shard files of a native-size image (``"native"``) (:func:`~.store.encode_converted`), so
    that the compression runs here and only compressed bytes go back to the writer."""
    report = IngestReport()
    try:
        if part.convert is not None:  # the reader's block path: the same result, no per-image table
            out = part.convert(report, source=source, taxonomy=taxonomy, cache=cache)
        else:
            out = [convert_image(item, source=source, taxonomy=taxonomy, cache=cache) for item in part.read(report)]
        if encode is not None:
            out = [encode_converted(conv, native=encode == "native") for conv in out]
    except CellcurateError:
        raise
    except MemoryError:
        raise StoreError(f"{part.files}: out of memory while converting") from None
    except Exception as exc:  # a reader bug or an unforeseen bad input: still one line naming the files
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise InputFormatError(part.files, f"cannot convert ({type(exc).__name__}: {text})") from None
    return out, report


# -- the worker side ----------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(source: str, taxonomy: Taxonomy, parent: int) -> None:
    _WORKER.update(source=source, taxonomy=taxonomy, cache={})
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # no prctl: watch the parent instead
            pass
        else:
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
            return

    def watch() -> None:
        import time

        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="cellcurate-parent-watch").start()


def _worker_part(part: UnitPart, encode: Encoding | None) -> tuple[list[ConvertedImage], IngestReport]:
    return convert_part(part, source=_WORKER["source"], taxonomy=_WORKER["taxonomy"], cache=_WORKER["cache"],
                        encode=encode)


def _worker_call(fn: Callable[[], Any]) -> Any:
    return fn()


# -- the parent side ----------------------------------------------------------------------------
class ConversionPool:
    """N worker processes converting parts for one source; results come back in order.

    >>> with ConversionPool(2, source="pannuke", taxonomy=Taxonomy.default()) as pool:  # doctest: +SKIP
    ...     for images, report in pool.convert(plan.parts):
    ...         ...
    """

    def __init__(self, jobs: int, *, source: str, taxonomy: Taxonomy) -> None:
        import multiprocessing as mp

        self.jobs = resolve_jobs(jobs)
        # fork where the platform has it: workers start at once and import nothing again; they
        # never touch the store, the ledger or zarr, whose threads and handles they inherit
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        self._pool = ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx, initializer=_init_worker,
                                         initargs=(source, taxonomy, os.getpid()))

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run a picklable ``fn()`` in a worker (e.g. a fold's fingerprint, beside the conversion)."""
        return self._pool.submit(_worker_call, fn)

    def convert(self, parts: Iterable[UnitPart], *,
                encode: Encoding | None = None) -> Iterator[tuple[list[ConvertedImage], IngestReport]]:
        """``(converted images, report)`` of every part, in order; at most ``2 * jobs`` in flight.
        ``encode``: the workers compress the images for the writer (:func:`convert_part`)."""
        return self.convert_each((part, encode) for part in parts)

    def convert_each(self, parts: Iterable[tuple[UnitPart, Encoding | None]]
                     ) -> Generator[tuple[list[ConvertedImage], IngestReport], None, None]:
        """:meth:`convert` of parts that each say how to compress their images: one stream over
        the parts of several units, so the workers convert the next unit's parts while the
        writer finishes one (ingest of many small units, e.g. MoNuSAC's patient folders)."""
        window = 2 * self.jobs
        queue: deque[tuple[UnitPart, Future[Any]]] = deque()
        it = iter(parts)
        try:
            while True:
                while len(queue) < window:
                    item = next(it, None)
                    if item is None:
                        break
                    part, encode = item
                    queue.append((part, self._pool.submit(_worker_part, part, encode)))
                if not queue:
                    return
                part, fut = queue.popleft()
                yield _result(fut, part.files)
        finally:
            for _, fut in queue:
                fut.cancel()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "ConversionPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _result(fut: Future[Any], files: str) -> Any:
    """``fut.result()``, with a dead worker reported as an error naming ``files``."""
    try:
        return fut.result()
    except BrokenProcessPool:
        raise StoreError(f"{files}: the worker process converting these files died (killed, or out of "
                         "memory); nothing was stored") from None

"""Review off napari: export the queue to CSV, import decisions from CSV (all or nothing).

Export columns: :data:`EXPORT_COLUMNS` (the queue, then empty ``decision``, ``label``,
``reviewer``, ``comment`` for the team to fill in). Import reads ``nucleus_id``, ``decision``
(accept | keep | set_class | not_nucleus | skip | adjudicate), ``label`` (class name or id, for
set_class / adjudicate), ``reviewer`` (default: the importing user) and ``comment``; rows with an
empty ``decision`` are ignored. The whole file is validated first: unknown ids, unknown classes,
bad actions and duplicate nucleus ids are reported one line each (``FILE:LINE: problem``) and
nothing is applied; a valid file is appended in one ledger transaction.

Instance flags (geometry review, :mod:`cellcurate.curation.geometry_review`) have their own pair:
:func:`export_instance_csv` (columns :data:`INSTANCE_EXPORT_COLUMNS`: the flag, its proposal as
JSON, then empty ``decision``, ``label``, ``polygon``, ``reviewer``, ``comment``) and
:func:`import_instance_csv` (decisions accept | add | delete | replace | keep | skip; ``polygon``
a drawn outline as JSON; validated the same way, all or nothing).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.atomic import atomic_path
from ..datasets.store import Store
from ..errors import (
    ConfigError,
    InputFormatError,
    InputNotFoundError,
    StateError,
    StoreError,
)
from .queue import build_queue
from .review import decision_event, record_many

EXPORT_COLUMNS: tuple[str, ...] = (
    "nucleus_id", "image_id", "source", "source_label", "current_label", "proposed_label", "score", "reason",
    "round", "decision", "label", "reviewer", "comment",
)
IMPORT_ACTIONS: tuple[str, ...] = ("accept", "keep", "set_class", "not_nucleus", "skip", "adjudicate")


class CsvValidationError(InputFormatError):
    """A decisions CSV has problems; ``problems`` lists them, one ``FILE:LINE: message`` each."""

    def __init__(self, path: str | os.PathLike[str], problems: list[str]) -> None:
        super().__init__(path, f"{len(problems)} problem(s), nothing was applied: " + "; ".join(problems[:3]))
        self.problems = problems


def _read_decisions_csv(path: Path, required: tuple[str, ...]) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a decisions CSV; one-line errors for a missing or unreadable file or a
    missing required column."""
    if not path.is_file():
        raise InputNotFoundError(path, "no such CSV file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputFormatError(path, f"cannot read the CSV ({exc})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise InputFormatError(path, f"missing column(s) {', '.join(missing)}; found {', '.join(header) or 'none'}")
    return header, rows


def export_csv(store: Store, path: str | os.PathLike[str], *, reviewer: str | None = None,
               include_reviewed: bool = False, **filters: Any) -> int:
    """Write the queue (pending nuclei unless ``include_reviewed``) to ``path``; return the row count."""
    q = build_queue(store, reviewer=reviewer, **filters)
    if not include_reviewed:
        q = q[~q["decided"]]
    tax = store.taxonomy

    def name(v: Any) -> str:
        if pd.isna(v):
            return ""
        v = int(v)
        return {-1: "not a nucleus", 0: "unresolved"}.get(v) or tax.class_name(v)

    out = pd.DataFrame({
        "nucleus_id": q["nucleus_id"].astype("int64"), "image_id": q["image_id"], "source": q["source"],
        "source_label": q["source_label"], "current_label": [name(v) for v in q["label"]],
        "proposed_label": [name(v) for v in q["proposed"]], "score": q["score"].round(4), "reason": q["reason"],
        "round": q["round"], "decision": "", "label": "", "reviewer": "", "comment": "",
    })
    path = Path(path)
    try:
        with atomic_path(path) as tmp:  # a unique temp name: two writers never share one
            out.to_csv(tmp, index=False)
    except OSError as exc:
        raise StoreError(f"cannot write the CSV: {exc.strerror or exc}", path=path) from None
    return len(out)


def import_csv(store: Store, path: str | os.PathLike[str], *, reviewer: str) -> list[int]:
    """Validate a decisions CSV and append its decisions in one transaction; return their seqs.

    Raises
    ------
    CsvValidationError
        With every problem found (line numbers are the file's, header = line 1); nothing applied.
    """
    path = Path(path)
    header, rows = _read_decisions_csv(path, ("nucleus_id", "decision"))

    nuclei = store.nuclei(include_ignore=False)
    known = set(int(n) for n in nuclei["nucleus_id"])
    problems: list[str] = []
    wanted: list[tuple[int, int, str, str | None, str]] = []  # (line, nid, action, label, reviewer)
    seen: dict[int, int] = {}
    for i, row in enumerate(rows, start=2):
        action = (row.get("decision") or "").strip().lower()
        if not action:
            continue
        raw_id = (row.get("nucleus_id") or "").strip()
        where = f"{path}:{i}"
        try:
            nid = int(raw_id)
        except ValueError:
            problems.append(f"{where}: nucleus_id {raw_id!r} is not an integer")
            continue
        if nid not in known:
            problems.append(f"{where}: unknown nucleus id {nid}")
            continue
        if nid in seen:
            problems.append(f"{where}: duplicate nucleus id {nid} (also on line {seen[nid]})")
            continue
        seen[nid] = i
        if action not in IMPORT_ACTIONS:
            problems.append(f"{where}: unknown decision {action!r}; expected one of {', '.join(IMPORT_ACTIONS)}")
            continue
        label = (row.get("label") or "").strip() or None
        if action in ("set_class", "adjudicate"):
            if label is None:
                problems.append(f"{where}: decision {action} needs a label (class name or id)")
                continue
            try:
                if not (action == "adjudicate" and label.lower() in ("-1", "not_nucleus", "not a nucleus")):
                    store.taxonomy.class_id(label)
            except ConfigError as exc:
                problems.append(f"{where}: {exc}")
                continue
        who = (row.get("reviewer") or "").strip() or reviewer
        wanted.append((i, nid, action, label, who))
    if problems:
        raise CsvValidationError(path, problems)

    # Fold the decided nuclei once, then build every event against that state.
    ids = [w[1] for w in wanted]
    events = store.ledger.events(nucleus_ids=ids) if ids else store.ledger.events(kinds=("round",))
    events = pd.concat([events, store.ledger.events(kinds=("round",))], ignore_index=True)
    events = events.drop_duplicates("seq").sort_values("seq", kind="stable")
    by_nucleus = {int(k): g for k, g in events.groupby("nucleus_id")}
    rounds = events[events["kind"] == "round"]
    out: list[dict[str, Any]] = []
    for line, nid, action, label, who in wanted:
        ev = pd.concat([by_nucleus.get(nid, events.iloc[:0]), rounds]).sort_values("seq", kind="stable")
        try:
            e = decision_event(store, nid, action, reviewer=who, label=label, source="csv", events=ev)
        except (ConfigError, StateError) as exc:
            problems.append(f"{path}:{line}: {exc}")
            continue
        comment = (rows[line - 2].get("comment") or "").strip()
        if comment:
            e["payload"]["comment"] = comment
        out.append(e)
    if problems:
        raise CsvValidationError(path, problems)
    return record_many(store, out)


# -- instance flags (geometry review) ----------------------------------------------------------------
#: Columns of :func:`export_instance_csv`. ``nucleus_ids`` are "|"-joined; ``proposed_polygons``
#: and ``polygon`` are JSON (a polygon ``[[x, y], ...]`` or a list of them).
INSTANCE_EXPORT_COLUMNS: tuple[str, ...] = (
    "flag_id", "image_id", "issue", "score", "nucleus_ids", "proposed_action", "proposed_polygons",
    "predicted_class", "decision", "label", "polygon", "reviewer", "comment",
)
#: Decisions an instance CSV may hold (``skip`` = leave the flag pending, as an empty cell does).
INSTANCE_IMPORT_ACTIONS: tuple[str, ...] = ("accept", "add", "delete", "replace", "keep", "skip")


def export_instance_csv(store: Store, path: str | os.PathLike[str], *, reviewer: str | None = None,
                        include_decided: bool = False) -> int:
    """Write the instance queue (flags not decided by ``reviewer`` unless ``include_decided``) to
    ``path`` with empty decision columns; return the row count."""
    import json

    from .geometry_review import instance_queue

    q = instance_queue(store, reviewer=reviewer, include_decided=include_decided)
    tax = store.taxonomy
    out = pd.DataFrame({
        "flag_id": q["flag_id"], "image_id": q["image_id"], "issue": q["issue"], "score": q["score"].round(4),
        "nucleus_ids": ["|".join(str(int(n)) for n in ids) for ids in q["nucleus_ids"]],
        "proposed_action": q["proposed_action"],
        "proposed_polygons": [json.dumps(p, separators=(",", ":")) for p in q["polygons"]],
        "predicted_class": [tax.class_name(int(v)) if int(v) in tax.ids else "" for v in q["label"]],
        "decision": "", "label": "", "polygon": "", "reviewer": "", "comment": "",
    }, columns=list(INSTANCE_EXPORT_COLUMNS))
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            out.to_csv(tmp, index=False)
    except OSError as exc:
        raise StoreError(f"cannot write the CSV: {exc.strerror or exc}", path=path) from None
    return len(out)


def _polygons_cell(text: str) -> list[Any] | None:
    """A ``polygon`` cell: None when empty; a polygon or a list of polygons (JSON)."""
    import json

    text = text.strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"polygon is not JSON ({exc.msg}); expected [[x, y], ...]") from None
    if isinstance(value, list) and value and isinstance(value[0], list) and value[0] and isinstance(value[0][0], list):
        return value
    return [value]


def import_instance_csv(store: Store, path: str | os.PathLike[str], *, reviewer: str) -> list[int]:
    """Validate an instance-decisions CSV and append its geometry events in one transaction.

    Reads ``flag_id``, ``decision`` (:data:`INSTANCE_IMPORT_ACTIONS`; empty rows are ignored),
    ``label`` (class of an added nucleus), ``polygon`` (a drawn outline replacing the proposal),
    ``reviewer`` and ``comment``.

    Raises
    ------
    CsvValidationError
        With every problem (``FILE:LINE: message``); nothing applied.
    """
    from .geometry_review import geometry_events, store_flags

    path = Path(path)
    header, rows = _read_decisions_csv(path, ("flag_id", "decision"))
    flags = {str(f["flag_id"]): f for f in store_flags(store).to_dict("records")}
    problems: list[str] = []
    events: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows, start=2):
        action = (row.get("decision") or "").strip().lower()
        if not action or action == "skip":
            continue
        where = f"{path}:{i}"
        fid = (row.get("flag_id") or "").strip()
        if fid not in flags:
            problems.append(f"{where}: unknown flag id {fid!r} (not a flag of the newest instance run)")
            continue
        if fid in seen:
            problems.append(f"{where}: duplicate flag id {fid} (also on line {seen[fid]})")
            continue
        seen[fid] = i
        if action not in INSTANCE_IMPORT_ACTIONS:
            problems.append(f"{where}: unknown decision {action!r}; expected one of {', '.join(INSTANCE_IMPORT_ACTIONS)}")
            continue
        try:
            polys = _polygons_cell(row.get("polygon") or "")
            who = (row.get("reviewer") or "").strip() or reviewer
            events += geometry_events(store, flags[fid], action, reviewer=who, polygons=polys,
                                      label=(row.get("label") or "").strip() or None, source="csv",
                                      comment=(row.get("comment") or "").strip() or None)
        except (ConfigError, StateError) as exc:
            problems.append(f"{where}: {exc}")
    if problems:
        raise CsvValidationError(path, problems)
    from .geometry_review import record

    return record(store, events)

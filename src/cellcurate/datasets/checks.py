"""Consistency checks of a store (``curate verify STORE``) and its summary (``curate info``).

Checks, each naming the unit/file at fault:

* ``store.json`` / ``taxonomy.json`` readable; the taxonomy's hash is the one the ledger recorded;
* the ledger's hash chain is intact (no event edited or removed behind its back);
* every registered unit folder exists, its tables have the documented columns, its zarr arrays
  exist with the shapes the images table states;
* nucleus ids are unique across the store, every nucleus has its ingest event in the ledger, and
  no proposal/flag/decision refers to a nucleus that was never ingested;
* (deep, the default) every instance map holds exactly the instance ids of its nuclei rows, with
  the recorded areas.

Round folders are checked against the ledger's finished round runs
(:func:`check_round_folders`): a missing folder and an orphan one are problems.

Unregistered folders left by an interrupted ingest are reported as notes: readers ignore them and
the next ingest removes them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .store import IMAGE_COLUMNS, NUCLEUS_COLUMNS, Store


@dataclass
class VerifyResult:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(store: Store, *, deep: bool = True, progress: bool | Callable[..., Any] = True) -> VerifyResult:
    import zarr

    from .containment import containment_problems, resolves_inside, unsafe_relative_path
    from .leftovers import remove_stale_tempdirs

    res = VerifyResult()
    P = res.problems.append
    res.notes.extend(store.notes)
    removed, undeletable = remove_stale_tempdirs(store.path / "releases", ".tmp-")
    res.notes.extend(f"{p}: removed the temporary folder of an interrupted export" for p in removed)
    res.notes.extend(undeletable)
    res.problems.extend(f"{store.path / p}" for p in containment_problems(store.path, what="store"))
    recorded = store.ledger.get_meta("taxonomy_hash")
    if recorded and recorded != store.taxonomy.hash:
        P(f"{store.path / 'taxonomy.json'}: hash {store.taxonomy.hash[:12]} differs from the one recorded "
          f"in the ledger ({recorded[:12]}); the file was edited")
    res.problems.extend(store.ledger.verify_chain())

    units = store.units()
    registered = set(units["dir"])
    for d in sorted((store.path / "units").iterdir()):
        if f"units/{d.name}" not in registered:
            res.notes.append(f"units/{d.name}: not registered (left by an interrupted ingest; ignored, "
                             "removed by the next ingest)")
    images_parts, nuclei_parts = [], []
    for u in units.itertuples(index=False):
        udir = store.path / u.dir
        why = unsafe_relative_path(u.dir)
        if why is None and not resolves_inside(store.path, u.dir):
            why = "resolves outside the store"
        if why is not None:
            P(f"{store.path / 'ledger.sqlite'}: folder {u.dir!r} of unit {u.unit} {why}")
            continue
        if not udir.is_dir():
            P(f"{udir}: folder of unit {u.unit} is missing")
            continue
        try:
            im = pd.read_parquet(udir / "images.parquet")
            nu = pd.read_parquet(udir / "nuclei.parquet")
        except Exception as exc:  # pyarrow raises several types for a damaged file
            P(f"{udir}: tables unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
            continue
        for name, df, cols in (("images.parquet", im, IMAGE_COLUMNS), ("nuclei.parquet", nu, NUCLEUS_COLUMNS)):
            missing = [c for c in cols if c not in df.columns]
            if missing:
                P(f"{udir / name}: missing columns {missing}")
        if len(im) != u.n_images:
            P(f"{udir / 'images.parquet'}: {len(im)} images, the catalog says {u.n_images}")
        n_nuc = int((nu["kind"] == "nucleus").sum()) if "kind" in nu else len(nu)
        if n_nuc != u.n_nuclei:
            P(f"{udir / 'nuclei.parquet'}: {n_nuc} nuclei, the catalog says {u.n_nuclei}")
        try:
            group = zarr.open_group(str(udir / "arrays.zarr"), mode="r")
        except Exception as exc:
            P(f"{udir / 'arrays.zarr'}: cannot open ({type(exc).__name__})")
            continue
        for row in im.itertuples(index=False):
            try:
                arr = group[row.zarr_path]
                ins_path = "instances" if row.zarr_path == "images" else row.zarr_path.replace("img/", "ins/", 1)
                ins = group[ins_path]
            except KeyError:
                P(f"{udir / 'arrays.zarr'}: array {row.zarr_path} of image {row.image_id} is missing")
                continue
            shape = arr.shape[1:3] if row.zarr_index >= 0 else arr.shape[:2]
            ishape = ins.shape[1:3] if row.zarr_index >= 0 else ins.shape[:2]
            if tuple(shape) != (row.height, row.width) or tuple(ishape) != (row.height, row.width):
                P(f"{udir / 'arrays.zarr'}: image {row.image_id} is {tuple(shape)}, the table says "
                  f"{(row.height, row.width)}")
        images_parts.append(im)
        nuclei_parts.append(nu)
    nuclei = pd.concat(nuclei_parts, ignore_index=True) if nuclei_parts else pd.DataFrame(columns=list(NUCLEUS_COLUMNS))
    images = pd.concat(images_parts, ignore_index=True) if images_parts else pd.DataFrame(columns=list(IMAGE_COLUMNS))
    res.checked = {"units": len(units), "images": len(images), "nuclei": len(nuclei)}
    dup = nuclei["nucleus_id"].duplicated()
    if dup.any():
        P(f"{int(dup.sum())} nucleus ids appear twice (e.g. {nuclei.loc[dup, 'nucleus_id'].iloc[0]})")
    dupi = images["image_id"].duplicated()
    if dupi.any():
        P(f"{int(dupi.sum())} image ids appear twice (e.g. {images.loc[dupi, 'image_id'].iloc[0]})")

    ev = store.ledger.events(kinds=("ingest", "proposal", "flag", "decision"))
    ingested = set(ev.loc[ev["kind"] == "ingest", "nucleus_id"].astype("int64"))
    missing = np.setdiff1d(nuclei["nucleus_id"].to_numpy(np.int64), np.fromiter(ingested, np.int64, len(ingested)))
    if missing.size:
        P(f"ledger: {missing.size} nuclei have no ingest event (e.g. {int(missing[0])})")
    others = ev.loc[ev["kind"] != "ingest", "nucleus_id"].dropna().astype("int64")
    added = store.ledger.events(kinds=("geometry",))  # nuclei added in geometry review are known too
    added = set(added.loc[added["action"] == "add", "nucleus_id"].dropna().astype("int64"))
    stray = sorted(set(others) - ingested - added)
    if stray:
        P(f"ledger: {len(stray)} events refer to nuclei never ingested (e.g. {stray[0]})")
    res.checked["events"] = store.ledger.count()
    res.problems.extend(check_round_folders(store))

    if deep and len(images):
        from tqdm.auto import tqdm

        by_image = {k: g for k, g in nuclei.groupby("image_id", sort=False)}
        bar = progress(total=len(images), desc="verify") if callable(progress) else tqdm(
            total=len(images), desc="verify", unit="image", disable=None if progress else True)
        with bar:
            for row in images.itertuples(index=False):
                bar.update(1)
                try:
                    ins = store.read_instances(row.image_id)
                except Exception as exc:
                    P(f"{row.unit}: instance map of {row.image_id} unreadable ({type(exc).__name__})")
                    continue
                g = by_image.get(row.image_id)
                n = 0 if g is None else len(g)
                counts = np.bincount(ins.ravel(), minlength=n + 1)
                if len(counts) > n + 1 and counts[n + 1 :].any():
                    P(f"{row.unit}: instance map of {row.image_id} holds ids above {n} (its nuclei rows)")
                    continue
                if g is not None:
                    want = g.sort_values("instance_id")
                    if not np.array_equal(want["instance_id"].to_numpy(), np.arange(1, n + 1)):
                        P(f"{row.unit}: nuclei of {row.image_id} do not number 1..{n}")
                    elif not np.array_equal(counts[1 : n + 1], want["area"].to_numpy()):
                        bad = int(np.flatnonzero(counts[1 : n + 1] != want["area"].to_numpy())[0]) + 1
                        P(f"{row.unit}: image {row.image_id}, instance {bad}: area in the map differs from the table")
    return res


def check_round_folders(store: Store) -> list[str]:
    """Round folders vs the ledger's round runs (see :mod:`cellcurate.relabel.rounds`).

    The round folder ``rounds/N`` is put in place before the ledger commits the run, and its
    ``summary.json`` names the run (``metrics.run_seq``). So:

    * a finished, not superseded run whose ``rounds/N`` is missing or belongs to another run is a
      problem (cannot come from a crash; the folder was removed or replaced by hand);
    * ``rounds/N`` whose run the ledger never finished is an orphan left by a crash between the
      rename and the commit: its proposals and flags are not in the ledger, nothing reads it, and
      ``curate relabel --round N --overwrite`` (or a first run) moves it aside.
    """
    problems: list[str] = []
    rounds_dir = store.path / "rounds"
    ev = store.ledger.events(kinds=("round",))
    started = ev[ev["action"] == "started"]
    finished = set(ev.loc[ev["action"] == "finished", "ref"].dropna().astype(int))
    superseded = set(ev.loc[ev["action"] == "superseded", "ref"].dropna().astype(int))
    active: dict[int, int] = {}
    for rnd, seq in zip(started["round"].astype(int), started["seq"].astype(int)):
        if seq in finished and seq not in superseded:
            active[rnd] = max(seq, active.get(rnd, seq))
    on_disk: dict[int, int | None] = {}
    if rounds_dir.is_dir():
        for d in rounds_dir.iterdir():
            if not (d.is_dir() and d.name.isdigit()):
                continue
            try:
                summary = json.loads((d / "summary.json").read_text("utf-8"))
                on_disk[int(d.name)] = int(summary["metrics"]["run_seq"])
            except (OSError, ValueError, KeyError, TypeError):
                on_disk[int(d.name)] = None
    for rnd, seq in sorted(active.items()):
        if rnd not in on_disk:
            problems.append(f"{rounds_dir / str(rnd)}: folder of round {rnd} (finished run seq {seq}) is missing")
        elif on_disk[rnd] != seq:
            problems.append(f"{rounds_dir / str(rnd)}: holds run seq {on_disk[rnd]}, the ledger's finished run "
                            f"of round {rnd} is seq {seq}")
    for rnd, seq in sorted(on_disk.items()):
        if rnd not in active:
            problems.append(f"{rounds_dir / str(rnd)}: orphan round folder (run seq {seq} was never committed "
                            f"to the ledger; left by an interrupted round): rerun `curate relabel --round {rnd}`, "
                            "which moves it aside")
    return problems


def label_name(store: Store, labels: pd.DataFrame) -> pd.Series:
    """Readable current label per nucleus: class name, candidate set, "conflict", "rejected", "ignore"."""
    tax = store.taxonomy
    names = {c.id: c.name for c in tax.classes}
    out = []
    for kind, lab, status, cand in zip(labels["kind"], labels["label"], labels["status"], labels["candidates"]):
        if kind == "ignore":
            out.append("ignore")
        elif lab > 0:
            out.append(names.get(int(lab), str(lab)))
        elif lab == -1:
            out.append("rejected")
        elif status == "conflict":
            out.append("conflict")
        else:
            ids = [int(x) for x in str(cand).split("|") if x]
            out.append(tax.candidates_name(ids) if ids else "unresolved")
    return pd.Series(out, index=labels.index, dtype="object")


def store_summary(store: Store) -> dict[str, Any]:
    """What ``curate info --json`` prints."""
    images = store.images()
    cur = store.current_labels()
    out: dict[str, Any] = {
        "store": str(store.path),
        "taxonomy": {"name": store.taxonomy.to_dict().get("name"), "hash": store.taxonomy.hash},
        "images": {s: int(n) for s, n in images.groupby("source").size().items()},
        "splits": {s: {k: int(v) for k, v in g.groupby("split").size().items()} for s, g in images.groupby("source")},
        "nuclei": {s: {k: int(v) for k, v in g.groupby("source_label").size().items()}
                   for s, g in cur.groupby("source")},
        "unified": {},
        "status": {},
    }
    if len(cur):
        names = label_name(store, cur)
        out["unified"] = {k: int(v) for k, v in names.value_counts().sort_index().items()}
        nuc = cur[cur["kind"] == "nucleus"]
        out["status"] = {k: int(v) for k, v in nuc["status"].value_counts().sort_index().items()}
    ev = store.ledger.events(kinds=("round", "flag", "decision"))
    rounds = ev[(ev["kind"] == "round") & (ev["action"] == "finished")]
    dec = ev[ev["kind"] == "decision"]
    seq, chain = store.ledger.head()
    out["rounds"] = sorted({int(r) for r in rounds["round"].dropna()})
    out["flags"] = int((ev["kind"] == "flag").sum())
    out["decisions"] = {
        "total": int(len(dec)),
        "by_action": {k: int(v) for k, v in dec["action"].value_counts().sort_index().items()},
        "reviewers": sorted(dec["actor"].unique().tolist()),
    }
    out["ledger"] = {"events": store.ledger.count(), "head_seq": seq, "head_hash": chain}
    return out


def format_summary(s: dict[str, Any]) -> str:
    """The readable form of :func:`store_summary`."""
    lines = [f"Store {s['store']}",
             f"  taxonomy {s['taxonomy']['name']} ({s['taxonomy']['hash'][:12]}), "
             f"ledger {s['ledger']['events']:,} events (head {s['ledger']['head_seq']}, {s['ledger']['head_hash'][:12]})"]
    if not s["images"]:
        lines.append("  empty: ingest a source with `curate ingest pannuke|monusac PATH --store STORE`")
        return "\n".join(lines)
    lines.append("Images")
    for src, n in s["images"].items():
        splits = ", ".join(f"{k} {v:,}" for k, v in s["splits"].get(src, {}).items())
        lines.append(f"  {src:<9} {n:>8,}   ({splits})")
    lines.append("Nuclei by source label")
    for src, labs in s["nuclei"].items():
        total = sum(labs.values())
        parts = "  ".join(f"{k} {v:,}" for k, v in labs.items())
        lines.append(f"  {src:<9} {total:>8,}   {parts}")
    lines.append("Current unified labels")
    width = max(len(k) for k in s["unified"]) if s["unified"] else 10
    for k, v in sorted(s["unified"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {k:<{width}} {v:>8,}")
    if s["status"]:
        lines.append("Label status   " + "  ".join(f"{k} {v:,}" for k, v in s["status"].items()))
    d = s["decisions"]
    rounds = ", ".join(map(str, s["rounds"])) or "none"
    lines.append(f"Curation       rounds: {rounds}; flags: {s['flags']:,}; decisions: {d['total']:,}"
                 + (f" by {', '.join(d['reviewers'])}" if d["reviewers"] else ""))
    if d["by_action"]:
        lines.append("               " + "  ".join(f"{k} {v:,}" for k, v in d["by_action"].items()))
    return "\n".join(lines)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False)

"""`curate demo`: the whole pipeline, end to end, on the built-in synthetic sample.

Stages: generate the sample (PanNuke and MoNuSAC in their real release formats, with a known
truth and 10 % planted label flips) -> ingest both -> summary. Later stages (relabeling rounds,
review, release, teacher/student) are added to :data:`STAGES` as they exist.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import click


def _header(title: str) -> None:
    click.secho(f"\n== {title} ", bold=True, nl=False)
    click.echo("=" * max(0, 70 - len(title)))


def stage_sample(ctx: dict[str, Any]) -> None:
    from ..datasets.synthetic import write_sample

    info = write_sample(ctx["out"] / "sample", preset=ctx["preset"], seed=ctx["seed"], flip_fraction=0.10)
    ctx["sample"] = info
    click.echo(f"wrote {info.n_tiles} PanNuke tiles and {info.n_images} MoNuSAC images "
               f"({info.n_nuclei:,} nuclei, {info.n_flipped} planted label flips) to {info.root}")


def stage_ingest(ctx: dict[str, Any]) -> None:
    from ..datasets.ingest import ingest_monusac, ingest_pannuke
    from ..datasets.store import Store
    from .ingest import _print_result

    store = Store.create(ctx["out"] / "store")
    ctx["store_path"] = store.path
    with store:
        _print_result(ingest_pannuke(store, ctx["sample"].pannuke_root), False)
        _print_result(ingest_monusac(store, ctx["sample"].monusac_root), False)


def stage_summary(ctx: dict[str, Any]) -> None:
    from ..datasets.checks import format_summary, store_summary, verify_store
    from ..datasets.store import Store

    with Store.open(ctx["store_path"]) as store:
        click.echo(format_summary(store_summary(store)))
        res = verify_store(store)
    if res.problems:
        from ..errors import StoreError

        raise StoreError("demo store failed verification: " + "; ".join(res.problems[:3]))
    click.echo(f"verify: OK ({', '.join(f'{v:,} {k}' for k, v in res.checked.items())})")


STAGES: list[tuple[str, Any]] = [
    ("Synthetic sample in PanNuke and MoNuSAC release formats", stage_sample),
    ("Ingest", stage_ingest),
    ("Store summary", stage_summary),
]


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_out"),
              show_default=True, help="Folder for the sample, the store, the rounds, the release and the models.")
@click.option("--preset", type=click.Choice(["demo", "tiny"]), default="demo", show_default=True,
              help="Sample size: `tiny` runs in seconds (used by the tests).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Delete OUT first if it exists.")
def command(out: Path, preset: str, seed: int, force: bool) -> None:
    """Run the whole pipeline on the built-in synthetic sample and report how well it did."""
    from ..errors import StateError

    if out.exists() and any(out.iterdir()):
        if not force:
            raise StateError(f"{out}: exists and is not empty; use --force to replace it or --out elsewhere")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx: dict[str, Any] = {"out": out, "preset": preset, "seed": seed}
    t0 = time.perf_counter()
    for title, fn in STAGES:
        _header(title)
        t = time.perf_counter()
        fn(ctx)
        click.echo(f"({time.perf_counter() - t:.1f} s)")
    click.secho(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; everything is under {out}/", bold=True)

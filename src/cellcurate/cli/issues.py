"""`curate issues STORE`: list flagged nuclei (the review queue), most likely wrong first.

Uses the same queue as `curate review` (cellcurate.curation.queue): one row per flagged nucleus
(its latest flag), open until a reviewer decides on it.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False, path_type=Path))
@click.option("--round", "round_", type=int, default=None, help="Only this round's flags.")
@click.option("--class", "cls", default=None, help="Only nuclei whose current or suggested class is this one.")
@click.option("--reason", default=None,
              type=click.Choice(["low_confidence_proposal", "confident_disagreement", "likely_class_swap"]))
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Rows shown on screen.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every matching nucleus (not only --limit) to this CSV file ('-' for stdout).")
@click.option("--all", "include_decided", is_flag=True, help="Include nuclei already decided in review.")
def command(store_path: Path, round_: int | None, cls: str | None, reason: str | None, limit: int,
            csv_path: Path | None, include_decided: bool) -> None:
    """List flagged nuclei of STORE (most likely wrong first)."""
    from ..curation.queue import build_queue
    from ..datasets.store import Store
    from ..errors import StateError
    from ..relabel.rounds import active_run

    store = Store.open(store_path, mode="r")
    try:
        if round_ is not None and active_run(store, round_) is None:
            raise StateError(f"{store_path}: round {round_} has not been run")
        q = build_queue(store, round=round_, classes=cls, reasons=reason)
        names = {c.id: c.name for c in store.taxonomy.classes}
    finally:
        store.close()
    names.update({0: "unresolved", -1: "rejected"})
    if not include_decided:
        q = q[~q["decided"].astype(bool)]
    q = q.sort_values(["score", "nucleus_id"], ascending=[False, True], kind="stable").reset_index(drop=True)
    df = q.assign(rank=range(1, len(q) + 1), given=q["label"].map(lambda v: names.get(int(v), str(v))),
                  suggested=q["proposed"].map(lambda v: names.get(int(v), str(v))))
    cols = ["rank", "round", "nucleus_id", "image_id", "source", "source_label", "given", "suggested", "reason",
            "score", "status", "centroid_y", "centroid_x", "flag_seq"]
    df = df[cols]
    if csv_path is not None:
        if str(csv_path) == "-":
            click.echo(df.to_csv(index=False), nl=False)
            return
        from ..core.atomic import atomic_path

        with atomic_path(csv_path) as tmp:  # a unique temp name, fsynced
            df.to_csv(tmp, index=False)
    if df.empty:
        click.echo("no open flags")
        return
    shown = df.head(limit)
    click.echo(shown[cols[:10]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    click.echo(f"{len(shown)} of {len(df)} flagged nuclei" + (f"; all written to {csv_path}" if csv_path else ""))

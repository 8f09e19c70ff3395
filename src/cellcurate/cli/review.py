"""`curate review STORE`: review flagged nuclei in napari, list conflicts, or review via CSV."""

from __future__ import annotations

import click


@click.command("review")
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--round", "round_", type=int, default=None, help="Only flags of this relabeling round.")
@click.option("--reviewer", default=None, help="Your name in the ledger (default: $USER).")
@click.option("--class", "classes", multiple=True, help="Only nuclei whose current or proposed class is this (name or id); repeatable.")
@click.option("--source", "sources", multiple=True, help="Only nuclei of this source (pannuke, monusac); repeatable.")
@click.option("--reason", "reasons", multiple=True, help="Only flags with this reason; repeatable.")
@click.option("--double-review", is_flag=True, help="Show nuclei other reviewers already decided (independent second review).")
@click.option("--conflicts", is_flag=True, help="List nuclei on which reviewers disagree (no GUI).")
@click.option("--adjudicate", "adjudicate", nargs=2, type=(int, str), default=None, metavar="NUCLEUS_ID CLASS",
              help="Settle a conflict: record an adjudication (class name or id, or not_nucleus).")
@click.option("--export-csv", type=click.Path(dir_okay=False), default=None, help="Write the pending queue to a CSV (no GUI).")
@click.option("--import-csv", type=click.Path(dir_okay=False), default=None, help="Apply decisions from a CSV, all or nothing (no GUI).")
@click.option("--instances", is_flag=True,
              help="Review instance flags (missed, spurious, badly drawn nuclei) instead of class flags: "
                   "napari, or with --export-csv/--import-csv/--export-geojson.")
@click.option("--issue", "issues", multiple=True,
              help="With --instances: only flags of this issue (missing_annotation, spurious_annotation, "
                   "bad_outline, merged, split); repeatable.")
@click.option("--export-geojson", type=click.Path(file_okay=False), default=None,
              help="With --instances: write one QuPath GeoJSON per image with its nuclei and the proposals; "
                   "bring the decisions back with `curate ingest qupath --geometry`.")
def command(store: str, round_: int | None, reviewer: str | None, classes: tuple[str, ...], sources: tuple[str, ...],
            reasons: tuple[str, ...], double_review: bool, conflicts: bool, adjudicate: tuple[int, str] | None,
            export_csv: str | None, import_csv: str | None, instances: bool, issues: tuple[str, ...],
            export_geojson: str | None) -> None:
    """Review the flagged nuclei of STORE (napari, keyboard-driven).

    \b
    Keys: a accept proposal   k keep current   1-9 set class (taxonomy ids)   n not a nucleus
          s skip   u undo   j jump to id   d adjudicate   c next conflict
          o outlines/filled   v overlay on/off   (every decision is saved at once)

    \b
    With --instances (geometry review; docs/GEOMETRY_REVIEW.md):
          p accept the proposal   a add the proposed nucleus   d delete the nucleus
          r replace the outline by the proposal   k keep   s skip   u undo
          1-9 class of the nucleus to add   v proposal on/off
    """
    import sys

    if instances:
        _instances(store, reviewer, list(issues) or None, export_csv, import_csv, export_geojson)
        return
    if export_geojson or issues:
        raise click.UsageError("--export-geojson and --issue need --instances")

    from ..curation.review import decide, default_reviewer
    from ..datasets.store import Store

    reviewer = reviewer or default_reviewer()
    filters = {"round": round_, "classes": list(classes) or None, "sources": list(sources) or None,
               "reasons": list(reasons) or None, "double_review": double_review}
    if conflicts:
        from ..curation.review import conflict_table

        with Store.open(store, mode="r") as s:
            table = conflict_table(s)
        if table.empty:
            click.echo("no conflicts")
            return
        click.echo(table.drop(columns=["label"]).to_string(index=False))
        click.echo(f"{table['nucleus_id'].nunique()} nuclei in conflict; settle with "
                   f"`curate review {store} --adjudicate NUCLEUS_ID CLASS`")
        return
    if adjudicate is not None:
        nid, label = adjudicate
        with Store.open(store, mode="a") as s:
            d = decide(s, nid, "adjudicate", reviewer=reviewer, label=label, source="cli")
        click.echo(f"adjudicated nucleus {d.nucleus_id}: {d.prev_label} -> {d.label} (seq {d.seq}, by {reviewer})")
        return
    if export_csv:
        from ..curation.reviewcsv import export_csv as export

        with Store.open(store, mode="r") as s:
            n = export(s, export_csv, reviewer=reviewer, **filters)
        click.echo(f"wrote {n} pending nuclei to {export_csv}")
        return
    if import_csv:
        from ..curation.reviewcsv import CsvValidationError
        from ..curation.reviewcsv import import_csv as do_import

        with Store.open(store, mode="a") as s:
            try:
                seqs = do_import(s, import_csv, reviewer=reviewer)
            except CsvValidationError as exc:
                for line in exc.problems:
                    click.echo(f"error: {line}", err=True)
                click.echo(f"error: {len(exc.problems)} problem(s) in {import_csv}; nothing was applied", err=True)
                sys.exit(1)
        click.echo(f"recorded {len(seqs)} decisions from {import_csv}")
        return

    from ..napari_plugin.widget import launch

    launch(store, reviewer=reviewer, **filters)


def _instances(store: str, reviewer: str | None, issues: list[str] | None, export_csv: str | None,
               import_csv: str | None, export_geojson: str | None) -> None:
    import sys

    from ..curation.review import default_reviewer
    from ..datasets.store import Store

    reviewer = reviewer or default_reviewer()
    if export_csv:
        from ..curation.reviewcsv import export_instance_csv

        with Store.open(store, mode="r") as s:
            n = export_instance_csv(s, export_csv, reviewer=reviewer)
        click.echo(f"wrote {n} instance flags not yet decided by {reviewer} to {export_csv}")
        return
    if import_csv:
        from ..curation.reviewcsv import CsvValidationError, import_instance_csv

        with Store.open(store, mode="a") as s:
            try:
                seqs = import_instance_csv(s, import_csv, reviewer=reviewer)
            except CsvValidationError as exc:
                for line in exc.problems:
                    click.echo(f"error: {line}", err=True)
                click.echo(f"error: {len(exc.problems)} problem(s) in {import_csv}; nothing was applied", err=True)
                sys.exit(1)
        click.echo(f"recorded {len(seqs)} geometry events from {import_csv}")
        return
    if export_geojson:
        from ..curation.geometry_qupath import export_review_geojson

        with Store.open(store, mode="r") as s:
            files, n = export_review_geojson(s, export_geojson, reviewer=reviewer)
        click.echo(f"wrote {len(files)} GeoJSON files with {n} proposals to {export_geojson}; decide in QuPath, "
                   f"then: curate ingest qupath {export_geojson}/*.geojson --store {store} --geometry")
        return
    from ..napari_plugin.geometry_widget import launch

    launch(store, reviewer=reviewer, issues=issues)

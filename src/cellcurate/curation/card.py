"""The dataset card of a release: ``DATASET_CARD.md`` plus ``class_distribution.png``.

The card is written before the files are hashed, so it is covered by the manifest like every
other file. It repeats the manifest's tables in readable form and shows one bar chart of the class
distribution per split.

Dimensions: S splits, K classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

CARD_NAME = "DATASET_CARD.md"
PLOT_NAME = "class_distribution.png"


def _table(rows: list[list[Any]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def plot_class_distribution(path: str | Path, counts: dict[str, dict[str, int]], colors: dict[str, str]) -> Path:
    """One bar chart per split (counts per class), saved as a PNG.

    Parameters
    ----------
    counts
        split -> class name -> count (the manifest's ``counts`` without ``total``).
    colors
        class name -> "#rrggbb".
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    splits = [s for s in counts if s != "total"] or ["total"]
    n = len(splits)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 0.5, 3.4), squeeze=False, sharey=False)
    for ax, s in zip(axes[0], splits):
        names = list(counts[s])
        values = [counts[s][c] for c in names]
        ax.bar(range(len(names)), values, color=[colors.get(c, "#888888") for c in names])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{s} ({sum(values):,} nuclei)", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90, metadata={"Software": None, "Creation Time": None})
    plt.close(fig)
    return path


def write_card(folder: str | Path, manifest: dict[str, Any], images: pd.DataFrame, nuclei: pd.DataFrame,
               taxonomy: Any) -> list[Path]:
    """Write ``DATASET_CARD.md`` and ``class_distribution.png`` into ``folder``; return their paths."""
    folder = Path(folder)
    counts: dict[str, dict[str, int]] = manifest["counts"]
    splits = [s for s in counts if s != "total"]
    names = list(taxonomy.names)
    colors = {c.name: c.color for c in taxonomy.classes}
    plot = plot_class_distribution(folder / PLOT_NAME, {s: counts[s] for s in splits}, colors)

    count_rows = [[c, *[f"{counts[s][c]:,}" for s in splits], f"{counts['total'][c]:,}"] for c in names]
    count_rows.append(["**all classes**", *[f"{sum(counts[s].values()):,}" for s in splits],
                       f"{sum(counts['total'].values()):,}"])
    ign = manifest["ignore_counts"]
    ignore_rows = [[r, *[f"{ign[s][r]:,}" for s in splits], f"{ign['total'][r]:,}"] for r in ign["total"]]
    n_img = manifest["splits"]["n_images"]
    img_rows = []
    for s in splits:
        sub = images[images["split"] == s]
        img_rows.append([s, f"{n_img.get(s, 0):,}", ", ".join(sorted(set(sub["source"]))) or "-",
                         ", ".join(sorted(set(sub["source_split"]))) or "-",
                         sub["patient_id"].dropna().nunique()])
    decided = nuclei[nuclei["kind"] == "nucleus"]["decided"].value_counts()
    dec_rows = [[k, f"{int(v):,}"] for k, v in decided.items()]
    st = manifest["store"]
    rv = manifest["review"]
    text = f"""# Dataset card: release `{manifest['version']}`

Curated nucleus segmentation and classification data with a unified {len(names)}-class taxonomy,
written by cellcurate {manifest['cellcurate_version']} on {manifest['created']}.
The schema is documented in cellcurate's `docs/RELEASE_FORMAT.md`; `curate verify` re-hashes
every file against `manifest.json`.

## Provenance
- store content hash: `{st['content_hash']}`
- taxonomy hash: `{st['taxonomy_hash']}`
- ledger position: {st['ledger_seq']} (chain `{st['ledger_chain']}`)
- unreviewed flags at export: {rv['unreviewed_flags']}{' (exported with --allow-unreviewed)' if rv['allow_unreviewed'] else ''}

## Splits
{manifest['splits']['rule']} (seed {manifest['splits']['seed']}, val fraction {manifest['splits']['val_fraction']}).

{_table(img_rows, ['split', 'images', 'sources', 'official source splits', 'patients'])}

Convenience names: {', '.join(f'`{k}` = {" + ".join(v)}' for k, v in manifest['splits']['aliases'].items() if k != 'all')}.

## Nuclei per split and class
{_table(count_rows, ['class', *splits, 'total'])}

![class distribution per split]({PLOT_NAME})

## Ignore regions (value 255 in the class maps)
{_table(ignore_rows, ['reason', *splits, 'total'])}

## How labels were decided
{_table(dec_rows, ['decided', 'nuclei'])}

## Licence and attribution
Licence: {manifest['licence']} (inherited from the sources; non-commercial, share alike).

{chr(10).join('- ' + a for a in manifest['attribution'])}
"""
    card = folder / CARD_NAME
    card.write_text(text, encoding="utf-8")
    return [card, plot]

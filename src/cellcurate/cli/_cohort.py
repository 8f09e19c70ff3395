"""Cohorts on Dask distributed: one task per slide, retried when its worker dies.

A local cluster of ``workers`` processes (one thread each, on 127.0.0.1) is started unless
``scheduler`` names an existing one (``tcp://HOST:PORT``: dask-jobqueue/Slurm or
dask-kubernetes clusters work unchanged). With ``gpus_per_task`` each task asks for that much of
the ``GPU`` resource, so only workers started with ``--resources GPU=N`` take it.

A worker killed mid-task costs only that task: the scheduler reruns it elsewhere (``retries``
also covers ordinary exceptions), and :func:`cellcurate.cli._slidejob.run_slide` resumes the
slide from its finished chunks; outputs appear by atomic rename only, so nothing is duplicated
or half-written. ``cohort_summary.parquet`` (one row per slide: status, nuclei per class,
seconds, error) is written atomically at the end; a progress bar counts finished slides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _task(model_path: str, slide: str, stem: str, out_dir: str, job: dict[str, Any]) -> dict[str, Any]:
    from ._slidejob import run_slide

    return run_slide(model_path, slide, out_dir, stem=stem, progress=False, **job)


def run_cohort(model_path: str, slides: list[str], stems: list[str], out_dir: str, *, workers: int = 1,
               scheduler: str | None = None, gpus_per_task: int = 0, job: dict[str, Any] | None = None,
               retries: int = 2) -> Any:
    """Run every slide as a Dask task; returns the cohort summary frame (also written)."""
    import pandas as pd
    from distributed import Client, LocalCluster, as_completed
    from tqdm.auto import tqdm

    from ..errors import ConfigError

    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job = dict(job or {})
    cluster = None
    if scheduler is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None, resources={"GPU": gpus_per_task} if gpus_per_task else None)
        client = Client(cluster)
    else:
        client = Client(scheduler)
    rows: list[dict[str, Any]] = []
    try:
        resources = {"GPU": gpus_per_task} if gpus_per_task else None
        futures = {
            client.submit(_task, model_path, slide, stem, out_dir, job, key=f"slide-{stem}", retries=retries,
                          resources=resources, pure=False): (slide, stem)
            for slide, stem in zip(slides, stems)
        }
        bar = tqdm(total=len(futures), desc="cohort", unit="slide", disable=None)
        for fut in as_completed(futures):
            slide, stem = futures[fut]
            try:
                res = fut.result()
                rows.append({**res, "error": ""})
            except Exception as exc:  # the slide failed after its retries; the cohort goes on
                rows.append({"slide": slide, "stem": stem, "status": "failed", "nuclei": 0,
                             "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__})
            bar.update(1)
        bar.close()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    frame = pd.DataFrame(rows)
    order = {s: i for i, s in enumerate(stems)}
    frame = frame.sort_values("stem", key=lambda c: c.map(order)).reset_index(drop=True)
    for col in [c for c in frame.columns if c.startswith("n_")]:
        frame[col] = frame[col].fillna(0).astype("int64")
    frame["nuclei"] = frame["nuclei"].fillna(0).astype("int64")
    if "skipped" in frame:
        frame["skipped"] = frame["skipped"].fillna(False).astype(bool)
    dest = out / "cohort_summary.parquet"
    from ..core.atomic import atomic_path

    with atomic_path(dest) as tmp:
        frame.to_parquet(tmp, index=False)
    return frame

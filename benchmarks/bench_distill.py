"""What distillation buys: students trained for the same budget from ground truth alone, distilled,
and with the full CellGenNet recipe; and with only a fraction of the tiles labelled, the teacher's
soft targets on the rest (issue 9 item 4, issue 19 item 1).

Run from the repository root on a release (``curate demo --out D`` writes one under
``D/releases/v1``)::

    .venv/bin/python benchmarks/bench_distill.py --release D/releases/v1 --out bench_distill_out   # ~55 min, 2 busy cores
    .venv/bin/python benchmarks/bench_distill.py --release D/releases/v1 --out O2 --teachers bench_distill_out/teachers
    .venv/bin/python benchmarks/bench_distill.py --release R --out O --teacher-encoder micro-vit \\
        --labelled 8 --pretrain 4 --val 2 --test 2 --tile 64 --epochs 1 --seeds 0   # plumbing only

Data (PanNuke-format tiles of ``--split`` first, then the rest, in release order), disjoint pools:

- ``--labelled`` tiles: the students' training tiles; the first ``--fraction`` of them (25 %) are
  the labelled tiles of the low-label settings, the others their unlabelled tiles;
- ``--val`` tiles: the teachers' best-epoch selection (and the students' with ``--student-val``);
- ``--pretrain`` tiles: the teacher encoder's pre-training
  (:func:`cellcurate.models.pretrain.pretrain_encoder`), the stand-in for the tissue a foundation
  model has seen before any of our labels. With ``--pretrain 0`` each teacher's encoder is
  pre-trained on that teacher's own labelled tiles instead (the demo's way).
- the first ``--test`` images of ``--test-split``: every figure.

Teachers (built as ``curate demo`` builds its own: the ``demo`` encoder is the demo's ViT-S/16
9-block encoder, random init, pre-trained then frozen, + the tiny decoder, encoder fed the whole
resized tile), trained once and reused across seeds and settings, their predictions cached on disk
(``OUT/cache``): one on all labelled tiles, and one on the labelled fraction only, which teaches the
unlabelled setting (it must not have seen the labels of the tiles it pseudo-labels). Their own
figures are printed first.

Settings (tiny student, ``--seeds`` seeds each, same optimiser steps; mean ± sd over seeds):

- ``(a) gt``: ground truth only (BCE + Dice on the nuclear map, CE + Dice + class-balanced
  foreground CE on types, MSE + gradient MSE on distance maps); no Tversky, no consistency, no dropout;
- ``(b) kd``: ``(a)`` + distillation (T²·KL on types, MSE on distance and soft nuclear maps);
- ``(c) cellgennet``: the full recipe: BCE + Tversky, KD, consistency under flips/rotations/stain
  jitter, layer-wise dropout;
- ``(d) gt@F``: ground truth on the labelled fraction F only, for as many optimiser steps as the
  others (epochs × 1/F, so it is not handicapped by a shorter run);
- ``(e) cellgennet@F+unlabelled``: the full recipe on the same labelled fraction plus the other tiles
  *without their labels* (``distill(..., unlabelled=...)``, what ``curate distill --unlabelled``
  does), supervised there only by the fraction-teacher's confidence-weighted soft targets.

Speed on a shared 2-core CPU: every run uses ``--threads`` torch threads (default 1: on a loaded
machine 2 threads were 3-6× slower per step than 1, spinning for a core another process holds), and
``--jobs`` student runs go at a time, each in its own process. ``--teachers DIR`` reuses the teachers
an earlier run wrote to ``OUT/teachers`` (each with ``bench_teacher.json``: the pools, encoder,
epochs, learning rate, batch and tile it was trained with, its training time and test figures) and is
refused when those settings differ from this run's.

Metrics: :func:`cellcurate.models.evaluate.evaluate_models` (the ``curate evaluate`` path). Prints the
configuration, one row per run, the mean ± sd table and each setting's ratio to ``(a)`` in the same
run; writes ``OUT/table.md``, ``OUT/table.csv`` (means, sds, ratios), ``OUT/runs.csv`` (per seed)
and ``OUT/runs.json``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

#: Summary metrics reported, with their column titles.
METRICS: dict[str, str] = {"PQ": "PQ", "mPQ": "mPQ", "F1_classification": "class F1", "R2_counts": "count R²"}
BASELINE = "(a) gt"


def _finite(vals: list[float]) -> list[float]:
    return [v for v in vals if v is not None and math.isfinite(v)]


def mean_sd(vals: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (sd 0 for one value, NaN for none)."""
    v = _finite(vals)
    if not v:
        return math.nan, math.nan
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def fmt_mean_sd(vals: list[float]) -> str:
    m, s = mean_sd(vals)
    if not math.isfinite(m):
        return "–"
    return f"{m:.3f}" if len(_finite(vals)) == 1 else f"{m:.3f} ± {s:.3f}"


def ratio(value: float, base: float) -> float:
    """``value / base``; NaN where the baseline is not positive (a ratio of R² ≤ 0 means nothing)."""
    if not (math.isfinite(value) and math.isfinite(base)) or base <= 0:
        return math.nan
    return value / base


def fmt_ratio(value: float, base: float) -> str:
    r = ratio(value, base)
    if math.isfinite(r):
        return f"{r:.2f}×"
    if math.isfinite(value) and math.isfinite(base):
        return f"Δ {value - base:+.3f}"
    return "–"


def summary_rows(rows: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """One record per setting: n, mean/sd per metric and the ratio of the mean to the baseline's."""
    base = {k: mean_sd([r[k] for r in rows.get(BASELINE, [])])[0] for k in METRICS}
    out = []
    for name, runs in rows.items():
        rec: dict[str, Any] = {"setting": name, "n": len(runs)}
        for k in METRICS:
            m, s = mean_sd([r[k] for r in runs])
            rec[f"{k}_mean"], rec[f"{k}_sd"], rec[f"{k}_ratio_to_a"] = m, s, ratio(m, base[k])
        out.append(rec)
    return out


def markdown_tables(rows: dict[str, list[dict[str, float]]]) -> str:
    """The mean ± sd table and the ratio-to-(a) table (Markdown)."""
    base = {k: mean_sd([r[k] for r in rows.get(BASELINE, [])])[0] for k in METRICS}
    lines = ["| setting | runs | " + " | ".join(METRICS.values()) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in METRICS) + " |"]
    for name, runs in rows.items():
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(fmt_mean_sd([r[k] for r in runs]) for k in METRICS) + " |")
    lines += ["", f"Ratio of each setting's mean to {BASELINE}'s (Δ = difference where {BASELINE}'s mean is ≤ 0):", "",
              "| setting | " + " | ".join(METRICS.values()) + " |",
              "| --- | " + " | ".join("---:" for _ in METRICS) + " |"]
    for name, runs in rows.items():
        if name.startswith("teacher") or name == BASELINE:
            continue
        lines.append(f"| {name} | " + " | ".join(fmt_ratio(mean_sd([r[k] for r in runs])[0], base[k]) for k in METRICS) + " |")
    return "\n".join(lines)


def _pools(images: Any, n_lab: int, n_val: int, n_pre: int) -> tuple[list[int], list[int], list[int]]:
    """Disjoint index pools (labelled, val, pretrain), PanNuke-format tiles first."""
    order = sorted(range(len(images)), key=lambda i: (images["source"].iloc[i] != "pannuke", i))
    need = n_lab + n_val + n_pre
    if need > len(order):
        from cellcurate.errors import ConfigError

        raise ConfigError(f"the split holds {len(order)} images; --labelled + --val + --pretrain asks for {need}")
    return order[:n_lab], order[n_lab:n_lab + n_val], order[n_lab + n_val:need]


def evaluate(model: Any, test_ds: Any, tile: int) -> dict[str, float]:
    """The summary metrics of ``model`` on ``test_ds`` (the ``curate evaluate`` path)."""
    from cellcurate.models.evaluate import evaluate_models

    r = evaluate_models({"m": model}, test_ds, tile=tile, overlap=tile // 4, progress=False)["models"]["m"]
    return {k: float(r[k]) for k in METRICS}


def run_student(job: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one student (one setting, one seed); runs in the main process or a worker."""
    import torch
    from torch.utils.data import Subset

    from cellcurate.datasets.release import load_release
    from cellcurate.models.checkpoint import read_config
    from cellcurate.models.data import StrippedLabels
    from cellcurate.models.losses import LossConfig
    from cellcurate.models.student import TINY_STUDENT_CHANNELS, StudentConfig
    from cellcurate.models.train import TrainConfig, distill

    torch.set_num_threads(int(job["threads"]))
    t1 = time.perf_counter()
    train = load_release(job["release"], split=job["split"])
    test = load_release(job["release"], split=job["test_split"])
    cfg = TrainConfig(epochs=job["epochs"], lr=job["lr"], seed=job["seed"], loss=LossConfig(**job["loss"]),
                      batch_size=job["batch_size"], tile_size=job["tile"], progress=False, cache_dir=job["cache_dir"],
                      val_metric="mPQ")
    res = distill(job["teacher"], Subset(train, job["idx"]), out_dir=job["out_dir"],
                  student_config=StudentConfig(channels=TINY_STUDENT_CHANNELS, dropout=job["dropout"]), config=cfg,
                  unlabelled=StrippedLabels(Subset(train, job["unl"])) if job["unl"] else None,
                  val=Subset(train, job["val"]) if job["val"] else None)
    scores = evaluate(res.model, Subset(test, list(range(job["test"]))), job["tile"])
    steps = job["epochs"] * math.ceil(int(read_config(res.out_dir)["training"]["tiles"]) / job["batch_size"])
    return {"setting": job["name"], "seed": job["seed"], "epochs": job["epochs"], "steps": steps,
            "tiles": len(job["idx"]), "unlabelled": len(job["unl"]), "seconds": time.perf_counter() - t1,
            "parameters": res.parameters, **scores}


def write_runs(out: Path, runs: list[dict[str, Any]]) -> None:
    """``out/runs.csv``: one row per run so far (rewritten after every run)."""
    out.mkdir(parents=True, exist_ok=True)
    fields = sorted({k for r in runs for k in r}, key=lambda k: (k not in ("setting", "seed"), k))
    with open(out / "runs.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(runs)


#: Written beside each teacher checkpoint: the settings it was trained with, its time and test figures.
TEACHER_SPEC = "bench_teacher.json"


def teacher_batch(args: argparse.Namespace, key: str, n_frac: int, n_lab: int) -> int:
    """The all-labelled teacher's batch; the fraction-teacher's is scaled so both take the same steps."""
    return int(args.teacher_batch_size) if key == "all" else max(1, round(args.teacher_batch_size * n_frac / n_lab))


def teacher_spec(args: argparse.Namespace, idx: list[int], val_idx: list[int], pre_idx: list[int],
                 batch_size: int) -> dict[str, Any]:
    """Everything a teacher of this benchmark depends on (compared before one is reused)."""
    return {"release": str(Path(args.release).resolve()), "split": args.split, "tiles": list(idx),
            "val": list(val_idx), "pretrain": list(pre_idx) or list(idx), "encoder": args.teacher_encoder,
            "pretrain_epochs": args.pretrain_epochs, "epochs": args.teacher_epochs, "lr": args.teacher_lr,
            "batch_size": batch_size, "tile": args.tile}


def write_teacher_spec(folder: Path, spec: dict[str, Any], **extra: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TEACHER_SPEC).write_text(json.dumps({"spec": spec, **extra}, indent=1) + "\n", encoding="utf-8")


def read_teacher_spec(folder: Path) -> dict[str, Any]:
    from cellcurate.errors import ConfigError

    path = folder / TEACHER_SPEC
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; --teachers needs the teachers/ folder of an earlier run") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict):
        raise ConfigError(f"{path}: holds no teacher settings")
    return doc


def per_seed_table(runs: list[dict[str, Any]]) -> str:
    """Every run (teachers and students) as a Markdown table."""
    lines = ["| setting | seed | " + " | ".join(METRICS.values()) + " | s |",
             "| --- | ---: | " + " | ".join("---:" for _ in METRICS) + " | ---: |"]
    for r in runs:
        lines.append(f"| {r['setting']} | {r['seed']} | " + " | ".join(f"{r[k]:.3f}" for k in METRICS)
                     + f" | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--release", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path, help="folder for table.md/csv, runs.csv/json, checkpoints, cache")
    ap.add_argument("--split", default="train", help="split the labelled, val and pretrain pools come from")
    ap.add_argument("--test-split", default="test")
    ap.add_argument("--labelled", type=int, default=32, help="labelled tiles (the students' training tiles)")
    ap.add_argument("--val", type=int, default=4, help="validation tiles (teachers' best-epoch selection)")
    ap.add_argument("--pretrain", type=int, default=44,
                    help="tiles for the teacher encoder's pre-training (0: each teacher's own labelled tiles)")
    ap.add_argument("--test", type=int, default=16, help="test images")
    ap.add_argument("--tile", type=int, default=256, help="training tile (crop) size, a multiple of 32")
    ap.add_argument("--epochs", type=int, default=6, help="student epochs over the labelled tiles")
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--teacher-encoder", default="demo", help="'demo' (the demo's ViT-S/16 9-block), or an encoder name")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--lr", type=float, default=3e-3, help="student learning rate")
    ap.add_argument("--teacher-lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=4, help="student batch size")
    ap.add_argument("--teacher-batch-size", type=int, default=8,
                    help="teacher batch size on all labelled tiles (the fraction-teacher's is this × the fraction, "
                         "so both teachers take the same optimiser steps and validations)")
    ap.add_argument("--student-val", action="store_true", help="students too pick their best epoch on --val tiles")
    ap.add_argument("--teachers", type=Path, metavar="DIR",
                    help="reuse the teachers an earlier run wrote to DIR (its OUT/teachers) instead of training them; "
                         "refused unless they were trained with this run's settings")
    ap.add_argument("--only", nargs="+", metavar="LETTER", help="run only these settings (a-e)")
    ap.add_argument("--jobs", type=int, default=2,
                    help="student runs at a time, each in its own process with --threads threads")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 is several times faster than 2 on a loaded 2-core machine")
    args = ap.parse_args(argv)

    import torch
    from torch.utils.data import Subset

    from cellcurate.cli.demo import DEMO_ENCODER
    from cellcurate.cli.train import TINY_DECODER
    from cellcurate.datasets.release import load_release
    from cellcurate.errors import ConfigError
    from cellcurate.models.encoders import EncoderSpec
    from cellcurate.models.checkpoint import load_model
    from cellcurate.models.losses import LossConfig
    from cellcurate.models.pretrain import pretrain_encoder
    from cellcurate.models.student import TINY_STUDENT_CHANNELS
    from cellcurate.models.teacher import TeacherConfig, build_teacher, count_parameters
    from cellcurate.models.train import TrainConfig, train_teacher

    if not 0 < args.fraction < 1:
        raise ConfigError(f"--fraction must be in (0, 1), got {args.fraction}")
    if args.tile % 32:
        raise ConfigError(f"--tile must be a multiple of 32, got {args.tile}")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    train = load_release(args.release, split=args.split)
    test = load_release(args.release, split=args.test_split)
    lab, val_idx, pre_idx = _pools(train.images, args.labelled, args.val, args.pretrain)
    n_frac = max(1, round(args.fraction * len(lab)))
    frac, rest = lab[:n_frac], lab[n_frac:]
    if not rest:
        raise ConfigError(f"--fraction {args.fraction} of {len(lab)} labelled tiles leaves no unlabelled tile")
    test_ds = Subset(test, list(range(min(args.test, len(test)))))
    val_ds = Subset(train, val_idx) if val_idx else None
    out: Path = args.out
    work = out / "work"
    if work.exists():
        shutil.rmtree(work)  # checkpoints of an earlier run; the cache is reused only within one run
    work.mkdir(parents=True)
    cache_dir = str(work / "cache")
    spec: Any = EncoderSpec(**DEMO_ENCODER) if args.teacher_encoder == "demo" else args.teacher_encoder
    steps_factor = math.ceil(len(lab) / len(frac))
    all_settings = {
        "a": BASELINE, "b": "(b) kd", "c": "(c) cellgennet",
        "d": f"(d) gt@{args.fraction:.0%}", "e": f"(e) cellgennet@{args.fraction:.0%}+unlabelled",
    }
    chosen = sorted(set(args.only or all_settings))
    if not set(chosen) <= set(all_settings):
        raise ConfigError(f"--only takes letters among {sorted(all_settings)}, got {args.only}")

    def log(msg: str) -> None:
        print(msg, flush=True)

    log("== configuration")
    log(f"release {args.release}; split {args.split!r}: {len(lab)} labelled tiles ({len(frac)} in the "
        f"{args.fraction:.0%} settings, {len(rest)} unlabelled there), {len(val_idx)} val, {len(pre_idx)} encoder "
        f"pre-training{' (0: each teacher pre-trains on its own labelled tiles)' if not pre_idx else ''}; "
        f"{len(test_ds)} test images of {args.test_split!r}")
    log(f"tile {args.tile} px; teacher: {args.teacher_encoder} encoder, pre-trained {args.pretrain_epochs} epochs, "
        f"decoder {TINY_DECODER} trained {args.teacher_epochs} epochs (batch {args.teacher_batch_size}; "
        f"{max(1, round(args.teacher_batch_size * len(frac) / len(lab)))} for the fraction-teacher) at lr "
        f"{args.teacher_lr} (best epoch on val mPQ); student: tiny U-Net {TINY_STUDENT_CHANNELS}, {args.epochs} epochs "
        f"(batch {args.batch_size}) at lr {args.lr} ({args.epochs * steps_factor} epochs for (d)), "
        f"{'best epoch on val mPQ' if args.student_val else 'last epoch'}; seeds {args.seeds}; settings {chosen}")
    log(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"{os.cpu_count()} CPUs, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


    def new_teacher() -> Any:
        torch.manual_seed(0)
        return build_teacher(spec, random_init=True,
                             config=TeacherConfig(decoder_channels=TINY_DECODER, tile_size=args.tile, encoder_input="resize"))

    pretrain_seconds = [0.0]

    def pretrained(idx: list[int]) -> Any:
        t = new_teacher()
        t0 = time.perf_counter()
        hist = pretrain_encoder(t, Subset(train, idx), epochs=args.pretrain_epochs, lr=1e-3, tile_size=args.tile,
                                batch_size=args.teacher_batch_size, seed=0)
        log(f"encoder pre-trained on {len(idx)} tiles, {args.pretrain_epochs} epochs: loss {hist[0]['loss']:.3f} -> "
            f"{hist[-1]['loss']:.3f} ({time.perf_counter() - t0:.0f} s)")
        pretrain_seconds[0] = time.perf_counter() - t0
        return t

    rows: dict[str, list[dict[str, float]]] = {}
    runs: list[dict[str, Any]] = []
    teachers: dict[str, Any] = {}
    log("\n== teachers (trained once, seed 0)")
    t0 = time.perf_counter()
    needs = {"all": bool({"b", "c"} & set(chosen)), "frac": "e" in chosen}
    pools = {"all": lab, "frac": frac}
    titles = {"all": "teacher (all labelled)", "frac": f"teacher ({args.fraction:.0%} labelled)"}
    test_id = {"test_split": args.test_split, "test": len(test_ds), "tile": args.tile}
    specs = {key: teacher_spec(args, pools[key], val_idx, pre_idx, teacher_batch(args, key, len(frac), len(lab)))
             for key in pools}
    reuse = {key: (args.teachers / key if args.teachers else None) for key in pools}
    for key in [k for k in pools if needs[k] and reuse[k] is not None]:
        recorded = read_teacher_spec(reuse[key])  # type: ignore[arg-type]
        if recorded["spec"] != specs[key]:
            diff = sorted(k for k in set(recorded["spec"]) | set(specs[key])
                          if recorded["spec"].get(k) != specs[key].get(k))
            raise ConfigError(f"{reuse[key] / TEACHER_SPEC}: teacher trained with other settings ({', '.join(diff)}); "
                              "drop --teachers to train it again")
    shared = None
    for key in pools:
        if not needs[key]:
            continue
        t1 = time.perf_counter()
        folder = out / "teachers" / key
        if reuse[key] is not None:
            src = reuse[key]
            model = load_model(src / "best" if (src / "best" / "model.pt").is_file() else src).eval()
            recorded = read_teacher_spec(src)
            how = (f"reused from {src} (trained there in {recorded['seconds']:.0f} s after {recorded['pretrain_seconds']:.0f} s "
                   f"of encoder pre-training, {recorded['best']})")
            seconds, best = float(recorded["seconds"]), recorded["best"]
            scores = recorded.get("scores") if recorded.get("test_id") == test_id else None
            if src.resolve() != folder.resolve():  # OUT keeps the teachers its table came from
                if folder.exists():
                    shutil.rmtree(folder)
                shutil.copytree(src, folder)
        else:
            if shared is None and pre_idx:
                shared = pretrained(pre_idx)
            model = copy.deepcopy(shared) if shared is not None else pretrained(pools[key])
            cfg = TrainConfig(epochs=args.teacher_epochs, lr=args.teacher_lr, seed=0, batch_size=specs[key]["batch_size"],
                              tile_size=args.tile, progress=False, cache_dir=cache_dir, val_metric="mPQ")
            if folder.exists():
                shutil.rmtree(folder)
            res = train_teacher(Subset(train, pools[key]), out_dir=folder, model=model, config=cfg, val=val_ds)
            model, seconds = res.model, time.perf_counter() - t1
            best = f"best epoch {res.best['epoch']}/{args.teacher_epochs}" if res.best else "last epoch"
            how, scores = best, None
        teachers[key] = model
        if scores is None:
            scores = evaluate(model, test_ds, args.tile)
        write_teacher_spec(folder, specs[key], seconds=seconds, best=best, scores=scores, test_id=test_id,
                           pretrain_seconds=recorded["pretrain_seconds"] if reuse[key] is not None else pretrain_seconds[0])
        rows[titles[key]] = [scores]
        n_params = count_parameters(model)
        runs.append({"setting": titles[key], "seed": 0, "seconds": seconds, "parameters": n_params, **scores})
        log(f"{titles[key]:<38} {n_params:>11,} params, {len(pools[key])} tiles, {how}: "
            + "  ".join(f"{METRICS[k]} {scores[k]:.3f}" for k in METRICS) + f"  ({time.perf_counter() - t1:.0f} s)")
    t_teachers = time.perf_counter() - t0
    teacher_params = count_parameters(next(iter(teachers.values()))) if teachers else 0

    gt_loss = LossConfig(np_tversky=0.0, kd_tp=0, kd_hv=0, kd_np=0, kd_np_bt=0, consistency=0.0)
    kd_loss = LossConfig(np_tversky=0.0, kd_np_bt=0.0, consistency=0.0)
    full_loss = LossConfig()
    # letter: (teacher, labelled indices, unlabelled indices, loss, layer-wise dropout, epochs)
    plan = {
        "a": (None, lab, None, gt_loss, 0.0, args.epochs),
        "b": ("all", lab, None, kd_loss, 0.0, args.epochs),
        "c": ("all", lab, None, full_loss, 0.2, args.epochs),
        "d": (None, frac, None, gt_loss, 0.0, args.epochs * steps_factor),
        "e": ("frac", frac, rest, full_loss, 0.2, args.epochs),
    }
    teacher_paths = {}
    for key in teachers:
        folder = out / "teachers" / key
        teacher_paths[key] = str(folder / "best" if (folder / "best" / "model.pt").is_file() else folder)
    jobs = []
    for seed in args.seeds:  # seed-major: a run stopped early still compares every setting on the same seeds
        for letter in chosen:
            tkey, idx, unl, loss, dropout, epochs = plan[letter]
            jobs.append({"release": str(args.release), "split": args.split, "test_split": args.test_split,
                         "test": len(test_ds), "tile": args.tile, "name": all_settings[letter], "letter": letter,
                         "seed": seed, "idx": idx, "unl": unl or [], "loss": loss.to_dict(), "dropout": dropout,
                         "epochs": epochs, "lr": args.lr, "batch_size": args.batch_size, "cache_dir": cache_dir,
                         "out_dir": str(work / f"{letter}-seed{seed}"), "threads": args.threads,
                         "teacher": teacher_paths[tkey] if tkey else None,
                         "val": val_idx if args.student_val else None})
    log(f"\n== students (one row per run; {len(jobs)} runs, {args.jobs} at a time)")
    t0 = time.perf_counter()
    done: list[dict[str, Any]] = []

    def record(r: dict[str, Any]) -> None:
        done.append(r)
        runs.append(r)
        write_runs(out, runs)
        log(f"{r['setting']:<38} seed {r['seed']}: " + "  ".join(f"{METRICS[k]} {r[k]:.3f}" for k in METRICS)
            + f"  ({r['epochs']} epochs, {r['steps']} steps, {r['seconds']:.0f} s)")

    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            for fut in as_completed([pool.submit(run_student, j) for j in jobs]):
                record(fut.result())
    else:
        for j in jobs:
            record(run_student(j))
    order = {name: i for i, name in enumerate(all_settings.values())}
    for r in sorted(done, key=lambda r: (order[r["setting"]], r["seed"])):
        rows.setdefault(r["setting"], []).append({k: r[k] for k in METRICS})
    student_params = done[0]["parameters"] if done else None
    t_students = time.perf_counter() - t0
    total = time.perf_counter() - t_start

    tables = markdown_tables(rows)
    footer = (f"{len(lab)} labelled tiles ({len(frac)} + {len(rest)} unlabelled in the {args.fraction:.0%} settings), "
              f"{len(test_ds)} test images, tile {args.tile}, {args.epochs} student epochs, seeds {args.seeds}; "
              f"teacher {teacher_params:,} / student {student_params or 0:,} parameters; "
              f"teachers {t_teachers:.0f} s, students {t_students:.0f} s, total {total:.0f} s; load average "
              + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    log("\n== mean ± sd over seeds (teachers: one run)\n")
    log(tables)
    log("\n" + footer)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/bench_distill.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "table.md").write_text(f"# Distillation benchmark\n\n`{cmd}`\n\n{tables}\n\n{footer}\n\n## Every run\n\n"
                                  f"{per_seed_table(runs)}\n", encoding="utf-8")
    summary = summary_rows(rows)
    with open(out / "table.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    write_runs(out, runs)
    (out / "runs.json").write_text(json.dumps({"command": cmd, "args": {k: str(v) for k, v in vars(args).items()},
                                               "runs": runs, "summary": summary, "seconds": total}, indent=2) + "\n",
                                   encoding="utf-8")
    log(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'runs.csv'}, {out / 'runs.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

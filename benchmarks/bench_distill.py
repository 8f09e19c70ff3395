"""What distillation buys: students trained for the same budget from ground truth alone, distilled,
and with the full CellGenNet recipe; and with only a fraction of the tiles labelled, the teacher's
soft targets on the rest (issue 9 item 4, issue 19 item 1).

Run from the repository root on a release (``curate demo`` writes one under
``demo_out/releases/v1``)::

    .venv/bin/python benchmarks/bench_distill.py --release demo_out/releases/v1            # small CPU config
    .venv/bin/python benchmarks/bench_distill.py --release R --labelled 48 --test 16 --epochs 12 --seeds 0 1 2

Settings (tiny student, ``--seeds`` seeds each; mean ± sd over seeds):

- ``gt``: ground truth only (BCE + Dice on the nuclear map, CE + Dice + class-balanced foreground CE
  on types, MSE + gradient MSE on distance maps); no Tversky, no consistency, no dropout;
- ``kd``: ``gt`` + distillation (T²·KL on types, MSE on distance and soft nuclear maps);
- ``cellgennet``: the full recipe: BCE + Tversky, KD, consistency under flips/rotations/stain
  jitter, layer-wise dropout;
- ``gt@F``: ground truth on a fraction F (``--fraction``, 25 %) of the tiles only, for as many
  optimiser steps as the next setting (so it is not handicapped by a shorter run);
- ``cellgennet@F+unlabelled``: the full recipe on the same labelled fraction plus the other tiles
  *without their labels*, supervised only by the teacher's confidence-weighted soft targets.

The teachers (tiny-vit encoder pre-trained on the labelled tiles with
:func:`cellcurate.models.pretrain.pretrain_encoder`, then frozen, + decoder) are trained once per
labelled set: one on all labelled tiles, one on the fraction only (it must not see the labels of
the tiles it later pseudo-labels). "Same budget" = same epochs over the labelled tiles, i.e. same
optimiser steps for ``gt``/``kd``/``cellgennet``. Metrics: :mod:`cellcurate.models.metrics` on the
first ``--test`` images of the test split. Prints a Markdown table; ``--json FILE`` saves all runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METRICS = ("PQ", "mPQ", "F1_classification", "R2_counts")


def _fmt(vals: list[float]) -> str:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--release", required=True, type=Path)
    ap.add_argument("--split", default="train", help="labelled split (PanNuke-format tiles are taken first)")
    ap.add_argument("--test-split", default="test")
    ap.add_argument("--labelled", type=int, default=16, help="labelled tiles")
    ap.add_argument("--test", type=int, default=8, help="test images")
    ap.add_argument("--epochs", type=int, default=4, help="student epochs over the labelled tiles")
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch
    from torch.utils.data import Subset

    from cellcurate.datasets.release import load_release
    from cellcurate.models.data import StrippedLabels
    from cellcurate.models.evaluate import evaluate_models
    from cellcurate.models.losses import LossConfig
    from cellcurate.models.pretrain import pretrain_encoder
    from cellcurate.models.student import TINY_STUDENT_CHANNELS, StudentConfig
    from cellcurate.models.teacher import TeacherConfig, build_teacher
    from cellcurate.models.train import TrainConfig, distill, train_teacher

    torch.set_num_threads(args.threads)
    train = load_release(args.release, split=args.split)
    test = load_release(args.release, split=args.test_split)
    order = sorted(range(len(train)), key=lambda i: (train.images["source"].iloc[i] != "pannuke", i))
    lab = order[: args.labelled]
    n_frac = max(1, round(args.fraction * len(lab)))
    frac, rest = lab[:n_frac], lab[n_frac:]
    test_ds = Subset(test, list(range(min(args.test, len(test)))))
    tiny_decoder = (64, 32, 32, 16, 16)
    work = Path(tempfile.mkdtemp(prefix="bench_distill_"))
    t_start = time.perf_counter()

    def teacher_on(idx: list[int], name: str) -> Any:
        torch.manual_seed(0)
        t = build_teacher("tiny-vit", random_init=True, config=TeacherConfig(decoder_channels=tiny_decoder, encoder_input="resize"))
        pretrain_encoder(t, Subset(train, idx), epochs=args.pretrain_epochs, lr=1e-3)
        cfg = TrainConfig(epochs=args.teacher_epochs, lr=args.lr, seed=0, progress=False)
        return train_teacher(Subset(train, idx), out_dir=work / name, model=t, config=cfg).model

    def evaluate(model: Any) -> dict[str, float]:
        r = evaluate_models({"m": model}, test_ds, progress=False)["models"]["m"]
        return {k: float(r[k]) for k in METRICS}

    gt_loss = LossConfig(np_tversky=0.0, kd_tp=0, kd_hv=0, kd_np=0, kd_np_bt=0, consistency=0.0)
    kd_loss = LossConfig(np_tversky=0.0, kd_np_bt=0.0, consistency=0.0)
    full_loss = LossConfig()
    rows: dict[str, list[dict[str, float]]] = {}
    t0 = time.perf_counter()
    teacher_all = teacher_on(lab, "teacher_all")
    teacher_frac = teacher_on(frac, "teacher_frac")
    t_teachers = time.perf_counter() - t0
    rows["teacher (all labelled)"] = [evaluate(teacher_all)]
    rows[f"teacher ({args.fraction:.0%} labelled)"] = [evaluate(teacher_frac)]
    ratio = math.ceil(len(lab) / len(frac))
    settings = [
        ("gt", None, lab, None, gt_loss, 0.0, args.epochs),
        ("kd", teacher_all, lab, None, kd_loss, 0.0, args.epochs),
        ("cellgennet", teacher_all, lab, None, full_loss, 0.2, args.epochs),
        (f"gt@{args.fraction:.0%}", None, frac, None, gt_loss, 0.0, args.epochs * ratio),
        (f"cellgennet@{args.fraction:.0%}+unlabelled", teacher_frac, frac, rest, full_loss, 0.2, args.epochs),
    ]
    runs: list[dict[str, Any]] = []
    for name, teacher, idx, unl, loss, dropout, epochs in settings:
        for seed in args.seeds:
            cfg = TrainConfig(epochs=epochs, lr=args.lr, seed=seed, loss=loss, progress=False)
            t1 = time.perf_counter()
            res = distill(teacher, Subset(train, idx), out_dir=work / f"{name}-{seed}".replace("%", "pc").replace("@", "_"),
                          student_config=StudentConfig(channels=TINY_STUDENT_CHANNELS, dropout=dropout), config=cfg,
                          unlabelled=StrippedLabels(Subset(train, unl)) if unl else None)
            scores = evaluate(res.model)
            rows.setdefault(name, []).append(scores)
            runs.append({"setting": name, "seed": seed, "epochs": epochs, "seconds": time.perf_counter() - t1,
                         "steps": sum(math.ceil(len(idx + (unl or [])) / cfg.batch_size) for _ in range(epochs)), **scores})
            print(f"{name:<28} seed {seed}: " + "  ".join(f"{k} {scores[k]:.3f}" for k in METRICS)
                  + f"  ({time.perf_counter() - t1:.0f} s)", file=sys.stderr, flush=True)

    print(f"\n{len(lab)} labelled tiles ({len(frac)} in the {args.fraction:.0%} setting, {len(rest)} unlabelled), "
          f"{len(test_ds)} test images, {args.epochs} student epochs, seeds {args.seeds}; "
          f"teachers {t_teachers:.0f} s, total {time.perf_counter() - t_start:.0f} s; "
          f"{platform.processor() or platform.machine()}, {args.threads} threads, load {os.getloadavg()[0]:.1f}\n")
    print("| setting | " + " | ".join(METRICS) + " |")
    print("| --- | " + " | ".join("---:" for _ in METRICS) + " |")
    for name, vals in rows.items():
        print(f"| {name} | " + " | ".join(_fmt([v[k] for v in vals]) for k in METRICS) + " |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                         "teachers": {k: v[0] for k, v in rows.items() if k.startswith("teacher")}},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

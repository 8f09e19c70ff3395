"""Teacher vs student: parameter counts, inference tiles/s and peak memory.

Run from the repository root::

    .venv/bin/python benchmarks/bench_models.py                      # CPU, tiny-vit teacher (< 1 min on 2 cores)
    .venv/bin/python benchmarks/bench_models.py --device cuda --teacher-encoder h-optimus-0 --iters 20

What is measured (each model in its own spawned process, so peaks do not mix):

- parameters: exact counts; the real H-Optimus-0 teacher is built on the ``meta`` device (no
  memory, no weights) for its count;
- tiles/s: forward passes of random (B, 3, T, T) tiles in eval mode under ``torch.inference_mode``,
  after one warm-up batch; ``--iters`` timed batches;
- peak memory: on CPU, the rise of the process's peak RSS during inference (``ru_maxrss``; the
  weights are loaded before) and the peak RSS itself; on CUDA, ``torch.cuda.max_memory_allocated``
  during inference (weights included).

Teacher encoders other than the ``tiny-*`` ones are random-initialised (speed does not depend on
the weights). Prints a table and the teacher/student ratios; ``--json FILE`` saves the numbers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from typing import Any


def _build(kind: str, encoder: str) -> Any:
    from cellcurate.models.student import Student
    from cellcurate.models.teacher import build_teacher

    if kind == "teacher":
        return build_teacher(encoder, random_init=True)
    return Student()


def _rss_mib() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024**2
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _measure(kind: str, encoder: str, device: str, tile: int, batch: int, iters: int, threads: int, queue: Any) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _build(kind, encoder).to(device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.rand(batch, 3, tile, tile, device=device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    rss_before = _rss_mib()  # weights loaded, no activation yet
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        model(x)  # warm-up (allocator, kernels); its activations count towards the peak
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        sync()
        elapsed = time.perf_counter() - t0
    result = {
        "model": kind,
        "architecture": model.meta.get("architecture"),
        "parameters": n_params,
        "tiles_per_s": batch * iters / elapsed,
        "ms_per_tile": 1000 * elapsed / (batch * iters),
        "peak_rss_mib": _rss_mib(),
        "inference_rss_rise_mib": max(0.0, _rss_mib() - rss_before) if not device.startswith("cuda") else None,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 1024**2 if device.startswith("cuda") else None,
    }
    queue.put(result)


def _run_isolated(*args: Any) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def reference_parameter_counts() -> dict[str, int]:
    """Exact parameter counts of the real H-Optimus-0 teacher (meta device) and its encoder."""
    from cellcurate.models.teacher import build_teacher

    teacher = build_teacher("h-optimus-0", meta=True)
    enc = sum(p.numel() for p in teacher.encoder.parameters())
    total = sum(p.numel() for p in teacher.parameters())
    return {"h_optimus_0_teacher": total, "h_optimus_0_encoder": enc, "h_optimus_0_decoder": total - enc}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--teacher-encoder", default="tiny-vit", help="tiny-vit (default), micro-vit, h-optimus-0, ...")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--iters", type=int, default=2, help="timed batches per model")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    env = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(torch.device(args.device)),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "tile": args.tile,
        "batch_size": args.batch_size,
        "iters": args.iters,
    }
    rows = [
        _run_isolated("teacher", args.teacher_encoder, args.device, args.tile, args.batch_size, args.iters, args.threads),
        _run_isolated("student", "", args.device, args.tile, args.batch_size, args.iters, args.threads),
    ]
    ref = reference_parameter_counts()
    t, s = rows
    ratios = {
        "parameters": t["parameters"] / s["parameters"],
        "student_speedup": s["tiles_per_s"] / t["tiles_per_s"],
        "h_optimus_0_teacher_vs_student_parameters": ref["h_optimus_0_teacher"] / s["parameters"],
    }
    mem_key = "cuda_peak_mib" if args.device.startswith("cuda") else "inference_rss_rise_mib"
    print(f"device {env['device']}, torch {env['torch']}, {args.threads} threads, tile {args.tile}², batch {args.batch_size}")
    print(f"{'model':<9}{'architecture':<48}{'parameters':>14}{'tiles/s':>10}{'ms/tile':>10}{'peak MiB':>10}")
    for r in rows:
        print(f"{r['model']:<9}{r['architecture']:<48}{r['parameters']:>14,}{r['tiles_per_s']:>10.2f}"
              f"{r['ms_per_tile']:>10.1f}{(r[mem_key] or 0):>10.0f}")
    print(f"{'ref':<9}{'cellcurate-teacher/h-optimus-0 (meta device)':<48}{ref['h_optimus_0_teacher']:>14,}")
    print(f"teacher/student: parameters ×{ratios['parameters']:.1f}, student speed-up ×{ratios['student_speedup']:.1f}; "
          f"H-Optimus-0 teacher/student parameters ×{ratios['h_optimus_0_teacher_vs_student_parameters']:.0f}")
    print(f"(peak MiB = {'CUDA max_memory_allocated' if mem_key == 'cuda_peak_mib' else 'rise of peak RSS during inference'})")
    result = {"environment": env, "models": rows, "reference": ref, "ratios": ratios}
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()

"""Encoder cost of the teacher's two input modes (native 224-px windows vs today's resize).

Prints, for the tiny-vit teacher (the demo's; random weights) on CPU, the seconds per encoded
batch of 256-px tiles at 0.25 µm/px in both modes, the token grid each one feeds the ViT, and
the ratio native / resize measured in the same run. H-Optimus-0 has the same token ratio
(16×16 = 256 tokens per 224-px window vs 9×9 = 81 resized), so the ratio carries over roughly.

    python benchmarks/bench_teacher_input.py [--tiles 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from cellcurate.models.teacher import TeacherConfig, build_teacher


def _time(teacher, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        teacher.encode(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            teacher.encode(x)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.rand(args.tiles, 3, 256, 256)
    secs = {}
    for mode in ("resize", "native"):
        t = build_teacher("tiny-vit", config=TeacherConfig(encoder_input=mode)).eval()
        grid = tuple(t.encode(x[:1])[0].shape[-2:])
        secs[mode] = _time(t, x, args.repeats)
        fed = t.native_window or t.encoder_size(256, 256)[0]
        print(f"{mode:>6}: {secs[mode]:.3f} s per {args.tiles} tiles; ViT input {fed} px; decoder grid {grid}")
    print(f"ratio native / resize: {secs['native'] / secs['resize']:.2f}x")


if __name__ == "__main__":
    main()

"""Where the host time of an eager converted layer goes: one ``hdrq.nn.QLinear`` (4096 -> 14336, W6A6 and W8A8,
dynamic and static inputs) at batch 1, timed per call (wall), its CUDA kernels' time per call (torch.profiler),
and a cProfile of the Python side (the functions with the most own time). For the host-bound eager rows of
bench_deploy (the converted MLP 3.5-4x slower than bf16 without CUDA graphs): which part of the ~250 us per
layer is the seam, the plan, the Triton launch of quantize_per_token, the torch.library dispatch.

    python bench/profile_host.py [--out host_profile.txt] [--calls 300]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import gpu_kernel_us  # noqa: E402

from hdrq.nn import QLinear  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="also write the report to this file")
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    lin = nn.Linear(4096, 14336, device=dev)
    x = torch.randn(1, 4096, device=dev, dtype=torch.bfloat16)
    report = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.calls} calls per case", ""]
    for bits in (6, 8):
        for act_scale in (None, 0.05):
            layer = QLinear.from_float(lin, bits, 8, act_scale=act_scale)
            name = f"QLinear 4096->14336 W{bits}A8 {'static' if act_scale else 'dynamic'}, batch 1"
            for _ in range(20):
                layer(x)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.calls):
                layer(x)
            torch.cuda.synchronize()
            wall_us = (time.perf_counter() - t) / args.calls * 1e6
            kernels, gpu_us = gpu_kernel_us(lambda: layer(x))
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls):
                layer(x)
            prof.disable()
            torch.cuda.synchronize()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
            report += [f"== {name}: wall {wall_us:.1f} us per call, CUDA kernels {gpu_us:.1f} us per call",
                       "kernels: " + ", ".join(f"{k} {v:.1f} us" for k, v in kernels.items()),
                       buf.getvalue()]
            print(report[-3], flush=True)
    text = "\n".join(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

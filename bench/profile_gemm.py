"""The GEMM calls that bench/gpu_check.sh's `profile` stage runs under Nsight Compute (ncu): each kernel path
at one large-M and one decode problem, two launches each (the int32 accumulator, checked against the reference,
then the bf16 epilogue with per-token scales and bias), in the fixed order of CALLS, so the ncu report reads
in that order (bench/gpu_check.sh names the ncu sections).

    ncu -k regex:gemm_ --section SpeedOfLight ... python bench/profile_gemm.py [--quick]

Run alone (no ncu) it only checks that every call runs and matches the reference accumulator.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import gemm_problem  # noqa: E402

from hdrq import reference as ref  # noqa: E402

# (label, path, bits, M, N, K): the large-M rows are where issue 8's targets are missed; the decode row is the
# 4096 x 4096 case that is launch/fill bound.
CALLS = [
    ("W8A8 wgmma cooperative", "wgmma", 8, 2048, 4096, 4096),
    ("W8A8 wgmma ping-pong", "wgmma_pp", 8, 2048, 4096, 4096),
    ("W8A8 wgmma 128x256", "wgmma256", 8, 2048, 4096, 4096),
    ("W8A8 wgmma 128x256 cluster multicast", "wgmma_mc", 8, 2048, 4096, 4096),
    ("W6A6 wgmma cooperative", "wgmma", 6, 2048, 4096, 4096),
    ("W8A8 mma", "mma", 8, 2048, 4096, 4096),
    ("W8A8 decode M=64", "decode", 8, 64, 4096, 4096),
    ("W8A8 wgmma_decode M=64", "wgmma_decode", 8, 64, 4096, 4096),
    ("W6A6 decode M=1", "decode", 6, 1, 4096, 4096),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the first three calls only")
    args = ap.parse_args()
    import hdrq._cuda as hc

    bad = 0
    for label, path, bits, m, n, k in CALLS[:3] if args.quick else CALLS:
        g = gemm_problem(m, n, k, bits)
        q, w, a, a_scale, w_scale, bias, acc, out = g.q, g.w, g.a, g.a_scale, g.w_scale, g.bias, g.acc, g.out
        hc.int_gemm_out(acc, a, a_scale[:1], w, w_scale, None, bits, path=path)  # int32 out, checked
        ok = torch.equal(acc, ref.int_matmul_acc(a, q))
        bad += not ok
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_push(label)
        plan = hc.int_gemm_out(out, a, a_scale, w, w_scale, bias, bits, path=path)  # the deployed epilogue
        torch.cuda.nvtx.range_pop()
        torch.cuda.synchronize()
        print(f"{label}: M={m} N={n} K={k} plan={plan.path} {plan.bm}x{plan.bn} s{plan.splits} "
              f"{'ok' if ok else 'WRONG'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

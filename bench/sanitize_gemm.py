"""Small GEMM calls on every kernel path, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck --error-exitcode 1 python bench/sanitize_gemm.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python bench/sanitize_gemm.py --small

Shapes with every edge the kernels handle: M below the tile, N and K not multiples of the panel, unit or
stage, odd K (byte-wise A), and forced split-K (the partial-sum hand-off). The CUDA caching allocator is
turned off so that memcheck sees each tensor as its own allocation (an overrun into a neighbouring tensor
inside one cached segment would otherwise go unnoticed). Exits non-zero if a result is wrong.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import torch  # noqa: E402

from hdrq import reference as ref  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import gemm_problem  # noqa: E402

# (path, bits, M, N, K, splits)
CASES = [
    ("decode", 8, 1, 72, 36, 1),
    ("decode", 6, 17, 40, 300, 2),
    ("decode", 8, 3, 33, 77, 1),
    ("decode", 6, 64, 48, 1024, 3),
    ("mma", 8, 129, 136, 200, 2),
    ("mma", 6, 70, 17, 64, 1),
    ("mma", 6, 300, 260, 256, 1),
    ("wgmma", 8, 200, 272, 544, 1),  # Hopper only: ragged last tiles in M, N and K
    ("wgmma", 6, 130, 144, 288, 1),
    ("wgmma_pp", 8, 200, 272, 544, 1),
    ("wgmma_pp", 6, 130, 144, 288, 1),
    ("wgmma_pp", 8, 1100, 2064, 64, 1),  # 153 tiles > SMs: CTAs with two tiles, both ping-pong consumers busy
    ("wgmma_pp", 6, 1100, 2064, 64, 1),
    ("wgmma256", 8, 200, 272, 544, 1),   # a partial 256-wide tile
    ("wgmma256", 6, 130, 400, 288, 1),
    ("wgmma256", 8, 1100, 4128, 64, 1),  # 153 tiles > SMs
    ("wgmma_mc", 8, 200, 272, 544, 1),   # a cluster pair: ragged M, N and K
    ("wgmma_mc", 8, 130, 400, 96, 1),    # odd M-tile count: the pair's second CTA is past M
    ("wgmma_mc", 8, 2200, 2064, 64, 1),  # 153 pairs > clusters: pairs walked persistently
    ("wgmma_decode", 8, 1, 272, 544, 3),  # split-K with a padding step
    ("wgmma_decode", 6, 17, 144, 288, 2),
    ("wgmma_decode", 8, 64, 4096, 1024, 8),  # 256 items: two CTAs per SM, counters shared by the splits
    # the other decode tile configurations (hdrq._cuda.DECODE_CONFIGS), run by name
    ("Decode16K256", 8, 3, 72, 600, 2),
    ("Decode16Deep", 6, 16, 40, 1100, 1),
    ("Decode32N128", 8, 20, 150, 200, 2),
    ("Decode64N128", 6, 50, 130, 300, 1),
]
SMALL = [c for c in CASES if (c[2] <= 130 and c[4] <= 300) or c[4] <= 64]
# the routes outside hdrq._C, through hdrq.ops.int_matmul with HDRQ_GEMM_PATH: (path, bits, M, N, K)
ROUTES = [("triton", 8, 17, 72, 300), ("triton", 6, 3, 40, 100), ("triton", 8, 130, 136, 200),
          ("int_mm", 8, 33, 72, 96), ("int_mm", 6, 40, 48, 128)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="fewer, smaller calls (racecheck is slow)")
    args = ap.parse_args()
    import hdrq._cuda as hc

    failures = 0
    hopper = torch.cuda.get_device_capability() == (9, 0)
    for path, bits, m, n, k, splits in SMALL if args.small else CASES:
        if path.startswith("wgmma") and not hopper:
            print(f"wgmma w{bits}: skipped (not an sm_90 GPU)")
            continue
        many = tuple((top, name, 64.0) for top, name, _ in hc.DISPATCH.decode_configs)
        hc.DISPATCH = dataclasses.replace(hc.DISPATCH, decode_configs=many, mma_blocks_per_sm=64.0,
                                          max_partial_fraction=1e9, max_splits=splits, min_k_tiles_per_split=1)
        g = gemm_problem(m, n, k, bits)
        q, w, a, a_scale, w_scale, bias, acc, out = g.q, g.w, g.a, g.a_scale, g.w_scale, g.bias, g.acc, g.out
        if path in hc.DECODE_CONFIGS or (path in hc.SPLIT_K_WGMMA and splits > 1):
            run = dict(plan_override=hc.plan_for_config(m, n, k, bits, path, splits))
        else:
            run = dict(path=path)
        plan = hc.int_gemm_out(acc, a, a_scale[:1], w, w_scale, None, bits, **run)
        hc.int_gemm_out(out, a, a_scale, w, w_scale, bias, bits, **run)
        ok = torch.equal(acc, ref.int_matmul_acc(a, q)) and torch.equal(
            out, ref.int_matmul(a, a_scale, w, w_scale, bits, bias, torch.bfloat16))
        failures += not ok
        print(f"{path:12s} w{bits} M={m} N={n} K={k} {plan.bm}x{plan.bn} splits={plan.splits}: "
              f"{'ok' if ok else 'WRONG'}", flush=True)
    from hdrq import ops

    for path, bits, m, n, k in ROUTES:
        g = gemm_problem(m, n, k, bits)
        os.environ["HDRQ_GEMM_PATH"] = path
        w = ops.PackedWeight(g.w, bits, (n, k), g.w_scale)
        out = ops.int_matmul(g.a, g.a_scale, w, bias=g.bias)
        os.environ.pop("HDRQ_GEMM_PATH")
        ok = torch.equal(out, ref.int_matmul(g.a, g.a_scale, g.w, g.w_scale, bits, g.bias, torch.bfloat16))
        failures += not ok
        print(f"{path:12s} w{bits} M={m} N={n} K={k}: {'ok' if ok else 'WRONG'}", flush=True)
    torch.cuda.synchronize()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Out-of-process checks of the Hopper wgmma kernels against the mma.sync kernel, for the GPU tests and benchmarks.

A wgmma kernel that faults or hangs takes its CUDA context down with it, so tests and benchmarks run each wgmma
configuration once in a separate process first (:func:`wgmma_canary`) and leave out the ones that fail. Nothing in
the library runs these: correctness is the tests' business, not the dispatch path's.

    python tests/gemm_check.py PATH      # exit 0: PATH equals mma.sync on every check shape
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

import torch

CHECK_SHAPES = ((200, 272, 544), (2048, 2048, 512))  # ragged last tiles; more tiles than SMs (persistence)
CHECK_SPLIT = (17, 272, 2080, 3)  # split-K paths also: 17 k-tiles in 3 splits of 6 (one padding step)
CHECK_ODD_PAIR = (300, 272, 544)  # cluster paths also: 3 M-tiles, so the last pair's second CTA is past M


def wgmma_mismatch(path: str, shapes=CHECK_SHAPES, device: Optional[torch.device] = None) -> Optional[str]:
    """None if the wgmma kernel with schedule ``path`` reproduces the mma kernel's int32 accumulator exactly on
    ``shapes`` for both weight widths (and, for a split-K path, on CHECK_SPLIT with its splits), else what went
    wrong."""
    from hdrq import _cuda as c
    from hdrq import ops

    device = device or torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=device).manual_seed(1234)
    cases = [(m, n, k, None) for m, n, k in shapes] + ([CHECK_SPLIT] if path in c.SPLIT_K_WGMMA else [])
    if path in c.EIGHT_BIT_ONLY:
        cases.append((*CHECK_ODD_PAIR, None))
    for m, n, k, splits in cases:
        for bits in (8, 6):
            lim = 128 if bits == 8 else 32
            q = torch.randint(-lim, lim, (n, k), dtype=torch.int8, device=device, generator=gen)
            w = ops.pack_weight(q, bits).data
            a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device, generator=gen)
            ones = torch.ones(n, dtype=torch.float32, device=device)
            got = torch.empty((m, n), dtype=torch.int32, device=device)
            want = torch.empty_like(got)
            try:
                run = (dict(path=path) if splits is None
                       else dict(plan_override=c.plan_for_config(m, n, k, bits, path, splits, device)))
                c.int_gemm_out(got, a, ones[:1], w, ones, None, bits, **run)
                c.int_gemm_out(want, a, ones[:1], w, ones, None, bits, path="mma")
                same = torch.equal(got, want)
            except Exception as e:  # a launch failure is reported, not raised
                return f"{type(e).__name__}: {e}"
            if not same:
                bad = (got != want).sum().item()
                how = "" if splits is None else f" with {splits} K splits"
                return (f"{path}{how}: {bad} of {m * n} accumulators differ from mma.sync at (M, N, K) = "
                        f"({m}, {n}, {k}), {bits}-bit")
    return None


def wgmma_canary(path: str, timeout: float = 180.0) -> tuple[bool, str]:
    """:func:`wgmma_mismatch` in a separate process: (passed, its output)."""
    try:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), path], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"the {path} check did not finish in {timeout:.0f} s (a hang)"
    return r.returncode == 0, (r.stdout + r.stderr).strip()[-2000:]


if __name__ == "__main__":
    path = sys.argv[1]
    cc = torch.cuda.get_device_capability()
    if cc != (9, 0):
        print(f"not an sm_90 GPU: {cc}")
        sys.exit(3)
    why = wgmma_mismatch(path)
    torch.cuda.synchronize()
    print(why or f"{path} == mma on every check shape")
    sys.exit(0 if why is None else 1)

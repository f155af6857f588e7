"""Where the quantizer time goes, and the quantize_per_token launch sweep (GPU).

1. Forward + backward through autograd (8192 x 8192 fp32, per channel): bench_quant.py measured it ~0.4 ms
   slower than the forward and backward kernels timed alone. Here torch.profiler lists every CUDA kernel of
   one iteration with its time, next to the do_bench time of the same call and the sum of its kernels, so
   the gap is attributed (extra kernels vs. idle GPU waiting for the host).
2. quantize_per_token on 8192 x 4096 bf16 (and 8192 x 14336): rows per program x warps, against copy bandwidth.

    python bench/tune_quant.py --out tune_quant.json
"""
from __future__ import annotations

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cli, copy_bandwidth_gbs, gpu_kernel_us, section, time_ms, write  # noqa: E402

from hdrq import ops  # noqa: E402


def host_us(fn, iters: int = 50) -> float:
    """Host time to issue one call, with the GPU kept far ahead (no sync inside the loop)."""
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / iters * 1e6


def autograd_profile(n: int) -> dict:
    dev = torch.device("cuda")
    w = torch.randn(n, n, device=dev)
    s = torch.rand(n, device=dev) * 0.05 + 0.01
    g = torch.randn_like(w)
    wr, sr = w.clone().requires_grad_(), s.clone().requires_grad_()
    zp = torch.zeros(n, device=dev)
    cases = {
        "noise_fake_quant fwd+bwd (triton)": lambda: torch.autograd.grad(
            ops.noise_fake_quant(wr, sr, bits=4, axis=0, seed=1), (wr, sr), g),
        "fake_quant fwd+bwd (triton)": lambda: torch.autograd.grad(ops.fake_quant(wr, sr, bits=6, axis=0), (wr, sr), g),
        "fake_quant fwd only (triton)": lambda: ops.fake_quant(w, s, bits=6, axis=0),
        "fake_quant bwd op only (triton)": lambda: torch.ops.hdrq.fake_quant_backward(g, w, s, 6, True, 0),
        "torch LSQ fwd+bwd": lambda: torch.autograd.grad(
            torch._fake_quantize_learnable_per_channel_affine(wr, sr, zp, 0, -32, 31, 1.0), (wr, sr), g),
    }
    rows = []
    ops.set_backend("triton")
    try:
        for name, fn in cases.items():
            per, total = gpu_kernel_us(fn)
            bench = time_ms(fn) * 1e3
            host = host_us(fn)
            kernels = "; ".join(f"{k} {v:.0f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]))
            rows.append([name, round(bench, 1), round(total, 1), round(host, 1), len(per), kernels])
            print(f"{name}: do_bench {bench:.1f} us, kernels {total:.1f} us, host {host:.1f} us: {kernels}", flush=True)
    finally:
        ops.set_backend("auto")
    return section(f"forward + backward through autograd, {n} x {n} fp32 per channel: where the time goes",
                   ["call", "do_bench us", "sum of CUDA kernels us", "host us per call", "kernels", "kernel us"],
                   rows, "do_bench: median wall time on the GPU stream (as bench_quant.py). Kernel times from "
                         "torch.profiler, per iteration. Host: time to issue one call with the GPU far behind.")


def host_profile(n: int, op: str = "noise_fake_quant") -> dict:
    """cProfile of the host side of ``op`` (noise_fake_quant or fake_quant) forward + backward through
    autograd: where the per-call launch overhead goes (Python functions by own time). Both ops run the same
    number of kernels; fake_quant's host time measured 2-3x noise_fake_quant's on the benchmark machine."""
    import cProfile
    import pstats

    dev = torch.device("cuda")
    wr = torch.randn(n, n, device=dev).requires_grad_()
    sr = (torch.rand(n, device=dev) * 0.05 + 0.01).requires_grad_()
    g = torch.randn_like(wr)
    forward = {"noise_fake_quant": lambda: ops.noise_fake_quant(wr, sr, bits=4, axis=0, seed=1),
               "fake_quant": lambda: ops.fake_quant(wr, sr, bits=6, axis=0)}[op]
    ops.set_backend("triton")
    try:
        def fn():
            return torch.autograd.grad(forward(), (wr, sr), g)

        fn()
        torch.cuda.synchronize()
        calls = 200
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        torch.cuda.synchronize()
    finally:
        ops.set_backend("auto")
    st = pstats.Stats(prof)
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:25]:
        rows.append([f"{os.path.basename(file)}:{line} {func}", round(tt / calls * 1e6, 1), round(ct / calls * 1e6, 1),
                     round(nc / calls, 1)])
    total = sum(v[2] for v in st.stats.values()) / calls * 1e6
    print(f"host profile of {op}: {total:.0f} us of Python per call; top: {rows[:5]}", flush=True)
    return section(f"host side of {op} forward + backward through autograd ({n} x {n}, triton), cProfile",
                   ["function", "own us per call", "cumulative us per call", "calls per call"], rows,
                   f"{total:.0f} us of profiled Python per forward + backward (cProfile inflates small functions).")


def per_token_sweep(copy_gbs: float) -> dict:
    from hdrq.kernels import per_token as pt
    from hdrq.kernels import runtime

    rows = []
    for m, k in ((8192, 4096), (8192, 14336), (16, 4096)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        q = torch.empty(m, k, dtype=torch.int8, device="cuda")
        sc = torch.empty(m, dtype=torch.float32, device="cuda")
        nb = x.numel() * 3 + m * 4
        ref_q, ref_s = ops.quantize_per_token(x, bits=8)
        one_pass = k <= pt.MAX_ONE_PASS
        bk = runtime.next_pow2(k) if one_pass else 2048
        for bm in (1, 2, 4) if one_pass else (1,):
            for warps in (2, 4, 8, 16):
                if bm * bk // (32 * warps) < 8:  # under 8 elements (16 bytes) per thread
                    continue

                def run(bm=bm, warps=warps):
                    pt._per_token_kernel[(triton.cdiv(m, bm),)](x, q, sc, m, k, x.stride(0), 127.0, BM=bm, BK=bk,
                                                                ONE_PASS=one_pass, IDX64=False, num_warps=warps,
                                                                **runtime.LAUNCH_OPTIONS)

                run()
                ok = torch.equal(q, ref_q) and torch.equal(sc, ref_s)
                us = time_ms(run) * 1e3
                rows.append([f"{m} x {k}", bm, bk, warps, round(us, 1), round(nb / us / 1e3),
                             round(100 * nb / us / 1e3 / copy_gbs, 1), ok])
                print(f"per_token {m}x{k} BM={bm} warps={warps}: {us:.1f} us ({100 * nb / us / 1e3 / copy_gbs:.1f}% "
                      f"of copy) equal={ok}", flush=True)
        ours = time_ms(lambda: ops.quantize_per_token(x, bits=8)) * 1e3
        rows.append([f"{m} x {k}", "default", bk, "default", round(ours, 1), round(nb / ours / 1e3),
                     round(100 * nb / ours / 1e3 / copy_gbs, 1), True])
    return section("quantize_per_token launch sweep (bf16 -> int8, 8-bit)",
                   ["M x K", "rows per program", "BK", "warps", "us", "GB/s", "% of copy", "equal to default"],
                   rows, f"Copy bandwidth in this run: {copy_gbs:.0f} GB/s. Bytes: read 2 + write 1 per element.")


def main():
    args = cli(__doc__.splitlines()[0])
    bw = copy_bandwidth_gbs()
    sections = [autograd_profile(4096 if args.quick else 8192), host_profile(1024),
                host_profile(1024, "fake_quant"), per_token_sweep(bw)]
    write(args.out, sections, {"copy_gbs": bw})


if __name__ == "__main__":
    main()

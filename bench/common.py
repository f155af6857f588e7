"""Shared helpers of the GPU benchmarks: timing, device description, JSON rows for bench/report.py.

Every benchmark script in bench/ is runnable as ``python bench/bench_<area>.py --out FILE.json`` on a GPU
machine. It times our kernel and the alternatives in the same run with :func:`time_ms` (median of
``triton.testing.do_bench``, warm-up excluded) and writes ``{"device": ..., "sections": [...]}`` where each
section is ``{"title": str, "notes": str, "columns": [...], "rows": [[...], ...]}``. ``bench/report.py``
turns those files into bench/RESULTS.md. Nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
from typing import Callable

import torch


def time_ms(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 200) -> float:
    """Median wall time of ``fn()`` on the current CUDA stream, in milliseconds."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def gpu_kernel_us(fn: Callable[[], object], iters: int = 10) -> tuple[dict, float]:
    """GPU time of ``fn()``'s CUDA kernels alone, from torch.profiler: ({kernel name: us per call}, their sum).
    Unlike :func:`time_ms`, this leaves out the time the GPU waits for the host to launch the next kernel."""
    from collections import defaultdict

    fn()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per: dict = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name[:90]] += e.device_time / iters  # device_time is in microseconds
    return dict(per), sum(per.values())


def gemm_problem(m: int, n: int, k: int, bits: int) -> argparse.Namespace:
    """Random int8 GEMM operands on the GPU: q (int weights), w = pack_weight(q, bits), a (int8 activations),
    a_scale [M], w_scale [N], bias (bf16), and empty acc (int32) and out (bf16) of [M, N]."""
    from hdrq import ops

    lo, hi = (-128, 128) if bits == 8 else (-32, 32)
    q = torch.randint(lo, hi, (n, k), dtype=torch.int8, device="cuda")
    return argparse.Namespace(
        q=q, w=ops.pack_weight(q, bits).data, a=torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda"),
        a_scale=torch.rand(m, device="cuda") + 0.1, w_scale=torch.rand(n, device="cuda") + 0.1,
        bias=torch.randn(n, device="cuda", dtype=torch.bfloat16),
        acc=torch.empty((m, n), dtype=torch.int32, device="cuda"),
        out=torch.empty((m, n), dtype=torch.bfloat16, device="cuda"))


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written) measured now, in GB/s: the memory ceiling."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def device_info() -> dict:
    import triton

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    return info


def section(title: str, columns: list[str], rows: list[list], notes: str = "") -> dict:
    return {"title": title, "notes": notes, "columns": columns, "rows": rows}


def cli(description: str, files: dict[str, str] | None = None,
        flags: dict[str, str] | None = None) -> argparse.Namespace:
    """--out and --quick, plus optional file arguments ``{"--name": "help"}`` (default None) and on/off ``flags``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    for flag, help_ in (files or {}).items():
        ap.add_argument(flag, default=None, help=help_)
    for flag, help_ in (flags or {}).items():
        ap.add_argument(flag, action="store_true", help=help_)
    return ap.parse_args()


def write(path: str, sections: list[dict], extra: dict | None = None) -> None:
    doc = {"device": device_info(), "sections": sections, **(extra or {})}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    for s in sections:
        print(f"\n## {s['title']}")
        print(" | ".join(s["columns"]))
        for r in s["rows"]:
            print(" | ".join(str(v) for v in r))

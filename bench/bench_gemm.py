"""GEMM benchmark: hdrq's W8A8 / W6A6 ``int_matmul`` against what a user would run instead, in one run, one GPU.

For y = x W^T with W of N x K in {4096 x 4096, 14336 x 4096, 4096 x 14336} and M in {1, 16, 64, 256, 2048,
8192}, times

* bf16      cuBLAS through ``F.linear`` (bf16 x bf16 -> bf16): the baseline of every speed-up;
* fp8       row-wise FP8 ``torch._scaled_mm`` (e4m3, per-row x per-column fp32 scales, bf16 out);
* int8 mm   ``torch._int_mm`` (int8 -> int32, no scales, the weights already row-major; needs M > 16);
* W8A8 / W6A6  ``hdrq.ops.int_matmul`` (per-token x per-channel scales and a bf16 bias fused, bf16 out) on the
  route of the device's routing table (``--table``: a tuned one), and with ``--paths`` on each forced path.

Timing: every implementation is captured in a CUDA graph of several calls (host overhead excluded, as in
a served model), each call on the next of several weight copies that together exceed the L2 cache (so
decode-sized calls stream their weights from HBM, as they would in a model), and the graph's replay is
timed with ``triton.testing.do_bench`` (median); the time per call is reported. Columns: microseconds per
call, TOPS (2*M*N*K / t), GB/s of weight bytes (N*K*bytes per weight / t) and the speed-up over bf16.

    python bench/bench_gemm.py --out gemm.json [--quick] [--table TABLE.json] [--paths]
"""
from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cli, copy_bandwidth_gbs, section, time_ms, write  # noqa: E402

from hdrq import ops  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from gemm_check import wgmma_canary  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
MS = [1, 16, 64, 256, 2048, 8192]
L2_ROTATE_BYTES = 150 * 2**20  # weight copies cycled per graph: three times an H100's 50 MB L2


_STREAM = []


def _warmup_stream() -> torch.cuda.Stream:
    """One side stream for every warm-up (each new stream would take another split-K workspace slot)."""
    if not _STREAM:
        _STREAM.append(torch.cuda.Stream())
    return _STREAM[0]


def graph_time_us(make_call, copies: int, reps: int, rep_ms: float = 60) -> float:
    """Median microseconds per call of ``make_call(i)`` (call i uses weight copy i % copies), captured as a
    CUDA graph of ``reps`` calls, replayed for about ``rep_ms``."""
    calls = [make_call(i % copies) for i in range(reps)]
    s = _warmup_stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture (workspaces, cuBLAS handles, autotuning)
        for c in calls[: min(reps, copies)]:
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    ms = time_ms(g.replay, warmup_ms=10, rep_ms=rep_ms)
    return ms * 1e3 / reps


class Case:
    """Inputs of one (M, N, K) for every implementation; weights in `copies` copies."""

    def __init__(self, m, n, k, copies):
        dev = "cuda"
        self.m, self.n, self.k = m, n, k
        self.x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        self.bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
        self.copies = copies
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / math.sqrt(k)
        self.w_bf16 = [w.clone() for _ in range(copies)]
        # FP8 row-wise: per-row activation scales, per-output-channel weight scales
        w_s = w.float().abs().amax(1, keepdim=True) / 448.0
        self.w_fp8 = [(w.float() / w_s).to(torch.float8_e4m3fn) for _ in range(copies)]
        self.w_fp8_scale = w_s.reshape(1, n).contiguous()
        x_s = self.x.float().abs().amax(1, keepdim=True) / 448.0
        self.x_fp8 = (self.x.float() / x_s).to(torch.float8_e4m3fn)
        self.x_fp8_scale = x_s.contiguous()
        # integer: per-token activations, per-channel weights
        self.packed = {}
        self.w_scale = {}
        for bits in (8, 6):
            qmax = 2 ** (bits - 1) - 1
            s = w.float().abs().amax(1) / qmax
            q = torch.clamp(torch.round(w.float() / s[:, None]), -qmax - 1, qmax).to(torch.int8)
            self.packed[bits] = [ops.pack_weight(q, bits, s) for _ in range(copies)]
            self.w_scale[bits] = s.contiguous()
        self.a_q = {bits: ops.quantize_per_token(self.x, bits=bits) for bits in (8, 6)}
        self.w_int8_t = [p.data.t() for p in self.packed[8]] if m > 16 else None  # _int_mm: K x N column-major


def impls(c: Case):
    """name -> make_call(copy index) for every implementation that runs at this M."""
    out = {
        "bf16 F.linear": lambda i: (lambda: F.linear(c.x, c.w_bf16[i], c.bias)),
        "fp8 _scaled_mm": lambda i: (lambda: torch._scaled_mm(c.x_fp8, c.w_fp8[i].t(), c.x_fp8_scale,
                                                               c.w_fp8_scale, out_dtype=torch.bfloat16)),
    }
    if c.m > 16:
        # layout-agnostic bytes of an int8 N x K tensor: the packed int8 weight is a permutation of the same
        # number of bytes, so the timing of this baseline is unaffected
        out["int8 _int_mm"] = lambda i: (lambda: torch._int_mm(c.a_q[8][0], c.w_int8_t[i]))
    for bits, name in ((8, "W8A8 hdrq"), (6, "W6A6 hdrq")):
        a_q, a_s = c.a_q[bits]
        out[name] = lambda i, bits=bits, a_q=a_q, a_s=a_s: (
            lambda: ops.int_matmul(a_q, a_s, c.packed[bits][i], bias=c.bias))
    return out


def route_label(m, n, k, bits) -> str:
    """The route a call takes (the routing table's, or the forced HDRQ_GEMM_PATH): path, +x8, Triton tiles."""
    import hdrq._cuda as hc

    r = hc.route(m, n, k, bits, torch.cuda.current_device())
    label = r.path + ("+x8" if r.expand and bits == 6 else "")
    if r.path == "triton":
        cfg = r.config or __import__("hdrq.kernels.gemm", fromlist=["x"]).default_config(m, n, k)
        label += f" {cfg.bm}x{cfg.bn}x{cfg.bk} s{cfg.split_k} w{cfg.num_warps} st{cfg.num_stages}"
    return label


class forced:
    """HDRQ_GEMM_PATH (and HDRQ_W6_EXPAND) set for a block: read on every call, so also while a graph is captured."""

    def __init__(self, path, expand=None):
        self.vars = {"HDRQ_GEMM_PATH": path}
        if expand is not None:
            self.vars["HDRQ_W6_EXPAND"] = "1" if expand else "0"

    def __enter__(self):
        os.environ.update(self.vars)

    def __exit__(self, *exc):
        for key in self.vars:
            os.environ.pop(key, None)


def forced_paths(m: int, bits: int, wgmma_ok: dict) -> list:
    """(path, expand) of every implementation worth forcing at this M."""
    import hdrq._cuda as hc

    out = [("triton", None)]
    if m > 16:
        out.append(("int_mm", None))
    if m <= 64:
        out += [("decode", None)] + ([("wgmma_decode", None)] if wgmma_ok.get("wgmma_decode") else [])
        return out
    out.append(("mma", None))
    for p in hc.WGMMA_PATHS:
        if p == "wgmma_decode" or not wgmma_ok.get(p):
            continue
        if bits == 8 or p in hc.EIGHT_BIT_ONLY:
            out.append((p, None))
        else:
            out += [(p, False), (p, True)]
    return out


def wgmma_checks() -> tuple[dict, str]:
    """Each wgmma configuration checked out of process (a faulting kernel must not take the run down)."""
    import hdrq._cuda as hc

    if torch.cuda.get_device_capability() != (9, 0):
        return {}, "not an sm_90 GPU: no wgmma rows"
    ok, notes = {}, []
    for path in hc.WGMMA_PATHS:
        ok[path], log = wgmma_canary(path)
        notes.append(log.splitlines()[-1] if log else f"{path}: no output")
    return ok, "wgmma kernel checks: " + "; ".join(notes)


def use_table(path):
    import hdrq._cuda as hc

    if path:
        hc.set_routing_table(hc.load_table(path))
    t = hc.routing_table()
    return (f"routing table: {t.path or 'generic rules'} (measured on the device: "
            f"{t.meta.get('measured_on_device', False)})")


def main():
    args = cli(__doc__.splitlines()[0], {"--table": "routing table (JSON) to use instead of the device's default"},
               {"--paths": "also time every path forced"})
    paths = args.paths
    ms = [1, 16, 256, 2048] if args.quick else MS
    table_note = use_table(args.table)
    print(table_note, flush=True)
    shapes = SHAPES[:2] if args.quick else SHAPES
    rows = []
    bw = copy_bandwidth_gbs()
    wgmma_ok, wgmma_note = wgmma_checks() if paths else ({}, "")
    for n, k in shapes:
        for m in ms:
            wbytes = n * k * 2
            # copies of every weight format so that even the smallest (int6) cycles through >= 150 MB
            copies = max(1, min(16, math.ceil(L2_ROTATE_BYTES / (0.75 * n * k)))) if m <= 256 else 1
            c = Case(m, n, k, copies)
            flops = 2 * m * n * k
            # calls per graph: enough work to time (~2 ms of bf16 at ~700 TFLOP/s or ~1400 GB/s)
            est_us = max(flops / 7e8, wbytes / 1.4e3)
            reps = int(min(50, max(2, 2000 / est_us)))
            times, plans = {}, {}
            for name, make in impls(c).items():
                if not name.endswith("hdrq"):
                    times[name] = graph_time_us(make, copies, reps)
                    continue
                bits = 8 if name.startswith("W8") else 6
                times[name], plans[name] = graph_time_us(make, copies, reps), route_label(m, n, k, bits)
                for path, expand in forced_paths(m, bits, wgmma_ok) if paths else []:
                    key = f"{name} [{path}{' x8' if expand else ''}]"
                    with forced(path, expand):
                        plans[key] = route_label(m, n, k, bits)
                        times[key] = graph_time_us(make, copies, reps)
            base = times["bf16 F.linear"]
            for name, us in times.items():
                bytes_per_w = 2.0 if name.startswith("bf16") else (0.75 if name.startswith("W6") else 1.0)
                rows.append([m, f"{n}x{k}", name, plans.get(name, ""), round(us, 1), round(flops / us / 1e6, 1),
                             round(n * k * bytes_per_w / us / 1e3), round(base / us, 2)])
            del c
            torch.cuda.empty_cache()
            print(f"M={m} {n}x{k}: " + ", ".join(f"{k_}={v:.1f}us" for k_, v in times.items()), flush=True)
    notes = (f"Device-to-device copy bandwidth measured in this run: {bw:.0f} GB/s. Per-call times from CUDA "
             f"graphs of several calls; weights rotated over copies totalling >= 150 MB for M <= 256 (HBM-bound "
             f"decode, as in a model). TOPS = 2*M*N*K/t; GB/s counts weight bytes only (bf16 2 B, fp8/int8 1 B, "
             f"int6 0.75 B per weight). 'plan' is the route the call took; rows '[path]' force that path "
             f"(decode / mma: the mma.sync kernels; wgmma: cooperative 128x128; wgmma_pp: ping-pong; wgmma256: "
             f"128x256; wgmma_mc: 128x256 in 2-CTA clusters multicasting the weights, 8-bit kernel; wgmma_decode: "
             f"64x128 with split-K; triton: the Triton GEMM with the epilogue fused; int_mm: torch._int_mm on the "
             f"weights made row-major per call, then the epilogue); ' x8' (W6A6): the 6-bit weights expanded to "
             f"int8 by one pass on every call (included in the time). {table_note}. {wgmma_note}")
    write(args.out, [section("GEMM y = x W^T: hdrq W8A8 / W6A6 vs cuBLAS bf16, FP8 row-wise, int8 _int_mm",
                             ["M", "N x K", "impl", "plan", "us", "TOPS", "weight GB/s", "x bf16"], rows, notes)],
          {"copy_gbs": bw})


if __name__ == "__main__":
    main()

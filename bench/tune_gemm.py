"""Routing-table tuning: every GEMM implementation at every M bucket, timed on the GPU; writes the device's table.

For N x K in {4096 x 4096, 14336 x 4096, 4096 x 14336}, M in {1, 16, 64, 256, 2048, 8192} and 8- / 6-bit weights,
times each route ``hdrq::int_matmul`` can take there (``hdrq._cuda``): the mma.sync decode kernels (M <= 64) and
general kernel (M > 64), every Hopper wgmma configuration that passes its out-of-process check (6-bit weights with
and without the expansion pass), ``torch._int_mm`` with the epilogue (M > 16), and the Triton GEMM in each candidate
tile configuration for the M (``hdrq.kernels.gemm.candidates_for``); cuBLAS bf16 in the same run. Each route is
installed as a one-rule table and timed like bench_gemm.py (CUDA graphs of several calls, weights rotated over
copies larger than L2 at M <= 256). The fastest route per (bits, N, K, M) becomes a shape rule of the table, and
per (bits, M) the route with the lowest geometric mean of (time / fastest) over the shapes becomes the rule for
other shapes. Within ``--budget-s`` seconds (cases left out are listed).

    python bench/tune_gemm.py --out tune_gemm.json --table-out TABLE.json [--quick] [--budget-s 200]
    HDRQ_GEMM_TABLE=TABLE.json python ...        # use it; or copy it into hdrq/gemm_tables/ for the device

The decode kernels' own tiles and split-K are fitted by bench/tune_decode.py.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemm import L2_ROTATE_BYTES, MS, SHAPES, Case, graph_time_us, wgmma_checks  # noqa: E402
from common import cli, copy_bandwidth_gbs, device_info, section, write  # noqa: E402

from hdrq import ops  # noqa: E402


def routes_for(hc, kg, m: int, bits: int, wgmma_ok: dict) -> list:
    """Every route worth timing at M = ``m``."""
    out = [hc.Route("triton", config=cfg) for cfg in kg.candidates_for(m)]
    if m > 16:
        out.append(hc.Route("int_mm"))
    if m <= 64:
        out.append(hc.Route("decode"))
        if wgmma_ok.get("wgmma_decode"):
            out.append(hc.Route("wgmma_decode"))
        return out
    out.append(hc.Route("mma"))
    for p in hc.WGMMA_PATHS:
        if p != "wgmma_decode" and wgmma_ok.get(p):
            expands = (True,) if p in hc.EIGHT_BIT_ONLY else ((False, True) if bits == 6 else (False,))
            out += [hc.Route(p, x) for x in expands]
    return out


def label(route) -> str:
    s = route.path + ("+x8" if route.expand else "")
    if route.config is not None:
        c = route.config
        s += f" {c.bm}x{c.bn}x{c.bk} g{c.group_m} s{c.split_k} w{c.num_warps} st{c.num_stages}"
    return s


def build_table(hc, best: dict, times: dict, meta: dict):
    """Shape rules (fastest route per bits, N, K and M bucket) then generic rules (per bits and M bucket, the route
    with the lowest geometric-mean slowdown over the shapes)."""
    rules = []
    shapes = sorted({(n, k) for _, n, k, _ in best})
    ms = sorted({m for *_, m in best})
    for bits in (8, 6):
        for n, k in shapes:
            for i, m in enumerate(ms):
                if (bits, n, k, m) in best:
                    rules.append(hc.Rule(bits, None if i == len(ms) - 1 else m, best[bits, n, k, m][1], n, k))
    for bits in (8, 6):
        for i, m in enumerate(ms):
            cases = [key for key in best if key[0] == bits and key[3] == m]
            common = None
            for key in cases:
                here = {label(r) for r in times[key]}
                common = here if common is None else common & here
            scored = []
            for lab in common or ():
                logs = [math.log(times[key][next(r for r in times[key] if label(r) == lab)] / best[key][0])
                        for key in cases]
                scored.append((math.exp(sum(logs) / len(logs)), lab))
            if scored:
                cost, lab = min(scored)
                route = next(r for r in times[cases[0]] if label(r) == lab)
                rules.append(hc.Rule(bits, None if i == len(ms) - 1 else m, route))
    return hc.RoutingTable(rules, meta)


def main():
    args = cli(__doc__.splitlines()[0], {"--table-out": "write the routing table here (JSON)",
                                         "--budget-s": "stop starting new cases after this many seconds (200)"})
    import hdrq._cuda as hc
    from hdrq.kernels import gemm as kg

    budget = float(args.budget_s or 200)
    t_start = time.time()
    ms = [1, 64, 2048] if args.quick else MS
    shapes = SHAPES[:2] if args.quick else SHAPES
    wgmma_ok, wgmma_note = wgmma_checks()
    print(wgmma_note, flush=True)
    bw = copy_bandwidth_gbs()
    grid, summary, skipped = [], [], []
    best, times = {}, {}
    for m in ms:  # every shape at one M before the next M: a cut budget leaves whole M buckets out
        for n, k in shapes:
            if time.time() - t_start > budget:
                skipped.append(f"M={m} {n}x{k}")
                continue
            copies = max(1, min(16, math.ceil(L2_ROTATE_BYTES / (0.75 * n * k)))) if m <= 256 else 1
            c = Case(m, n, k, copies)
            est_us = max(2 * m * n * k / 7e8, 2 * n * k / 1.4e3)
            reps = int(min(30, max(2, 1000 / est_us)))
            base = graph_time_us(lambda i: (lambda: F.linear(c.x, c.w_bf16[i], c.bias)), copies, reps, rep_ms=30)
            for bits in (8, 6):
                a_q, a_s = c.a_q[bits]
                key = (bits, n, k, m)
                times[key] = {}
                for r in routes_for(hc, kg, m, bits, wgmma_ok):
                    hc.set_routing_table(hc.RoutingTable([hc.Rule(bits, None, r)], {}))
                    try:
                        us = graph_time_us(lambda i: (lambda: ops.int_matmul(a_q, a_s, c.packed[bits][i], bias=c.bias)),
                                           copies, reps, rep_ms=30)
                    except Exception as e:  # a configuration that does not compile or launch here: left out
                        print(f"  {label(r)}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        continue
                    times[key][r] = us
                    grid.append([f"{n}x{k}", m, bits, label(r), round(us, 1), round(base / us, 2)])
                fastest = min(times[key].items(), key=lambda kv: kv[1])
                best[key] = (fastest[1], fastest[0])
                summary.append([f"{n}x{k}", m, bits, round(base, 1), label(fastest[0]), round(fastest[1], 1),
                                round(base / fastest[1], 2)])
                print(f"{n}x{k} M={m} w{bits}: bf16 {base:.1f} us, best {label(fastest[0])} {fastest[1]:.1f} us "
                      f"({base / fastest[1]:.2f}x)", flush=True)
            del c
            torch.cuda.empty_cache()
    hc.set_routing_table(None)
    info = device_info()
    meta = {"device": {"names": [torch.cuda.get_device_name()], "capability": list(torch.cuda.get_device_capability()),
                       "sms": torch.cuda.get_device_properties(0).multi_processor_count},
            "measured_on_device": True,
            "source": f"bench/tune_gemm.py on {info.get('gpu')} ({info['date']}, torch {info['torch']}, triton "
                      f"{info['triton']}): the fastest route per shape and M, then per M over the shapes"
                      + (f"; cases left out (budget): {', '.join(skipped)}" if skipped else ""),
            "date": datetime.date.today().isoformat()}
    table = build_table(hc, best, times, meta)
    if args.table_out:
        with open(args.table_out, "w") as f:
            json.dump(table.to_json(), f, indent=1)
    notes = (f"Copy bandwidth in this run: {bw:.0f} GB/s. CUDA graphs, weights rotated over >= 150 MB at M <= 256. "
             f"'x bf16' = cuBLAS bf16 time / this time. {wgmma_note}. Budget {budget:.0f} s; left out: "
             f"{', '.join(skipped) or 'none'}.")
    write(args.out, [
        section("Routing table tuning: the fastest route per case", ["N x K", "M", "bits", "bf16 us", "fastest route",
                                                                     "us", "x bf16"], summary, notes),
        section("Routing table tuning: every route timed", ["N x K", "M", "bits", "route", "us", "x bf16"], grid,
                notes),
        section("Routing table written", ["bits", "max M", "N", "K", "route"],
                [[r.bits, r.max_m, r.n, r.k, label(r.route)] for r in table.rules]),
    ], {"copy_gbs": bw, "table": table.to_json()})


if __name__ == "__main__":
    main()

"""Decode-path tuning: every decode tile configuration x K splits, timed on the GPU like bench_gemm.py.

For N x K in {4096 x 4096, 14336 x 4096, 4096 x 14336}, M in {1, 16, 32, 64} and 8- / 6-bit weights, times
each decode configuration of ``hdrq._cuda.DECODE_CONFIGS`` that serves M's bucket (16 / 32 / 64 rows) at
each K split count, the plan ``auto`` picks today, and cuBLAS bf16 in the same run. Same timing as
bench_gemm.py: CUDA graphs of several calls, weights rotated over copies larger than L2. Writes the full grid
and a summary (best configuration and splits per case, against ``auto``) for bench/report.py; the
dispatcher's default (``GemmDispatch.decode_configs``: configuration and split-K target per bucket) is set from it.

    python bench/tune_decode.py --out tune_decode.json [--quick] [--dispatch-out dispatch.json]
"""
from __future__ import annotations

import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemm import L2_ROTATE_BYTES, SHAPES, Case, graph_time_us  # noqa: E402
from common import cli, copy_bandwidth_gbs, section, write  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from gemm_check import wgmma_canary  # noqa: E402


MS = [1, 16, 32, 64]
SPLITS = list(range(1, 17))
BLOCKS_PER_SM = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0]  # split-K targets the fit chooses from


def bucket_configs(hc, m: int) -> list[str]:
    """Decode configurations of the smallest M bucket that holds m rows."""
    top = min(t for _, t in hc.DECODE_CONFIGS.values() if t >= m)
    return [name for name, (_, t) in hc.DECODE_CONFIGS.items() if t == top]


def fit(hc, times: dict, best: dict) -> tuple[list, list]:
    """Per decode M bucket, the (configuration, blocks per SM) whose dispatcher-predicted split counts give
    the lowest geometric-mean slowdown against the best measured plan of each case. Returns the
    ``GemmDispatch.decode_configs`` value and the table of every candidate's cost."""
    sms = hc._device_info(torch.cuda.current_device())[1]
    chosen, table = [], []
    for top in sorted({t for _, t in hc.DECODE_CONFIGS.values()}):
        cases = [c for c in best if bucket_configs(hc, c[1]) == bucket_configs(hc, top)]
        if not cases:
            continue
        cands = []
        for name in bucket_configs(hc, top):
            for b in BLOCKS_PER_SM:
                logs = []
                for shape, m, bits in cases:
                    n, k = (int(v) for v in shape.split("x"))
                    bm, bn, bk = hc.tile_info(0, hc.DECODE_CONFIGS[name][0], bits)[:3]
                    s = hc._splits(m, n, k, bits, bm, bn, bk, sms, b, hc.DISPATCH)
                    t = times.get((shape, m, bits, name, s))
                    logs.append(math.log(t / best[(shape, m, bits)][0]) if t else math.inf)
                cost = math.exp(sum(logs) / len(logs))
                cands.append((cost, name, b))
                table.append([f"M <= {top}", name, b, round(cost, 3) if math.isfinite(cost) else "n/a"])
        cost, name, b = min(cands)
        chosen.append([top, name, b])
        print(f"decode M <= {top}: {name}, {b} blocks per SM ({cost:.3f}x the best plan, geometric mean)", flush=True)
    return chosen, table


def main():
    args = cli(__doc__.splitlines()[0], {"--dispatch-out": "also write the chosen GemmDispatch fields here (JSON)"})
    import hdrq._cuda as hc

    ms = [1, 32, 64] if args.quick else MS  # one M per decode bucket
    # Hopper: the wgmma decode configuration too (its own column; the fit of decode_configs stays on mma.sync)
    wgmma_decode = torch.cuda.get_device_capability() == (9, 0) and wgmma_canary("wgmma_decode")[0]
    print(f"wgmma_decode timed: {wgmma_decode}", flush=True)
    shapes = SHAPES[:2] if args.quick else SHAPES
    bw = copy_bandwidth_gbs()
    grid, summary = [], []
    times, bests = {}, {}
    for n, k in shapes:
        for m in ms:
            copies = max(1, min(16, math.ceil(L2_ROTATE_BYTES / (0.75 * n * k))))
            c = Case(m, n, k, copies)
            reps = 20
            base = graph_time_us(lambda i: (lambda: F.linear(c.x, c.w_bf16[i], c.bias)), copies, reps)
            for bits in (8, 6):
                a_q, a_s = c.a_q[bits]
                out = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
                wbytes = n * k * (1.0 if bits == 8 else 0.75)

                def make(plan_override):
                    return lambda i: (lambda: hc.int_gemm_out(out, a_q, a_s, c.packed[bits][i].data, c.w_scale[bits],
                                                              c.bias, bits, "decode", plan_override=plan_override))

                auto = hc.plan(m, n, k, bits, torch.device("cuda"), "decode")
                auto_us = graph_time_us(make(None), copies, reps)
                best = best_wg = None
                for name in bucket_configs(hc, m) + (["wgmma_decode"] if wgmma_decode else []):
                    for s in SPLITS:
                        try:
                            pl = hc.plan_for_config(m, n, k, bits, name, s)
                        except ValueError:
                            continue
                        if math.ceil(m / pl.bm) * math.ceil(n / pl.bn) * s * pl.bm * pl.bn > 64 * 2**20:
                            continue  # a split-K partial buffer over 256 MB: not a plan worth timing
                        ran = hc.int_gemm_out(out, a_q, a_s, c.packed[bits][0].data, c.w_scale[bits], c.bias, bits,
                                              plan_override=pl)
                        assert (ran.config, ran.splits) == (pl.config, s), (ran, pl)  # no silent fallback
                        us = graph_time_us(make(pl), copies, reps, rep_ms=25)
                        grid.append([f"{n}x{k}", m, bits, name, s, round(us, 1), round(wbytes / us / 1e3),
                                     round(base / us, 2)])
                        times[(f"{n}x{k}", m, bits, name, s)] = us
                        if name == "wgmma_decode":
                            if best_wg is None or us < best_wg[0]:
                                best_wg = (us, name, s)
                        elif best is None or us < best[0]:
                            best = (us, name, s)
                bests[(f"{n}x{k}", m, bits)] = best
                auto_name = auto.path if auto.path != "decode" else next(
                    nm for nm, (i, _) in hc.DECODE_CONFIGS.items() if i == auto.config)
                wg = [f"s{best_wg[2]}", round(best_wg[0], 1), round(base / best_wg[0], 2)] if best_wg else ["", "", ""]
                summary.append([f"{n}x{k}", m, bits, round(base, 1), f"{auto_name} s{auto.splits}", round(auto_us, 1),
                                round(base / auto_us, 2), f"{best[1]} s{best[2]}", round(best[0], 1),
                                round(wbytes / best[0] / 1e3), round(base / best[0], 2), *wg])
                print(f"{n}x{k} M={m} w{bits}: bf16 {base:.1f} us, auto {auto_name} s{auto.splits} {auto_us:.1f} us, "
                      f"best {best[1]} s{best[2]} {best[0]:.1f} us", flush=True)
            del c
            torch.cuda.empty_cache()
    chosen, costs = fit(hc, {key: t for key, t in times.items() if key[3] != "wgmma_decode"}, bests)
    notes = (f"Copy bandwidth in this run: {bw:.0f} GB/s. CUDA graphs of 20 calls, weights rotated over >= 150 MB. "
             "'x bf16' = cuBLAS bf16 F.linear time / this time. GB/s counts weight bytes.")
    write(args.out, [
        section("Decode tuning: best configuration and K splits per case, against auto",
                ["N x K", "M", "bits", "bf16 us", "auto plan", "auto us", "auto x bf16", "best plan", "best us",
                 "best weight GB/s", "best x bf16", "wgmma_decode best", "its us", "its x bf16"], summary,
                notes + " 'best plan' is over the mma.sync decode configurations; 'wgmma_decode best' is the Hopper "
                "wgmma decode configuration's best split count (empty: not an sm_90 GPU)."),
        section("Decode tuning: every configuration x K splits",
                ["N x K", "M", "bits", "config", "splits", "us", "weight GB/s", "x bf16"], grid, notes),
        section("Decode tuning: the dispatcher's choice per M bucket (configuration, split-K blocks per SM)",
                ["bucket", "config", "blocks per SM", "geo-mean time / best"], costs,
                f"Chosen (GemmDispatch.decode_configs): {chosen}. Each candidate's splits are those hdrq._cuda._splits "
                "predicts; cost = geometric mean over the bucket's cases of its measured time / the best time."),
    ], {"copy_gbs": bw, "decode_configs": chosen})
    if args.dispatch_out:
        with open(args.dispatch_out, "w") as f:
            json.dump({"decode_configs": chosen}, f)


if __name__ == "__main__":
    main()

"""Streamed calibration: peak memory (CPU, in a subprocess) and, on a GPU, the device peak of a 7B-shaped
slice and the end-to-end wall time of a whole HDRQ calibration, reference backend against Triton.

    python bench/bench_stream.py memory [--layers 32] [--out stream_memory.json]   # CPU, ~1.5 GB fp32 model
    python bench/bench_stream.py [gpu] --out stream_gpu.json [--iters 100]          # one GPU, ~4 minutes

On a GPU machine it runs as a stage of bench/gpu_check.sh: ``BENCHES="stream"`` (give it a 300 s limit there).

``memory``: a random-weight Llama-shaped decoder (transformers' ``LlamaForCausalLM``: hidden 1024, FFN 2816,
16 heads, 4 key/value heads, vocabulary 2048; 34 layers make ~1.55 GB in fp32) is calibrated with HDRQ
(source = the model itself, a few iterations per block) by a child process per mode, streamed and whole;
each child reports its resident memory after ``import torch, transformers, hdrq`` (the baseline), after
building the model, and the peak during calibration (``resource.getrusage``: ``ru_maxrss``, after resetting
the high-water mark that building the model left), and the calibration caches' bytes
(``hdrq_report[i]["cache_bytes"]``, the largest block's).

``gpu``: the decoder at 7B's shapes (hidden 4096, FFN 11008, 32 heads, vocabulary 32000) cut to 2 layers,
bf16 on the CPU (the caller's model), calibrated streamed on the GPU with HDRQ for ``--iters`` iterations per
block and 32 sequences of 512 tokens at batch 4: the device's peak allocated bytes (one block at a time, so the
projection for 32 layers is the same peak plus nothing per layer: the shell holds the embeddings and head),
wall time per backend ("reference" then "triton", same seeds), and a ``torch.profiler`` table of the Triton
run's first block (where the time goes: matmuls, quantizer kernels, the rest).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

LLAMA_SMALL = dict(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                   num_key_value_heads=4)
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                num_key_value_heads=32)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def llama(shape: dict, layers: int, dtype):
    import torch
    import transformers
    from torch import nn

    cfg = transformers.LlamaConfig(**shape, num_hidden_layers=layers, use_cache=False,
                                   max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cpu"):
        lm = transformers.LlamaForCausalLM(cfg).to(dtype).eval()

    class Logits(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids).logits

    return Logits(lm).eval()


def child_memory(args) -> None:
    """One calibration in this process; prints one JSON line."""
    import torch
    import transformers  # noqa: F401  (imported before the baseline: its import is not calibration memory)

    import hdrq

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    base = rss_mb()
    model = llama(LLAMA_SMALL, args.layers, torch.float32)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    after_model = rss_mb()
    build_peak = peak_mb()
    # The peak from here on is the calibration's: reset the high-water mark that building the model (random
    # initialisation's temporaries) left (Linux: clear_refs 5 resets VmHWM, which ru_maxrss reads).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    ids = torch.randint(0, LLAMA_SMALL["vocab_size"], (args.samples, args.tokens),
                        generator=torch.Generator().manual_seed(1))
    cfg = hdrq.QuantConfig.preset("hdrq", iters=args.iters, calib_batch_size=args.batch, stream=args.mode == "streamed",
                                  verbose=False)
    t = time.perf_counter()
    q = hdrq.quantize(model, ids, cfg, source=model)
    seconds = time.perf_counter() - t
    q_mb = sum(t.numel() * t.element_size() for t in q.state_dict().values()) / 2**20
    caches = max(r["cache_bytes"] for r in q.hdrq_report) / 2**20
    print(json.dumps(dict(mode=args.mode, layers=args.layers, model_mb=model_mb, baseline_rss_mb=base,
                          after_model_rss_mb=after_model, build_peak_rss_mb=build_peak, peak_rss_mb=peak_mb(),
                          quantized_model_mb=q_mb,
                          cache_mb=caches, seconds=seconds, blocks=len(q.hdrq_report))))


def memory(args) -> list[dict]:
    rows = []
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "_child", "--mode", mode, "--layers", str(args.layers), "--iters",
               str(args.iters), "--samples", str(args.samples), "--tokens", str(args.tokens), "--batch",
               str(args.batch)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        row["peak_over_model"] = row["peak_rss_mb"] / row["model_mb"]
        row["target_mb"] = 1.5 * row["model_mb"] + row["cache_mb"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def gpu(args) -> dict:
    import torch

    import hdrq

    # --smoke: tiny shapes on the CPU (run under TRITON_INTERPRET=1): a check of the script, not a measurement
    cuda = not args.smoke
    dev = torch.device("cuda" if cuda else "cpu")
    shape = LLAMA_7B if cuda else dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                       num_key_value_heads=4)
    model = llama(shape, 2, torch.bfloat16)  # the caller's model: bf16, on the CPU
    ids = torch.randint(0, shape["vocab_size"], (32, 512) if cuda else (8, 16),
                        generator=torch.Generator().manual_seed(1))
    cfg = hdrq.QuantConfig.preset("hdrq", iters=args.iters, calib_batch_size=4, device=str(dev), stream=True,
                                  verbose=False)
    result = dict(device=torch.cuda.get_device_name() if cuda else "cpu (smoke)", torch=torch.__version__,
                  iters=args.iters, runs={})
    for backend in ("reference", "triton"):
        hdrq.set_backend(backend)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        t = time.perf_counter()
        q = hdrq.quantize(model, ids, cfg, source=model)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        blocks = {r["name"]: dict(seconds=r["seconds"], iters=r["iters"], cache_mb=r["cache_bytes"] / 2**20)
                  for r in q.hdrq_report}
        decoder = [v for k, v in blocks.items() if ".layers." in k]
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None
        run = dict(wall_s=wall, device_peak_gib=peak, blocks=blocks,
                   ms_per_iter_decoder_block=1e3 * sum(b["seconds"] for b in decoder)
                   / max(1, sum(b["iters"] for b in decoder)))
        # 32 decoder blocks at the authors' 20,000 iterations, from the measured per-iteration time
        run["projected_hours_7b_20k"] = 32 * 20000 * run["ms_per_iter_decoder_block"] / 3.6e6
        result["runs"][backend] = run
        print(backend, json.dumps(run), flush=True)
        del q
    # where the time of one Triton reconstruction goes
    from torch.profiler import ProfilerActivity, profile

    hdrq.set_backend("triton")
    small = hdrq.QuantConfig.preset("hdrq", iters=20 if cuda else 2, calib_batch_size=4, device=str(dev),
                                    stream=True, verbose=False)
    one = llama(shape, 1, torch.bfloat16)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        hdrq.quantize(one, ids[:8], small, source=one)
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25)
    result["profile_top"] = table
    print(table, flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", nargs="?", default="gpu", choices=("memory", "gpu", "_child"))
    p.add_argument("--out", default=None)
    p.add_argument("--mode", default="streamed")
    p.add_argument("--layers", type=int, default=34)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--modes", default="streamed,whole", help="memory: which calibrations to measure")
    p.add_argument("--smoke", action="store_true", help="gpu: tiny shapes on the CPU (checks the script)")
    args = p.parse_args()
    if args.what == "_child":
        args.iters = 2 if args.iters is None else args.iters
        child_memory(args)
        return
    if args.what == "memory":
        args.iters = 2 if args.iters is None else args.iters
        res = {"memory": memory(args)}
    else:
        args.iters = 100 if args.iters is None else args.iters
        res = {"gpu": gpu(args)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

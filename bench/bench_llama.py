"""A converted Llama-shaped decoder generating through transformers' ``generate`` under ``torch.compile``, against
its bf16 original, in one run, on one GPU.

The model is ``LlamaForCausalLM`` from a ``transformers.LlamaConfig`` with random weights: 4096 hidden, 14336
intermediate, 32 heads (8 key-value heads), 2 layers, a 32000-token vocabulary, bf16. ``hdrq.convert(model,
w_bits=b, a_bits=b)`` turns every ``nn.Linear`` (attention projections, MLP, LM head) into ``hdrq.nn.QLinear``
(RTN weights, dynamic per-token inputs). Each model generates greedily with a static KV cache and its forward
compiled by ``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs; a graph break inside an hdrq
layer would fail the compile). Reported: prefill time of a prompt (``generate`` of one token), decode tokens per
second (the difference between generating 1 + N and 1 tokens, over N), the compile time, and the first tokens'
agreement with bf16 (information: RTN W6A6 / W8A8 on random weights changes the argmax).

    python bench/bench_llama.py --out llama.json [--quick]
    python bench/bench_llama.py --tiny            # CPU: a tiny model, the pipeline and the compile only

Needs ``transformers`` (``pip install hdrq[real]``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hdrq  # noqa: E402

FULL = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=128)


def build(config: dict, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**config)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def variants(model, bits_list=(8, 6)) -> dict:
    out = {"bf16": model}
    for bits in bits_list:
        out[f"W{bits}A{bits}"] = hdrq.convert(model, w_bits=bits, a_bits=bits, observer="minmax", verbose=False)
    return out


def compile_forward(model, backend: str, mode=None):
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, backend=backend, mode=mode, fullgraph=True)
    return model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def generate_s(model, ids, new_tokens: int, device) -> tuple[float, torch.Tensor]:
    sync(device)
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    sync(device)
    return time.perf_counter() - t, out


def graph_breaks(model, ids) -> int:
    """Graph breaks dynamo finds in one forward of the (uncompiled) model on ``ids``."""
    torch._dynamo.reset()
    with torch.no_grad():
        return torch._dynamo.explain(model)(ids).graph_break_count


def tiny_check() -> dict:
    """CPU: the converted tiny decoder compiles with fullgraph=True (no graph break from hdrq layers), generates, and
    gives the tokens of the uncompiled converted model."""
    device = torch.device("cpu")
    model = build(TINY, device, torch.float32)
    ids = torch.randint(0, TINY["vocab_size"], (1, 8))
    result = {}
    for name, m in variants(model, bits_list=(6,)).items():  # one width: W8A8 runs the same layer code
        if name == "bf16":
            continue  # the hdrq layers are what is checked
        _, eager = generate_s(m, ids, 6, device)
        result[f"{name} graph breaks"] = graph_breaks(m, ids)
        compile_forward(m, "eager")
        _, compiled = generate_s(m, ids, 6, device)
        result[f"{name} tokens equal"] = bool(torch.equal(eager, compiled))
        torch._dynamo.reset()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="shorter prompt and decode")
    ap.add_argument("--tiny", action="store_true", help="CPU: tiny model, check the pipeline and the compile")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new model after this many seconds")
    args = ap.parse_args()
    if args.tiny:
        result = tiny_check()
        print(result)
        ok = all(v == 0 if "breaks" in k else v for k, v in result.items())
        return 0 if ok else 1
    from common import section, write

    device = torch.device("cuda")
    prompt, new = (128, 32) if args.quick else (512, 128)
    model = build(FULL, device, torch.bfloat16)
    ids = torch.randint(0, FULL["vocab_size"], (1, prompt), device=device)
    rows, first, skipped = [], {}, []
    t_start = time.perf_counter()
    models = variants(model, bits_list=(6, 8))  # bf16, then the headline W6A6, then W8A8
    for name, m in models.items():
        if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
            skipped.append(name)
            continue
        t0 = time.perf_counter()
        compile_forward(m, "inductor", "reduce-overhead")
        for _ in range(2):  # compile (prefill and decode shapes), then the CUDA graphs' warm-up and capture
            generate_s(m, ids, 1 + new, device)
        compile_s = time.perf_counter() - t0
        prefill = min(generate_s(m, ids, 1, device)[0] for _ in range(3))
        full, out = min((generate_s(m, ids, 1 + new, device) for _ in range(3)), key=lambda r: r[0])
        tok_s = new / max(full - prefill, 1e-9)
        first[name] = out[0, prompt:prompt + 16]
        agree = float((first[name] == first["bf16"]).float().mean())
        rows.append([name, round(prefill * 1e3, 2), round(tok_s, 1), round(compile_s, 1), f"{agree:.2f}"])
        print(f"{name}: prefill {prefill * 1e3:.2f} ms, decode {tok_s:.1f} tokens/s, compile {compile_s:.0f} s, "
              f"first 16 tokens equal to bf16: {agree:.2f}", flush=True)
        del m
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    base = rows[0]
    for r in rows:
        r.insert(3, f"{base[1] / r[1]:.2f}x")
        r.insert(4, f"{r[2] / base[2]:.2f}x")
    write(args.out or "llama.json", [section(
        f"Llama-shaped decoder (4096 hidden, 14336 intermediate, 2 layers, 32000 vocab, random weights), batch 1, "
        f"prompt {prompt}, {new} new tokens: generate under torch.compile(mode='reduce-overhead')",
        ["model", "prefill ms", "decode tokens/s", "prefill speed-up", "decode speed-up", "compile s",
         "first 16 tokens = bf16"], rows,
        "Greedy generate with a static KV cache; every nn.Linear converted (RTN, dynamic per-token inputs). Decode "
        "tokens/s = N / (time of 1 + N tokens - time of 1 token); best of three runs after two warm-up runs."
        + (f" Left out (time budget): {', '.join(skipped)}." if skipped else ""))])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

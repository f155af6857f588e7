"""Deploy benchmark: a converted decoder MLP against its bf16 version, in one run, on one GPU.

The MLP is a Llama-style 4096-wide block: ``down(silu(gate(x)) * up(x))`` with gate/up 4096 -> 14336 and down
14336 -> 4096 (176 M weights: 352 MB in bf16, 176 MB int8, 132 MB int6). It is converted with
``hdrq.convert(mlp, w_bits=b, a_bits=b)`` (RTN weights, dynamic per-token inputs), and also run with static
per-tensor input scales (``act="static"``, the calibrated-model path). Timed at batch 1 (decode: weight-bandwidth
bound, ideal int6 speed-up over bf16 2.67x, int8 2x) and batch 256, eager and under
``torch.compile(mode="reduce-overhead")`` (inductor with CUDA graphs; the bf16 MLP compiled the same way), plus the
gate projection alone. Before timing, every converted MLP is checked against the reference ``int_matmul`` on the
same GPU tensors.

    python bench/bench_deploy.py --out deploy.json [--quick]

Without a GPU, ``--quick`` runs a small MLP on the CPU with wall-clock timing: a smoke run of the script,
not a measurement.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cli, section, time_ms, write  # noqa: E402

import hdrq  # noqa: E402
from hdrq import ops  # noqa: E402
from hdrq.nn import QLinear  # noqa: E402

HIDDEN, INTER = 4096, 14336


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate = nn.Linear(hidden, inter, bias=False)
        self.up = nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def static_copy(mlp: nn.Module, x: torch.Tensor) -> nn.Module:
    """The converted MLP with static per-tensor input scales (min-max of the inputs each layer sees for ``x``),
    the same integer weights."""
    import copy

    out = copy.deepcopy(mlp)
    seen = {}
    hooks = [getattr(out, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0]))
             for n in ("gate", "up", "down")]
    with torch.no_grad():
        out(x)
    for h in hooks:
        h.remove()
    for name in ("gate", "up", "down"):
        d = getattr(out, name)
        s = seen[name].float().abs().amax() / (2 ** (d.a_bits - 1) - 1)
        q = QLinear(d.in_features, d.out_features, bias=False, w_bits=d.w_bits, a_bits=d.a_bits, act="static",
                    device=x.device)
        setattr(out, name, q.set_integers(d.integer_weight(), d.weight_scale, None, s.reshape(1)))
    return out


def timer(dev: torch.device):
    """``time_ms`` on a GPU; a plain wall-clock median on the CPU (smoke runs only)."""
    if dev.type == "cuda":
        return time_ms

    def cpu_ms(fn, reps: int = 5) -> float:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[reps // 2]
    return cpu_ms


def compiled_ms(model: nn.Module, hidden: int, batches, dev) -> list:
    """Microseconds per call of ``torch.compile(model, mode="reduce-overhead", fullgraph=True)`` at each batch size
    (CUDA graphs), or why it could not be timed."""
    if dev.type != "cuda":
        return ["n/a (CPU)"] * len(batches)
    out = []
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for b in batches:
        xb = torch.randn(b, hidden, device=dev, dtype=torch.bfloat16)
        try:
            for _ in range(3):  # compile, warm up, record the graph
                compiled(xb)
            out.append(f"{time_ms(lambda: compiled(xb)) * 1e3:.1f}")
        except Exception as e:  # report, do not fail the run
            out.append(f"n/a ({type(e).__name__}: {str(e)[:80]})")
    return out


def weight_mb(model: nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 1e6


@torch.no_grad()
def main() -> None:
    args = cli(__doc__.splitlines()[0])
    if not torch.cuda.is_available() and not args.quick:
        raise SystemExit("bench_deploy needs a CUDA GPU (without one, --quick makes a CPU smoke run)")
    t0 = time.time()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timed = timer(dev)
    torch.manual_seed(0)
    hidden, inter = (HIDDEN, INTER) if not args.quick else (1024, 3584)
    if dev.type == "cpu":
        hidden, inter = 256, 512
    batches = (1, 256)
    mlp = MLP(hidden, inter).to(dev, torch.bfloat16).eval()
    calib = torch.randn(64, hidden, device=dev, dtype=torch.bfloat16)

    variants = {"bf16 (cuBLAS)": mlp}
    for bits in (8, 6):
        d = hdrq.convert(mlp, w_bits=bits, a_bits=bits, observer="minmax", verbose=False)
        variants[f"W{bits}A{bits} dynamic"] = d
        variants[f"W{bits}A{bits} static"] = static_copy(d, calib)
    route_note = "CPU: the reference"
    if dev.type == "cuda":
        import hdrq._cuda as hc

        t = hc.routing_table()
        routes = {f"M={m} W{b}": hc.route(m, inter, hidden, b, torch.cuda.current_device()).path
                  for b in (8, 6) for m in batches}
        route_note = (f"routing table {t.path or 'generic'} (measured on the device: "
                      f"{t.meta.get('measured_on_device', False)}); gate-projection routes {routes}")

    # correctness on the GPU: every converted MLP against the reference int_matmul on the same tensors
    x = torch.randn(256, hidden, device=dev, dtype=torch.bfloat16)
    ref_float = mlp(x).float()
    check_rows = []

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    for name, m in variants.items():
        if m is mlp:
            continue
        y = m(x).float()
        hdrq.set_backend("reference")
        y_ref = m(x).float()
        hdrq.set_backend("auto")
        check_rows.append([name, f"{rel(y, y_ref):.2e}", f"{rel(y, ref_float):.3f}"])

    rows = []
    for name, m in variants.items():
        row = [name, f"{weight_mb(m):.1f}"]
        for b in batches:
            xb = torch.randn(b, hidden, device=dev, dtype=torch.bfloat16)
            row.append(f"{timed(lambda: m(xb)) * 1e3:.1f}")
        compiled = compiled_ms(m, hidden, batches, dev)
        row += compiled
        rows.append(row)
    base = rows[0]
    for row in rows:
        for i in range(2, 2 + 2 * len(batches)):
            try:
                row.append(f"{float(base[i]) / float(row[i]):.2f}x")
            except ValueError:
                row.append("-")

    gate_rows = []
    for name, m in variants.items():
        row = [name]
        for b in batches:
            xb = torch.randn(b, hidden, device=dev, dtype=torch.bfloat16)
            row.append(f"{timed(lambda: m.gate(xb)) * 1e3:.1f}")
        if name != "bf16 (cuBLAS)":
            g = m.gate
            xq, sq = ops.quantize_per_token(torch.randn(1, hidden, device=dev, dtype=torch.bfloat16), bits=g.a_bits)
            gemm = lambda: ops.int_matmul(xq, sq, g.packed_weights[0])  # noqa: E731
            row.append(f"{timed(gemm) * 1e3:.1f}")
        else:
            row.append("-")
        gate_rows.append(row)

    shape = f"{hidden} -> {inter} -> {hidden}"
    sections = [
        section(f"Decoder MLP {shape}: latency (us, median) and speed-up over bf16",
                ["model", "weights MB", "eager b1", "eager b256", "compiled b1", "compiled b256", "speed-up eager b1",
                 "speed-up eager b256", "speed-up compiled b1", "speed-up compiled b256"],
                rows, notes=f"{route_note}. Eager: the modules called as they are (silu and mul as eager ops). "
                            f"Compiled: torch.compile(mode='reduce-overhead', fullgraph=True) of each model (bf16 "
                            f"too), timed after warm-up and capture. Speed-ups against the bf16 MLP in the same mode."),
        section(f"Gate projection alone ({hidden} -> {inter}, us)",
                ["model", "batch 1", "batch 256", "int_matmul only, batch 1"], gate_rows),
        section("Correctness on this GPU (batch 256)",
                ["model", "rel. diff vs reference int_matmul", "rel. diff vs bf16 float MLP"], check_rows,
                notes="First column: kernel vs the exact reference (fp32 epilogue rounding only). Second: the "
                      "quantization error of RTN on random weights (information, not a check)."),
    ]
    write(args.out, sections, extra={"wall_s": round(time.time() - t0, 1), "routes": route_note,
                                     "smoke_run_on_cpu": dev.type == "cpu"})


if __name__ == "__main__":
    main()

"""Host time per call of the deploy layer and of the quantizers, with the kernels stubbed, on the CPU.

What a call costs on the host before any kernel runs: the argument checks of ``hdrq.ops``, the dispatcher (the op,
its Autograd kernel for the quantizers, the device kernel), ``QLinear``'s own work, and for the quantizers the
autograd graph and engine. Each op's CPU kernel is replaced by a stub that only allocates the outputs (what a
kernel wrapper allocates too), registered over the reference exactly as ``hdrq.set_backend`` registers kernels,
so the dispatch path is the production one and no kernel time is counted. The per-call check of scale values,
which runs on CPU tensors only (on CUDA it would sync the host), is off (``HDRQ_CHECK_VALUES=0``), so the numbers
are what a CUDA call costs the host.

Cases: ``QLinear.forward`` (4096 -> 14336, batch 1, bf16 in; W8A8 / W6A6, static and dynamic inputs); a quantizer
forward + backward (``fake_quant`` and ``noise_fake_quant``, per-channel, ``torch.autograd.grad``), alone and per
quantizer in a chain of 16 under one backward (as in a calibration step). Beside them, on the same machine and in
the same run: the stubs called directly, and the same quantizer through a bare ``torch.autograd.Function`` around
the stubs (no dispatcher): the floor of any autograd-based design. Then cProfile (own time per function) of each
case. Timing: rounds that time every case in turn (the mean over many calls, ``time.perf_counter``), the best round
of each case kept, so that cases and floors see the same quiet moments of a shared machine.

    python bench/host_cost.py [--out host_cost.json] [--calls 2000]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ["HDRQ_CHECK_VALUES"] = "0"  # as on CUDA tensors: no per-call checks of scale values on the host

from hdrq import ops  # noqa: E402
from hdrq.nn import QLinear  # noqa: E402

TARGETS_US = {"QLinear.forward": 15.0, "quantizer forward + backward": 25.0}


def _stub_quantizer(x, scale, *args):
    return torch.empty_like(x)


def _stub_quantizer_backward(grad, x, scale, *args):
    return torch.empty_like(x), torch.empty_like(scale)


def _stub_per_token(x, bits):
    return torch.empty(x.shape, dtype=torch.int8), torch.empty(x.shape[0], dtype=torch.float32)


def _stub_per_tensor(x, scale, bits, signed, zero_point):
    return torch.empty(x.shape, dtype=torch.int8)


def _stub_int_matmul(a_q, a_scale, w, w_scale, w_bits, bias, out_dtype):
    return torch.empty((a_q.shape[0], w_scale.shape[0]), dtype=out_dtype)


STUBS = {
    "fake_quant": _stub_quantizer, "noise_fake_quant": _stub_quantizer,
    "fake_quant_backward": _stub_quantizer_backward, "noise_fake_quant_backward": _stub_quantizer_backward,
    "quantize_per_token": _stub_per_token, "quantize_per_tensor": _stub_per_tensor, "int_matmul": _stub_int_matmul,
}


def stub_kernels() -> torch.library.Library:
    """Register the stubs as the ops' CPU kernels (over the reference); ``_destroy()`` the result to undo."""
    lib = torch.library.Library("hdrq", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for name, fn in STUBS.items():
            lib.impl(name, fn, "CPU")
    return lib


def per_call_us(fns: dict, calls: int, rounds: int = 15) -> dict:
    """For each ``name: (fn, calls_per_invocation)``: the best over ``rounds`` of the mean host time per call, the
    cases timed in turn within each round."""
    for fn, _ in fns.values():
        for _ in range(50):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, (fn, per) in fns.items():
            n = max(1, calls // per)
            t = time.perf_counter()
            for _ in range(n):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t) / (n * per))
    return {name: v * 1e6 for name, v in best.items()}


def profile_text(fn, calls: int, top: int = 14) -> str:
    fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    return "\n".join(lines[start:])


class _BareQuantizer(torch.autograd.Function):
    """The floor: a quantizer's autograd around the stubs with no dispatcher and no argument checks."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(x, scale)
        return _stub_quantizer(x, scale)

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        return _stub_quantizer_backward(grad, x, scale)


def cases():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 14336, bias=False)
    x = torch.randn(1, 4096, dtype=torch.bfloat16)
    out = {}
    for bits in (8, 6):
        for act_scale in (None, 0.05):
            layer = QLinear.from_float(lin, bits, bits, act_scale=act_scale)
            name = f"QLinear.forward W{bits}A{bits} {'static' if act_scale else 'dynamic'}, batch 1"
            out[name] = ("QLinear.forward", lambda layer=layer: layer(x))
    w = torch.randn(512, 512, requires_grad=True)
    s = (torch.rand(512) * 0.05 + 0.01).requires_grad_()
    g = torch.randn(512, 512)
    quantizers = {
        "fake_quant": lambda h: ops.fake_quant(h, s, bits=4, axis=0),
        "noise_fake_quant": lambda h: ops.noise_fake_quant(h, s, bits=4, axis=0, seed=1),
    }
    for qname, q in quantizers.items():
        out[f"{qname} forward + backward (autograd.grad)"] = (
            "quantizer forward + backward", lambda q=q: torch.autograd.grad(q(w), (w, s), g))

        def chain(q=q, n=16):
            h = w
            for _ in range(n):
                h = q(h)
            torch.autograd.grad(h, (w, s), g)
        out[f"{qname} forward + backward, per quantizer in a chain of 16"] = ("quantizer forward + backward",
                                                                            (chain, 16))
    floors = {
        "floor: the three stubs of a QLinear call, called directly": lambda: (
            _stub_per_token(x, 8), _stub_int_matmul(x, None, None, torch.empty(14336), 8, None, torch.bfloat16)),
        "floor: bare autograd.Function around the stubs, forward + backward (autograd.grad)": lambda: (
            torch.autograd.grad(_BareQuantizer.apply(w, s), (w, s), g)),
    }
    return out, floors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the numbers and profiles here (JSON)")
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    lib = stub_kernels()
    rows, profiles = [], {}
    try:
        measured, floors = cases()
        fns = {name: fn if isinstance(fn, tuple) else (fn, 1) for name, (_, fn) in measured.items()}
        fns.update({name: (fn, 1) for name, fn in floors.items()})
        us = per_call_us(fns, args.calls)
        for name, (target_key, _) in measured.items():
            target = TARGETS_US[target_key]
            rows.append([name, round(us[name], 1), target, "yes" if us[name] <= target else "no"])
            fn, per = fns[name]
            profiles[name] = profile_text(fn, max(1, args.calls // (4 * per)))
        rows += [[name, round(us[name], 1), "", ""] for name in floors]
    finally:
        lib._destroy()
    doc = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
           "columns": ["case", "host us per call", "target us", "met"], "rows": rows, "profiles": profiles}
    for r in rows:
        print(" | ".join(str(v) for v in r))
    for name, text in profiles.items():
        print(f"\n== cProfile: {name} (own time; cProfile inflates small functions)\n{text}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Quantizer kernels benchmark: the fused Triton kernels (hdrq.kernels) against what users would use instead,
timed in the same run on one GPU.

    python bench/bench_quant.py --out quant.json [--quick]

Sections (the targets are issue 3's "Speed"; floors and eager figures of shared/ANCHORS.md are re-measured):

1. ``noise_fake_quant`` forward, 8192 x 8192 per-channel weight, fp32 and bf16 (target >= 85% of the copy
   bandwidth measured in this run), against eager ``w + s[:, None] * (rand_like(w) - 0.5)``, a minimal
   Triton kernel with one ``tl.rand`` per element, hdrq's eager reference (same semantics: clamp, Philox),
   ``torch.fake_quantize_per_channel_affine`` (hard rounding, fp32), and histogram mode.
2. Backward, dx and ds together (target >= 75% of copy bandwidth counting read g, read x, write dx), and
   forward + backward against eager autograd.
3. ``fake_quant`` forward + backward against ``torch._fake_quantize_learnable_per_channel_affine`` (target 3x).
4. ``qdrop_fake_quant`` (one fused op) against its eager composition.
5. ``quantize_per_token`` 8192 x 4096 bf16 (target >= 80% of copy bandwidth) against eager PyTorch.
6. The calibration effect: one quantizer forward + backward over every layer of a 4096-wide Llama MLP block
   and of a ResNet-50 bottleneck (weights per channel, activations per tensor), through the public hdrq.ops,
   backend "reference" against "triton". (A whole reconstruction iteration is bench/bench_calib.py's.)
7. A sweep of the kernels' block size (``hdrq.kernels.quantizer.MAX_BLOCK``) on section 1's tensor.

Bytes per element (the roofline): forward reads x and writes y (2 x element size), backward reads g and x and
writes dx (3x), fake_quant forward + backward 5x, quantize_per_token reads x and writes one int8 (elsize + 1).
The floor is bytes / the copy bandwidth measured here. The noise kernels do about 10 integer operations per
element for Philox (one 10-round call per 4 elements) and ~10 fp32 operations, under the H100's issue rate at
memory speed; histogram mode adds an 8-step binary search per element and a histogram pass (one more read).

Without a GPU, ``--quick`` under TRITON_INTERPRET=1 runs tiny shapes on the CPU with wall-clock timing: a smoke
run of the script, not a measurement.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cli, copy_bandwidth_gbs, device_info, gpu_kernel_us, section, time_ms, write  # noqa: E402

import hdrq  # noqa: E402
from hdrq import ops  # noqa: E402
from hdrq import reference as ref  # noqa: E402

COLUMNS = ["case", "dtype", "implementation", "ms", "GB/s", "% of copy", "floor ms", "ours vs this"]


# ---------------------------------------------------------------------------------------------- timing


def make_timer(dev: torch.device):
    """Median milliseconds of ``fn()``: ``time_ms`` (do_bench) on the GPU, except for slow functions (the eager
    references, over 20 ms a call), which get the median of three CUDA-event-timed calls, since do_bench's
    estimate-warm-up-repeat protocol would spend several seconds on each. On the CPU (smoke runs) one
    wall-clock call after a warm-up."""
    if dev.type != "cuda":
        def cpu_ms(fn, **_) -> float:
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3

        return cpu_ms

    def events_ms(fn) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def gpu_ms(fn, rep_ms: float = 200) -> float:
        fn()  # compile / warm up
        first = events_ms(fn)
        if first > 20:
            return sorted([first, events_ms(fn), events_ms(fn)])[1]
        return time_ms(fn, rep_ms=rep_ms)

    return gpu_ms


def cpu_copy_gbs() -> float:
    src = torch.rand(1 << 22)
    dst = torch.empty_like(src)
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    return 2 * src.numel() * 4 * 5 / (time.perf_counter() - t) / 1e9


@contextlib.contextmanager
def backend(name: str):
    old = hdrq.get_backend()
    hdrq.set_backend(name)
    try:
        yield
    finally:
        hdrq.set_backend(old)


class Table:
    """Rows of one section: each implementation's time, bandwidth against the copy ceiling, and our speed-up."""

    def __init__(self, copy_gbs: float, timer):
        self.copy_gbs, self.timer, self.rows = copy_gbs, timer, []

    def add(self, case, dtype, impl, fn, nbytes, ours_ms=None, rep_ms=200):
        """A row of ``fn``'s wall time on the GPU stream; returns it in ms."""
        return self._row(case, dtype, impl, self.timer(fn, rep_ms=rep_ms), nbytes, ours_ms)

    def add_gpu_time(self, case, dtype, impl, fn, nbytes, ours_ms=None):
        """A row of the GPU time of ``fn``'s kernels alone (profiler), host launch gaps left out; in ms."""
        return self._row(case, dtype, impl + " [GPU kernel time only]", gpu_kernel_us(fn)[1] * 1e-3, nbytes, ours_ms)

    def _row(self, case, dtype, impl, ms, nbytes, ours_ms):
        gbs = nbytes / (ms * 1e-3) / 1e9
        floor = nbytes / (self.copy_gbs * 1e9) * 1e3
        vs = round(ms / ours_ms, 2) if ours_ms else "-"
        self.rows.append([case, str(dtype).replace("torch.", ""), impl, round(ms, 4), round(gbs), round(100 * gbs /
                          self.copy_gbs, 1), round(floor, 4), vs])
        return ms


def failed(title: str, err: BaseException) -> dict:
    traceback.print_exc()
    return section(title, ["error"], [[f"{type(err).__name__}: {err}"[:500]]], "this section failed")


# ---------------------------------------------------------------------------------------------- alternatives


def eager_noise(w, s):
    """ANCHORS.md's eager PyTorch noise quantizer (no clamp): what the authors' code and DiffQ do."""
    return w + s[:, None].to(w.dtype) * (torch.rand_like(w) - 0.5)


_MINIMAL = None


def minimal_triton_noise():
    """ANCHORS.md's minimal Triton kernel: one ``tl.rand`` (one Philox call) per element, BLOCK 1024."""
    global _MINIMAL
    if _MINIMAL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def kernel(x_ptr, y_ptr, s_ptr, seed, n, inner, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            m = offs < n
            x = tl.load(x_ptr + offs, mask=m).to(tl.float32)
            s = tl.load(s_ptr + offs // inner, mask=m)
            y = x + s * (tl.rand(seed, offs) - 0.5)
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)

        def run(w, s, seed=1):
            y = torch.empty_like(w)
            n = w.numel()
            kernel[(triton.cdiv(n, 1024),)](w, y, s, seed, n, w.shape[1], BLOCK=1024)
            return y

        _MINIMAL = run
    return _MINIMAL


def grads(y, inputs, g):
    """d(y)/d(inputs) for upstream gradient g, returned rather than accumulated into ``.grad``: timing
    ``y.backward(g)`` in a loop would also time ``x.grad += dx`` (three more passes over x) from the second call."""
    return torch.autograd.grad(y, inputs, g)


def torch_lsq(w, s, zp, qmin, qmax):
    return torch._fake_quantize_learnable_per_channel_affine(w, s, zp, 0, qmin, qmax, 1.0)


# ---------------------------------------------------------------------------------------------- sections


def noise_forward(dev, n, dtypes, t: Table, quick: bool) -> dict:
    title = f"noise_fake_quant forward, {n} x {n} per-channel (axis 0)"
    for dt in dtypes:
        w = torch.randn(n, n, device=dev).to(dt)
        s = torch.rand(n, device=dev) * 0.05 + 0.01
        nbytes = 2 * w.numel() * w.element_size() + s.numel() * 4
        with backend("triton"):
            ours = t.add(title.split(",")[0], dt, "hdrq triton (uniform)",
                         lambda: ops.noise_fake_quant(w, s, bits=4, axis=0, seed=1), nbytes)
            t.add("", dt, "hdrq triton (histogram mode)",
                  lambda: ops.noise_fake_quant(w, s, bits=4, axis=0, seed=1, mode="histogram"), nbytes + nbytes // 2)
        t.add("", dt, "eager w + s*(rand_like(w) - 0.5)", lambda: eager_noise(w, s), nbytes, ours)
        if dev.type == "cuda":
            fn = minimal_triton_noise()
            t.add("", dt, "minimal Triton, one tl.rand per element", lambda: fn(w, s), nbytes, ours)
            if dt == torch.float32:
                zp = torch.zeros(n, dtype=torch.int32, device=dev)
                t.add("", dt, "torch.fake_quantize_per_channel_affine (hard)",
                      lambda: torch.fake_quantize_per_channel_affine(w, s, zp, 0, -8, 7), nbytes, ours)
        with backend("reference"):
            t.add("", dt, "hdrq reference (eager, same semantics)",
                  lambda: ops.noise_fake_quant(w, s, bits=4, axis=0, seed=1), nbytes, ours)
        del w
    notes = ("Bytes: read x + write y. Floors in ANCHORS.md at 3017 GB/s: 0.178 ms fp32, 0.089 ms bf16; eager "
             "0.784 / 0.516 ms. Target: ours >= 85% of copy bandwidth in fp32 and bf16. Histogram mode's bytes "
             "count its extra read of x (histogram pass). 'ours vs this' = this time / ours.")
    return section(title, COLUMNS, t.rows, notes)


def noise_backward(dev, n, dtypes, t: Table) -> dict:
    title = f"noise_fake_quant backward (dx and ds), {n} x {n} per-channel"
    for dt in dtypes:
        w = torch.randn(n, n, device=dev).to(dt)
        s = torch.rand(n, device=dev) * 0.05 + 0.01
        g = torch.randn_like(w)
        nb = 3 * w.numel() * w.element_size()
        with backend("triton"):
            t.add("backward", dt, "hdrq triton (uniform)",
                  lambda: torch.ops.hdrq.noise_fake_quant_backward(g, w, s, 4, True, 0, 1, "uniform"), nb)
            t.add("", dt, "hdrq triton (histogram mode)",
                  lambda: torch.ops.hdrq.noise_fake_quant_backward(g, w, s, 4, True, 0, 1, "histogram"),
                  nb + nb // 3)
        wr, sr = w.clone().requires_grad_(), s.clone().requires_grad_()

        def ours_fb():
            grads(ops.noise_fake_quant(wr, sr, bits=4, axis=0, seed=1), (wr, sr), g)

        def eager_fb():
            grads(eager_noise(wr, sr), (wr, sr), g)

        nb5 = 5 * w.numel() * w.element_size()
        with backend("triton"):
            ours = t.add("forward + backward", dt, "hdrq triton (uniform)", ours_fb, nb5)
        t.add("", dt, "eager autograd of w + s*(rand_like(w) - 0.5)", eager_fb, nb5, ours)
        with backend("reference"):
            t.add("", dt, "hdrq reference (eager, same semantics)", ours_fb, nb5, ours)
        if dev.type == "cuda":
            with backend("triton"):
                ours_gpu = t.add_gpu_time("", dt, "hdrq triton (uniform)", ours_fb, nb5)
            t.add_gpu_time("", dt, "eager autograd of w + s*(rand_like(w) - 0.5)", eager_fb, nb5, ours_gpu)
        del w, g, wr
    notes = ("Backward bytes: read g, read x, write dx (ds: one fp32 partial per 4096 elements, then a fixed-order "
             "sum). Target: >= 75% of copy bandwidth. Forward + backward bytes: 5 x element size; ANCHORS.md "
             "eager 1.419 ms fp32 / 0.847 ms bf16, floor 0.445 / 0.222 ms. [GPU kernel time only] rows: the sum of "
             "the CUDA kernels (torch.profiler), without the GPU's waits for the host between launches.")
    return section(title, COLUMNS, t.rows, notes)


def fake_quant_fwd_bwd(dev, n, t: Table) -> dict:
    title = f"fake_quant (hard, LSQ gradients) forward + backward, {n} x {n} fp32 per-channel, 6-bit grid"
    w = torch.randn(n, n, device=dev)
    s = torch.rand(n, device=dev) * 0.05 + 0.01
    g = torch.randn_like(w)
    wr, sr = w.clone().requires_grad_(), s.clone().requires_grad_()
    zp = torch.zeros(n, device=dev)
    nb = 5 * w.numel() * 4

    def ours():
        grads(ops.fake_quant(wr, sr, bits=6, axis=0), (wr, sr), g)

    def theirs():
        grads(torch_lsq(wr, sr, zp, -32, 31), (wr, sr), g)

    with backend("triton"):
        o = t.add("fwd + bwd", torch.float32, "hdrq triton", ours, nb)
        t.add("fwd only", torch.float32, "hdrq triton", lambda: ops.fake_quant(w, s, bits=6, axis=0), 2 * nb // 5)
    t.add("fwd + bwd", torch.float32, "torch._fake_quantize_learnable_per_channel_affine", theirs, nb, o)
    with backend("reference"):
        t.add("fwd + bwd", torch.float32, "hdrq reference (eager)", ours, nb, o)
    if dev.type == "cuda":
        with backend("triton"):
            o_gpu = t.add_gpu_time("fwd + bwd", torch.float32, "hdrq triton", ours, nb)
        t.add_gpu_time("fwd + bwd", torch.float32, "torch._fake_quantize_learnable_per_channel_affine", theirs, nb,
                       o_gpu)
    notes = ("Target: ours >= 3x faster than torch's learnable fake quant (ANCHORS.md: 1.773 ms on 8192^2). "
             "[GPU kernel time only] rows: the sum of the call's CUDA kernels (torch.profiler), without the time "
             "the GPU waits for the host between launches; the other rows are wall time on the GPU stream.")
    return section(title, COLUMNS, t.rows, notes)


def qdrop(dev, n, t: Table) -> dict:
    title = f"qdrop_fake_quant (p = 0.5) forward and forward + backward, {n} x {n} bf16 per-tensor"
    x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    s = torch.tensor(0.05, device=dev)
    g = torch.randn_like(x)
    xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
    nb = 2 * x.numel() * 2

    def eager_fwd(xx, ss):
        keep = torch.rand_like(xx, dtype=torch.float32) < 0.5
        q = torch.clamp(torch.round(xx.float() / ss), -8, 7) * ss
        return torch.where(keep, xx, q.to(xx.dtype))

    for noise in (False, True):
        name = "fwd, noise q" if noise else "fwd, hard q"
        with backend("triton"):
            o = t.add(name, torch.bfloat16, "hdrq triton (one fused op)",
                      lambda: ops.qdrop_fake_quant(x, s, bits=4, seed=3, noise=noise), nb)
        if not noise:
            t.add("", torch.bfloat16, "eager where(rand < p, x, q(x))", lambda: eager_fwd(x, s), nb, o)
    with backend("triton"):
        o = t.add("fwd + bwd, hard q", torch.bfloat16, "hdrq triton",
                  lambda: grads(ops.qdrop_fake_quant(xr, sr, bits=4, seed=3), (xr, sr), g), 5 * x.numel() * 2)
    t.add("", torch.bfloat16, "eager autograd (straight-through round)",
          lambda: _eager_qdrop_fb(xr, sr, g), 5 * x.numel() * 2, o)
    return section(title, COLUMNS, t.rows, "The eager composition draws its mask with torch.rand_like.")


def _eager_qdrop_fb(x, s, g):
    keep = torch.rand_like(x, dtype=torch.float32) < 0.5
    v = x.float() / s
    q = (torch.clamp(v + (torch.round(v) - v).detach(), -8, 7) * s).to(x.dtype)
    grads(torch.where(keep, x, q), (x, s), g)


def per_token(dev, m, k, t: Table) -> dict:
    title = f"quantize_per_token, {m} x {k} bf16 -> int8 + fp32 scales"
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    nb = x.numel() * 3 + m * 4
    with backend("triton"):
        o = t.add("8-bit", torch.bfloat16, "hdrq triton (one pass)", lambda: ops.quantize_per_token(x, bits=8), nb)
        t.add("6-bit", torch.bfloat16, "hdrq triton (one pass)", lambda: ops.quantize_per_token(x, bits=6), nb)
    t.add("8-bit", torch.bfloat16, "eager PyTorch (hdrq reference)", lambda: ref.quantize_per_token(x, 8), nb, o)
    if dev.type == "cuda":
        with backend("triton"):
            o_gpu = t.add_gpu_time("8-bit", torch.bfloat16, "hdrq triton (one pass)",
                                   lambda: ops.quantize_per_token(x, bits=8), nb)
        t.add_gpu_time("8-bit", torch.bfloat16, "eager PyTorch (hdrq reference)", lambda: ref.quantize_per_token(x, 8),
                       nb, o_gpu)
    notes = "Target: >= 80% of copy bandwidth. ANCHORS.md: eager 0.594 ms, floor 0.033 ms (8192 x 4096)."
    return section(title, COLUMNS, t.rows, notes)


def _quantizer_pass(weights, acts, grads):
    """One calibration step's quantizer work: every weight through noise_fake_quant (per channel), every
    input through qdrop_fake_quant (per tensor), then the backward of all of them."""
    outs = [ops.noise_fake_quant(w, s, bits=4, axis=0, seed=i) for i, (w, s) in enumerate(weights)]
    outs += [ops.qdrop_fake_quant(a, s, bits=4, signed=signed, seed=100 + i, p=0.5)
             for i, (a, s, signed) in enumerate(acts)]
    torch.autograd.backward(outs, grads)


def calibration_effect(dev, quick: bool, timer) -> dict:
    title = "calibration effect: one quantizer forward + backward over a whole block (public hdrq.ops)"
    rows = []
    if dev.type == "cpu":
        mlp_dims, tokens, batch, hw = (16, 48), 8, 1, 4
    elif quick:
        mlp_dims, tokens, batch, hw = (1024, 2752), 512, 8, 28
    else:
        mlp_dims, tokens, batch, hw = (4096, 11008), 2048, 32, 56
    h, f = mlp_dims
    c = 8 if dev.type == "cpu" else 64  # layer1 of ResNet-50: 64 -> 256 channels
    c4 = 4 * c
    blocks = {
        f"Llama MLP {h}->{f}->{h}, {tokens} tokens, fp32": (
            [(f, h), (f, h), (h, f)], [((tokens, h), True), ((tokens, h), True), ((tokens, f), True)]),
        f"ResNet-50 bottleneck {c4}->{c}->{c}->{c4}, batch {batch} at {hw}x{hw}, fp32": (
            [(c, c4, 1, 1), (c, c, 3, 3), (c4, c, 1, 1)],
            [((batch, c4, hw, hw), False), ((batch, c, hw, hw), False), ((batch, c, hw, hw), False)]),
    }
    for name, (wshapes, ashapes) in blocks.items():
        weights = [(torch.randn(sh, device=dev).requires_grad_(),
                    (torch.rand(sh[0], device=dev) * 0.05 + 0.01).requires_grad_()) for sh in wshapes]
        acts = [(torch.randn(sh, device=dev).abs_().requires_grad_() if not signed else
                 torch.randn(sh, device=dev).requires_grad_(), torch.tensor(0.05, device=dev).requires_grad_(),
                 signed) for sh, signed in ashapes]
        grads = [torch.randn_like(w) for w, _ in weights] + [torch.randn_like(a) for a, _, _ in acts]
        elems = sum(w.numel() for w, _ in weights) + sum(a.numel() for a, _, _ in acts)
        times = {}
        for b in ("reference", "triton"):
            with backend(b):
                times[b] = timer(lambda: _quantizer_pass(weights, acts, grads))
        rows.append([name, f"{elems / 1e6:.1f} M", round(times["reference"], 3), round(times["triton"], 3),
                     round(times["reference"] / times["triton"], 1)])
        del weights, acts, grads
    notes = ("Weights: noise_fake_quant per output channel; layer inputs: qdrop_fake_quant per tensor (p = 0.5, "
             "hard q; unsigned after ReLU in the ResNet block). Forward of all six quantizers, then one "
             "autograd backward. 'reference' is hdrq's eager implementation (what runs without the kernels).")
    return section(title, ["block", "elements", "reference ms", "triton ms", "speed-up"], rows, notes)


def block_sweep(dev, n, t: Table) -> dict:
    from hdrq.kernels import quantizer as kq

    title = f"block-size sweep: noise_fake_quant forward {n} x {n} per-channel"
    default = kq.MAX_BLOCK
    try:
        for dt in (torch.float32, torch.bfloat16):
            w = torch.randn(n, n, device=dev).to(dt)
            s = torch.rand(n, device=dev) * 0.05 + 0.01
            nb = 2 * w.numel() * w.element_size()
            for blk in (1024, 2048, 4096, 8192):
                kq.MAX_BLOCK = blk
                with backend("triton"):
                    t.add(f"MAX_BLOCK={blk}" + (" (default)" if blk == default else ""), dt, "hdrq triton",
                          lambda: ops.noise_fake_quant(w, s, bits=4, axis=0, seed=1), nb)
            del w
    finally:
        kq.MAX_BLOCK = default
    return section(title, COLUMNS, t.rows, "num_warps = min(8, BLOCK / (VEC * 64)); for tuning MAX_BLOCK.")


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    t0 = time.time()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not (args.quick and os.environ.get("TRITON_INTERPRET") == "1"):
        sys.exit("bench_quant.py needs a GPU (or --quick with TRITON_INTERPRET=1 for a CPU smoke run)")
    timer = make_timer(dev)
    copy_gbs = copy_bandwidth_gbs() if dev.type == "cuda" else cpu_copy_gbs()
    print(f"copy bandwidth: {copy_gbs:.0f} GB/s", flush=True)
    if dev.type == "cuda":
        n, m, k = (4096, 4096, 4096) if args.quick else (8192, 8192, 4096)
    else:
        n, m, k = 32, 8, 96
    dtypes = (torch.float32, torch.bfloat16)
    jobs = [
        ("noise forward", lambda: noise_forward(dev, n, dtypes, Table(copy_gbs, timer), args.quick)),
        ("noise backward", lambda: noise_backward(dev, n, dtypes, Table(copy_gbs, timer))),
        ("fake_quant", lambda: fake_quant_fwd_bwd(dev, n, Table(copy_gbs, timer))),
        ("qdrop", lambda: qdrop(dev, n, Table(copy_gbs, timer))),
        ("per token", lambda: per_token(dev, m, k, Table(copy_gbs, timer))),
        ("calibration effect", lambda: calibration_effect(dev, args.quick, timer)),
    ]
    if dev.type == "cuda" and not args.quick:
        jobs.append(("block sweep", lambda: block_sweep(dev, n, Table(copy_gbs, timer))))
    sections = []
    for name, job in jobs:
        ts = time.time()
        try:
            sections.append(job())
        except Exception as e:  # report and go on: one broken section must not hide the others
            sections.append(failed(name, e))
        print(f"[{name}: {time.time() - ts:.1f} s]", flush=True)
        with open(args.out, "w") as f:  # after every section, so a timeout keeps what was measured
            json.dump({"device": device_info(), "sections": sections, "partial": True}, f, indent=1)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    write(args.out, sections, extra={"copy_gbs": round(copy_gbs), "wall_s": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()

"""Calibration benchmark: iterations per second of one HDRQ block reconstruction, backend "reference" (the
eager PyTorch ops of hdrq.reference) against "triton" (the fused kernels of hdrq.kernels), in one run.

    python bench/bench_calib.py --out calib.json [--quick]

Blocks (synthetic weights, fp32, on one GPU):

* a 4096-wide transformer block: ``nn.TransformerEncoderLayer(4096, 32 heads, FFN 16384, batch_first)``,
  decomposed attention, 6 quantized Linear layers (201M weights); 32 calibration sequences of 128 tokens,
  batch 4 (512 tokens per iteration);
* a ResNet-50 bottleneck (torchvision's layer1 shape: 256 -> 64 -> 64 -> 256 channels at 56 x 56, 1x1 / 3x3 /
  1x1 convs with BatchNorm folded, identity shortcut); 64 calibration images, batch 32.

Each is prepared once (fold, observers, cached block inputs/targets) exactly as ``hdrq.quantize`` does; then
for each backend and phase the quantized block is restored to the same starting state and
``BlockReconstructor`` runs a warm-up iteration (kernel compilation), a probe iteration, then as many timed
iterations as fit in about 2 s (CUDA-synchronised wall time of the whole loop: batch gather, forward, loss
with the distance term, backward, Adam). The
phases are HDRQ's noise phase (histogram noise, the authors' default, and uniform noise; weights and
activations, QDrop's drop at 0.5) and its hard phase (``fake_quant`` with the STE). The HDRQ column combines
them as the published schedule does: 80% noise iterations, 20% hard.

Target (issue 4): the triton backend at least 1.5x faster per iteration than the reference on the transformer
block. Without a GPU, ``--quick`` under TRITON_INTERPRET=1 runs tiny shapes on the CPU: a smoke run of the
script, not a measurement.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cli, section, write  # noqa: E402

import hdrq  # noqa: E402
from hdrq.calib import BlockCache, BlockReconstructor, QuantConfig, prepare_float, quantizable_layers  # noqa: E402
from hdrq.calib.engine import build_quant_model, observe_inputs  # noqa: E402
from hdrq.quant import quant_layers  # noqa: E402

COLUMNS = ["block", "phase", "backend", "iters timed", "ms / iter", "iters / s", "triton speedup"]


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 bottleneck (expansion 4), identity shortcut."""

    def __init__(self, inplanes: int, planes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + x)


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Synthetic but realistic BatchNorm statistics, so folding changes the weights."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=gen) * 0.1)


def make_block(kind: str, quick: bool, gen: torch.Generator) -> tuple[nn.Module, torch.Tensor, int]:
    """``(model with the block as child "0", calibration inputs, batch size)``."""
    if kind == "transformer":
        d, tokens, n, batch = (64, 8, 8, 4) if quick else (4096, 128, 32, 4)
        model = nn.Sequential(nn.TransformerEncoderLayer(d, 32 if d >= 1024 else 4, 4 * d, dropout=0.0,
                                                         batch_first=True))
        return model, torch.randn(n, tokens, d, generator=gen), batch
    inplanes, hw, n, batch = (32, 4, 8, 4) if quick else (256, 56, 64, 32)
    model = nn.Sequential(Bottleneck(inplanes, inplanes // 4))
    _randomize_bn(model, gen)
    return model, torch.relu(torch.randn(n, inplanes, hw, hw, generator=gen)), batch


class Prepared:
    """One block, prepared as ``hdrq.quantize`` prepares it, restorable to its starting state."""

    def __init__(self, kind: str, quick: bool, device: torch.device):
        gen = torch.Generator().manual_seed(0)
        model, data, batch = make_block(kind, quick, gen)
        self.cfg = QuantConfig.preset("hdrq", w_bits=4, a_bits=4, first_last_bits=None, calib_batch_size=batch,
                                      device=str(device), verbose=False)
        fp = prepare_float(model, device)
        layers = quantizable_layers(fp)
        order, signed, samples = observe_inputs(fp, layers, data, batch, device)
        self.qmodel, _ = build_quant_model(fp, layers, order, signed, samples, self.cfg)
        self.cache = BlockCache.build(fp, self.qmodel, "0", data, device, batch_size=batch, iters=4096,
                                      drop_prob=self.cfg.drop_prob, seed=0)
        # The source: the block's own weights, perturbed, so the distance term has a gradient.
        self.source = {n: (m.weight + 0.01 * m.weight.std() * torch.randn_like(m.weight)).detach()
                       for n, m in layers.items()}
        self.layers = dict(quant_layers(self.qmodel))
        self.snapshot = {k: v.clone() for k, v in self.qmodel.state_dict().items()}
        self.n_weights = sum(m.weight.numel() for m in layers.values())
        del fp

    def restore(self) -> None:
        self.qmodel.load_state_dict(self.snapshot)
        for layer in self.layers.values():
            layer.weight_quantizer.step = layer.act_quantizer.step = 0

    def _run(self, cfg: QuantConfig, iters: int) -> float:
        cfg = dataclasses.replace(cfg, iters=iters)
        rec = BlockReconstructor(self.qmodel.get_submodule("0"), self.layers, self.cache, cfg,
                                 source_weights=self.source)
        if self.cache.device.type == "cuda":
            torch.cuda.synchronize()
        return rec.run().seconds / iters

    def seconds_per_iter(self, backend: str, phase: str, budget_s: float, max_iters: int) -> tuple[float, int]:
        """Mean wall seconds of one reconstruction iteration in ``phase`` on ``backend``, and how many
        iterations were timed: one warm-up iteration (kernel compilation), a one-iteration probe, then as many
        as fit in ``budget_s`` (at least 2, at most ``max_iters``)."""
        noise_mode = {"noise (histogram)": "histogram", "noise (uniform)": "uniform"}.get(phase, "uniform")
        noise_fraction = 0.0 if phase == "hard" else 1.0
        cfg = dataclasses.replace(self.cfg, noise_fraction=noise_fraction, noise_mode=noise_mode)
        hdrq.set_backend(backend)
        self.restore()
        self._run(cfg, 1)
        probe = self._run(cfg, 1)
        n = int(min(max_iters, max(2, budget_s / probe)))
        return self._run(cfg, n), n


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    t0 = time.time()
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("bench_calib.py needs a CUDA GPU (or TRITON_INTERPRET=1 with --quick for a CPU smoke run)")
    quick = args.quick or not on_gpu
    budget_s, max_iters = (0.0, 2) if quick else (2.0, 50)  # timed seconds per (block, phase, backend)
    rows, notes = [], []
    warnings.simplefilter("ignore", RuntimeWarning)  # a missing Triton op falls back with a warning, once
    for kind in ("transformer", "bottleneck"):
        block = Prepared(kind, quick, device)
        label = (f"{kind} ({block.n_weights / 1e6:.1f}M weights, batch {block.cfg.calib_batch_size}, "
                 f"cache on {block.cache.storage})")
        per_phase = {}
        for phase in ("noise (histogram)", "noise (uniform)", "hard"):
            t, n = {}, {}
            for b in ("reference", "triton"):
                t[b], n[b] = block.seconds_per_iter(b, phase, budget_s, max_iters)
            per_phase[phase] = t
            for b in ("reference", "triton"):
                rows.append([label, phase, b, n[b], round(t[b] * 1e3, 2), round(1 / t[b], 2),
                             f"{t['reference'] / t['triton']:.2f}x" if b == "triton" else ""])
        for noise in ("histogram", "uniform"):  # HDRQ's schedule: 80% noise iterations, 20% hard
            t = {b: 0.8 * per_phase[f"noise ({noise})"][b] + 0.2 * per_phase["hard"][b] for b in ("reference", "triton")}
            for b in ("reference", "triton"):
                rows.append([label, f"HDRQ schedule ({noise})", b, "", round(t[b] * 1e3, 2), round(1 / t[b], 2),
                             f"{t['reference'] / t['triton']:.2f}x" if b == "triton" else ""])
        del block
        if on_gpu:
            torch.cuda.empty_cache()
    hdrq.set_backend("auto")
    notes.append("One iteration = cached batch gather + QDrop input mixing, block forward with every weight and "
                 "activation quantizer, reconstruction loss + distance term, backward, Adam step. Target: triton "
                 ">= 1.5x the reference per iteration on the transformer block.")
    if not on_gpu:
        notes.append("CPU smoke run under TRITON_INTERPRET=1: not a measurement.")
    write(args.out, [section("HDRQ block reconstruction: iterations per second", COLUMNS, rows, " ".join(notes))],
          extra={"wall_s": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()

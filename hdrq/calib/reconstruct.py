"""Block reconstruction: one optimisation loop for BRECQ, QDrop and HDRQ.

For a block with quantized layers and its :class:`~hdrq.calib.cache.BlockCache`, each iteration runs the
block on a batch of cached inputs and minimises

    ||block_q(x) - block_fp(x_fp)||_p^p (summed over dim 1, averaged over the rest, as BRECQ/QDrop; p = 2
                                         except in BRECQ's activation stage, ``act_loss_p``)
    + AdaRound's rounding regulariser                                  (brecq, qdrop; after the warm-up)
    + lambda_dist * sum_l ||W_l - W_l_source||_F                       (hdrq)

with one Adam over two parameter groups: the weight variables (AdaRound's ``alpha``; or HDRQ's weights
and weight step sizes) and the activation step sizes (LSQ). What each method learns and when:

=======  =========================================================  ===================================
method   weights                                                    activations
=======  =========================================================  ===================================
brecq    AdaRound, activations off (stage 1, ``iters``)             LSQ, weights fixed (stage 2,
                                                                    ``act_iters``), no dropping
qdrop    AdaRound                                                   LSQ jointly, drop ``drop_prob``
hdrq     continuous W and step size, lr warm-up then cosine;        LSQ jointly, drop ``drop_prob``;
         noise quantization for the first ``noise_fraction``,       noise then hard, like the weights
         then hard rounding with the STE (``fake_quant`` grads)
=======  =========================================================  ===================================

Per-iteration host work is constant (a few Python calls per layer): the batch indices are drawn up front,
the loss stays on the device, and the progress bar reads it (``.item()``) at most twice a second.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..quant.adaround import AdaRound
from ..quant.layers import QuantLayer
from ..quant.quantizer import Quantizer, _bcast
from .cache import BlockCache
from .config import QuantConfig

# AdaRound for QDrop/BRECQ; HDRQ's warm-up starts the lr at this multiple of its peak (authors' code).
WARMUP_START = 1e-3
REFRESH_SECONDS = 0.5


@dataclass
class BlockReport:
    """What one block's reconstruction did (``model.hdrq_report`` holds one per block)."""

    name: str
    kind: str
    layers: list[str]
    iters: int = 0
    seconds: float = 0.0
    loss_first: Optional[float] = None  # reconstruction error of the first / last iteration
    loss_last: Optional[float] = None
    cache_device: str = ""
    cache_bytes: int = 0
    stages: list[str] = field(default_factory=list)
    note: str = ""  # what was left out, and why (a block not reconstructed, weights kept fixed)


def reconstruction_loss(pred: Tensor, target: Tensor, p: float = 2.0) -> Tensor:
    """``sum over dim 1 of |pred - target|^p, averaged over the other dims`` (BRECQ/QDrop's ``lp_loss``), so
    the regulariser weights of the published defaults keep their meaning."""
    d = (pred - target).float()
    e = d.pow(2) if p == 2 else d.abs().pow(p)
    return e.sum(1).mean() if d.dim() >= 2 else e.mean()


def first_tensor(out) -> Tensor:
    """The first tensor of a block's output (HF-style layers return tuples)."""
    if isinstance(out, Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else ()
    for v in values:
        try:
            return first_tensor(v)
        except TypeError:
            continue
    raise TypeError(f"the block returned no tensor (got {type(out).__name__})")


def beta_schedule(t: int, iters: int, warmup: float, start: float, end: float) -> float:
    """AdaRound's annealed exponent: ``start`` until the warm-up ends, then linear to ``end``."""
    warm = warmup * iters
    if t < warm or iters <= warm:
        return start
    return end + (start - end) * max(0.0, 1.0 - (t - warm) / (iters - warm))


def warmup_cosine(iters: int, warmup: float):
    """HDRQ's weight schedule: linear from ``WARMUP_START`` to 1 over ``warmup * iters``, then cosine to 0."""
    warm = int(warmup * iters)

    def f(t: int) -> float:
        if t < warm:
            return WARMUP_START + (1.0 - WARMUP_START) * t / warm
        return 0.5 * (1.0 + math.cos(math.pi * (t - warm) / max(iters - warm, 1)))
    return f


def cosine(iters: int):
    return lambda t: 0.5 * (1.0 + math.cos(math.pi * t / max(iters, 1)))


def constant(t: int) -> float:
    return 1.0


class BlockReconstructor:
    """Reconstructs one block of a quantized model in place (see the module docstring).

    Args:
        block: the block module of the quantized model (its quantized layers are ``layers``).
        layers: ``{full name: QuantLinear/QuantConv2d}`` of the block.
        cache: the block's cached inputs and targets.
        boundary: the block's own activation quantizers outside its layers (its ``block_input_quantizer`` /
            ``block_output_quantizer``), learned with the layers' input quantizers.
        config: the run's :class:`QuantConfig`.
        source_weights: HDRQ's ``{full name: source weight}`` (on the device) for the distance term.
        report: filled in as it runs.
        fixed_weights: names of layers whose weights stay as they are (hard-quantized, not learned): weights
            shared with a module outside the block.
    """

    def __init__(self, block: nn.Module, layers: dict[str, QuantLayer], cache: BlockCache, config: QuantConfig,
                 *, boundary: Sequence[Quantizer] = (), source_weights: Optional[dict[str, Tensor]] = None,
                 report: Optional[BlockReport] = None, desc: str = "", fixed_weights: Sequence[str] = (),
                 data_parallel: bool = False):
        self.block, self.layers, self.cache, self.cfg = block, layers, cache, config
        self.fixed = set(fixed_weights)
        self.learned = {n: l for n, l in layers.items() if n not in self.fixed}
        # Data parallel (torch.distributed initialised): each process trains on its share of every batch and the
        # gradients are summed over processes before each step, so every process takes the same steps.
        self.world, self.rank = 1, 0
        if data_parallel:
            import torch.distributed as dist

            self.world, self.rank = dist.get_world_size(), dist.get_rank()
            cache.set_shard(self.rank, self.world)
        self.source_weights = source_weights or {}
        self.report = report if report is not None else BlockReport("", "", list(layers))
        self.desc = desc
        self.act_quantizers = [l.act_quantizer for l in layers.values() if l.act_quantizer.mode != "off"]
        self.act_quantizers += [q for q in boundary if q.mode != "off"]
        self.adarounds: dict[str, AdaRound] = {}
        self._cache_step = 0

    # ---------------------------------------------------------------------------------------------
    def run(self) -> BlockReport:
        cfg = self.cfg
        start = time.perf_counter()
        if cfg.method == "brecq":
            self._attach_adaround()
            self._stage("weights", cfg.iters, learn_acts=False, acts_on=False, noise_iters=0)
            self._detach_adaround()
            self._stage("activations", cfg.act_iters, learn_acts=True, acts_on=True, noise_iters=0,
                        learn_weights=False, loss_p=cfg.act_loss_p)
        elif cfg.method == "qdrop":
            self._attach_adaround()
            self._stage("joint", cfg.iters, learn_acts=True, acts_on=True, noise_iters=0)
            self._detach_adaround()
        elif cfg.method == "hdrq":
            self._stage("joint", cfg.iters, learn_acts=True, acts_on=True,
                        noise_iters=int(round(cfg.noise_fraction * cfg.iters)), continuous=True)
        else:
            raise ValueError(f"BlockReconstructor: method {cfg.method!r} does not reconstruct")
        if self.cache.device.type == "cuda":  # the time of the work, not of its queueing
            torch.cuda.synchronize(self.cache.device)
        self.report.seconds = time.perf_counter() - start
        return self.report

    # ---------------------------------------------------------------------------------------------
    def _attach_adaround(self) -> None:
        for name, layer in self.learned.items():
            wq = layer.weight_quantizer
            ar = AdaRound(layer.weight, _bcast(wq.step_size().detach(), layer.weight, wq.axis), wq.qmin, wq.qmax)
            wq.rounding = ar.to(layer.weight.device)
            self.adarounds[name] = wq.rounding

    @torch.no_grad()
    def _detach_adaround(self) -> None:
        """Bake AdaRound's hard decision into the weight (``W = s * integer``) and return to plain rounding."""
        for name, layer in self.learned.items():
            wq = layer.weight_quantizer
            s = _bcast(wq.step_size().detach(), layer.weight, wq.axis)
            ints = self.adarounds[name].integers(layer.weight, s)
            layer.weight.copy_((s * ints).to(layer.weight.dtype))
            wq.rounding = None
        self.adarounds.clear()

    def _stage(self, label: str, iters: int, *, learn_acts: bool, acts_on: bool, noise_iters: int,
               continuous: bool = False, learn_weights: bool = True, loss_p: float = 2.0) -> None:
        if iters <= 0:
            return
        cfg = self.cfg
        w_params: list[Tensor] = []
        if learn_weights and self.adarounds:
            w_params = [ar.alpha for ar in self.adarounds.values()]
        elif learn_weights and continuous:
            for layer in self.learned.values():
                w_params += [layer.weight, layer.weight_quantizer.scale]
        # per-token (dynamic) quantizers compute their step sizes from the data: nothing to learn
        a_params = [q.scale for q in self.act_quantizers if not q.dynamic] if learn_acts else []
        groups, lambdas = [], []
        if w_params and cfg.w_lr > 0:
            groups.append({"params": w_params, "lr": cfg.w_lr})
            lambdas.append(warmup_cosine(iters, cfg.warmup) if continuous else constant)
        if a_params and cfg.a_lr > 0:
            groups.append({"params": a_params, "lr": cfg.a_lr})
            lambdas.append(cosine(iters))
        if not groups:
            return
        params = [p for g in groups for p in g["params"]]
        for p in params:
            p.requires_grad_(True)
        fused = all(p.is_cuda for p in params)
        opt = torch.optim.Adam(groups, fused=True) if fused else torch.optim.Adam(groups, foreach=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)

        mode = "noise" if noise_iters > 0 else "hard"
        self._set_modes(mode, acts_on=acts_on, training=True)
        drop = cfg.drop_prob if acts_on else 0.0
        for q in self.act_quantizers:
            q.drop_prob = drop
        self.cache.drop_prob = drop

        dist_pairs = [(layer.weight, self.source_weights[n]) for n, layer in self.learned.items()
                      if continuous and cfg.lambda_dist > 0 and n in self.source_weights]
        reg_weight, (b_start, b_end) = cfg.round_reg_weight, cfg.round_beta
        warm_iters = cfg.warmup * iters

        bar = None
        if cfg.verbose and self.rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=iters, desc=f"{self.desc} {label}".strip(), leave=False, dynamic_ncols=True)
        loss_sum, loss_count, last_refresh, done_since_refresh = None, 0, time.monotonic(), 0
        first_loss = None
        try:
            for t in range(iters):
                if t == noise_iters and mode == "noise":
                    self._set_modes("hard", acts_on=acts_on, training=True)
                args, kwargs, target = self.cache.batch(self._cache_step)
                self._cache_step += 1
                out = first_tensor(self.block(*args, **kwargs))
                rec = reconstruction_loss(out, target, loss_p)
                if self.world > 1:  # this share's part of the batch mean; the regularisers split evenly
                    rec = rec * self.cache.share
                loss = rec
                reg = 0.0
                if self.adarounds and t >= warm_iters and reg_weight > 0 and learn_weights:
                    beta = beta_schedule(t, iters, cfg.warmup, b_start, b_end)
                    reg = reg + reg_weight * sum(ar.regularizer(beta) for ar in self.adarounds.values())
                if dist_pairs:
                    reg = reg + cfg.lambda_dist * sum(torch.linalg.vector_norm(w - ws) for w, ws in dist_pairs)
                if isinstance(reg, Tensor):
                    loss = loss + (reg / self.world if self.world > 1 else reg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.world > 1:
                    self._all_reduce_grads(params)
                    if t == 0 or t == iters - 1 or bar is not None:
                        rec = self._all_reduce(rec.detach())
                opt.step()
                sched.step()

                if first_loss is None:
                    first_loss = rec.detach()  # reported: the reconstruction error, without the regularisers
                if bar is None:
                    continue
                loss_sum = rec.detach() if loss_sum is None else loss_sum + rec.detach()
                loss_count += 1
                done_since_refresh += 1
                now = time.monotonic()
                if now - last_refresh >= REFRESH_SECONDS or t == iters - 1:
                    bar.set_postfix(loss=f"{float(loss_sum) / loss_count:.4g}", refresh=False)
                    bar.update(done_since_refresh)
                    last_refresh, done_since_refresh = now, 0
                    loss_sum, loss_count = None, 0
        finally:
            if bar is not None:
                bar.close()
        for p in params:
            p.requires_grad_(False)
            p.grad = None  # the returned model carries no optimiser leftovers
        self.report.iters += iters
        self.report.stages.append(f"{label}:{iters}")
        if self.report.loss_first is None and first_loss is not None:
            self.report.loss_first = float(first_loss)
        self.report.loss_last = float(rec.detach())

    def _all_reduce_grads(self, params: list[Tensor]) -> None:
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)

    def _all_reduce(self, x: Tensor) -> Tensor:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
        return x

    def _set_modes(self, mode: str, *, acts_on: bool, training: bool) -> None:
        """Weight quantizers to ``mode``; activation quantizers to ``mode`` (or "off" when ``acts_on`` is
        False); quantizers in training mode so QDrop's dropping is active (the rest of the block stays in
        eval mode: no dropout, no batch-statistics updates)."""
        noise_mode = self.cfg.noise_mode
        for name, layer in self.layers.items():
            # a fixed weight is already on its grid: noise would only perturb it
            layer.weight_quantizer.set_mode("hard" if name in self.fixed else mode, noise_mode)
            layer.weight_quantizer.train(training)
        for q in self.act_quantizers:
            q.set_mode(mode if acts_on else "off", noise_mode)
            q.train(training)


@torch.no_grad()
def finalize_layer(layer: QuantLayer, *, act_enabled: bool) -> None:
    """Put ``layer`` in the hard-quantized state of the quantized-model contract: ``weight = s * integers``
    exactly, step sizes positive, weight quantizer "hard" with no rounding hook, activation quantizer
    "hard" (or "off"), no dropping, eval mode."""
    wq, aq = layer.weight_quantizer, layer.act_quantizer
    if wq.rounding is not None:
        raise RuntimeError("finalize_layer: a rounding hook is still attached; bake it into the weight first")
    wq.scale.copy_(wq.step_size())
    if not layer.is_compact:  # a compact layer stores step * integers by construction
        s = _bcast(wq.step_size(), layer.weight, wq.axis)
        ints = layer.weight_integers()
        layer.weight.copy_((s * ints.to(s.dtype)).to(layer.weight.dtype))
        if not torch.equal(layer.weight_integers(), ints):  # s * k must round-trip exactly for |k| <= 128
            raise RuntimeError("finalize_layer: the weight does not round-trip to its integers")
    wq.set_mode("hard")
    wq.drop_prob = 0.0
    wq.eval()
    finalize_quantizer(aq, enabled=act_enabled)


@torch.no_grad()
def finalize_quantizer(q: Quantizer, *, enabled: bool = True) -> None:
    """An activation quantizer in the hard-quantized state: step size positive (``scale = step_size()``), mode
    "hard" (or "off" when not ``enabled``), no dropping, eval mode."""
    q.scale.copy_(q.step_size())
    q.set_mode("hard" if enabled else "off")
    q.drop_prob = 0.0
    q.eval()

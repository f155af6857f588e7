"""``hdrq.quantize``: a float model in, a calibrated quantized copy (hard-quantized state) out.

The pipeline:

1. **Prepare** a float copy: BatchNorm folded into the preceding convs (``hdrq.quant.fold_batchnorm``),
   ``nn.MultiheadAttention`` decomposed into four ``nn.Linear`` (so its projections can be quantized),
   float32, eval mode, on the calibration device. ``source`` (HDRQ) is prepared the same way.
2. **Observe** one pass over the calibration data: the execution order of the ``nn.Conv2d`` /
   ``nn.Linear`` layers (the first and last take ``first_last_bits``), whether each layer's input is ever
   negative (``signed``), and a subsample of each input for the activation observer.
3. **Build** the quantized copy: every layer becomes ``QuantConv2d`` / ``QuantLinear``; weight step sizes
   from the MSE observer (Lp error, p = 2.4), activation step sizes from the MSE observer on the
   observed inputs; per-layer noise seeds ``mix_seed(seed, layer, role)``.
4. **Reconstruct** (brecq, qdrop, hdrq) block by block in execution order (``hdrq.calib.blocks``): cache
   the block's inputs and targets (``hdrq.calib.cache``), optimise (``hdrq.calib.reconstruct``), bake the
   result into the hard-quantized state before the next block caches its inputs.
5. **Finalise** every layer into the hard-quantized state and record ``model.hdrq_config`` (the config as
   a dict) and ``model.hdrq_report`` (per block: iterations, seconds, loss).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from ..quant import fold_batchnorm, mse_scale, to_quant_layer
from ..quant.attention import decompose_attention
from ..quant.layers import _QuantLayer, _set_module
from ..reference import mix_seed
from .blocks import Block, find_blocks, quantizable_layers
from .cache import BlockCache, canonical_device, collect_calib_data, iter_chunks
from .config import QuantConfig
from .reconstruct import BlockReconstructor, BlockReport, finalize_layer

# Elements of each layer's input kept for its activation observer: the MSE search costs
# 80 candidate scales x this, and a per-tensor range needs far fewer samples than a layer produces.
ACT_OBSERVER_ELEMENTS = 1 << 15

# Per-layer seed streams (``mix_seed(seed, layer_index, role)``) and per-block streams.
_WEIGHT_STREAM, _ACT_STREAM = 0, 1
_BLOCK_STREAM = 1 << 20


def quantize(model: nn.Module, calib_data: Any, config: Optional[QuantConfig] = None, *,
             source: Optional[nn.Module] = None, blocks: Optional[Sequence[str]] = None) -> nn.Module:
    """A quantized copy of ``model`` calibrated on ``calib_data`` (``model`` itself is untouched).

    Args:
        model: any ``nn.Module`` built of ``nn.Conv2d`` / ``nn.Linear`` (plus anything else, left float).
        calib_data: unlabeled inputs: a tensor ``[N, ...]``, a list of such batches, or a DataLoader of
            batches or ``(input, label)`` tuples. The model is called as ``model(x)``.
        config: a :class:`QuantConfig` (default: HDRQ W4A4 with its published defaults).
        source: HDRQ's pre-adaptation model for the distance term (same layers as ``model``); required for
            method "hdrq" with ``lambda_dist > 0``.
        blocks: module names to reconstruct as blocks (overrides ``config.blocks`` and the detection).

    Returns the quantized model in eval mode, in the hard-quantized state: in every ``QuantLinear`` /
    ``QuantConv2d``, ``weight == weight_quantizer.step_size() * weight_integers()`` exactly.
    """
    cfg = config if config is not None else QuantConfig()
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"config must be a hdrq.QuantConfig, got {type(cfg).__name__}")
    if blocks is not None:
        cfg = dataclasses.replace(cfg, blocks=list(blocks))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    device = _device(cfg, model)
    data = collect_calib_data(calib_data)

    fp = prepare_float(model, device)
    layers = quantizable_layers(fp)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantizable layers (nn.Conv2d / nn.Linear)")
    source_weights = _source_weights(cfg, source, layers)

    order, signed, samples = observe_inputs(fp, layers, data, cfg.calib_batch_size, device)
    unused = [n for n in layers if n not in order]
    if unused:
        warnings.warn(f"hdrq.quantize: layers {unused} were not called by the model's forward on the calibration "
                      f"data; their weights are rounded to nearest and their inputs left unquantized",
                      RuntimeWarning, stacklevel=2)
    qmodel, act_enabled = build_quant_model(fp, layers, order, signed, samples, cfg)

    reports: list[dict] = []
    if cfg.method != "rtn":
        plan = find_blocks(fp, cfg.blocks)
        plan.sort(key=lambda b: min(order.get(l, math.inf) for l in b.layers))
        for i, blk in enumerate(plan):
            if not any(l in order for l in blk.layers):
                continue  # never executed: nothing to reconstruct against
            reports.append(_reconstruct_block(fp, qmodel, blk, i, len(plan), data, device, cfg, source_weights,
                                              act_enabled))

    for name, layer in _quant_layers(qmodel, layers):
        finalize_layer(layer, act_enabled=act_enabled[name])
    for p in qmodel.parameters():
        p.requires_grad_(True)
    qmodel.hdrq_config = cfg.to_dict()
    qmodel.hdrq_report = reports
    return qmodel.eval()


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------


def prepare_float(model: nn.Module, device: torch.device | str) -> nn.Module:
    """A float32 eval-mode copy with BatchNorm folded and attention decomposed, frozen, on ``device``."""
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # fold_batchnorm traces the model with FX (and warns when it cannot): only worth it when there is a BN.
    m = fold_batchnorm(model) if has_bn else copy.deepcopy(model)
    decompose_attention(m)
    m = m.to(device=device, dtype=torch.float32).eval()
    m.requires_grad_(False)
    return m


@torch.no_grad()
def observe_inputs(fp: nn.Module, layers: dict[str, nn.Module], data: Tensor, batch_size: int,
                   device: torch.device) -> tuple[dict[str, int], dict[str, bool], dict[str, Tensor]]:
    """One pass of ``fp`` over ``data``: each layer's position in execution order, whether its input was
    ever negative, and up to ``ACT_OBSERVER_ELEMENTS`` evenly spaced elements of its inputs."""
    order: dict[str, int] = {}
    mins: dict[str, Tensor] = {}
    kept: dict[str, list[Tensor]] = {n: [] for n in layers}
    per_batch = max(1, ACT_OBSERVER_ELEMENTS // math.ceil(data.shape[0] / batch_size))

    def hook(name):
        def pre(module, args):
            x = args[0].detach()
            order.setdefault(name, len(order))
            m = x.amin().float()
            mins[name] = m if name not in mins else torch.minimum(mins[name], m)
            flat = x.reshape(-1)
            stride = max(1, -(-flat.numel() // per_batch))
            kept[name].append(flat[::stride].float())
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        for _, x in iter_chunks(data, batch_size, device):
            fp(x)
    finally:
        for h in handles:
            h.remove()
    signed = {n: bool(mins[n] < 0) for n in mins}
    samples = {n: torch.cat(v) for n, v in kept.items() if v}
    return order, signed, samples


def build_quant_model(fp: nn.Module, layers: dict[str, nn.Module], order: dict[str, int], signed: dict[str, bool],
                      samples: dict[str, Tensor], cfg: QuantConfig) -> tuple[nn.Module, dict[str, bool]]:
    """A copy of ``fp`` with every layer quantized and its step sizes set from the observers."""
    qmodel = copy.deepcopy(fp)
    ends = set()
    if order:
        ends = {min(order, key=order.get), max(order, key=order.get)}
    act_enabled = {}
    for i, name in enumerate(layers):
        w_bits = a_bits = None
        if name in ends and cfg.first_last_bits is not None:
            w_bits, a_bits = cfg.first_last_bits, cfg.first_last_bits if cfg.a_bits is not None else None
        w_bits = w_bits or cfg.w_bits
        a_bits = a_bits or cfg.a_bits
        enabled = a_bits is not None and name in samples
        act_enabled[name] = enabled
        is_signed = signed.get(name, True)
        q = to_quant_layer(layers[name], w_bits, a_bits or 8, per_channel=cfg.granularity == "channel",
                           a_signed=is_signed, a_enabled=enabled)
        wq, aq = q.weight_quantizer, q.act_quantizer
        wq.set_scale(mse_scale(q.weight.detach(), w_bits, True, axis=wq.axis, p=cfg.observer_p))
        if enabled:
            aq.set_scale(mse_scale(samples[name], a_bits, is_signed, p=cfg.observer_p))
        wq.seed, aq.seed = mix_seed(cfg.seed, i, _WEIGHT_STREAM), mix_seed(cfg.seed, i, _ACT_STREAM)
        wq.noise_mode = aq.noise_mode = cfg.noise_mode
        aq.lsq_grad_scale = True  # LSQ's 1/sqrt(numel * qmax) on activation step sizes, as QDrop/HDRQ
        q.requires_grad_(False)
        _set_module(qmodel, name, q.to(layers[name].weight.device).eval())
    return qmodel, act_enabled


def _reconstruct_block(fp: nn.Module, qmodel: nn.Module, blk: Block, index: int, total: int, data: Tensor,
                       device: torch.device, cfg: QuantConfig, source_weights: Optional[dict[str, Tensor]],
                       act_enabled: dict[str, bool]) -> dict:
    iters = cfg.iters + (cfg.act_iters if cfg.method == "brecq" else 0)
    qmodel.eval()
    cache = BlockCache.build(fp, qmodel, blk.name, data, device, batch_size=cfg.calib_batch_size, iters=iters,
                             drop_prob=cfg.drop_prob, seed=mix_seed(cfg.seed, _BLOCK_STREAM, index),
                             cache_device=cfg.cache_device)
    qlayers = {n: qmodel.get_submodule(n) for n in blk.layers}
    src = None
    if source_weights is not None:
        src = {n: source_weights[n].to(device) for n in blk.layers}
    report = BlockReport(blk.name, blk.kind, list(blk.layers), cache_device=str(cache.storage),
                         cache_bytes=cache.nbytes())
    BlockReconstructor(qmodel.get_submodule(blk.name), qlayers, cache, cfg, source_weights=src, report=report,
                       desc=f"{cfg.method} [{index + 1}/{total}] {blk.name}").run()
    for n, layer in qlayers.items():
        finalize_layer(layer, act_enabled=act_enabled[n])
    return report.__dict__.copy()


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _device(cfg: QuantConfig, model: nn.Module) -> torch.device:
    if cfg.device is not None:
        device = torch.device(cfg.device)
    else:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    return canonical_device(device)


def _quant_layers(qmodel: nn.Module, layers: dict[str, nn.Module]):
    for name in layers:
        layer = qmodel.get_submodule(name)
        assert isinstance(layer, _QuantLayer)
        yield name, layer


def _source_weights(cfg: QuantConfig, source: Optional[nn.Module],
                    layers: dict[str, nn.Module]) -> Optional[dict[str, Tensor]]:
    """HDRQ's source weights (prepared like the model, on the CPU), checked against ``layers``."""
    needed = cfg.method == "hdrq" and cfg.lambda_dist > 0
    if source is None:
        if needed:
            raise ValueError(f"method 'hdrq' with lambda_dist={cfg.lambda_dist} needs source= (the pre-adaptation "
                             f"model the distance term pulls towards; pass the model itself to regularise towards "
                             f"its own weights, or set lambda_dist=0)")
        return None
    if not needed:
        warnings.warn(f"hdrq.quantize: source is used only by method 'hdrq' with lambda_dist > 0; ignored "
                      f"(method {cfg.method!r}, lambda_dist={cfg.lambda_dist})", RuntimeWarning, stacklevel=3)
        return None
    if not isinstance(source, nn.Module):
        raise TypeError(f"source must be an nn.Module, got {type(source).__name__}")
    src_layers = quantizable_layers(prepare_float(source, "cpu"))
    missing = [n for n in layers if n not in src_layers]
    extra = [n for n in src_layers if n not in layers]
    shapes = [f"{n}: {tuple(layers[n].weight.shape)} vs {tuple(src_layers[n].weight.shape)}"
              for n in layers if n in src_layers and layers[n].weight.shape != src_layers[n].weight.shape]
    if missing or extra or shapes:
        raise ValueError(f"source does not match the model: layers missing from source {missing}, layers only in "
                         f"source {extra}, weight shapes that differ [{'; '.join(shapes)}]")
    return {n: m.weight.detach() for n, m in src_layers.items()}

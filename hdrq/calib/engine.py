"""``hdrq.quantize``: a float model in, a calibrated quantized copy (hard-quantized state) out.

The pipeline:

1. **Prepare** a float copy: BatchNorm folded into the preceding convs (``hdrq.quant.fold_batchnorm``),
   ``nn.MultiheadAttention`` decomposed into four ``nn.Linear`` and transformers' ``Conv1D`` turned into the
   ``nn.Linear`` it is (so they can be quantized), a transformers model's own key/value cache switched off
   (calibration runs whole sequences; a cache would carry state from one call into the next), float32, eval
   mode, on the calibration device. ``source`` (HDRQ) is prepared the same way. Layers that stay float are
   named in a warning (``hdrq.calib.unquantizable_layers``). With ``smooth_alpha``, one more pass measures each
   ``nn.Linear``'s per-channel input maxima for the SmoothQuant factors (:func:`smooth_scales`).
2. **Observe** one pass over the calibration data (:func:`observe`): the execution order of the
   ``nn.Conv2d`` / ``nn.Linear`` layers (the first and last take ``first_last_bits``), whether each
   activation point is ever negative (``signed``), a subsample of it for the activation observer, and, under
   the "output" activation placement, which layers read a residual block's boundary (its input or its output
   after the add) and which read the network's input.
3. **Build** the quantized copy: every layer becomes ``QuantConv2d`` / ``QuantLinear``, each residual block
   gets its boundary quantizers (``hdrq.quant.boundary``); weight step sizes from the MSE observer (Lp error,
   p = 2.4), activation step sizes from the MSE observer on the observed activations (none for per-token
   dynamic inputs); per-quantizer noise seeds ``mix_seed(seed, layer, role)``. A layer whose weight is tied
   to a module that stays float (GPT-2's ``lm_head`` and its token embedding) is quantized once, by
   round-to-nearest, and that module is tied to the quantized weight: both read the same values, and the
   layer's weight is not reconstructed (a change would also move the embedding, upstream of every block).
4. **Reconstruct** (brecq, qdrop, hdrq) block by block in execution order (``hdrq.calib.blocks``): cache
   the block's inputs and targets (``hdrq.calib.cache``), optimise (``hdrq.calib.reconstruct``), bake the
   result into the hard-quantized state before the next block caches its inputs.
5. **Finalise** every layer into the hard-quantized state, store the weights as packed integers, and record
   ``model.hdrq_config`` (the config as a dict) and ``model.hdrq_report`` (per block: iterations, seconds,
   loss).

This is the whole-model path. ``hdrq.calib.stream`` runs the same steps block by block for models whose blocks
chain (same result, one block on the device at a time); ``quantize`` takes it when it applies.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..quant import fold_batchnorm, linearize_transposed, mse_scale, to_quant_layer
from ..quant.attention import decompose_attention
from ..quant.boundary import BLOCK_INPUT, BLOCK_OUTPUT, attach_block_quantizer
from ..quant.layers import QuantLayer, compact_weights, set_module
from ..quant.quantizer import Quantizer
from ..reference import mix_seed
from .blocks import (QUANTIZABLE, Block, find_blocks, is_residual_block, quantizable_layers,
                     report_unquantizable)
from .cache import BlockCache, canonical_device, collect_calib_data, iter_chunks
from .config import QuantConfig
from .reconstruct import BlockReconstructor, BlockReport, finalize_layer, finalize_quantizer, first_tensor

# Elements of each layer's input kept for its activation observer: the MSE search costs
# 80 candidate scales x this, and a per-tensor range needs far fewer samples than a layer produces.
ACT_OBSERVER_ELEMENTS = 1 << 15

# Per-layer seed streams (``mix_seed(seed, layer_index, role)``), per-block streams and the block-boundary
# quantizers' streams.
_WEIGHT_STREAM, _ACT_STREAM = 0, 1
_BLOCK_STREAM = 1 << 20
_BOUNDARY_STREAM = 1 << 21


def quantize(model: nn.Module, calib_data: Any, config: Optional[QuantConfig] = None, *,
             source: Optional[nn.Module] = None, blocks: Optional[Sequence[str]] = None,
             smooth: Optional[dict[str, Tensor]] = None, checkpoint: Optional[str] = None,
             data_parallel: bool = False) -> nn.Module:
    """A quantized copy of ``model`` calibrated on ``calib_data`` (``model`` itself is untouched).

    Args:
        model: any ``nn.Module`` built of ``nn.Conv2d`` / ``nn.Linear`` (plus anything else, left float).
        calib_data: unlabeled inputs: a tensor ``[N, ...]``, a list of such batches, or a DataLoader of
            batches or ``(input, label)`` tuples. The model is called as ``model(x)``.
        config: a :class:`QuantConfig` (default: HDRQ W4A4 with its published defaults).
        source: HDRQ's pre-adaptation model for the distance term (same layers as ``model``); required for
            method "hdrq" with ``lambda_dist > 0``.
        blocks: module names to reconstruct as blocks (overrides ``config.blocks`` and the detection).
        smooth: SmoothQuant factors ``{layer name: [in_features]}`` to use instead of measuring them on
            ``calib_data`` (``config.smooth_alpha``): copies that will be merged must share them, e.g. all
            taking :func:`smooth_scales` of the source model, or ``smooth_factors`` of one quantized copy.
        checkpoint: a folder for one file per finished block (``hdrq.calib.checkpoint``): a run killed at any
            point and started again with the same arguments continues after the last finished block and
            returns the same model.
        data_parallel: under ``torch.distributed`` (every process calls ``quantize`` with the same
            arguments): each block's iterations are split across the processes by samples, gradients summed
            before each step. Every process returns the same model; process 0 writes the checkpoints.

    Returns the quantized model in eval mode, in the hard-quantized state: in every ``QuantLinear`` /
    ``QuantConv2d``, ``weight == weight_quantizer.step_size() * weight_integers()`` exactly, the weight stored
    as packed integers (``QuantLayer.compact``). A model whose blocks chain is streamed through the device one
    block at a time (``hdrq.calib.stream``; ``config.stream``) and returned on ``model``'s device; otherwise it
    is calibrated whole on the calibration device and returned there. Both give the same model.
    """
    cfg = config if config is not None else QuantConfig()
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"config must be a hdrq.QuantConfig, got {type(cfg).__name__}")
    if blocks is not None:
        cfg = dataclasses.replace(cfg, blocks=list(blocks))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    device = _device(cfg, model)
    data = collect_calib_data(calib_data, max_samples=cfg.max_calib_samples)
    run = RunOptions(checkpoint=checkpoint, data_parallel=data_parallel)

    if cfg.stream is not False:
        from .stream import StreamUnsupported, quantize_streamed

        try:
            if smooth is not None or cfg.smooth_alpha is not None:
                raise StreamUnsupported("SmoothQuant factors are measured and applied on the whole model")
            return quantize_streamed(model, data, cfg, device, source=source, run=run)
        except StreamUnsupported as e:
            if cfg.stream:
                warnings.warn(f"hdrq.quantize: not streaming ({e}); calibrating the whole model on {device}",
                              RuntimeWarning, stacklevel=2)

    fp = prepare_float(model, device)
    layers = quantizable_layers(fp)
    report_unquantizable(fp)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantizable layers (nn.Conv2d / nn.Linear)")
    source_weights = _source_weights(cfg, source, layers)
    tied = tied_weights(fp, layers)
    plan = find_blocks(fp, cfg.blocks)
    residual = [b.name for b in plan if b.kind == "residual"
                or (b.kind == "explicit" and is_residual_block(fp.get_submodule(b.name)))]

    if smooth is None and cfg.smooth_alpha is not None:
        smooth = _smooth_factors(fp, layers, data, cfg.calib_batch_size, device, cfg.smooth_alpha, cfg.verbose)
    smooth = _check_smooth(smooth, layers, tied)
    obs = observe(fp, layers, data, cfg.calib_batch_size, device,
                  residual_blocks=residual if cfg.a_bits is not None else None, placement=cfg.act_placement,
                  smooth=smooth, verbose=cfg.verbose)
    smooth = {n: m for n, m in smooth.items() if obs.sources.get(n, OWN) == OWN and n in obs.order}
    unused = [n for n in layers if n not in obs.order]
    if unused:
        warnings.warn(f"hdrq.quantize: layers {unused} were not called by the model's forward on the calibration "
                      f"data; their weights are rounded to nearest and their inputs left unquantized",
                      RuntimeWarning, stacklevel=2)
    qmodel = build_quant_model(fp, layers, obs, cfg, smooth=smooth, tied=tied)
    run.open(cfg, data, layers, source_weights is not None)

    reports: list[dict] = []
    if cfg.method != "rtn":
        plan.sort(key=lambda b: min(obs.order.get(l, math.inf) for l in b.layers))
        for i, blk in enumerate(plan):
            if not any(l in obs.order for l in blk.layers):
                continue  # never executed: nothing to reconstruct against
            reports.append(_reconstruct_block(fp, qmodel, blk, i, len(plan), data, device, cfg, source_weights,
                                              obs, tied=tied, run=run))

    finalize_model(qmodel, layers, obs)
    return finish(qmodel, model, cfg, reports)


def finish(qmodel: nn.Module, model: nn.Module, cfg: QuantConfig, reports: list[dict]) -> nn.Module:
    """The returned model: weights stored compactly, parameters trainable, ``model``'s key/value-cache setting
    back, config and report recorded."""
    compact_weights(qmodel)
    for p in qmodel.parameters():
        p.requires_grad_(True)
    restore_kv_cache(qmodel, model)
    qmodel.hdrq_config = cfg.to_dict()
    qmodel.hdrq_report = reports
    return qmodel.eval()


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------


def prepare_float(model: nn.Module, device: torch.device | str) -> nn.Module:
    """A float32 eval-mode copy with BatchNorm folded, attention decomposed, transformers' ``Conv1D`` turned
    into ``nn.Linear`` and the model's own key/value cache switched off, frozen, on ``device``."""
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # fold_batchnorm traces the model with FX (and warns when it cannot): only worth it when there is a BN.
    m = fold_batchnorm(model) if has_bn else copy.deepcopy(model)
    decompose_attention(m)
    linearize_transposed(m)
    for c in _cache_configs(m):
        c.use_cache = False
    m = m.to(device=device, dtype=torch.float32).eval()
    m.requires_grad_(False)
    return m


def _cache_configs(model: nn.Module) -> list:
    """The configs (transformers' ``PretrainedConfig``, each once, in module order) that carry ``use_cache``."""
    found: dict[int, Any] = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and not isinstance(c, (Tensor, nn.Module)) and hasattr(c, "use_cache"):
            found.setdefault(id(c), c)
    return list(found.values())


def restore_kv_cache(qmodel: nn.Module, model: nn.Module) -> None:
    """Give ``qmodel`` (a prepared copy of ``model``) ``model``'s ``use_cache`` settings back."""
    for mine, theirs in zip(_cache_configs(qmodel), _cache_configs(model)):
        mine.use_cache = theirs.use_cache


def tied_weights(fp: nn.Module, layers: dict[str, nn.Module]) -> dict[str, list[tuple[str, str]]]:
    """``{layer: [(module path, parameter name), ...]}``: where a quantizable layer's weight is also registered
    under another module that is not itself a quantizable layer (an embedding tied to the output layer)."""
    owner = {id(m.weight): name for name, m in layers.items()}
    tied: dict[str, list[tuple[str, str]]] = {}
    for path, m in fp.named_modules(remove_duplicate=False):
        if isinstance(m, QUANTIZABLE):  # the layer itself (or the same layer registered at a second path)
            continue
        for pname, p in m._parameters.items():
            name = owner.get(id(p)) if p is not None else None
            if name is not None:
                tied.setdefault(name, []).append((path, pname))
    return tied


@torch.no_grad()
def smooth_scales(model: nn.Module, calib_data: Any, alpha: float = 0.5, *, batch_size: int = 32,
                  device: Optional[torch.device | str] = None, verbose: bool = True) -> dict[str, Tensor]:
    """SmoothQuant's per-input-channel factors of every ``nn.Linear`` of ``model`` (names as
    :func:`hdrq.quantize` sees them): ``m_j = max|x_j|^alpha / max|W_j|^(1 - alpha)``, the activation maximum
    over ``calib_data`` and the weight maximum over column ``j`` (both at least 1e-5). Pass the result to
    ``hdrq.quantize(..., smooth=...)`` to give several copies the same factors."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smooth_scales: alpha must be in [0, 1], got {alpha!r}")
    dev = canonical_device(torch.device(device) if device is not None else _device(QuantConfig(), model))
    fp = prepare_float(model, dev)
    return _smooth_factors(fp, quantizable_layers(fp), collect_calib_data(calib_data), batch_size, dev, alpha,
                           verbose)


def smooth_factors(qmodel: nn.Module) -> dict[str, Tensor]:
    """The SmoothQuant factors a quantized model was built with (``{layer name: factors}``), to build another
    copy with the same ones: ``hdrq.quantize(..., smooth=smooth_factors(qmodel))``."""
    return {name: m.smooth.detach().clone() for name, m in qmodel.named_modules()
            if isinstance(m, QuantLayer) and getattr(m, "smooth", None) is not None}


# Floor of both maxima in the SmoothQuant factors (as its reference code): a channel that is always zero.
_SMOOTH_FLOOR = 1e-5


@torch.no_grad()
def _smooth_factors(fp: nn.Module, layers: dict[str, nn.Module], data: Tensor, batch_size: int,
                    device: torch.device, alpha: float, verbose: bool) -> dict[str, Tensor]:
    linears = {n: m for n, m in layers.items() if isinstance(m, nn.Linear)}
    amax: dict[str, Tensor] = {}

    def hook(name):
        def pre(module, args):
            x = args[0].detach()
            a = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
            amax[name] = a if name not in amax else torch.maximum(amax[name], a)
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        for _, x in iter_chunks(data, batch_size, device, desc="smooth: input maxima" if verbose else None):
            fp(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, a in amax.items():
        w = linears[name].weight.detach().abs().amax(0).float().clamp_min(_SMOOTH_FLOOR)
        out[name] = (a.clamp_min(_SMOOTH_FLOOR).pow(alpha) / w.pow(1.0 - alpha)).clamp_min(_SMOOTH_FLOOR)
    return out


def _check_smooth(smooth: Optional[dict[str, Tensor]], layers: dict[str, nn.Module],
                  tied: dict[str, list]) -> dict[str, Tensor]:
    """The factors to apply: only ``nn.Linear`` layers, not a tied layer (its weight is shared as it is)."""
    if smooth is None:
        return {}
    if not isinstance(smooth, dict):
        raise TypeError(f"smooth must be a dict {{layer name: factors}}, got {type(smooth).__name__}")
    out = {}
    for name, m in smooth.items():
        layer = layers.get(name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"smooth: {name!r} is not an nn.Linear of the model "
                             f"({'missing' if layer is None else type(layer).__name__})")
        m = torch.as_tensor(m, dtype=torch.float32).reshape(-1)
        if m.numel() != layer.in_features:
            raise ValueError(f"smooth: {name!r} takes {layer.in_features} factors, got {m.numel()}")
        if name not in tied:
            out[name] = m.to(layer.weight.device)
    return out


# Where a layer's input comes from, under the "output" placement (Observation.sources).
OWN, MODEL_INPUT = "own", "model input"


@dataclass
class Observation:
    """What one float pass over the calibration data shows.

    order: each layer's position in execution order. signed / samples: per activation point (a layer's input,
    keyed by the layer's name; a block boundary, keyed ``"<block>:input"`` / ``"<block>:output"``), whether it
    was ever negative and up to ``ACT_OBSERVER_ELEMENTS`` evenly spaced elements of it. sources: per layer,
    where its input comes from: ``OWN`` (quantized by the layer's own input quantizer), ``MODEL_INPUT`` (the
    network's input, not quantized under the "output" placement) or a boundary key (already quantized there:
    the layer's input quantizer mirrors it). boundaries: the boundary keys that get a quantizer, in execution
    order."""

    order: dict[str, int]
    signed: dict[str, bool]
    samples: dict[str, Tensor]
    sources: dict[str, str] = field(default_factory=dict)
    boundaries: list[str] = field(default_factory=list)


class Observer:
    """The hooks and state of one observation (see :func:`observe`), so that a model can also be observed in
    parts (``hdrq.calib.stream``).

    With ``structure`` the first batch of a pass decides ``order``, ``sources`` and ``boundaries`` (by object
    identity); with ``recording`` every batch adds to the per-key minima and samples. A pass is
    :meth:`start_batch` / the model's forward / :meth:`end_batch` per batch; :meth:`rewind` starts a new pass
    (its first batch reads structure again)."""

    def __init__(self, n: int, batch_size: int, *, placement: str, structure: bool = True, recording: bool = True,
                 smooth: Optional[dict[str, Tensor]] = None):
        self.smooth = smooth or {}  # a layer's input is recorded divided by its SmoothQuant factors
        self.order: dict[str, int] = {}
        self.mins: dict[str, Tensor] = {}
        self.kept: dict[str, list[Tensor]] = {}
        self.sources: dict[str, str] = {}
        self.boundaries: list[str] = []
        self.per_batch = max(1, ACT_OBSERVER_ELEMENTS // math.ceil(n / batch_size))
        self.output_placement = placement == "output"
        self.structure, self.recording = structure, recording
        self.first, self.input = True, None
        self.produced: dict[int, tuple[str, Tensor]] = {}

    def rewind(self) -> None:
        self.first, self.input = True, None
        self.produced.clear()

    def start_batch(self, x: Any) -> None:
        self.input = x

    def end_batch(self) -> None:
        self.first = False
        self.produced.clear()

    def record(self, key: str, x: Tensor) -> None:
        if not self.recording:
            return
        x = x.detach()
        m = x.amin().float()
        self.mins[key] = m if key not in self.mins else torch.minimum(self.mins[key], m)
        flat = x.reshape(-1)
        stride = max(1, -(-flat.numel() // self.per_batch))
        # a copy: a strided view would keep the whole activation alive until the observation ends
        self.kept.setdefault(key, []).append(flat[::stride].float().clone())

    def produce(self, key: str, x: Tensor) -> None:
        # keep a reference: the id of a freed tensor could be reused within the batch
        self.produced[id(x)] = (key, x)
        if key not in self.boundaries:
            self.boundaries.append(key)

    def produced_key(self, x: Any) -> Optional[str]:
        """The boundary key of tensor ``x`` in the current batch (MODEL_INPUT for the model's input), or None."""
        if x is self.input:
            return MODEL_INPUT
        hit = self.produced.get(id(x))
        return hit[0] if hit is not None else None

    def layer_hook(self, name: str):
        def pre(module, args):
            x = args[0]
            if self.structure:
                self.order.setdefault(name, len(self.order))
                if self.output_placement and self.first and name not in self.sources:
                    src = self.produced.get(id(x))
                    self.sources[name] = src[0] if src is not None else MODEL_INPUT if x is self.input else OWN
            if self.sources.get(name, OWN) == OWN:
                self.record(name, x / self.smooth[name] if name in self.smooth else x)
        return pre

    def block_pre_hook(self, name: str):
        def pre(module, args):
            x = args[0] if args else None
            key = f"{name}:input"
            if self.structure and self.first and isinstance(x, Tensor) and x is not self.input \
                    and id(x) not in self.produced:
                self.produce(key, x)
            if key in self.boundaries:
                self.record(key, x)
        return pre

    def block_post_hook(self, name: str):
        def post(module, args, output):
            key = f"{name}:output"
            out = first_tensor(output)
            if self.structure and self.first:
                self.produce(key, out)
            if key in self.boundaries:
                self.record(key, out)
        return post

    def attach(self, layers: dict[str, nn.Module], blocks: dict[str, nn.Module]) -> list:
        """Register the hooks on ``layers`` and on the residual ``blocks`` (by full name); returns the handles."""
        handles = [m.register_forward_pre_hook(self.layer_hook(n)) for n, m in layers.items()]
        for name, block in blocks.items():
            handles.append(block.register_forward_pre_hook(self.block_pre_hook(name)))
            handles.append(block.register_forward_hook(self.block_post_hook(name)))
        return handles

    def result(self) -> "Observation":
        signed = {n: bool(m < 0) for n, m in self.mins.items()}
        samples = {n: torch.cat(v) for n, v in self.kept.items()}
        return Observation(dict(self.order), signed, samples, dict(self.sources), list(self.boundaries))


@torch.no_grad()
def observe(fp: nn.Module, layers: dict[str, nn.Module], data: Tensor, batch_size: int, device: torch.device, *,
            residual_blocks: Optional[Sequence[str]] = None, placement: str = "input",
            smooth: Optional[dict[str, Tensor]] = None, verbose: bool = False) -> Observation:
    """One pass of ``fp`` over ``data`` (see :class:`Observation`). Under ``placement="output"``, the
    boundaries of ``residual_blocks`` are quantized and the network's input is not; which tensor feeds which
    layer is read off the first batch by object identity: a layer whose input *is* a quantized boundary's
    tensor (a block's output, or its input) reads it quantized. Under ``"input"`` every layer quantizes its own
    input. ``smooth``: a layer's input is recorded divided by its SmoothQuant factors (what its quantizer will
    see). ``verbose``: a progress bar."""
    obs = Observer(data.shape[0], batch_size, placement=placement, smooth=smooth)
    blocks = residual_blocks if placement == "output" and residual_blocks else ()
    handles = obs.attach(layers, {name: fp.get_submodule(name) for name in blocks})
    try:
        for _, x in iter_chunks(data, batch_size, device, desc="observe" if verbose else None):
            obs.start_batch(x)
            fp(x)
            obs.end_batch()
    finally:
        for h in handles:
            h.remove()
    return obs.result()


def _boundary(key: str) -> tuple[str, str]:
    """``"layer1.0:output"`` -> ``("layer1.0", "output")``."""
    block, _, where = key.rpartition(":")
    return block, where


def build_quant_model(fp: nn.Module, layers: dict[str, nn.Module], obs: Observation, cfg: QuantConfig, *,
                      smooth: Optional[dict[str, Tensor]] = None,
                      tied: Optional[dict[str, list[tuple[str, str]]]] = None) -> nn.Module:
    """A copy of ``fp`` with every layer quantized (``smooth``: SmoothQuant factors per layer), the
    block-boundary quantizers attached, and step sizes set from the observers. A layer in ``tied`` is
    quantized by round-to-nearest here and the modules sharing its weight are tied to the quantized weight."""
    smooth, tied = smooth or {}, tied or {}
    qmodel = copy.deepcopy(fp)
    ends = end_layers(obs)
    for i, name in enumerate(layers):
        q = quant_layer(layers[name], name, i, obs, cfg, ends, smooth=smooth.get(name))
        set_module(qmodel, name, q)
        if name in tied:
            with torch.no_grad():
                q.weight.copy_(q.quantized_weight())  # on the grid from the start: the tied module reads it
            for path, pname in tied[name]:
                setattr(qmodel.get_submodule(path), pname, q.weight)
    for j, key in enumerate(obs.boundaries):
        block, where = _boundary(key)
        attach_block_quantizer(qmodel.get_submodule(block), where, boundary_quantizer(key, j, obs, cfg))
    return qmodel


def end_layers(obs: Observation) -> set[str]:
    """The first and the last layer in execution order (they take ``first_last_bits``)."""
    order = obs.order
    return {min(order, key=order.get), max(order, key=order.get)} if order else set()


def quant_layer(layer: nn.Module, name: str, index: int, obs: Observation, cfg: QuantConfig,
                ends: set[str], *, smooth: Optional[Tensor] = None) -> QuantLayer:
    """The ``QuantLinear`` / ``QuantConv2d`` for float ``layer`` (``index``: its position among the model's
    layers in registration order, which seeds its quantizers), step sizes from the observers; ``smooth``: its
    SmoothQuant factors. Under ``act_granularity="token"`` a linear layer's input quantizer is dynamic (per
    token at run time, as ``hdrq.convert`` deploys it) and needs no observed step size."""
    w_bits = a_bits = None
    if name in ends and cfg.first_last_bits is not None:
        w_bits, a_bits = cfg.first_last_bits, cfg.first_last_bits if cfg.a_bits is not None else None
    w_bits = w_bits or cfg.w_bits
    a_bits = a_bits or cfg.a_bits
    own = obs.sources.get(name, OWN) == OWN
    enabled = a_bits is not None and own and name in obs.samples
    dynamic = cfg.act_granularity == "token" and isinstance(layer, nn.Linear)
    is_signed = obs.signed.get(name, True) or dynamic
    q = to_quant_layer(layer, w_bits, a_bits or 8, per_channel=cfg.granularity == "channel",
                       a_signed=is_signed, a_enabled=enabled, a_dynamic=dynamic, smooth=smooth)
    wq, aq = q.weight_quantizer, q.act_quantizer
    wq.set_scale(mse_scale(q.weight.detach(), w_bits, True, axis=wq.axis, p=cfg.observer_p))
    if enabled and not dynamic:
        aq.set_scale(mse_scale(obs.samples[name], a_bits, is_signed, p=cfg.observer_p))
    wq.seed, aq.seed = mix_seed(cfg.seed, index, _WEIGHT_STREAM), mix_seed(cfg.seed, index, _ACT_STREAM)
    wq.noise_mode = aq.noise_mode = cfg.noise_mode
    aq.lsq_grad_scale = True  # LSQ's 1/sqrt(numel * qmax) on activation step sizes, as QDrop/HDRQ
    q.requires_grad_(False)
    return q.to(layer.weight.device).eval()


def boundary_quantizer(key: str, index: int, obs: Observation, cfg: QuantConfig) -> Quantizer:
    """The activation quantizer of boundary ``key`` (``index``: its position in ``obs.boundaries``). The last
    boundary in execution order feeds the head: it takes first_last_bits, as the authors set the last
    activation quantizer to 8 bits."""
    last = index == len(obs.boundaries) - 1 and cfg.first_last_bits is not None
    bits = cfg.first_last_bits if last else cfg.a_bits
    signed = obs.signed.get(key, True)
    q = Quantizer(bits, signed=signed, noise_mode=cfg.noise_mode, lsq_grad_scale=True,
                  seed=mix_seed(cfg.seed, _BOUNDARY_STREAM, index))
    q.set_scale(mse_scale(obs.samples[key], bits, signed, p=cfg.observer_p))
    q.requires_grad_(False)
    return q.to(obs.samples[key].device).eval()


def _boundary_quantizer(qmodel: nn.Module, key: str) -> Quantizer:
    block, where = _boundary(key)
    return getattr(qmodel.get_submodule(block), BLOCK_INPUT if where == "input" else BLOCK_OUTPUT)


@torch.no_grad()
def finalize_model(qmodel: nn.Module, layers: dict[str, nn.Module], obs: Observation) -> None:
    """Every layer and boundary quantizer in the hard-quantized state. A layer reading a quantized boundary
    takes that quantizer's grid and step size for its own input quantizer: re-quantizing a value already on
    the grid with the same step gives it back exactly, so the model computes the same, and ``hdrq.convert``
    gets a static integer input for the layer."""
    for key in obs.boundaries:
        finalize_quantizer(_boundary_quantizer(qmodel, key))
    for name, layer in _quant_layers(qmodel, layers):
        src = obs.sources.get(name, OWN)
        mirror = src not in (OWN, MODEL_INPUT)
        finalize_layer(layer, act_enabled=layer.act_quantizer.mode != "off" and not mirror)
        if mirror:
            producer, aq = _boundary_quantizer(qmodel, src), layer.act_quantizer
            aq.bits, aq.signed = producer.bits, producer.signed
            aq.scale.copy_(producer.step_size())
            aq.set_mode("hard")


def block_iters(cfg: QuantConfig) -> int:
    """Reconstruction iterations of one block (every stage)."""
    return cfg.iters + (cfg.act_iters if cfg.method == "brecq" else 0)


def block_seed(cfg: QuantConfig, index: int) -> int:
    """The seed of the ``index``-th block's batch sampling and drop masks."""
    return mix_seed(cfg.seed, _BLOCK_STREAM, index)


@dataclass
class RunOptions:
    """How one ``quantize`` call runs besides its config: block checkpoints and data parallelism."""

    checkpoint: Optional[str] = None
    data_parallel: bool = False
    checkpoints: Any = None

    def open(self, cfg: QuantConfig, data: Tensor, layers: dict[str, nn.Module], source: bool) -> None:
        if self.checkpoint is None:
            return
        from .checkpoint import BlockCheckpoints, fingerprint

        writer = True
        if self.data_parallel:
            import torch.distributed as dist

            writer = dist.get_rank() == 0
        self.checkpoints = BlockCheckpoints(self.checkpoint, fingerprint(cfg.to_dict(), data, layers, source),
                                            writer=writer)

    def restore(self, index: int, name: str) -> Optional[tuple[dict, dict]]:
        """The finished block's checkpoint, the same decision on every process."""
        if self.checkpoints is None:
            return None
        hit = self.checkpoints.read(index, name)
        if self.data_parallel:
            import torch.distributed as dist

            found = [hit is not None]
            dist.broadcast_object_list(found, src=0)
            if found[0] and hit is None:
                raise RuntimeError(f"block {name!r}: process 0 resumes from a checkpoint this process cannot read")
            hit = hit if found[0] else None
        return hit


def _reconstruct_block(fp: Optional[nn.Module], qmodel: nn.Module, blk: Block, index: int, total: int,
                       data: Optional[Tensor], device: torch.device, cfg: QuantConfig,
                       source_weights: Optional[dict[str, Tensor]], obs: Observation, *,
                       tied: Optional[dict[str, list[tuple[str, str]]]] = None,
                       cache: Optional[Callable[[], BlockCache]] = None, run: Optional[RunOptions] = None) -> dict:
    """Reconstruct block ``blk`` of ``qmodel`` (or restore it from its checkpoint) and put it in the
    hard-quantized state; its cache is built from ``fp`` and ``qmodel`` over ``data``, or by ``cache()``. The
    weights of layers in ``tied`` (shared with a float module) stay as they are."""
    run, tied = run or RunOptions(), tied or {}
    qmodel.eval()
    module = qmodel.get_submodule(blk.name)
    qlayers = {n: qmodel.get_submodule(n) for n in blk.layers}
    boundary = [_boundary_quantizer(qmodel, key) for key in obs.boundaries if _boundary(key)[0] == blk.name]
    fixed = {n for n in blk.layers if n in tied}
    learnable_acts = [q for q in [l.act_quantizer for l in qlayers.values()] + boundary
                      if q.mode != "off" and not q.dynamic]
    if len(fixed) == len(qlayers) and not learnable_acts:
        why = "; ".join(f"{n}: weight tied to {', '.join(f'{p}.{w}' for p, w in tied[n])}" for n in sorted(fixed))
        return BlockReport(blk.name, blk.kind, list(blk.layers),
                           note=f"not reconstructed (nothing to learn: {why}; quantized by round-to-nearest)").__dict__
    restored = run.restore(index, blk.name)
    if restored is not None:
        info, tensors = restored
        module.load_state_dict(tensors)
        for layer in qlayers.values():
            finalize_layer(layer, act_enabled=layer.act_quantizer.mode != "off")
        for q in boundary:
            finalize_quantizer(q)
        return info["report"]
    if cache is None:
        built = BlockCache.build(fp, qmodel, blk.name, data, device, batch_size=cfg.calib_batch_size,
                                 iters=block_iters(cfg), drop_prob=cfg.drop_prob, seed=block_seed(cfg, index),
                                 cache_device=cfg.cache_device, verbose=cfg.verbose)
    else:
        built = cache()
    cache = built
    src = None
    if source_weights is not None:
        src = {}
        for n in blk.layers:
            w = source_weights[n].to(device)
            m = getattr(qlayers[n], "smooth", None)
            src[n] = w if m is None else w * m.to(w.dtype)  # the quantized weight is W * smooth
    report = BlockReport(blk.name, blk.kind, list(blk.layers), cache_device=str(cache.storage),
                         cache_bytes=cache.nbytes())
    if fixed:
        report.note = f"weights not reconstructed (tied to a float module): {sorted(fixed)}"
    enabled = {n: layer.act_quantizer.mode != "off" for n, layer in qlayers.items()}  # stages switch them
    BlockReconstructor(module, qlayers, cache, cfg, boundary=boundary, source_weights=src, report=report,
                       desc=f"{cfg.method} [{index + 1}/{total}] {blk.name}", fixed_weights=fixed,
                       data_parallel=run.data_parallel).run()
    for n, layer in qlayers.items():
        finalize_layer(layer, act_enabled=enabled[n])
    for q in boundary:
        finalize_quantizer(q)
    result = report.__dict__.copy()
    if run.checkpoints is not None:
        run.checkpoints.write(index, blk.name, module, result, {})
    return result


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
        assert isinstance(layer, QuantLayer)
        yield name, layer


def _source_weights(cfg: QuantConfig, source: Optional[nn.Module],
                    layers: dict[str, nn.Module]) -> Optional[dict[str, Tensor]]:
    """HDRQ's source weights (prepared like the model, on the CPU), checked against ``layers``."""
    if not source_needed(cfg, source):
        return None
    src_layers = quantizable_layers(prepare_float(source, "cpu"))
    check_source_layers(layers, src_layers)
    return {n: m.weight.detach() for n, m in src_layers.items()}


def source_needed(cfg: QuantConfig, source: Optional[nn.Module]) -> bool:
    """Whether ``source`` is used (HDRQ's distance term); raises if it is needed and missing, warns if given
    and unused."""
    needed = cfg.method == "hdrq" and cfg.lambda_dist > 0
    if source is None and needed:
        raise ValueError(f"method 'hdrq' with lambda_dist={cfg.lambda_dist} needs source= (the pre-adaptation "
                         f"model the distance term pulls towards; pass the model itself to regularise towards "
                         f"its own weights, or set lambda_dist=0)")
    if source is not None and not needed:
        warnings.warn(f"hdrq.quantize: source is used only by method 'hdrq' with lambda_dist > 0; ignored "
                      f"(method {cfg.method!r}, lambda_dist={cfg.lambda_dist})", RuntimeWarning, stacklevel=4)
    if source is not None and needed and not isinstance(source, nn.Module):
        raise TypeError(f"source must be an nn.Module, got {type(source).__name__}")
    return source is not None and needed


def check_source_layers(layers: dict[str, nn.Module], src_layers: dict[str, nn.Module]) -> None:
    """Raise ``ValueError`` unless the source's prepared layers match the model's, name for name and shape."""
    missing = [n for n in layers if n not in src_layers]
    extra = [n for n in src_layers if n not in layers]
    shapes = [f"{n}: {tuple(layers[n].weight.shape)} vs {tuple(src_layers[n].weight.shape)}"
              for n in layers if n in src_layers and layers[n].weight.shape != src_layers[n].weight.shape]
    if missing or extra or shapes:
        raise ValueError(f"source does not match the model: layers missing from source {missing}, layers only in "
                         f"source {extra}, weight shapes that differ [{'; '.join(shapes)}]")

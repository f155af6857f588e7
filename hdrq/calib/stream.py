"""Streamed calibration: the model goes through the calibration device one block at a time.

``hdrq.quantize`` without streaming prepares a float copy of the whole model on the device, builds a quantized
copy beside it, and caches each block's inputs by running both models up to the block. Here the caller's
model stays where it is, and only one block at a time exists on the device, as a float copy and then as its
quantized version, which goes back (weights stored as packed integers) once it is reconstructed.

This works for models whose blocks form a **chain**: the reconstructed blocks (transformer, residual or
explicitly named blocks) are called one after the other, block ``k+1``'s first argument is the first tensor
block ``k`` returned, its other arguments (masks, position ids or embeddings, flags) are the very objects
block ``k`` got, and no other code reads a block's output except the next block (transformer decoder stacks,
ResNet stages). Everything else is the **shell**: the model with each chain block replaced by a stand-in,
prepared on the device whole (embeddings, stem, norm, head: the layers before and after the chain).

The pipeline, on the calibration data in batches of ``calib_batch_size``:

1. **Structure**: the full model prepared on the meta device (no memory) gives the layer names, their
   registration order (which seeds the quantizers) and the blocks, exactly as the whole-model path sees them.
2. **Probe**: one forward of the first batch through the shell, each stand-in preparing its block on the
   device, running it and dropping it, with the observer's structure hooks (execution order, which layer
   reads which quantized boundary) and the chain checks (call order, argument identity, and, under a
   ``TorchFunctionMode``, that no operation outside block ``k+1`` reads block ``k``'s output).
3. **Prologue**: the shell's layers that run before the chain are observed, quantized and reconstructed
   (their caches stop the shell's forward at them); the first chain block's float and quantized inputs are
   captured.
4. **Chain**: per block, its float copy runs over the float inputs (observing its activations, giving the
   targets and the next block's float inputs); its layers are quantized in place; it is reconstructed on the
   cached inputs and targets; the quantized block runs over its quantized inputs (the next block's quantized
   inputs); it is compacted and sent back.
5. **Epilogue**: the shell runs again with each stand-in returning the last chain block's cached outputs,
   so the layers after the chain are observed, quantized and reconstructed as in the whole-model path.

Every step computes what the whole-model path computes, on the same batches in the same order, so the
result is the same bit for bit on the CPU. Models that do not chain raise :class:`StreamUnsupported` before
any calibration work, and ``hdrq.quantize`` calibrates them whole.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..quant.boundary import attach_block_quantizer
from ..quant.layers import compact_weights, set_module
from .blocks import Block, find_blocks, is_residual_block, quantizable_layers, report_unquantizable
from .cache import BlockCache, CapturedCalls, _allocate, _batched_leaf, capture, pick_storage
from .config import QuantConfig
from .engine import (Observer, RunOptions, _boundary, _boundary_quantizer, _reconstruct_block, block_iters,
                     block_seed, boundary_quantizer, check_source_layers, end_layers, finalize_model, finish,
                     prepare_float, quant_layer, source_needed, tied_weights)
from .reconstruct import finalize_layer, finalize_quantizer, first_tensor


class StreamUnsupported(Exception):
    """The model cannot be streamed (the message says why); it is calibrated whole instead."""


class _StopForward(Exception):
    """Raised by a stand-in that has nothing to return: the rest of the model need not run."""


# --------------------------------------------------------------------------------------------------
# Skeletons and stand-ins
# --------------------------------------------------------------------------------------------------


def meta_skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are on the meta device (no memory; tied
    tensors stay tied)."""
    memo: dict[int, Any] = {}
    for t in (*model.parameters(), *model.buffers()):
        if id(t) in memo:
            continue
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


class _Feed:
    """Cached outputs of the last chain block, served batch by batch: the shell's root pre-hook moves to the
    next batch's rows (wrapping at the end of the data), every stand-in returns those rows."""

    def __init__(self, store: CapturedCalls, n: int, device: torch.device):
        self.store, self.n, self.device = store, n, device
        self.offset, self.rows = 0, slice(0, 0)

    def rewind(self) -> None:
        self.offset = 0

    def begin(self, batch: int) -> None:
        if self.offset >= self.n:
            self.offset = 0
        self.rows = slice(self.offset, self.offset + batch)
        self.offset += batch

    def output(self) -> Any:
        leaves = [l[self.rows].to(self.device, non_blocking=True) if bt else l
                  for l, bt in zip(self.store.leaves, self.store.batched)]
        return pytree.tree_unflatten(leaves, self.store.spec)


class ChainStub(nn.Module):
    """Stands in the shell for a chain block. Calls go to ``run`` (the probe), else return the fed outputs
    (the epilogue), else stop the forward. Attribute reads it does not have go to the block's meta
    skeleton (a container may inspect its children, as ``nn.TransformerEncoder`` reads
    ``layers[0].self_attn``)."""

    def __init__(self, name: str, skeleton: nn.Module):
        super().__init__()
        object.__setattr__(self, "skeleton", skeleton)  # not a submodule: no parameters, no state
        self.block_name = name
        self.run: Optional[Callable] = None
        self.feed: Optional[_Feed] = None

    def forward(self, *args, **kwargs):
        if args and isinstance(args[0], torch.fx.Proxy):  # traced by fold_batchnorm: an opaque pass-through
            return args[0]
        if self.run is not None:
            return self.run(*args, **kwargs)
        if self.feed is not None:
            return self.feed.output()
        raise _StopForward

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            skeleton = self.__dict__.get("skeleton")
            if skeleton is None:
                raise
            return getattr(skeleton, name)


def make_shell(model: nn.Module, names: list[str], skeletons: dict[str, nn.Module]) -> tuple[nn.Module, dict]:
    """A deep copy of ``model`` with a :class:`ChainStub` in place of each block in ``names`` (the blocks
    themselves are not copied). Returns ``(shell, {name: stub})``."""
    stubs = {n: ChainStub(n, skeletons[n]) for n in names}
    memo = {id(model.get_submodule(n)): stubs[n] for n in names}
    return copy.deepcopy(model, memo), stubs


def _holder(name: str, block: nn.Module) -> nn.Module:
    """A module in which ``block`` sits at the dotted path ``name`` (so full layer names resolve)."""
    root = nn.Module()
    parent = root
    parts = name.split(".")
    for p in parts[:-1]:
        child = nn.Module()
        parent.add_module(p, child)
        parent = child
    parent.add_module(parts[-1], block)
    return root


def _prefixed(name: str, module: nn.Module) -> dict[str, nn.Module]:
    return {f"{name}.{n}": m for n, m in quantizable_layers(module).items()}


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


# --------------------------------------------------------------------------------------------------
# The probe: structure and chain checks on the first batch
# --------------------------------------------------------------------------------------------------


class _Watch(TorchFunctionMode):
    """Flags any operation that reads a tracked tensor (a chain block's output, or the first block's input)
    outside the block allowed to read it, and returns a tensor (reading a shape is not a use)."""

    def __init__(self):
        super().__init__()
        self.tracked: dict[int, tuple[int, Tensor]] = {}  # id -> (the chain position allowed to read it, tensor)
        self.inside: list[int] = []
        self.violation: Optional[str] = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.tracked and self.violation is None:
            for leaf in pytree.tree_leaves((args, kwargs)):
                hit = self.tracked.get(id(leaf)) if isinstance(leaf, Tensor) else None
                if hit is None or hit[1] is not leaf:
                    continue
                if (not self.inside or self.inside[-1] != hit[0]) \
                        and any(isinstance(o, Tensor) for o in pytree.tree_leaves(out)):
                    self.violation = (f"{getattr(func, '__name__', func)} reads a tensor that only chain block "
                                      f"#{hit[0]} may read")
                    break
        return out


@dataclass
class _Probe:
    chain: list[str]          # chain blocks in call order
    before: set[str]          # shell layers run before the chain
    after: set[str]           # shell layers run after it


@torch.no_grad()
def _probe(model: nn.Module, fp_shell: nn.Module, stubs: dict[str, ChainStub], shell_layers: dict[str, nn.Module],
           meta_layers: dict[str, nn.Module], residual: set[str], obs: Observer, x: Tensor,
           device: torch.device) -> _Probe:
    calls: list[tuple[str, tuple, dict, Any]] = []
    watch = _Watch()
    phase = {"chain": "before"}
    before, after, between = set(), set(), []

    def layer_phase(name):
        def pre(module, args):
            if phase["chain"] == "before":
                before.add(name)
            elif phase["chain"] == "after":
                after.add(name)
            else:
                between.append(name)
        return pre

    def runner(name: str):
        def run(*args, **kwargs):
            position = len(calls)
            if any(c[0] == name for c in calls):
                raise StreamUnsupported(f"block {name!r} is called more than once per forward")
            block = prepare_float(model.get_submodule(name), device)
            layers = _prefixed(name, block)
            if set(layers) != {l for l in meta_layers if l.startswith(name + ".")}:
                raise StreamUnsupported(f"block {name!r} prepared alone has other layers than in the prepared model")
            handles = obs.attach(layers, {name: block} if name in residual else {})
            if position == 0 and args and isinstance(args[0], Tensor):
                watch.tracked[id(args[0])] = (0, args[0])
            phase["chain"] = "inside"
            watch.inside.append(position)
            try:
                out = block(*args, **kwargs)
            finally:
                watch.inside.pop()
                phase["chain"] = "between"
                for h in handles:
                    h.remove()
            calls.append((name, args, kwargs, out))
            if len(calls) == len(stubs):
                phase["chain"] = "after"
            else:
                for leaf in pytree.tree_leaves(out):
                    if isinstance(leaf, Tensor):
                        watch.tracked[id(leaf)] = (position + 1, leaf)
            return out
        return run

    handles = obs.attach(shell_layers, {})
    handles += [m.register_forward_pre_hook(layer_phase(n)) for n, m in shell_layers.items()]
    for name, stub in stubs.items():
        stub.run = runner(name)
    try:
        obs.start_batch(x)
        with watch:
            fp_shell(x)
        obs.end_batch()
    finally:
        for h in handles:
            h.remove()
        for stub in stubs.values():
            stub.run = None
    if len(calls) != len(stubs):
        missing = sorted(set(stubs) - {c[0] for c in calls})
        raise StreamUnsupported(f"blocks {missing} are not called by the model's forward")
    if between:
        raise StreamUnsupported(f"layer {between[0]!r} runs between two chain blocks")
    if watch.violation:
        raise StreamUnsupported(watch.violation)
    for (prev, pargs, pkw, pout), (name, args, kwargs, _) in zip(calls, calls[1:]):
        if not args or not isinstance(args[0], Tensor) or args[0] is not first_tensor(pout):
            raise StreamUnsupported(f"block {name!r} does not take block {prev!r}'s output as its first argument")
        rest, rest_spec = pytree.tree_flatten((args[1:], kwargs))
        prest, prest_spec = pytree.tree_flatten((pargs[1:], pkw))
        if rest_spec != prest_spec or not all(_same(a, b) for a, b in zip(rest, prest)):
            raise StreamUnsupported(f"block {name!r} gets other arguments than block {prev!r} besides the hidden state")
    return _Probe([c[0] for c in calls], before, after)


# --------------------------------------------------------------------------------------------------
# Running one block over cached calls
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def run_calls(block: nn.Module, calls: CapturedCalls, n: int, batch_size: int, device: torch.device,
              storage: torch.device, observer: Optional[Observer] = None) -> CapturedCalls:
    """``block`` called on the cached calls, batch by batch as the model's forward would call it; its
    outputs stored like :func:`hdrq.calib.cache.capture` stores them."""
    store: Optional[CapturedCalls] = None
    for start in range(0, n, batch_size):
        leaves = [l[start:start + batch_size].to(device, non_blocking=True) if bt else l
                  for l, bt in zip(calls.leaves, calls.batched)]
        b = next((l.shape[0] for l, bt in zip(leaves, calls.batched) if bt), 0)
        args, kwargs = pytree.tree_unflatten(leaves, calls.spec)
        if observer is not None:
            observer.start_batch(None)
        out = block(*args, **kwargs)
        if observer is not None:
            observer.end_batch()
        flat, spec = pytree.tree_flatten(out)
        if store is None:
            batched = [_batched_leaf(l, b) for l in flat]
            store = CapturedCalls(spec, [_allocate(l, n, storage) if bt else l for l, bt in zip(flat, batched)],
                                  batched, storage)
        elif spec != store.spec:
            raise RuntimeError(f"{type(block).__name__} returned differently structured outputs in batch "
                               f"{start // batch_size}")
        for dst, src, bt in zip(store.leaves, flat, store.batched):
            if bt:
                dst[start:start + b].copy_(src)
    return store


def chained(calls: CapturedCalls, outputs: CapturedCalls) -> CapturedCalls:
    """The next chain block's calls: ``calls`` with the first argument replaced by the first tensor of
    ``outputs``."""
    out_index = next((i for i, l in enumerate(outputs.leaves) if isinstance(l, Tensor)), None)
    if out_index is None or not outputs.batched[out_index] or not calls.batched[0]:
        raise RuntimeError("a chain block's output has no batched first tensor to pass on")
    leaves = list(calls.leaves)
    leaves[0] = outputs.leaves[out_index]
    return CapturedCalls(calls.spec, leaves, calls.batched, calls.storage)


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------


def _out_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def quantize_streamed(model: nn.Module, data: Tensor, cfg: QuantConfig, device: torch.device, *,
                      source: Optional[nn.Module] = None, run: Optional[RunOptions] = None) -> nn.Module:
    """:func:`hdrq.quantize` streamed (module docstring). Raises :class:`StreamUnsupported` before any
    calibration work for a model that does not chain. Returns the quantized model on ``model``'s device."""
    n, bs = data.shape[0], cfg.calib_batch_size

    # 1. structure, as the whole-model path sees it
    meta = prepare_float(meta_skeleton(model), "meta")
    layers = quantizable_layers(meta)
    if not layers:
        raise StreamUnsupported("the model has no quantizable layers")
    if tied_weights(meta, layers):
        raise StreamUnsupported("a layer's weight is tied to a module that stays float (it is quantized once, "
                                "on the whole model)")
    plan = find_blocks(meta, cfg.blocks)
    chain_blocks = [b for b in plan if b.kind != "layer"]
    if len(chain_blocks) < 2:
        raise StreamUnsupported("the model has fewer than two multi-layer blocks")
    residual = {b.name for b in chain_blocks if b.kind == "residual"
                or (b.kind == "explicit" and is_residual_block(meta.get_submodule(b.name)))}
    use_source = source_needed(cfg, source)
    if use_source:
        check_source_layers(layers, quantizable_layers(prepare_float(meta_skeleton(source), "meta")))
    names = [b.name for b in chain_blocks]
    skeletons = {nm: meta.get_submodule(nm) for nm in names}
    fp_shell, fp_stubs = make_shell(model, names, skeletons)
    fp_shell = prepare_float(fp_shell, device)
    fp_stubs = {nm: fp_shell.get_submodule(nm) for nm in names}
    shell_layers = quantizable_layers(fp_shell)
    if set(shell_layers) != {l for l in layers if not any(l.startswith(nm + ".") for nm in names)}:
        raise StreamUnsupported("the model's layers outside the blocks prepare differently without the blocks")

    # 2. the probe
    placement = cfg.act_placement
    hooked = residual if placement == "output" and cfg.a_bits is not None else set()  # boundary quantizers
    structure = Observer(n, bs, placement=placement, recording=False)
    probe = _probe(model, fp_shell, fp_stubs, shell_layers, layers, hooked, structure, data[:bs].to(device), device)
    obs = structure.result()
    chain = probe.chain
    if [b.name for b in sorted(chain_blocks, key=lambda b: min(obs.order[l] for l in b.layers))] != chain:
        raise StreamUnsupported("the blocks are called in another order than their layers run")

    # from here on the model chains: calibrate
    report_unquantizable(meta)
    run = run or RunOptions()
    run.open(cfg, data, layers, use_source)
    rec = Observer(n, bs, placement=placement, structure=False)
    rec.order, rec.sources, rec.boundaries = obs.order, obs.sources, obs.boundaries
    ends = end_layers(obs)
    index = {name: i for i, name in enumerate(layers)}
    out_device = _out_device(model)
    src_shell = None
    if use_source:
        src_shell = quantizable_layers(prepare_float(make_shell(source, names, skeletons)[0], "cpu"))

    def observe_shell(which: set[str]) -> None:
        hooked = {nm: m for nm, m in shell_layers.items() if nm in which}
        if not hooked:
            return
        handles = rec.attach(hooked, {})
        try:
            for start in range(0, n, bs):
                x = data[start:start + bs].to(device)
                rec.start_batch(x)
                try:
                    fp_shell(x)
                except _StopForward:
                    pass
                rec.end_batch()
        finally:
            for h in handles:
                h.remove()

    q_shell = copy.deepcopy(fp_shell)
    q_stubs = {nm: q_shell.get_submodule(nm) for nm in names}

    def quantize_shell(which: set[str]) -> None:
        current = rec.result()
        for nm in which:
            set_module(q_shell, nm, quant_layer(shell_layers[nm], nm, index[nm], current, cfg, ends))

    unused = set(shell_layers) - probe.before - probe.after
    observe_shell(probe.before)
    quantize_shell(probe.before | unused)

    reports: list[dict] = []
    reconstruct = cfg.method != "rtn"
    plan.sort(key=lambda b: min(obs.order.get(l, math.inf) for l in b.layers))
    position = {b.name: i for i, b in enumerate(plan)}
    total = len(plan)
    first_chain = position[chain[0]]
    last_chain = position[chain[-1]]

    def shell_sources(blk: Block) -> Optional[dict[str, Tensor]]:
        return {l: src_shell[l].weight.detach() for l in blk.layers} if src_shell is not None else None

    # 3. prologue blocks
    for blk in plan[:first_chain]:
        if reconstruct and any(l in obs.order for l in blk.layers):
            reports.append(_reconstruct_block(fp_shell, q_shell, blk, position[blk.name], total, data, device, cfg,
                                              shell_sources(blk), rec.result(), run=run))

    # the first chain block's inputs
    q_shell.eval()
    decide = pick_storage(device, cfg.cache_device, n)
    fp_in, _ = capture(fp_shell, fp_stubs[chain[0]], data, bs, device, outputs=False, decide_storage=decide,
                       name=chain[0])
    storage = fp_in.storage
    q_in, _ = capture(q_shell, q_stubs[chain[0]], data, bs, device, outputs=False, storage=storage, name=chain[0])

    # 4. the chain
    by_name = {b.name: b for b in plan}
    chain_q: dict[str, nn.Module] = {}
    fp_out = q_out = None
    bar = None
    if cfg.verbose and not (run.data_parallel and torch.distributed.get_rank() != 0):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chain), desc="hdrq streamed blocks", unit="block", dynamic_ncols=True)
    for k, name in enumerate(chain):
        blk = by_name[name]
        block = prepare_float(model.get_submodule(name), device)
        blayers = _prefixed(name, block)
        handles = rec.attach(blayers, {name: block} if name in hooked else {})
        try:
            fp_out = run_calls(block, fp_in, n, bs, device, storage, observer=rec)
        finally:
            for h in handles:
                h.remove()
        current = rec.result()
        for lname in list(blayers):  # quantize in place: the float block becomes the quantized one
            layer = blayers.pop(lname)
            set_module(block, lname[len(name) + 1:], quant_layer(layer, lname, index[lname], current, cfg, ends))
            del layer
        for j, key in enumerate(obs.boundaries):
            bname, where = _boundary(key)
            if bname == name:
                attach_block_quantizer(block, where, boundary_quantizer(key, j, current, cfg))
        holder = _holder(name, block)
        if reconstruct:
            src = None
            if use_source:
                src_block = prepare_float(source.get_submodule(name), "cpu")
                src = {l: m.weight.detach() for l, m in _prefixed(name, src_block).items()}
                del src_block

            def make_cache(fp_in=fp_in, q_in=q_in, fp_out=fp_out, seed=block_seed(cfg, position[name])):
                return BlockCache(fp_in, q_in, fp_out, device, batch_size=bs, iters=block_iters(cfg),
                                  drop_prob=cfg.drop_prob, seed=seed)

            reports.append(_reconstruct_block(None, holder, blk, position[name], total, None, device, cfg, src,
                                              current, cache=make_cache, run=run))
        if not reconstruct:  # rtn: the hard-quantized state (reconstruction leaves blocks in it)
            for lname in blk.layers:
                layer = holder.get_submodule(lname)
                finalize_layer(layer, act_enabled=layer.act_quantizer.mode != "off")
            for key in obs.boundaries:
                if _boundary(key)[0] == name:
                    finalize_quantizer(_boundary_quantizer(holder, key))
        block.eval()
        q_out = run_calls(block, q_in, n, bs, device, storage)
        compact_weights(block)
        chain_q[name] = block.to(out_device)
        del block, holder
        if bar is not None:
            bar.update(1)
        if k + 1 < len(chain):
            fp_in, q_in = chained(fp_in, fp_out), chained(q_in, q_out)

    if bar is not None:
        bar.close()

    # 5. epilogue: the shells run on with the last chain block's cached outputs
    feeds = {"fp": _Feed(fp_out, n, device), "q": _Feed(q_out, n, device)}
    hooks = [fp_shell.register_forward_pre_hook(lambda m, a: feeds["fp"].begin(a[0].shape[0])),
             q_shell.register_forward_pre_hook(lambda m, a: feeds["q"].begin(a[0].shape[0]))]
    for nm in names:
        fp_stubs[nm].feed, q_stubs[nm].feed = feeds["fp"], feeds["q"]
    try:
        feeds["fp"].rewind()
        observe_shell(probe.after)
        quantize_shell(probe.after)
        for blk in plan[last_chain + 1:]:
            if reconstruct and any(l in obs.order for l in blk.layers):
                feeds["fp"].rewind()
                feeds["q"].rewind()
                reports.append(_reconstruct_block(fp_shell, q_shell, blk, position[blk.name], total, data, device,
                                                  cfg, shell_sources(blk), rec.result(), run=run))
    finally:
        for h in hooks:
            h.remove()
    del fp_shell, fp_stubs, feeds, fp_in, q_in, fp_out, q_out

    # the quantized model: the quantized shell with the quantized blocks in place of the stand-ins
    for nm, qb in chain_q.items():
        set_module(q_shell, nm, qb)
    q_shell.to(out_device)
    finalize_model(q_shell, layers, rec.result())
    return finish(q_shell, model, cfg, reports)


__all__ = ["quantize_streamed", "StreamUnsupported", "meta_skeleton", "make_shell", "ChainStub", "run_calls",
           "chained"]

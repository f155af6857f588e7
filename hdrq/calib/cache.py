"""Calibration data, and the cached inputs and targets of one block.

For each block, three things are cached once over the whole calibration set, by running the models up to
the block and stopping there (a forward hook raises, so nothing after the block is computed):

* the block's call arguments in the full-precision model (``fp``) and its output (the target);
* the block's call arguments in the quantized model, whose earlier blocks are already reconstructed
  (``q``); QDrop mixes ``fp`` and ``q`` element-wise at the block input.

Arguments are captured as a pytree (positional and keyword, nested tuples/dicts); a tensor leaf whose
leading dimension is the batch size is *batched* and stored as one ``[N, ...]`` tensor, every other leaf
(a constant mask, position ids, ``None``, a flag) is kept as it was in the first batch. A batched leaf
that is identical in ``fp`` and ``q`` (a padding mask, or every input of the first block) is stored once.

A leaf that is neither a tensor nor an immutable value (a number, a string, ``None``, a dtype...) nor a
module or a function is *stateful*: an object the block may change when called, such as a key/value cache
(transformers' ``DynamicCache``, which every attention layer appends to). Reusing it would carry one call's
state into the next (and its autograd graph into the next backward), so it is copied (``copy.deepcopy``) as
the block received it in the first batch, before the call, and every call made from the cache gets a fresh
copy of that snapshot. (``hdrq.quantize`` also switches a transformers model's own key/value cache off while
it calibrates, so such objects rarely reach a block.)

Where the cache lives: on the calibration device when it fits in half of the device's free memory, else
on the CPU in pinned memory; then every iteration gathers its batch on the CPU and copies it over
asynchronously. Storage is allocated once at its final size (after the first batch shows the bytes per
sample), so there is never a second copy of the cached data on the device.
"""
from __future__ import annotations

import copy
import enum
import functools
import types
import warnings
from collections.abc import Mapping
from typing import Any, Iterable, Optional

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ..reference import mix_seed
from .config import MAX_CALIB_SAMPLES, check_device

# Share of the device's free memory the caches of one block may take before they go to the CPU.
DEVICE_CACHE_FRACTION = 0.5


# --------------------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------------------


def collect_calib_data(calib_data: Any, *, max_samples: Optional[int] = MAX_CALIB_SAMPLES) -> Tensor:
    """One CPU tensor ``[N, ...]`` from a tensor (a batch), a list/tuple of batches, or an iterable such as
    a DataLoader yielding batches or ``(input, label, ...)`` tuples (the input is taken). Floating inputs
    become float32; integer inputs (token ids) keep their dtype.

    At most ``max_samples`` samples are taken (the first ones, with a warning naming the cap when there were
    more), so an endless iterable ends; None takes everything. Refused, naming the item: a batch without a
    batch dimension (a scalar, or a 1-D tensor, which would be read as samples of one feature), tensors
    without values ("meta") or in a sparse layout, complex tensors, NaN or infinite values, mappings (hdrq
    calls ``model(x)`` with one tensor) and anything that is not a tensor."""
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    if isinstance(calib_data, Tensor):
        items: Iterable = [calib_data]
    elif isinstance(calib_data, Mapping):
        raise TypeError(f"calib_data is a {type(calib_data).__name__}; hdrq calls model(x) with one input "
                        f"tensor: pass that tensor (e.g. calib_data[{next(iter(calib_data), 'key')!r}]) or a list "
                        f"of such batches")
    elif isinstance(calib_data, (str, bytes)) or not hasattr(calib_data, "__iter__"):
        raise TypeError(f"calib_data must be a tensor, a list of tensors or a DataLoader, got "
                        f"{type(calib_data).__name__}")
    else:
        items = calib_data
    name = (lambda i: "calib_data") if isinstance(calib_data, Tensor) else (lambda i: f"calib_data item {i}")
    batches, total, more = [], 0, False
    for i, item in enumerate(items):
        if max_samples is not None and total >= max_samples:
            more = True
            break
        batches.append(_calib_batch(item, name(i)))
        total += batches[-1].shape[0]
    if max_samples is not None and total > max_samples:
        batches[-1] = batches[-1][:batches[-1].shape[0] - (total - max_samples)]
        more = True
    if more:
        warnings.warn(f"calib_data: took the first {max_samples} calibration samples (max_calib_samples) and left "
                      f"the rest; raise QuantConfig.max_calib_samples (None: no cap) to use more", UserWarning,
                      stacklevel=3)
    if not batches or sum(b.shape[0] for b in batches) == 0:
        raise ValueError("calib_data is empty: quantization needs at least one calibration sample")
    shapes = {tuple(b.shape[1:]) for b in batches}
    if len(shapes) > 1:
        raise ValueError(f"calib_data batches must agree in every dimension but the first, got sample shapes "
                         f"{sorted(shapes)}")
    data = torch.cat(batches) if len(batches) > 1 else batches[0]
    return data.float() if data.is_floating_point() else data


def _calib_batch(item: Any, where: str) -> Tensor:
    """One calibration batch as a CPU tensor ``[n, ...]``, checked (see :func:`collect_calib_data`)."""
    if isinstance(item, (list, tuple)):
        if not item:
            raise ValueError(f"{where} is an empty {type(item).__name__}")
        item = item[0]  # (input, label): keep the input
    if isinstance(item, Mapping):
        raise TypeError(f"{where} is a {type(item).__name__} (keys {list(item)[:4]}); hdrq calls model(x) with one "
                        f"input tensor: yield that tensor (or an (input, label) tuple)")
    if not isinstance(item, Tensor):
        raise TypeError(f"{where} must be a tensor or an (input, label) tuple, got {type(item).__name__}")
    if item.is_meta:
        raise ValueError(f"{where} is a tensor on the meta device, which holds no values")
    if item.layout != torch.strided:
        raise TypeError(f"{where} is a {item.layout} tensor; pass a dense one (x.to_dense())")
    if item.is_complex():
        raise TypeError(f"{where} is a complex tensor ({item.dtype}); calibration data must be real")
    if item.dim() < 2:
        got = "a scalar" if item.dim() == 0 else f"shape {tuple(item.shape)}"
        raise ValueError(f"{where} must be a batch [N, ...] with a leading batch dimension, got {got}: for one "
                         f"sample pass x.unsqueeze(0), for a list of single samples torch.stack(samples)")
    item = item.detach().cpu()
    if item.is_floating_point():
        bad = int((~torch.isfinite(item)).sum())
        if bad:
            raise ValueError(f"{where} has {bad} NaN or infinite values (of {item.numel()}); calibration data "
                             f"must be finite")
    return item


def iter_chunks(data: Tensor, batch_size: int, device: torch.device, *,
                desc: Optional[str] = None) -> Iterable[tuple[int, Tensor]]:
    """``(start, batch on device)`` over ``data`` in order; with ``desc``, a progress bar (tqdm) so named."""
    starts = range(0, data.shape[0], batch_size)
    if desc is not None:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=desc, leave=False, dynamic_ncols=True)
    for start in starts:
        yield start, data[start:start + batch_size].to(device, non_blocking=True)


# --------------------------------------------------------------------------------------------------
# Capturing a block's calls
# --------------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook once the block has been seen: the rest of the model need not run."""


class CapturedCalls:
    """A block's call arguments (and optionally outputs) over the calibration set.

    ``leaves[i]`` is an ``[N, ...]`` tensor (on ``storage``) where ``batched[i]``, else the constant value."""

    def __init__(self, spec, leaves: list, batched: list[bool], storage: torch.device):
        self.spec, self.leaves, self.batched, self.storage = spec, leaves, batched, storage

    def nbytes(self) -> int:
        return sum(l.numel() * l.element_size() for l, b in zip(self.leaves, self.batched) if b)


def _batched_leaf(leaf: Any, batch: int) -> bool:
    return isinstance(leaf, Tensor) and leaf.dim() >= 1 and leaf.shape[0] == batch


_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, slice, range, type(Ellipsis), torch.dtype,
              torch.device, torch.layout, torch.memory_format, torch.Size, enum.Enum, type, nn.Module,
              types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial)


def is_stateful(leaf: Any) -> bool:
    """True for a call argument the block may mutate (see the module docstring): not a tensor, an immutable
    value, a module or a function."""
    return not isinstance(leaf, (Tensor, *_IMMUTABLE))


def _snapshot(tree: Any) -> Any:
    """``tree`` with every stateful leaf deep-copied (its state before the block runs)."""
    leaves, spec = pytree.tree_flatten(tree)
    if not any(is_stateful(l) for l in leaves):
        return tree
    return pytree.tree_unflatten([copy.deepcopy(l) if is_stateful(l) else l for l in leaves], spec)


@torch.no_grad()
def canonical_device(device: torch.device) -> torch.device:
    """``device`` with its index: "cuda" and "cuda:0" name one device but compare unequal, and tensors always
    report an index, so the cache (which decides what to copy by comparing devices) needs the indexed form.
    A device this machine does not have, or "meta", raises ``ValueError`` (:func:`check_device`)."""
    device = check_device(device, what="hdrq.quantize: the calibration device (QuantConfig.device, else the "
                                       "model's)")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def capture(model: nn.Module, block: nn.Module, data: Tensor, batch_size: int, device: torch.device, *,
            outputs: bool, storage: Optional[torch.device] = None, decide_storage=None,
            name: str = "", desc: Optional[str] = None) -> tuple[CapturedCalls, Optional[CapturedCalls]]:
    """Run ``model`` over ``data`` in batches, recording ``block``'s first call per batch (and its output if
    ``outputs``). Storage is ``storage`` or ``decide_storage(bytes_per_sample)`` (called after the first
    batch). ``desc``: show a progress bar so named. Returns ``(inputs, outputs or None)``."""
    n = data.shape[0]
    seen: dict[str, Any] = {}

    def pre_hook(module, args, kwargs):
        if "args" not in seen:
            # stateful arguments (a key/value cache) as they are before the call: only the first batch's are kept
            seen["args"] = _snapshot((args, kwargs)) if stores[0] is None else (args, kwargs)
            if not outputs:
                raise _StopForward

    def post_hook(module, args, kwargs, output):
        seen.setdefault("out", output)
        raise _StopForward

    # prepend: the call's arguments as the caller passed them, before the block's own hooks (a block input
    # quantizer belongs to the block and is reconstructed with it).
    handles = [block.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)]
    if outputs:
        handles.append(block.register_forward_hook(post_hook, with_kwargs=True))
    stores: list[Optional[CapturedCalls]] = [None, None]
    try:
        for start, x in iter_chunks(data, batch_size, device, desc=desc):
            seen.clear()
            try:
                model(x)
            except _StopForward:
                pass
            if "args" not in seen or (outputs and "out" not in seen):
                raise RuntimeError(f"block {name!r} ({type(block).__name__}) was not called by the model's "
                                   f"forward on calibration batch {start // batch_size}")
            b = x.shape[0]
            trees = [seen["args"]] + ([seen["out"]] if outputs else [])
            flat = [pytree.tree_flatten(t) for t in trees]
            if stores[0] is None:  # first batch: decide what is batched and where it is stored
                per_sample = sum(l[0].numel() * l.element_size() for leaves, _ in flat for l in leaves
                                 if _batched_leaf(l, b))
                if storage is None:
                    storage = decide_storage(per_sample) if decide_storage is not None else device
                for k, (leaves, spec) in enumerate(flat):
                    batched = [_batched_leaf(l, b) for l in leaves]
                    kept = [_allocate(l, n, storage) if bt else l for l, bt in zip(leaves, batched)]
                    stores[k] = CapturedCalls(spec, kept, batched, storage)
            for k, (leaves, spec) in enumerate(flat):
                store = stores[k]
                if spec != store.spec or len(leaves) != len(store.leaves):
                    raise RuntimeError(f"block {name!r} was called with differently structured arguments in "
                                       f"calibration batch {start // batch_size}")
                for dst, src, bt in zip(store.leaves, leaves, store.batched):
                    if bt:
                        if not _batched_leaf(src, b):
                            raise RuntimeError(f"block {name!r}: an argument batched in the first calibration "
                                               f"batch has shape {tuple(src.shape)} in batch {start // batch_size}")
                        dst[start:start + b].copy_(src)  # blocking: the CPU reads it right after
    finally:
        for h in handles:
            h.remove()
    return stores[0], stores[1]


def _allocate(like: Tensor, n: int, storage: torch.device) -> Tensor:
    # Pinned host memory when the data comes from (and goes back to) a GPU: asynchronous copies need it.
    pin = storage.type == "cpu" and like.device.type == "cuda"
    return torch.empty((n, *like.shape[1:]), dtype=like.dtype, device=storage, pin_memory=pin)


def pick_storage(device: torch.device, cache_device: Optional[str], n: int):
    """``decide_storage`` for :func:`capture`: ``cache_device`` if given, else the device while the three
    caches of a block (fp input, quantized input, target ~ 3x the bytes per sample) fit in
    ``DEVICE_CACHE_FRACTION`` of its free memory, else the CPU."""
    def decide(bytes_per_sample: int) -> torch.device:
        if cache_device is not None:
            return check_device(cache_device, what="QuantConfig.cache_device")
        if device.type != "cuda":
            return device
        free, _ = torch.cuda.mem_get_info(device)
        return device if 3 * bytes_per_sample * n <= DEVICE_CACHE_FRACTION * free else torch.device("cpu")
    return decide


# --------------------------------------------------------------------------------------------------
# The per-block cache and its batches
# --------------------------------------------------------------------------------------------------


class BlockCache:
    """Cached inputs (full-precision and quantized) and targets of one block, and its batch stream.

    ``batch(t)`` returns the call arguments and the target of iteration ``t``: ``calib_batch_size`` random
    samples (a fresh permutation prefix per iteration, drawn up front from a seeded CPU generator), with
    each batched input element taken from the full-precision input with probability ``drop_prob``
    and from the quantized input otherwise (QDrop; ``drop_prob=0`` uses the quantized input only).
    """

    def __init__(self, fp_in: CapturedCalls, q_in: CapturedCalls, target: CapturedCalls, device: torch.device,
                 *, batch_size: int, iters: int, drop_prob: float, seed: int):
        self.device, self.drop_prob = canonical_device(device), float(drop_prob)
        self.spec, self.batched = q_in.spec, q_in.batched
        if fp_in.spec != q_in.spec or fp_in.batched != q_in.batched:
            raise RuntimeError("the block is called with different arguments in the full-precision and the "
                               "quantized model")
        self.storage = q_in.storage
        # A batched leaf identical in both models is kept once (no mixing needed for it).
        self.q_leaves = q_in.leaves
        self.fp_leaves = [None if not bt or torch.equal(f, q) else f
                          for f, q, bt in zip(fp_in.leaves, q_in.leaves, self.batched)]
        self.const = [None if bt else _to(l, device) for l, bt in zip(q_in.leaves, self.batched)]
        self.stateful = [not bt and is_stateful(l) for l, bt in zip(q_in.leaves, self.batched)]
        tgt_leaves = [l for l, bt in zip(target.leaves, target.batched) if bt]
        if not tgt_leaves:
            raise RuntimeError("the block's output has no batched tensor to reconstruct")
        self.target = tgt_leaves[0]  # the first tensor of the output (the hidden state of HF-style tuples)
        self.n = self.target.shape[0]
        b = min(batch_size, self.n)
        gen = torch.Generator().manual_seed(mix_seed(seed, 0))
        idx = (torch.stack([torch.randperm(self.n, generator=gen)[:b] for _ in range(iters)]) if iters
               else torch.empty(0, b, dtype=torch.int64))
        self.idx_cpu = idx
        # One copy of all indices to the device up front: a per-iteration copy from pageable memory would
        # synchronise the host with the device every step.
        self.idx_dev = idx.to(self.storage) if self.storage.type != "cpu" else idx
        self.mix_gen = torch.Generator(device=device).manual_seed(mix_seed(seed, 1))
        self.rows = b          # samples per iteration
        self.shard = slice(0, b)  # the rows of each batch this process trains on (data parallel: its share)

    def set_shard(self, rank: int, world: int) -> None:
        """Data parallelism: return only rows ``[rank * b // world, (rank + 1) * b // world)`` of each batch
        (the batch itself, and its QDrop mixing, are drawn whole as in one process)."""
        if not 0 <= rank < world or self.rows < world:
            raise ValueError(f"BlockCache.set_shard: need 0 <= rank < world <= samples per iteration, got rank "
                             f"{rank}, world {world}, {self.rows} samples per iteration")
        self.shard = slice(rank * self.rows // world, (rank + 1) * self.rows // world)

    @property
    def share(self) -> float:
        """This process's fraction of each batch."""
        return (self.shard.stop - self.shard.start) / self.rows

    @classmethod
    def build(cls, fp_model: nn.Module, q_model: nn.Module, name: str, data: Tensor, device: torch.device, *,
              batch_size: int, iters: int, drop_prob: float, seed: int,
              cache_device: Optional[str] = None, verbose: bool = False) -> "BlockCache":
        """Capture the block ``name``'s inputs and targets in ``fp_model`` and its inputs in ``q_model``;
        ``verbose``: a progress bar for each of the two passes."""
        decide = pick_storage(device, cache_device, data.shape[0])
        fp_in, target = capture(fp_model, fp_model.get_submodule(name), data, batch_size, device, outputs=True,
                                decide_storage=decide, name=name, desc=f"cache {name}: float" if verbose else None)
        q_in, _ = capture(q_model, q_model.get_submodule(name), data, batch_size, device, outputs=False,
                          storage=fp_in.storage, name=name, desc=f"cache {name}: quantized" if verbose else None)
        return cls(fp_in, q_in, target, device, batch_size=batch_size, iters=iters, drop_prob=drop_prob,
                   seed=seed)

    def nbytes(self) -> int:
        """Bytes of cached data (batched leaves, each stored once, and the target)."""
        stored = [q for q, bt in zip(self.q_leaves, self.batched) if bt]
        stored += [f for f in self.fp_leaves if f is not None] + [self.target]
        return sum(t.numel() * t.element_size() for t in stored)

    def _gather(self, t: Tensor, step: int) -> Tensor:
        if t.device == self.device:
            return t.index_select(0, self.idx_dev[step] if t.device.type != "cpu" else self.idx_cpu[step])
        # CPU storage, accelerator compute: gather into pinned memory, copy asynchronously (the caching host
        # allocator keeps the pinned block alive until the copy has finished).
        idx = self.idx_cpu[step]
        buf = torch.empty((idx.numel(), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
        torch.index_select(t, 0, idx, out=buf)
        return buf.to(self.device, non_blocking=True)

    def batch(self, step: int) -> tuple[tuple, dict, Tensor]:
        """``(args, kwargs, target)`` of iteration ``step``."""
        leaves = []
        for q, f, c, bt, st in zip(self.q_leaves, self.fp_leaves, self.const, self.batched, self.stateful):
            if not bt:
                leaves.append(copy.deepcopy(c) if st else c)  # a fresh copy per call: no state carried over
                continue
            xq = self._gather(q, step)
            if f is not None and self.drop_prob > 0.0:
                xf = self._gather(f, step)
                keep_fp = torch.rand(xq.shape, device=self.device, generator=self.mix_gen) < self.drop_prob
                xq = torch.where(keep_fp, xf, xq)
            leaves.append(xq if self.share == 1.0 else xq[self.shard])
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        target = self._gather(self.target, step)
        return args, kwargs, target if self.share == 1.0 else target[self.shard]


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, Tensor) else x

"""Fake-quantized layers (a weight quantizer plus an input-activation quantizer) and BatchNorm folding."""
from __future__ import annotations

import copy
import math
import warnings
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quantizer import Quantizer


class QuantLayer(nn.Module):
    """The base of QuantLinear / QuantConv2d: float weight and bias (learnable), a per-output-channel
    (``w_axis=0``) or per-tensor (``w_axis=None``) weight quantizer and a per-tensor input quantizer."""

    weight: nn.Parameter
    bias: Optional[nn.Parameter]

    def _init_quant(self, layer: nn.Module, w_bits: int, a_bits: int, per_channel: bool, a_signed: bool,
                    a_enabled: bool, a_dynamic: bool = False) -> None:
        self.weight = nn.Parameter(layer.weight.detach().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        out = self.weight.shape[0]
        self.weight_quantizer = Quantizer(w_bits, signed=True, axis=0 if per_channel else None,
                                          channels=out if per_channel else None)
        self.act_quantizer = Quantizer(a_bits, signed=a_signed or a_dynamic, mode="hard" if a_enabled else "off",
                                       dynamic=a_dynamic)

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight)

    def weight_integers(self) -> Tensor:
        """The integer weights of the hard-quantized state (int32, shaped like ``weight``)."""
        packed = self._buffers.get(PACKED)
        if packed is not None:
            return unpack_integers(packed, self._packed_bits, self._weight_shape)
        return self.weight_quantizer.integers(self.weight)

    # -- compact storage -----------------------------------------------------------------------------
    @property
    def is_compact(self) -> bool:
        """True when the weight is stored as packed integers (see :meth:`compact`)."""
        return PACKED in self._buffers

    @torch.no_grad()
    def compact(self, *, verify: bool = True) -> "QuantLayer":
        """Store the weight of a layer in the hard-quantized state as its integers, packed (two per byte
        for 2-4 bits, one per byte for 5-8), instead of a float parameter: a quarter (8 bits) or an
        eighth (4 bits) of the fp32 bytes. ``layer.weight`` stays readable, materialised on each read as
        ``step_size() * integers`` (exactly the float weight it replaces; not a parameter, and writes to it
        are lost: call :meth:`expand` first to change the weight). ``verify=False`` skips the checks that the
        weight is on its grid (for a skeleton about to receive a state dict, e.g. on the meta device). Returns
        the layer."""
        if self.is_compact:
            return self
        wq = self.weight_quantizer
        if verify and (wq.mode != "hard" or wq.rounding is not None):
            raise ValueError(f"{type(self).__name__}.compact: the weight must be in the hard-quantized state "
                             f"(mode 'hard', no rounding hook), got mode {wq.mode!r}")
        w = self._parameters["weight"]
        ints = self.weight_integers()
        s = _bcast_step(wq.step_size(), w)
        if verify and not torch.equal((s * ints.to(s.dtype)).to(w.dtype), w):
            raise ValueError(f"{type(self).__name__}.compact: the weight is not step * integers; finalize it first")
        self._packed_bits = PACK_NIBBLES if wq.bits <= PACK_NIBBLES else PACK_BYTES
        self._weight_shape = tuple(w.shape)
        self._weight_dtype = w.dtype
        del self._parameters["weight"]
        self.register_buffer(PACKED, pack_integers(ints, self._packed_bits))
        return self

    @torch.no_grad()
    def expand(self) -> "QuantLayer":
        """Undo :meth:`compact`: the weight a float ``nn.Parameter`` again (same values). Returns the layer."""
        if not self.is_compact:
            return self
        w = self.weight
        del self._buffers[PACKED]
        self.weight = nn.Parameter(w, requires_grad=False)
        return self

    def __getattr__(self, name: str):
        if name == "weight":  # compact storage: no parameter named weight; materialise it
            packed = self.__dict__["_buffers"].get(PACKED)
            if packed is not None:
                s = _bcast_step(self.weight_quantizer.step_size().detach(), packed, ndim=len(self._weight_shape))
                ints = unpack_integers(packed, self._packed_bits, self._weight_shape)
                return (s * ints.to(s.dtype)).to(self._weight_dtype)
        return super().__getattr__(name)

    def set_bits(self, w_bits: Optional[int] = None, a_bits: Optional[int] = None) -> None:
        if w_bits is not None:
            self.weight_quantizer.bits = w_bits
        if a_bits is not None:
            self.act_quantizer.bits = a_bits


class QuantLinear(QuantLayer):
    """``F.linear(act_quantizer(x / smooth), weight_quantizer(weight), bias)``.

    ``smooth`` (a buffer ``[in_features]``, or None): SmoothQuant's per-input-channel factors. The layer is
    built from the float ``W`` with ``weight = W * smooth`` (columns), so without quantization it computes the
    float layer's function exactly; activation outliers divided down, weight columns multiplied up."""

    smooth: Optional[Tensor]

    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int, *, per_channel: bool = True,
                 a_signed: bool = True, a_enabled: bool = True, a_dynamic: bool = False,
                 smooth: Optional[Tensor] = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantLinear wraps nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_quant(linear, w_bits, a_bits, per_channel, a_signed, a_enabled, a_dynamic)
        if smooth is not None:
            smooth = smooth.detach().to(device=self.weight.device, dtype=torch.float32).reshape(-1)
            if smooth.numel() != self.in_features or not bool(torch.isfinite(smooth).all() & (smooth > 0).all()):
                raise ValueError(f"QuantLinear: smooth must hold {self.in_features} finite positive factors, got "
                                 f"shape {tuple(smooth.shape)}")
            with torch.no_grad():
                self.weight.mul_(smooth.to(self.weight.dtype))
        self.register_buffer("smooth", smooth)

    def forward(self, x: Tensor) -> Tensor:
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        return F.linear(self.act_quantizer(x), self.quantized_weight(), self.bias)

    def float_module(self) -> nn.Linear:
        """A plain ``nn.Linear`` with this layer's current (unquantized) weight and bias (the smoothing factors
        divided back out of the weight)."""
        m = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        w = self.weight.data if self.smooth is None else self.weight.data / self.smooth.to(self.weight.dtype)
        m.weight.data.copy_(w)
        if self.bias is not None:
            m.bias.data.copy_(self.bias.data)
        return m.to(self.weight.device)


class QuantConv2d(QuantLayer):
    """``conv2d(act_quantizer(x), weight_quantizer(weight), bias)`` with the wrapped conv's geometry."""

    _GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode", "_reversed_padding_repeated_twice")

    def __init__(self, conv: nn.Conv2d, w_bits: int, a_bits: int, *, per_channel: bool = True,
                 a_signed: bool = True, a_enabled: bool = True):
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"QuantConv2d wraps nn.Conv2d, got {type(conv).__name__}")
        for attr in self._GEOMETRY:
            setattr(self, attr, getattr(conv, attr))
        self._init_quant(conv, w_bits, a_bits, per_channel, a_signed, a_enabled)

    def _conv(self, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv(self.act_quantizer(x), self.quantized_weight(), self.bias)

    def float_module(self) -> nn.Conv2d:
        m = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                      self.dilation, self.groups, bias=self.bias is not None, padding_mode=self.padding_mode)
        m.weight.data.copy_(self.weight.data)
        if self.bias is not None:
            m.bias.data.copy_(self.bias.data)
        return m.to(self.weight.device)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}")


QUANT_LAYERS = (QuantLinear, QuantConv2d)

# Compact weight storage (QuantLayer.compact): the buffer's name and its two layouts.
PACKED = "weight_packed"
PACK_NIBBLES, PACK_BYTES = 4, 8


def pack_integers(ints: Tensor, bits: int) -> Tensor:
    """Signed integers (any shape, within the ``bits``-bit grid) as a flat uint8 tensor: two's complement
    nibbles, element ``2i`` in the low half of byte ``i`` (``bits=4``), or one byte each (``bits=8``)."""
    flat = ints.reshape(-1).to(torch.int16)
    if bits == PACK_BYTES:
        return flat.to(torch.int8).view(torch.uint8).clone()
    if bits != PACK_NIBBLES:
        raise ValueError(f"pack_integers: bits must be {PACK_NIBBLES} or {PACK_BYTES}, got {bits}")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    nib = (flat & 0xF).to(torch.uint8)
    return nib[0::2] | (nib[1::2] << 4)


def unpack_integers(packed: Tensor, bits: int, shape) -> Tensor:
    """The int32 integers of shape ``shape`` that :func:`pack_integers` stored in ``packed``."""
    numel = math.prod(shape)
    if bits == PACK_BYTES:
        return packed.view(torch.int8)[:numel].to(torch.int32).reshape(shape)
    lo = (packed & 0xF).to(torch.int32)
    hi = (packed >> 4).to(torch.int32)
    both = torch.stack([lo, hi], dim=1).reshape(-1)[:numel]
    return torch.where(both >= 8, both - 16, both).reshape(shape)


def _bcast_step(step: Tensor, like: Tensor, ndim: Optional[int] = None) -> Tensor:
    """A per-tensor (one element) or per-output-channel step size shaped to broadcast against a weight."""
    ndim = like.dim() if ndim is None else ndim
    return step.reshape(-1, *[1] * (ndim - 1)) if step.numel() > 1 else step.reshape(())


def compact_weights(model: nn.Module) -> nn.Module:
    """:meth:`QuantLayer.compact` on every quantized layer of ``model`` (in place); returns ``model``. A layer
    whose weight is also registered under another module (a tie, e.g. an output layer sharing the token
    embedding) keeps it as a float parameter, so that the other module still reads the same tensor."""
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    for _, layer in quant_layers(model):
        w = layer._parameters.get("weight")
        if w is None or owners.get(id(w), 0) == 1:
            layer.compact()
    return model


def expand_weights(model: nn.Module) -> nn.Module:
    """:meth:`QuantLayer.expand` on every quantized layer of ``model`` (in place); returns ``model``."""
    for _, layer in quant_layers(model):
        layer.expand()
    return model


def float_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every compact layer's packed integers replaced by its float ``weight``
    (the state dict of the expanded model, without expanding it)."""
    sd = model.state_dict()
    for name, layer in quant_layers(model):
        prefix = f"{name}." if name else ""
        if sd.pop(prefix + PACKED, None) is not None:
            sd[prefix + "weight"] = layer.weight
    return sd


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    """``(name, layer)`` for every QuantLinear / QuantConv2d in ``model``, in registration order."""
    for name, m in model.named_modules():
        if isinstance(m, QUANT_LAYERS):
            yield name, m


def to_quant_layer(m: nn.Module, w_bits: int, a_bits: int, *, a_dynamic: bool = False,
                   smooth: Optional[Tensor] = None, **kw) -> QuantLayer:
    """The fake-quantized layer for ``m``. ``a_dynamic`` (per-token inputs) and ``smooth`` apply to
    ``nn.Linear`` only (a conv's inputs keep one calibrated step size)."""
    if isinstance(m, nn.Linear):
        return QuantLinear(m, w_bits, a_bits, a_dynamic=a_dynamic, smooth=smooth, **kw)
    if isinstance(m, nn.Conv2d):
        return QuantConv2d(m, w_bits, a_bits, **kw)
    raise TypeError(f"only nn.Linear and nn.Conv2d can be quantized, got {type(m).__name__}")


# ------------------------------------------------------------------------------------------------
# Linear layers stored transposed
# ------------------------------------------------------------------------------------------------


def is_transposed_linear(m: nn.Module) -> bool:
    """True for a linear layer that keeps its weight as ``[in, out]``: transformers' ``Conv1D`` (GPT-2, GPT,
    ImageGPT...), recognised by its class name and attributes so transformers need not be imported."""
    w = getattr(m, "weight", None)
    return (type(m).__name__ == "Conv1D" and isinstance(w, Tensor) and w.dim() == 2
            and tuple(w.shape) == (getattr(m, "nx", None), getattr(m, "nf", None)))


@torch.no_grad()
def linear_from_transposed(m: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` computing what the transposed linear layer ``m`` computes (weight transposed, bias kept)."""
    if not is_transposed_linear(m):
        raise TypeError(f"linear_from_transposed takes transformers' Conv1D, got {type(m).__name__}")
    bias = getattr(m, "bias", None)
    lin = nn.Linear(m.nx, m.nf, bias=bias is not None, device=m.weight.device, dtype=m.weight.dtype)
    lin.weight.copy_(m.weight.t())
    if bias is not None:
        lin.bias.copy_(bias)
    return lin.train(m.training)


def linearize_transposed(model: nn.Module) -> list[str]:
    """Replace (in place) every transposed linear layer of ``model`` (:func:`is_transposed_linear`) by its
    ``nn.Linear``, so it can be quantized; returns their names. A layer whose weight is shared with another
    module is left as it is (replacing it would untie them)."""
    shared = _shared_parameters(model)
    done = []
    for name, m in list(model.named_modules()):
        if name and is_transposed_linear(m) and id(m.weight) not in shared:
            set_module(model, name, linear_from_transposed(m))
            done.append(name)
    return done


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one (module, name)."""
    count: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None:
                count[id(p)] = count.get(id(p), 0) + 1
    return {k for k, c in count.items() if c > 1}


# ------------------------------------------------------------------------------------------------
# BatchNorm folding
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d equal to ``bn(conv(x))`` with ``bn`` in eval mode:
    ``w' = w * g / sqrt(var + eps)``, ``b' = (b - mean) * g / sqrt(var + eps) + beta``."""
    if bn.num_features != conv.out_channels:
        raise ValueError(f"fold_bn: BatchNorm has {bn.num_features} features but the conv has "
                         f"{conv.out_channels} output channels")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_bn: BatchNorm without running statistics (track_running_stats=False) cannot be folded")
    folded = copy.deepcopy(conv)
    inv_std = torch.rsqrt(bn.running_var.float() + bn.eps)
    gamma = bn.weight.float() if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias.float() if bn.bias is not None else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    w = conv.weight.float() * factor.reshape(-1, 1, 1, 1)
    b = conv.bias.float() if conv.bias is not None else torch.zeros_like(inv_std)
    b = (b - bn.running_mean.float()) * factor + beta
    folded.weight = nn.Parameter(w.to(conv.weight.dtype))
    folded.bias = nn.Parameter(b.to(conv.weight.dtype))
    return folded


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace (or add) the submodule at the dotted path ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _bn_pairs_fx(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module names where the BN's only input is the conv's output, read off an FX trace."""
    import torch.fx

    gm = torch.fx.symbolic_trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0] if node.args else None
        if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and isinstance(modules.get(src.target), nn.Conv2d) and len(src.users) == 1
                and calls[src.target] == 1 and calls[node.target] == 1):
            pairs.append((src.target, node.target))
    return pairs


def _bn_pairs_by_order(model: nn.Module) -> list[tuple[str, str]]:
    """Fallback when the model cannot be traced: a BatchNorm2d registered right after a Conv2d of the same
    parent, with matching channels (the torchvision convention: ``conv1``/``bn1``)."""
    pairs = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (cn, c), (bn_name, b) in zip(children, children[1:]):
            if isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and b.num_features == c.out_channels:
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + cn, prefix + bn_name))
    return pairs


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm2d that directly follows a Conv2d folded into it (the BN
    replaced by ``nn.Identity``). The pairs come from an FX trace; a model that cannot be traced falls back
    to registration order with a warning. The input model is untouched."""
    try:
        pairs = _bn_pairs_fx(model)
    except Exception as e:  # data-dependent control flow etc.
        warnings.warn(f"fold_batchnorm: FX tracing failed ({type(e).__name__}: {e}); pairing Conv2d and "
                      f"BatchNorm2d by registration order instead", RuntimeWarning, stacklevel=2)
        pairs = _bn_pairs_by_order(model)
    folded = copy.deepcopy(model)
    for conv_name, bn_name in pairs:
        set_module(folded, conv_name, fold_bn(folded.get_submodule(conv_name), folded.get_submodule(bn_name)))
        set_module(folded, bn_name, nn.Identity())
    return folded

"""Deploy layers: real integer weights (6-bit bit-packed or int8) run by ``hdrq.ops.int_matmul``.

:class:`QLinear` and :class:`QConv2d` are what :func:`hdrq.convert` puts in place of the fake-quantized
``QuantLinear`` / ``QuantConv2d`` (or of float ``nn.Linear`` / ``nn.Conv2d``, by round-to-nearest). Each holds

* ``qweight``: the bytes of the integer weights in the layout ``hdrq.ops.pack_weight`` makes for the GEMM kernels
  (a conv with groups keeps one such matrix per group in a byte buffer, each at a 16-byte aligned offset), and
  ``packed_weights``: one ``hdrq.ops.PackedWeight`` per group over those bytes and the step sizes, the object
  ``hdrq.ops.int_matmul`` takes. That layout belongs to the kernels and may change between hdrq versions, so it
  is never written to a file: ``hdrq.save`` writes the canonical form (:meth:`canonical_tensors`) and
  ``hdrq.load`` packs again.
  Weights of up to 6 bits are held 6-bit packed (a 4-bit integer is a valid int6 value), 7 and 8 bits as
  int8; ``w_bits`` keeps the true width. 6-bit packing takes four values per three bytes along K, so where
  K (in features per group) is not a multiple of 4, it is padded with zero weight columns, and each input
  row with zero columns to match (zero weights make their value irrelevant).
* ``weight_scale``: fp32 ``[out]``, one step size per output channel (a per-tensor step size is repeated).
* ``bias``: fp32 ``[out]`` or None (BatchNorm folding gives a conv a bias).
* ``act_scale``: fp32 ``[1]``, the calibrated input step size, in ``"static"`` mode only.

The input is handled by ``act``:

* ``"static"``: per-tensor with the calibrated step size, the fake-quant layer's arithmetic exactly
  (``v = x * (1/s)`` in fp32, round half to even, clamp to the signed or unsigned ``a_bits`` grid; one kernel,
  ``hdrq.ops.quantize_per_tensor``), so the integers equal the fake-quant layer's and the outputs differ only
  by fp32 summation order.
* ``"dynamic"``: symmetric per-token scales (``hdrq.ops.quantize_per_token``, grid ``[-qmax, qmax]`` of
  ``a_bits``) computed from each row at run time. This is not what the fake-quant layer computed; it needs no
  calibration data (float models converted by RTN use it). The grid is always signed, so non-negative
  inputs use half of it; ``"static"`` keeps the calibrated unsigned grid.
* ``"float"``: the input is not quantized (the fake-quant layer's act quantizer was ``"off"``, typically
  the first layer, whose input is the image). The integer kernel needs integer inputs, so this layer
  dequantizes its integer weights on every call and runs a float ``F.linear`` / ``F.conv2d``:
  bit-identical to the fake-quant layer, stored as compactly as the others, but no faster than float.
  ``hdrq.convert(..., off_act="dynamic8")`` runs such layers on the integer kernel with 8-bit
  per-token inputs instead, which changes results (slightly) and is therefore opt-in.

Static unsigned 8-bit inputs (0..255) do not fit int8: they enter the GEMM shifted by -128 and the shift
comes back through the epilogue bias, ``sum_k a_k w_k = sum_k (a_k - 128) w_k + 128 * sum_k w_k``, so the
output carries ``s_a * s_w[n] * 128 * sum_k w[n, k]`` in a precomputed bias (exact up to fp32 rounding).

Outputs have the input's dtype (fp16 / bf16 / fp32 straight from the kernel's epilogue; fp64 inputs are
computed in fp32). ``module.to(dtype)`` / ``.half()`` move these layers between devices but never cast
their scales and bias, which stay fp32.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .quant.layers import QuantConv2d, QuantLinear
from .quant.observers import minmax_scale, mse_scale
from .reference import qrange

__all__ = ["QLinear", "QConv2d", "ActQuant", "QLAYERS", "ACT_MODES", "OFF_ACT_MODES", "OBSERVERS", "storage_bits", "qlayers"]

ACT_MODES = ("static", "dynamic", "float")
OBSERVERS = ("mse", "minmax")
OFF_ACT_MODES = ("float", "dynamic8")
_KERNEL_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Static unsigned 8-bit inputs are shifted by this much to fit int8 (see the module docstring).
_UNSIGNED8_SHIFT = 128
# Alignment in bytes of each group's packed weights (the CUDA GEMM's 16-byte weight loads).
_WEIGHT_ALIGN = 16


def storage_bits(w_bits: int) -> int:
    """The packed width integer weights of ``w_bits`` bits are held in: 6 (packed) up to 6 bits, else 8."""
    return 6 if w_bits <= 6 else 8


def _padded_k(k: int, storage: int) -> int:
    # 6-bit packing takes four values per three bytes along K.
    return -(-k // 4) * 4 if storage == 6 else k


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _KERNEL_OUT_DTYPES else torch.float32


def _check_act(act: str, a_bits: int) -> None:
    if act not in ACT_MODES:
        raise ValueError(f"act must be one of {ACT_MODES}, got {act!r}")
    ops._check_bits(a_bits)


class _QLayer(nn.Module):
    """What QLinear and QConv2d share: the integer weights of ``groups`` independent GEMMs of
    ``[out/groups, k]`` each, their scales, bias and the input quantization."""

    qweight: Tensor
    weight_scale: Tensor
    bias: Optional[Tensor]
    act_scale: Optional[Tensor]

    def _init_qlayer(self, out_features: int, k: int, groups: int, *, has_bias: bool, w_bits: int, a_bits: int,
                     act: str, a_signed: bool, device) -> None:
        ops._check_bits(w_bits)
        _check_act(act, a_bits)
        self.w_bits, self.a_bits, self.act, self.a_signed = int(w_bits), int(a_bits), act, bool(a_signed)
        self.groups, self.k = groups, k
        self.storage_bits = storage_bits(self.w_bits)
        self.k_padded = _padded_k(k, self.storage_bits)
        self._out = out_features
        # A static unsigned 8-bit grid (0..255) is shifted into int8 (module docstring).
        self.act_shift = _UNSIGNED8_SHIFT if act == "static" and not a_signed and a_bits == 8 else 0
        device = torch.device("cpu") if device is None else torch.device(device)
        zeros = torch.zeros(out_features // groups, self.k_padded, dtype=torch.int8, device=device)
        packed = ops.pack_weight(zeros, self.storage_bits).data
        # One packed matrix per group. Several groups share one byte buffer with each group's slot rounded
        # up to 16 bytes, because the CUDA GEMM loads weights with 16-byte loads and needs them aligned.
        self._packed_shape, self._packed_dtype = tuple(packed.shape), packed.dtype
        self._group_bytes = packed.numel() * packed.element_size()
        self._group_stride = -(-self._group_bytes // _WEIGHT_ALIGN) * _WEIGHT_ALIGN
        self.register_buffer("qweight", packed if groups == 1 else self._join([packed] * groups))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if has_bias else None)
        self.register_buffer("act_scale", torch.ones(1, device=device) if act == "static" else None)
        # bias + the unsigned-8-bit shift correction; derived from the others, so not saved but rebuilt
        # by set_integers and after load_state_dict.
        self.register_buffer("_epilogue_bias", None, persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)
        self._refresh()

    # -- integer weights ---------------------------------------------------------------------------------
    def _join(self, packed: list[Tensor]) -> Tensor:
        buf = torch.zeros(len(packed) * self._group_stride, dtype=torch.uint8, device=packed[0].device)
        for g, p in enumerate(packed):
            start = g * self._group_stride
            buf[start:start + self._group_bytes] = p.reshape(-1).view(torch.uint8)
        return buf

    def _group_weight(self, g: int) -> Tensor:
        """Group ``g``'s ``pack_weight`` matrix (a view, 16-byte aligned when the buffer is)."""
        if self.groups == 1:
            return self.qweight
        start = g * self._group_stride
        return self.qweight[start:start + self._group_bytes].view(self._packed_dtype).view(self._packed_shape)

    def integer_weight(self) -> Tensor:
        """The integer weights (int8) shaped like the float weight, unpacked from ``qweight``."""
        rows = [ops.unpack_weight(w)[:, :self.k] for w in self.packed_weights]
        return torch.cat(rows, 0).reshape(self._weight_shape)

    def dequantized_weight(self) -> Tensor:
        """``integers * step size`` in fp32: the fake-quant layer's quantized weight, bit for bit."""
        q = self.integer_weight()
        return q.to(torch.float32) * self.weight_scale.reshape(-1, *[1] * (q.dim() - 1))

    @torch.no_grad()
    def set_integers(self, q: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
                     act_scale: Optional[Tensor] = None) -> "_QLayer":
        """Fill the layer: integer weights ``q`` (any integer dtype, shaped like the float weight or
        ``[out, k]``) on the signed ``w_bits`` grid, step sizes (``[out]``, or one for the tensor), bias
        ``[out]`` (required iff the layer has one) and, in static mode, the input step size (one value).
        Everything is copied to the layer's device; weights are packed with ``hdrq.ops.pack_weight``."""
        out, k = self._out, self.k
        if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
            raise TypeError(f"set_integers: q must be an integer tensor, got {q.dtype}")
        if tuple(q.shape) not in (tuple(self._weight_shape), (out, k)):
            raise ValueError(f"set_integers: q must have shape {tuple(self._weight_shape)} (or [{out}, {k}]), "
                             f"got {tuple(q.shape)}")
        qmin, qmax = qrange(self.w_bits, True)
        if q.numel() and (int(q.min()) < qmin or int(q.max()) > qmax):
            raise ValueError(f"set_integers: {self.w_bits}-bit weights must lie in [{qmin}, {qmax}], got values "
                             f"in [{int(q.min())}, {int(q.max())}]")
        scale = torch.as_tensor(weight_scale, dtype=torch.float32).detach().reshape(-1)
        if scale.numel() == 1:
            scale = scale.expand(out)
        if scale.numel() != out:
            raise ValueError(f"set_integers: weight_scale must have {out} entries (or 1), got shape "
                             f"{tuple(torch.as_tensor(weight_scale).shape)}")
        _check_scales("weight_scale", scale)
        if (bias is None) != (self.bias is None):
            raise ValueError(f"set_integers: this layer {'has' if self.bias is not None else 'has no'} bias, "
                             f"got bias={'None' if bias is None else tuple(bias.shape)}")
        if bias is not None and tuple(bias.shape) != (out,):
            raise ValueError(f"set_integers: bias must have shape ({out},), got {tuple(bias.shape)}")
        if (act_scale is None) != (self.act_scale is None):
            raise ValueError(f"set_integers: act={self.act!r} {'needs' if self.act_scale is not None else 'takes no'} "
                             f"act_scale")
        if act_scale is not None:
            act_scale = torch.as_tensor(act_scale, dtype=torch.float32).detach().reshape(-1)
            if act_scale.numel() != 1:
                raise ValueError(f"set_integers: act_scale must be one value (per-tensor), got shape "
                                 f"{tuple(act_scale.shape)}")
            _check_scales("act_scale", act_scale)

        dev = self.weight_scale.device
        q8 = q.detach().reshape(out, k).to(device=dev, dtype=torch.int8)
        if self.k_padded != k:
            q8 = F.pad(q8, (0, self.k_padded - k))
        n_g = out // self.groups
        packed = [ops.pack_weight(q8[g * n_g:(g + 1) * n_g].contiguous(), self.storage_bits).data
                  for g in range(self.groups)]
        self.qweight = packed[0] if self.groups == 1 else self._join(packed)
        self.weight_scale = scale.to(dev).clone()
        if bias is not None:
            self.bias = bias.detach().to(device=dev, dtype=torch.float32).clone()
        if act_scale is not None:
            self.act_scale = act_scale.to(dev).clone()
        self._refresh()
        return self

    def _refresh(self, epilogue: bool = True) -> None:
        """Rebuild what derives from the buffers: the PackedWeight of each group (over the buffers themselves, so
        that torch.compile sees module buffers) and (``epilogue``) the GEMM's bias: bias + the unsigned 8-bit
        correction."""
        n_g = self._out // self.groups
        self.packed_weights = tuple(
            ops.PackedWeight(self._group_weight(g), self.storage_bits, (n_g, self.k_padded),
                             self.weight_scale if self.groups == 1 else self.weight_scale[g * n_g:(g + 1) * n_g])
            for g in range(self.groups))
        if epilogue:
            self._refresh_epilogue()
        self._act_scale = self.act_scale  # plain attributes: no nn.Module.__getattr__ per call
        self._gemm_bias = self._epilogue_bias if self._epilogue_bias is not None else self.bias

    def _refresh_epilogue(self) -> None:
        if not self.act_shift:
            self._epilogue_bias = None
            return
        # sum over K of the integer weights, exact in fp64; the correction is formed in fp64, rounded once.
        rowsum = self.integer_weight().reshape(self._out, -1).to(torch.float64).sum(1)
        corr = self.act_shift * self.act_scale.to(torch.float64) * self.weight_scale.to(torch.float64) * rowsum
        base = self.bias.to(torch.float64) if self.bias is not None else 0.0
        self._epilogue_bias = (base + corr).to(torch.float32)

    # -- input quantization and the GEMM ----------------------------------------------------------------
    def _static_values(self, x: Tensor) -> Tensor:
        """``clamp(round(x * (1/s)), qmin, qmax)`` as exact integers in fp32 (fp64 for fp64 inputs): the
        arithmetic of ``hdrq.ops.fake_quant``, so the integers equal the fake-quant layer's."""
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        qmin, qmax = qrange(self.a_bits, self.a_signed)
        return torch.clamp(torch.round(x.to(cdt) * (1.0 / self.act_scale.to(cdt))), qmin, qmax)

    def _int8_rows(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Rows ``[M, k]`` of the GEMM input (integer values in static mode, floats in dynamic mode) as int8
        ``[M, k_padded]`` and their scales (``[1]`` static, ``[M]`` dynamic)."""
        if self.act == "static":
            a_q = (rows - self.act_shift if self.act_shift else rows).to(torch.int8)
            a_scale = self.act_scale
        else:
            if rows.dtype not in _KERNEL_OUT_DTYPES:
                rows = rows.to(torch.float32)
            a_q, a_scale = ops.quantize_per_token(rows.contiguous(), bits=self.a_bits)
        if self.k_padded != self.k:
            a_q = F.pad(a_q, (0, self.k_padded - self.k))
        return a_q, a_scale

    def _gemm(self, a_q: Tensor, a_scale: Tensor, g: int, out_dtype: torch.dtype) -> Tensor:
        bias = self._gemm_bias
        if bias is not None and self.groups > 1:
            n_g = self._out // self.groups
            bias = bias[g * n_g:(g + 1) * n_g]
        return ops.int_matmul(a_q, a_scale, self.packed_weights[g], bias=bias, out_dtype=out_dtype)

    # -- device moves keep the fp32 scales ---------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) / .half() would cast the fp32 scales and bias and change the results. These
        # layers follow device moves only: a buffer that fn would give another dtype moves as it is.
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            self._buffers[name] = buf.to(moved.device) if moved.dtype != buf.dtype else moved
        self._refresh(epilogue=False)
        return self

    # -- description -------------------------------------------------------------------------------------
    def _quant_spec(self) -> dict:
        return {"bias": self.bias is not None, "w_bits": self.w_bits, "a_bits": self.a_bits, "act": self.act,
                "a_signed": self.a_signed}

    def canonical_tensors(self) -> dict[str, Tensor]:
        """The layer's tensors in the file format (CPU): ``weight_int6`` (``hdrq.ops.pack_int6`` of the
        ``[out, k_padded]`` integers, for weights of up to 6 bits) or ``weight_int8`` (int8 ``[out, k]``),
        ``weight_scale``, and ``bias`` / ``act_scale`` where the layer has them."""
        q = self.integer_weight().reshape(self._out, self.k).cpu()
        if self.storage_bits == 6:
            t = {"weight_int6": ops.pack_int6(F.pad(q, (0, self.k_padded - self.k)).contiguous())}
        else:
            t = {"weight_int8": q.contiguous()}
        t["weight_scale"] = self.weight_scale.cpu()
        if self.bias is not None:
            t["bias"] = self.bias.cpu()
        if self.act_scale is not None:
            t["act_scale"] = self.act_scale.cpu()
        return {name: v.detach().clone() for name, v in t.items()}

    def load_canonical(self, tensors: dict[str, Tensor], where: str = "") -> "_QLayer":
        """Inverse of :meth:`canonical_tensors`; errors name ``where`` (the layer's path) and the shapes."""
        what = f"{where}: " if where else ""
        expect = {"weight_int6" if self.storage_bits == 6 else "weight_int8", "weight_scale"}
        expect |= {"bias"} if self.bias is not None else set()
        expect |= {"act_scale"} if self.act_scale is not None else set()
        if set(tensors) != expect:
            raise ValueError(f"{what}expected tensors {sorted(expect)}, got {sorted(tensors)}")
        shapes = {"weight_int6": ((self._out, self.k_padded // 4 * 3), torch.uint8),
                  "weight_int8": ((self._out, self.k), torch.int8), "weight_scale": ((self._out,), torch.float32),
                  "bias": ((self._out,), torch.float32), "act_scale": ((1,), torch.float32)}
        for name, t in tensors.items():
            shape, dtype = shapes[name]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"{what}{name} must be {dtype} of shape {shape}, got {t.dtype} of shape "
                                 f"{tuple(t.shape)}")
        if "weight_int6" in tensors:
            q = ops.unpack_int6(tensors["weight_int6"], [self._out, self.k_padded])
            if self.k_padded != self.k and bool((q[:, self.k:] != 0).any()):
                raise ValueError(f"{what}weight_int6 has non-zero values in its K padding")
            q = q[:, :self.k]
        else:
            q = tensors["weight_int8"]
        try:
            return self.set_integers(q, tensors["weight_scale"], tensors.get("bias"), tensors.get("act_scale"))
        except ValueError as e:
            raise ValueError(f"{what}{e}") from None

    def extra_repr(self) -> str:
        return (f"w_bits={self.w_bits} (held as int{self.storage_bits}), a_bits={self.a_bits}, act={self.act!r}, "
                f"a_signed={self.a_signed}, bias={self.bias is not None}")


def _refresh_after_load(module: _QLayer, incompatible_keys) -> None:
    # A module-level function (not a lambda) so that layers stay picklable.
    module._refresh()


def _check_scales(name: str, s: Tensor) -> None:
    bad = ~(torch.isfinite(s) & (s > 0))
    if bool(bad.any()):
        raise ValueError(f"set_integers: every {name} must be finite and > 0, got {s[bad][:4].tolist()} "
                         f"({int(bad.sum())} bad of {s.numel()})")


# ======================================================================================================
# Conversion helpers shared by QLinear and QConv2d
# ======================================================================================================


def _from_quant_args(layer: Union[QuantLinear, QuantConv2d], act: str, off_act: str) -> dict:
    """Bits, act mode and tensors of a fake-quant layer in the hard-quantized state (see the quantized
    model contract), read exactly: integers and step sizes, no second rounding."""
    name = type(layer).__name__
    wq, aq = layer.weight_quantizer, layer.act_quantizer
    if act not in ("static", "dynamic"):
        raise ValueError(f"act must be 'static' or 'dynamic' for a quantized layer, got {act!r}")
    if off_act not in OFF_ACT_MODES:
        raise ValueError(f"off_act must be one of {OFF_ACT_MODES}, got {off_act!r}")
    if wq.mode != "hard" or wq.rounding is not None:
        raise ValueError(f"{name}: the weight quantizer must be in the hard-quantized state (mode 'hard', no "
                         f"rounding hook), got mode {wq.mode!r}, rounding {wq.rounding!r}; finish calibration "
                         f"(hard rounding) before convert")
    if not wq.signed or wq.axis not in (0, None):
        raise ValueError(f"{name}: weights must use a signed grid per output channel (axis 0) or per tensor, "
                         f"got signed={wq.signed}, axis={wq.axis}")
    if aq.mode == "noise" or (aq.mode == "hard" and aq.rounding is not None):
        raise ValueError(f"{name}: the act quantizer must be 'hard' or 'off' (no rounding hook), got mode "
                         f"{aq.mode!r}, rounding {aq.rounding!r}")
    if aq.mode == "hard" and aq.axis is not None:
        raise ValueError(f"{name}: the act quantizer must be per tensor (axis None), got axis={aq.axis}")
    dynamic = getattr(aq, "dynamic", False)
    args = dict(w_bits=wq.bits, q=layer.weight_integers(), weight_scale=wq.step_size().detach().float(),
                bias=None if layer.bias is None else layer.bias.detach().float(), act_scale=None)
    if aq.mode == "off" and off_act == "float":
        args.update(act="float", a_bits=aq.bits, a_signed=aq.signed)
    elif aq.mode == "off":  # "dynamic8": opt-in, changes results
        args.update(act="dynamic", a_bits=8, a_signed=True)
    elif dynamic:  # calibrated per token: deployed per token, whatever ``act`` asks for per-tensor layers
        args.update(act="dynamic", a_bits=aq.bits, a_signed=True)
    else:
        args.update(act=act, a_bits=aq.bits, a_signed=aq.signed)
        if act == "static":
            args["act_scale"] = aq.step_size().detach().float().reshape(1)
    return args


def _rtn(weight: Tensor, w_bits: int, observer: str) -> tuple[Tensor, Tensor]:
    """Round-to-nearest integers and per-output-channel step sizes of a float weight."""
    if observer not in OBSERVERS:
        raise ValueError(f"observer must be one of {OBSERVERS}, got {observer!r}")
    ops._check_bits(w_bits)
    w = weight.detach().to(torch.float32)
    find = mse_scale if observer == "mse" else minmax_scale
    s = find(w, w_bits, True, axis=0)
    qmin, qmax = qrange(w_bits, True)
    q = torch.clamp(torch.round(w * (1.0 / s.reshape(-1, *[1] * (w.dim() - 1)))), qmin, qmax)
    return q.to(torch.int8), s


# ======================================================================================================
# QLinear
# ======================================================================================================


class QLinear(_QLayer):
    """``y = (x / smooth) @ W^T + b`` with integer weights and quantized inputs, on ``hdrq.ops.int_matmul``.

    Build one with :meth:`from_quant` (a calibrated ``QuantLinear``), :meth:`from_float` (an ``nn.Linear``
    by RTN) or the constructor followed by :meth:`set_integers`. See the module docstring for ``act``.
    ``smooth`` (fp32 ``[in_features]``, only when built with ``smooth=True``): the SmoothQuant factors the
    layer was calibrated with (``hdrq.quant.QuantLinear``), the input divided by them before it is quantized."""

    smooth: Optional[Tensor]

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, w_bits: int, a_bits: int,
                 act: str = "static", a_signed: bool = True, smooth: bool = False, device=None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"QLinear needs in_features, out_features >= 1, got {in_features}, {out_features}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._weight_shape = (self.out_features, self.in_features)
        self._init_qlayer(self.out_features, self.in_features, 1, has_bias=bias, w_bits=w_bits, a_bits=a_bits,
                          act=act, a_signed=a_signed, device=device)
        self.register_buffer("smooth", torch.ones(self.in_features, device=self.weight_scale.device)
                             if smooth else None)

    @classmethod
    def from_quant(cls, layer: QuantLinear, *, act: str = "static", off_act: str = "float") -> "QLinear":
        """The integer layer equal to a calibrated ``QuantLinear`` in the hard-quantized state: its integer
        weights and step sizes exactly; inputs static per-tensor with the calibrated step size
        (``act="static"``, the fake-quant layer's own arithmetic) or dynamic per-token (``"dynamic"``).
        A layer whose act quantizer is off becomes ``act="float"`` (or 8-bit dynamic with
        ``off_act="dynamic8"``)."""
        if not isinstance(layer, QuantLinear):
            raise TypeError(f"QLinear.from_quant takes a hdrq.quant.QuantLinear, got {type(layer).__name__}")
        a = _from_quant_args(layer, act, off_act)
        smooth = getattr(layer, "smooth", None)
        m = cls(layer.in_features, layer.out_features, layer.bias is not None, w_bits=a["w_bits"],
                a_bits=a["a_bits"], act=a["act"], a_signed=a["a_signed"], smooth=smooth is not None,
                device=layer.weight.device)
        if smooth is not None:
            m.smooth.copy_(smooth.detach().float())
        return m.set_integers(a["q"], a["weight_scale"], a["bias"], a["act_scale"])

    @classmethod
    def from_float(cls, linear: nn.Linear, w_bits: int, a_bits: int, *, observer: str = "mse",
                   act_scale: Optional[Union[float, Tensor]] = None, a_signed: bool = True) -> "QLinear":
        """Round-to-nearest conversion of a float ``nn.Linear``: per-output-channel step sizes from the MSE
        observer (``observer="mse"``: the clipping of the min-max range minimising the L2.4 error, as
        BRECQ/QDrop initialise weights; lower error than min-max at 4-6 bits) or ``"minmax"`` (the
        smallest step covering each row), integers ``clamp(round(w * (1/s)), -2^(b-1), 2^(b-1)-1)``.
        Inputs: dynamic per-token with ``a_bits``; static when ``act_scale`` (the input step size) is given."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QLinear.from_float takes an nn.Linear, got {type(linear).__name__}")
        q, s = _rtn(linear.weight, w_bits, observer)
        act = "dynamic" if act_scale is None else "static"
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w_bits=w_bits, a_bits=a_bits,
                act=act, a_signed=a_signed, device=linear.weight.device)
        bias = None if linear.bias is None else linear.bias.detach().float()
        return m.set_integers(q, s, bias, None if act_scale is None else torch.as_tensor(act_scale))

    def spec(self) -> dict:
        """Constructor arguments (JSON-able): ``QLinear(**spec)`` rebuilds an empty layer like this one."""
        spec = {"in_features": self.in_features, "out_features": self.out_features, **self._quant_spec()}
        if self.smooth is not None:
            spec["smooth"] = True
        return spec

    def canonical_tensors(self) -> dict[str, Tensor]:
        """As :meth:`_QLayer.canonical_tensors`, plus ``smooth`` where the layer has it."""
        t = super().canonical_tensors()
        if self.smooth is not None:
            t["smooth"] = self.smooth.detach().cpu().clone()
        return t

    def load_canonical(self, tensors: dict[str, Tensor], where: str = "") -> "QLinear":
        tensors = dict(tensors)
        smooth = tensors.pop("smooth", None)
        what = f"{where}: " if where else ""
        if (smooth is None) != (self.smooth is None):
            raise ValueError(f"{what}this layer {'has' if self.smooth is not None else 'has no'} smoothing factors, "
                             f"got {'none' if smooth is None else 'smooth'}")
        if smooth is not None:
            if tuple(smooth.shape) != (self.in_features,) or smooth.dtype != torch.float32:
                raise ValueError(f"{what}smooth must be torch.float32 of shape ({self.in_features},), got "
                                 f"{smooth.dtype} of shape {tuple(smooth.shape)}")
            if not bool((torch.isfinite(smooth) & (smooth > 0)).all()):
                raise ValueError(f"{what}every smooth factor must be finite and > 0")
            self.smooth.copy_(smooth)
        return super().load_canonical(tensors, where)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"QLinear: expected input [..., {self.in_features}], got shape {tuple(x.shape)}")
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        if self.act == "float":
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantized_weight().to(x.dtype), bias)
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 0:
            return x.new_empty((*lead, self.out_features))
        if self.act == "static":
            a_scale = self._act_scale
            a_q = ops.quantize_per_tensor(rows, a_scale, bits=self.a_bits, signed=self.a_signed,
                                          zero_point=-self.act_shift)
        else:
            a_q, a_scale = ops.quantize_per_token(rows if rows.dtype in _KERNEL_OUT_DTYPES else rows.float(),
                                                  bits=self.a_bits)
        if self.k_padded != self.k:
            a_q = F.pad(a_q, (0, self.k_padded - self.k))
        y = ops.int_matmul(a_q, a_scale, self.packed_weights[0], bias=self._gemm_bias,
                           out_dtype=_kernel_dtype(x.dtype)).reshape(*lead, self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()


# ======================================================================================================
# QConv2d
# ======================================================================================================


class QConv2d(_QLayer):
    """``nn.Conv2d`` with integer weights and quantized inputs: im2col (``F.unfold``), one
    ``hdrq.ops.int_matmul`` per group, and the result folded back to NCHW. Stride, padding (numbers,
    ``"same"``/``"valid"``, any ``padding_mode``), dilation and groups as in ``nn.Conv2d``.

    Static inputs are quantized before the unfold, so padding adds integer zeros exactly as the
    fake-quant conv pads its fake-quantized input. Dynamic per-token scales are per (group, output
    position): one im2col row each. The unfold materialises ``[N, C*kh*kw, L]``: correct first, not
    the fastest conv (a depthwise conv runs one small GEMM per channel)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, w_bits: int, a_bits: int,
                 act: str = "static", a_signed: bool = True, device=None):
        super().__init__()
        # nn.Conv2d normalises and validates the geometry (tuples, "same", groups dividing channels).
        geom = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=False,
                         padding_mode=padding_mode, device="meta")
        for attr in QuantConv2d._GEOMETRY:
            setattr(self, attr, getattr(geom, attr))
        kh, kw = self.kernel_size
        self._weight_shape = (out_channels, in_channels // groups, kh, kw)
        self._init_qlayer(out_channels, in_channels // groups * kh * kw, groups, has_bias=bias, w_bits=w_bits,
                          a_bits=a_bits, act=act, a_signed=a_signed, device=device)

    @staticmethod
    def _geometry_of(conv: Union[nn.Conv2d, QuantConv2d]) -> dict:
        return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                    stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                    padding_mode=conv.padding_mode)

    @classmethod
    def from_quant(cls, layer: QuantConv2d, *, act: str = "static", off_act: str = "float") -> "QConv2d":
        """As :meth:`QLinear.from_quant`, for a calibrated ``QuantConv2d``."""
        if not isinstance(layer, QuantConv2d):
            raise TypeError(f"QConv2d.from_quant takes a hdrq.quant.QuantConv2d, got {type(layer).__name__}")
        a = _from_quant_args(layer, act, off_act)
        m = cls(**cls._geometry_of(layer), bias=layer.bias is not None, w_bits=a["w_bits"], a_bits=a["a_bits"],
                act=a["act"], a_signed=a["a_signed"], device=layer.weight.device)
        return m.set_integers(a["q"], a["weight_scale"], a["bias"], a["act_scale"])

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int, a_bits: int, *, observer: str = "mse",
                   act_scale: Optional[Union[float, Tensor]] = None, a_signed: bool = True) -> "QConv2d":
        """As :meth:`QLinear.from_float`, for an ``nn.Conv2d`` (step sizes per output channel)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"QConv2d.from_float takes an nn.Conv2d, got {type(conv).__name__}")
        q, s = _rtn(conv.weight, w_bits, observer)
        act = "dynamic" if act_scale is None else "static"
        m = cls(**cls._geometry_of(conv), bias=conv.bias is not None, w_bits=w_bits, a_bits=a_bits, act=act,
                a_signed=a_signed, device=conv.weight.device)
        bias = None if conv.bias is None else conv.bias.detach().float()
        return m.set_integers(q, s, bias, None if act_scale is None else torch.as_tensor(act_scale))

    def spec(self) -> dict:
        g = self._geometry_of(self)
        g.update(kernel_size=list(g["kernel_size"]), stride=list(g["stride"]), dilation=list(g["dilation"]),
                 padding=g["padding"] if isinstance(g["padding"], str) else list(g["padding"]))
        return {**g, **self._quant_spec()}

    def _float_conv(self, x: Tensor) -> Tensor:
        # The fake-quant conv's own arithmetic (QuantConv2d._conv) on the dequantized weights.
        w = self.dequantized_weight().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _pad(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Padding the unfold can do itself (symmetric zeros) is left to it; the rest is done here."""
        if self.padding_mode == "zeros" and not isinstance(self.padding, str):
            return x, tuple(self.padding)
        if self.padding_mode == "zeros":  # "same" may pad unevenly; "valid" pads nothing
            return F.pad(x, self._reversed_padding_repeated_twice), (0, 0)
        return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0, 0)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # unbatched [C, H, W], as nn.Conv2d allows
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"QConv2d: expected input [N, {self.in_channels}, H, W], got shape {tuple(x.shape)}")
        if self.act == "float":
            return self._float_conv(x)
        out_dtype = x.dtype
        v = self._static_values(x) if self.act == "static" else x
        v, pad = self._pad(v)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ho = (v.shape[2] + 2 * pad[0] - dh * (kh - 1) - 1) // sh + 1
        wo = (v.shape[3] + 2 * pad[1] - dw * (kw - 1) - 1) // sw + 1
        if ho <= 0 or wo <= 0:
            raise ValueError(f"QConv2d: input {tuple(x.shape)} is smaller than the kernel {self.kernel_size} "
                             f"(dilation {self.dilation}, padding {self.padding})")
        n, g = x.shape[0], self.groups
        if n == 0:
            return x.new_empty((0, self.out_channels, ho, wo))
        cols = F.unfold(v, self.kernel_size, dilation=self.dilation, padding=pad, stride=self.stride)
        # [N, G*k, L] -> [G, N*L, k]: one GEMM input matrix per group, a row per output position.
        cols = cols.reshape(n, g, self.k, ho * wo).permute(1, 0, 3, 2).reshape(g, n * ho * wo, self.k)
        kernel_dtype = _kernel_dtype(out_dtype)
        outs = [self._gemm(*self._int8_rows(cols[i]), i, kernel_dtype) for i in range(g)]
        y = outs[0] if g == 1 else torch.cat(outs, 1)  # [N*L, C_out]
        return y.reshape(n, ho, wo, self.out_channels).permute(0, 3, 1, 2).contiguous().to(out_dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, " + super().extra_repr())


QLAYERS = (QLinear, QConv2d)


def qlayers(model: nn.Module):
    """``(name, layer)`` for every QLinear / QConv2d in ``model``, in registration order."""
    for name, m in model.named_modules():
        if isinstance(m, QLAYERS):
            yield name, m


# ======================================================================================================
# ActQuant
# ======================================================================================================


class ActQuant(nn.Module):
    """An exact rounding step onto a calibrated activation grid: ``s * clamp(round(x * (1/s)), qmin, qmax)``,
    the arithmetic of ``hdrq.ops.fake_quant`` (one step size, signed or unsigned ``bits``-bit grid), in the
    input's dtype. :func:`hdrq.convert` puts one in place of each block-boundary quantizer (see
    ``hdrq.quant.boundary``: a residual block's output after the add, under the "output" activation
    placement), so the converted model keeps the residual stream on the grid the calibration chose. The
    integer layers reading it are static with the same step size and recover its integers exactly."""

    scale: Tensor

    def __init__(self, bits: int, signed: bool = True, *, device=None):
        super().__init__()
        ops._check_bits(bits)
        self.bits, self.signed = int(bits), bool(signed)
        self.register_buffer("scale", torch.ones(1, device=device))

    @classmethod
    @torch.no_grad()
    def from_quantizer(cls, q: nn.Module) -> "ActQuant":
        """The rounding step of a hard-mode per-tensor ``hdrq.quant.Quantizer``, step size copied exactly."""
        if getattr(q, "mode", None) != "hard" or getattr(q, "axis", 0) is not None or q.rounding is not None:
            raise ValueError(f"ActQuant.from_quantizer takes a per-tensor quantizer in mode 'hard' with no rounding "
                             f"hook, got {q!r}")
        m = cls(q.bits, q.signed, device=q.scale.device)
        m.set_scale(q.step_size().detach())
        return m

    @torch.no_grad()
    def set_scale(self, scale) -> "ActQuant":
        s = torch.as_tensor(scale, dtype=torch.float32).detach().reshape(-1)
        if s.numel() != 1 or not (bool(torch.isfinite(s).all()) and bool((s > 0).all())):
            raise ValueError(f"ActQuant: scale must be one finite value > 0, got {s.tolist()}")
        self.scale = s.to(self.scale.device).clone()
        return self

    def forward(self, x: Tensor) -> Tensor:
        return ops.fake_quant(x, self.scale, bits=self.bits, signed=self.signed)

    def _apply(self, fn, recurse=True):
        # As the integer layers: device moves only, the fp32 step size is never cast.
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = buf.to(moved.device) if moved.dtype != buf.dtype else moved
        return self

    def spec(self) -> dict:
        return {"bits": self.bits, "signed": self.signed}

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"

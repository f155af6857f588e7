"""The seam: every kernel-backed hdrq op is one operator of PyTorch's dispatcher in the ``hdrq`` namespace.

This file holds every schema (the C++ GEMM ops of ``hdrq._C`` included), and registers for each op

  * the pure-PyTorch reference (``hdrq.reference``) as its ``CompositeExplicitAutograd`` kernel: the definition
    of correct, and what runs on any device that has no kernel of its own (CPU tensors among them);
  * the CUDA kernel (:func:`_register_cuda`): the Triton kernels of ``hdrq.kernels``, and for ``int_matmul`` the
    GEMM routing of ``hdrq._cuda`` (CUDA C++ kernels of ``hdrq._C``, the Triton GEMM, ``torch._int_mm``);
  * a fake implementation, so that ``torch.compile`` and ``torch.export`` trace through it;
  * its autograd: the quantizers' Python ``Autograd`` kernel (:class:`_QuantizerGrad`, whose backward is an op of
    its own); every other op is registered as not differentiable, and a backward through a deploy op's float
    outputs raises (:class:`_NotDifferentiable`).

So a call goes ``hdrq.ops.<op>`` (checks its arguments) -> ``torch.ops.hdrq.<op>`` -> the kernel registered for
the device, e.g. ``hdrq.kernels.quantizer.fake_quant`` -> its launch.

Backends (``set_backend`` / env ``HDRQ_BACKEND``), for tests and comparisons:
  * ``"auto"``: the registrations above.
  * ``"reference"``: the reference on every device (its kernels are registered over the CUDA ones).
  * ``"triton"``: the Triton kernels on CUDA tensors (``int_matmul`` too, instead of the routing) and on CPU
    tensors, which they run under the Triton interpreter (``TRITON_INTERPRET=1``; without it a call on CPU
    tensors raises).

Code above this module calls the public functions below and never imports Triton or the extension.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import reference as ref

__all__ = [
    "fake_quant", "noise_fake_quant", "qdrop_fake_quant", "uniform_noise", "quantize_per_token",
    "quantize_per_tensor", "pack_int6", "unpack_int6", "PackedWeight", "pack_weight", "unpack_weight",
    "int_matmul", "int_matmul_int32", "set_backend", "get_backend", "available_backends", "NOISE_MODES",
    "WEIGHT_BITS", "WEIGHT_LAYOUT",
]

NOISE_MODES = ("uniform", "histogram")
BACKENDS = ("auto", "reference", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KERNEL_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
WEIGHT_BITS = (6, 8)
WEIGHT_LAYOUT = "hdrq-mma-m16n8k32"
"""Name of the byte order :func:`pack_weight` produces (see ``hdrq.reference.pack_weight``)."""

# ==================================================================================================
# Schemas: every op of the namespace, the CUDA C++ ones of hdrq._C (csrc/bindings.cpp) included
# ==================================================================================================

_lib = torch.library.Library("hdrq", "DEF")
_QUANT_ARGS = "Tensor x, Tensor scale, int bits, bool signed, int? axis"
_SCHEMAS = {
    "fake_quant": f"({_QUANT_ARGS}) -> Tensor",
    "noise_fake_quant": f"({_QUANT_ARGS}, int seed, str mode) -> Tensor",
    "qdrop_fake_quant": f"({_QUANT_ARGS}, int seed, float p, bool noise, str mode) -> Tensor",
    "fake_quant_backward": f"(Tensor grad, {_QUANT_ARGS}) -> (Tensor, Tensor)",
    "noise_fake_quant_backward": f"(Tensor grad, {_QUANT_ARGS}, int seed, str mode) -> (Tensor, Tensor)",
    "qdrop_fake_quant_backward": f"(Tensor grad, {_QUANT_ARGS}, int seed, float p, bool noise, str mode) "
                                 f"-> (Tensor, Tensor)",
    "uniform_noise": "(SymInt[] shape, int seed, Device device) -> Tensor",
    "quantize_per_token": "(Tensor x, int bits) -> (Tensor, Tensor)",
    "quantize_per_tensor": "(Tensor x, Tensor scale, int bits, bool signed, int zero_point) -> Tensor",
    "pack_int6": "(Tensor q) -> Tensor",
    "unpack_int6": "(Tensor packed, SymInt[] shape) -> Tensor",
    "int_matmul": "(Tensor a_q, Tensor a_scale, Tensor w, Tensor w_scale, int w_bits, Tensor? bias, "
                  "ScalarType out_dtype) -> Tensor",
    "int_matmul_int32": "(Tensor a_q, Tensor w, int w_bits, int n) -> Tensor",
    # CUDA C++ (hdrq._C): out = epilogue(a_q @ w^T) into `out`; the split-K workspace; tile shapes; 6 -> 8 bits
    "int_gemm": "(Tensor(a!) out, Tensor a_q, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias, "
                "Tensor(b!) counters, Tensor(c!) partials, int w_bits, int path, int config, int splits) -> ()",
    "gemm_info": "(int path, int config, int w_bits) -> int[]",
    "expand_w6": "(Tensor(a!) w8, Tensor w6, int n, int k) -> ()",
}
for _name, _sig in _SCHEMAS.items():
    _lib.define(_name + _sig)

# The reference: every op's kernel on any device without one of its own.
for _name in ("fake_quant", "noise_fake_quant", "qdrop_fake_quant", "fake_quant_backward",
              "noise_fake_quant_backward", "qdrop_fake_quant_backward", "uniform_noise", "quantize_per_token",
              "quantize_per_tensor", "pack_int6", "unpack_int6", "int_matmul", "int_matmul_int32"):
    _lib.impl(_name, getattr(ref, _name), "CompositeExplicitAutograd")


# ==================================================================================================
# Fakes (shapes and dtypes only), for torch.compile and fake tensors
# ==================================================================================================


def _like_x(x, scale, *args):
    return torch.empty_like(x)


def _like_x_and_scale(grad, x, scale, *args):
    return torch.empty_like(x), torch.empty_like(scale)


for _name in ("fake_quant", "noise_fake_quant", "qdrop_fake_quant"):
    torch.library.register_fake(f"hdrq::{_name}", _like_x, lib=_lib)
    torch.library.register_fake(f"hdrq::{_name}_backward", _like_x_and_scale, lib=_lib)


@torch.library.register_fake("hdrq::uniform_noise", lib=_lib)
def _(shape, seed, device):
    return torch.empty(shape, dtype=torch.float32, device=device)


@torch.library.register_fake("hdrq::quantize_per_token", lib=_lib)
def _(x, bits):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("hdrq::quantize_per_tensor", lib=_lib)
def _(x, scale, bits, signed, zero_point):
    return x.new_empty(x.shape, dtype=torch.int8)


@torch.library.register_fake("hdrq::pack_int6", lib=_lib)
def _(q):
    return q.new_empty((*q.shape[:-1], q.shape[-1] // 4 * 3), dtype=torch.uint8)


@torch.library.register_fake("hdrq::unpack_int6", lib=_lib)
def _(packed, shape):
    return packed.new_empty(shape, dtype=torch.int8)


@torch.library.register_fake("hdrq::int_matmul", lib=_lib)
def _(a_q, a_scale, w, w_scale, w_bits, bias, out_dtype):
    return a_q.new_empty((a_q.shape[0], w_scale.shape[0]), dtype=out_dtype)


@torch.library.register_fake("hdrq::int_matmul_int32", lib=_lib)
def _(a_q, w, w_bits, n):
    return a_q.new_empty((a_q.shape[0], n), dtype=torch.int32)


@torch.library.register_fake("hdrq::int_gemm", lib=_lib)
def _(out, a_q, a_scale, w, w_scale, bias, counters, partials, w_bits, path, config, splits):
    return None


@torch.library.register_fake("hdrq::expand_w6", lib=_lib)
def _(w8, w6, n, k):
    return None


# An op without tensor inputs dispatches on its device argument.
def _uniform_noise_backend_select(keyset, shape, seed, device):
    key = getattr(torch._C.DispatchKey, torch._C._dispatch_key_for_device(device.type))
    return torch.ops.hdrq.uniform_noise.default.redispatch(torch._C.DispatchKeySet(key), shape, seed, device)


_lib.impl("uniform_noise", _uniform_noise_backend_select, "BackendSelect", with_keyset=True)

# ==================================================================================================
# Autograd
# ==================================================================================================


def _quantizer_backward(ctx, grad):
    x, scale = ctx.saved_tensors
    dx, ds = ctx.backward_op(grad, x, scale, *ctx.args)
    return (None, None, dx, ds) + (None,) * len(ctx.args)


_quantizer_backward_once = once_differentiable(_quantizer_backward)


class _QuantizerGrad(torch.autograd.Function):
    """Autograd of the three quantizer ops: saves x and the scale (the noise is regenerated from the seed, never
    stored) and calls the op's backward op, which dispatches like any op. A second derivative is refused."""

    @staticmethod
    def forward(ctx, forward_op, backward_op, x, scale, *args):
        ctx.backward_op, ctx.args = backward_op, args
        ctx.save_for_backward(x, scale)
        with torch._C._AutoDispatchBelowAutograd():
            return forward_op(x, scale, *args)

    @staticmethod
    def backward(ctx, grad):
        # Grad mode is on in a backward only under create_graph=True: then the result must refuse to be
        # differentiated again (once_differentiable); otherwise skip its wrapper.
        return (_quantizer_backward_once if torch.is_grad_enabled() else _quantizer_backward)(ctx, grad)


def _quantizer_autograd_kernel(name: str):
    forward_op = getattr(torch.ops.hdrq, name).default
    backward_op = getattr(torch.ops.hdrq, name + "_backward").default

    def autograd_kernel(x, scale, *args):
        if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
            return _QuantizerGrad.apply(forward_op, backward_op, x, scale, *args)
        with torch._C._AutoDispatchBelowAutograd():
            return forward_op(x, scale, *args)
    return autograd_kernel


for _name in ("fake_quant", "noise_fake_quant", "qdrop_fake_quant"):
    _lib.impl(_name, _quantizer_autograd_kernel(_name), "Autograd")
# Not differentiable: outputs never require grad (the public functions refuse inputs that ask for one).
for _name in ("fake_quant_backward", "noise_fake_quant_backward", "qdrop_fake_quant_backward",
              "quantize_per_token", "quantize_per_tensor", "pack_int6", "unpack_int6", "int_matmul",
              "int_matmul_int32", "int_gemm", "expand_w6"):
    _lib.impl(_name, torch.library.fallthrough_kernel, "Autograd")

# ==================================================================================================
# Device kernels, and the backend switch
# ==================================================================================================


# The ops that have device kernels (the others run the reference everywhere).
_DEVICE_OPS = ("fake_quant", "fake_quant_backward", "noise_fake_quant", "noise_fake_quant_backward",
               "qdrop_fake_quant", "qdrop_fake_quant_backward", "uniform_noise", "quantize_per_token",
               "quantize_per_tensor", "int_matmul", "int_matmul_int32")


def _triton_kernels() -> dict:
    """The Triton implementation of each op of :data:`_DEVICE_OPS` (``hdrq.kernels``). On CUDA under "auto",
    ``int_matmul`` is the routing of ``hdrq._cuda`` instead (:func:`_register_cuda`)."""
    from .kernels import gemm, per_tensor, per_token, quantizer

    return {
        "fake_quant": quantizer.fake_quant,
        "fake_quant_backward": quantizer.fake_quant_backward,
        "noise_fake_quant": quantizer.noise_fake_quant,
        "noise_fake_quant_backward": quantizer.noise_fake_quant_backward,
        "qdrop_fake_quant": quantizer.qdrop_fake_quant,
        "qdrop_fake_quant_backward": quantizer.qdrop_fake_quant_backward,
        "uniform_noise": quantizer.uniform_noise,
        "quantize_per_token": per_token.quantize_per_token,
        "quantize_per_tensor": per_tensor.quantize_per_tensor,
        "int_matmul": gemm.int_matmul,
        "int_matmul_int32": gemm.int_matmul_int32,
    }


CUDA_KERNELS_ERROR: Optional[str] = None
"""Why the CUDA kernels were not registered (None when they were, or when there is no CUDA device)."""
_cuda_lib: Optional[torch.library.Library] = None


def _register_cuda() -> None:
    """Register the CUDA kernels: the Triton kernels, and ``hdrq._cuda``'s GEMM routing for ``int_matmul``.
    Without Triton, CUDA tensors run the reference."""
    global _cuda_lib, CUDA_KERNELS_ERROR
    try:
        kernels = _triton_kernels()
        from . import _cuda
    except Exception as e:  # ImportError, or a broken install: the reference keeps every op working
        CUDA_KERNELS_ERROR = f"{type(e).__name__}: {e}"
        return
    kernels.update(int_matmul=_cuda.int_matmul, int_matmul_int32=_cuda.int_matmul_int32)
    _cuda_lib = torch.library.Library("hdrq", "IMPL")
    for name, fn in kernels.items():
        _cuda_lib.impl(name, fn, "CUDA")


if torch.cuda.is_available():
    _register_cuda()


_backend = "auto"
_override: Optional[torch.library.Library] = None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _needs_interpreter(*args, **kwargs):
    raise RuntimeError("hdrq backend 'triton' runs on CPU tensors only under the Triton interpreter "
                       "(TRITON_INTERPRET=1); use hdrq.set_backend('auto') or CUDA tensors")


def set_backend(name: str) -> None:
    """Choose the implementations every op runs: ``"auto"``, ``"reference"`` or ``"triton"`` (module docstring).
    The choice is a set of kernels registered over the default ones, removed again by ``set_backend("auto")``."""
    global _backend, _override
    if name not in BACKENDS:
        raise ValueError(f"unknown hdrq backend {name!r}; expected one of {BACKENDS}")
    overrides: dict[str, dict] = {}
    if name == "reference":
        overrides["CUDA"] = {op: getattr(ref, op) for op in _DEVICE_OPS}
    elif name == "triton":
        triton = _triton_kernels()  # raises ImportError without Triton
        overrides["CPU"] = triton if _interpreted() else dict.fromkeys(triton, _needs_interpreter)
        overrides["CUDA"] = triton
    if _override is not None:
        _override._destroy()
        _override = None
    if overrides:
        lib = torch.library.Library("hdrq", "IMPL")
        with warnings.catch_warnings():  # "overriding a previously registered kernel" is the point here
            warnings.simplefilter("ignore", UserWarning)
            for key, fns in overrides.items():
                for op, fn in fns.items():
                    lib.impl(op, fn, key)
        _override = lib
    _backend = name


def get_backend() -> str:
    return _backend


def available_backends(device: str | torch.device = "cuda") -> list[str]:
    """The backends that can run on ``device`` here."""
    device = torch.device(device)
    names = ["auto", "reference"]
    try:
        import triton  # noqa: F401
        if (device.type == "cuda" and torch.cuda.is_available()) or (device.type == "cpu" and _interpreted()):
            names.append("triton")
    except ImportError:
        pass
    return names


set_backend(os.environ.get("HDRQ_BACKEND", "auto"))

# ==================================================================================================
# Argument checks shared by the public functions. Errors name what was received.
# ==================================================================================================


def _check_bits(bits, name: str = "bits", lo: int = 2, hi: int = 8) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise ValueError(f"{name} must be an int from {lo} to {hi}, got {bits!r}")


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return f"a {type(t).__name__}"


CHECK_VALUES = os.environ.get("HDRQ_CHECK_VALUES", "cpu")
"""Per-call checks of scale values (finite, > 0) need the data on the host: ``"cpu"`` (env ``HDRQ_CHECK_VALUES``,
the default) checks CPU tensors only, since on CUDA the check would sync the host on every call; ``"1"`` checks
every device, ``"0"`` none (what a CUDA call costs the host: bench/host_cost.py)."""


def _values_checkable(t: Tensor) -> bool:
    if CHECK_VALUES == "0" or torch.compiler.is_compiling() or isinstance(t, torch._subclasses.FakeTensor):
        return False
    return t.device.type == "cpu" or (CHECK_VALUES == "1" and t.device.type != "meta")


def _check_positive_finite(name: str, what: str, s: Tensor) -> None:
    bad = ~(torch.isfinite(s) & (s > 0))
    if bool(bad.any()):
        raise ValueError(f"{name}: every {what} must be finite and > 0, got {s[bad][:4].tolist()} "
                         f"({int(bad.sum())} bad of {s.numel()})")


def _check_quant_args(name: str, x: Tensor, scale: Tensor, bits: int, axis: Optional[int]) -> Optional[int]:
    """Validate a quantizer call; returns the normalised axis."""
    if not isinstance(x, Tensor) or not isinstance(scale, Tensor):
        raise TypeError(f"{name}: x and scale must be tensors, got {_describe(x)} and {_describe(scale)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: x must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if scale.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: scale must be a floating tensor, got {scale.dtype}")
    if x.device != scale.device:
        raise ValueError(f"{name}: x is on {x.device} but scale is on {scale.device}")
    _check_bits(bits)
    if axis is None:
        if scale.numel() != 1:
            raise ValueError(f"{name}: axis=None needs one scale, got scale of shape {tuple(scale.shape)} "
                             f"for x of shape {tuple(x.shape)}")
    else:
        if isinstance(axis, bool) or not isinstance(axis, int) or not -x.dim() <= axis < x.dim():
            raise ValueError(f"{name}: axis {axis!r} is out of range for x of shape {tuple(x.shape)}")
        axis %= x.dim()
        if scale.dim() > 1 or scale.numel() != x.shape[axis]:
            raise ValueError(f"{name}: axis={axis} needs a 1-D scale of length {x.shape[axis]} "
                             f"(x of shape {tuple(x.shape)}), got scale of shape {tuple(scale.shape)}")
    if scale.numel() > 0 and _values_checkable(scale):
        _check_positive_finite(name, "scale", scale.detach())
    return axis


def _check_seed(name: str, seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name}: seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed <= ref.SEED_MASK:
        raise ValueError(f"{name}: seed must be an int in [0, 2**63), got {seed}")
    return seed


def _check_mode(name: str, mode) -> None:
    if mode not in NOISE_MODES:
        raise ValueError(f"{name}: mode must be one of {NOISE_MODES}, got {mode!r}")


class _NotDifferentiable(torch.autograd.Function):
    """A deploy op called on inputs that ask for a gradient: computed as usual, but a backward through its float
    outputs raises instead of silently giving none."""

    @staticmethod
    def forward(ctx, name, op, *args):
        ctx.name = name
        return op(*args)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.name} is not differentiable: detach its inputs (or run it under torch.no_grad()) "
                           f"where no gradient should flow through it")


def _deploy_call(name: str, op, grad_inputs: tuple, *args):
    """``op(*args)``, through :class:`_NotDifferentiable` when one of ``grad_inputs`` asks for a gradient."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in grad_inputs):
        return _NotDifferentiable.apply(name, op, *args)
    return op(*args)


# ==================================================================================================
# Public API: quantizers (calibration side)
# ==================================================================================================


def fake_quant(x: Tensor, scale: Tensor, *, bits: int, signed: bool = True, axis: Optional[int] = None) -> Tensor:
    """Round-to-nearest fake quantization ``s * clamp(round(x/s), qmin, qmax)`` with LSQ gradients.

    ``axis=None``: one scale for the tensor; ``axis=k``: one scale per index of dim k. Grid: signed
    ``[-2^(b-1), 2^(b-1)-1]``, unsigned ``[0, 2^b-1]``. Values and gradients equal
    ``torch._fake_quantize_learnable_per_channel_affine`` with zero point 0 and grad_factor 1.

    >>> x = torch.tensor([0.26, -1.0, 3.0]); s = torch.tensor(0.5)
    >>> fake_quant(x, s, bits=3)
    tensor([ 0.5000, -1.0000,  1.5000])
    """
    axis = _check_quant_args("fake_quant", x, scale, bits, axis)
    return torch.ops.hdrq.fake_quant.default(x, scale, bits, bool(signed), axis)


def noise_fake_quant(x: Tensor, scale: Tensor, *, bits: int, signed: bool = True, axis: Optional[int] = None,
                     seed: int, mode: str = "uniform") -> Tensor:
    """Noise quantization: ``x + s*u`` for elements strictly inside the grid (``s*qmin < x < s*qmax``);
    an element at or beyond a bound is set to that bound and gets no noise (exact zeros on an unsigned
    grid stay zero).

    ``mode="uniform"``: ``u ~ U[-0.5, 0.5)``; ``mode="histogram"``: ``u`` follows, per scale group, the
    256-bin histogram of the rounding errors ``round(x/s) - x/s`` of the strictly-inside elements. The
    noise is a function of (seed, element index) only; the backward regenerates it. Gradients: d/dx = 1
    strictly inside, else 0; d/ds = u inside, else qmin or qmax; summed per scale. ``seed``: in [0, 2**63)."""
    axis = _check_quant_args("noise_fake_quant", x, scale, bits, axis)
    seed = _check_seed("noise_fake_quant", seed)
    _check_mode("noise_fake_quant", mode)
    return torch.ops.hdrq.noise_fake_quant.default(x, scale, bits, bool(signed), axis, seed, mode)


def qdrop_fake_quant(x: Tensor, scale: Tensor, *, bits: int, signed: bool = True, axis: Optional[int] = None,
                     seed: int, p: float = 0.5, noise: bool = False, mode: str = "uniform") -> Tensor:
    """QDrop's activation quantizer in one op: ``where(r < p, x, q(x))`` with ``r ~ U[0, 1)`` drawn from
    stream 1 of ``seed`` (see ``hdrq.reference.drop_mask``) and ``q`` the hard (``noise=False``) or noise
    quantizer (its noise drawn from ``seed`` itself). Kept elements pass the gradient straight through."""
    axis = _check_quant_args("qdrop_fake_quant", x, scale, bits, axis)
    seed = _check_seed("qdrop_fake_quant", seed)
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
        raise ValueError(f"qdrop_fake_quant: p must be a probability in [0, 1], got {p!r}")
    _check_mode("qdrop_fake_quant", mode)
    return torch.ops.hdrq.qdrop_fake_quant.default(x, scale, bits, bool(signed), axis, seed, float(p), bool(noise),
                                                   mode)


def uniform_noise(shape: Sequence[int], seed: int, device: str | torch.device | None = None) -> Tensor:
    """The noise source of ``noise_fake_quant``: fp32 ``u ~ U[-0.5, 0.5)`` of ``shape`` for ``seed``,
    identical on every backend (Philox4x32-10, see ``hdrq.reference``)."""
    shape = [int(d) for d in shape]
    if any(d < 0 for d in shape):
        raise ValueError(f"uniform_noise: shape must be non-negative, got {shape}")
    seed = _check_seed("uniform_noise", seed)
    device = torch.device(device) if device is not None else torch.device("cpu")
    return torch.ops.hdrq.uniform_noise.default(shape, seed, device)


# ==================================================================================================
# Public API: deploy side
# ==================================================================================================


def _check_rows(name: str, x: Tensor, dtypes=KERNEL_FLOAT_DTYPES) -> None:
    if not isinstance(x, Tensor) or x.dtype not in dtypes:
        raise TypeError(f"{name}: x must be a {'/'.join(str(d)[6:] for d in dtypes)} tensor, got {_describe(x)}")
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"{name}: x must be [M, K] with K >= 1, got shape {tuple(x.shape)}")


def quantize_per_token(x: Tensor, *, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric dynamic per-row quantization of ``x [M, K]``: int8 values in ``[-qmax, qmax]``
    (``qmax = 2^(bits-1) - 1``) and fp32 scales ``[M]`` with ``x ~= q * scale[:, None]``.

    ``scale = absmax / qmax``; a row of zeros gets scale 0 and integers 0. A row holding a NaN or an infinity
    gets scale NaN and integers 0 (so ``int_matmul`` gives NaN for that row, as a float layer would),
    identically on every backend; nothing is checked on the host."""
    _check_rows("quantize_per_token", x)
    _check_bits(bits)
    return _deploy_call("quantize_per_token", torch.ops.hdrq.quantize_per_token.default, (x,), x, bits)


def quantize_per_tensor(x: Tensor, scale: Tensor, *, bits: int, signed: bool = True,
                        zero_point: int = 0) -> Tensor:
    """Static activation quantization of ``x [M, K]`` with one calibrated step size: int8
    ``clamp(round(x * (1/s)), qmin, qmax) + zero_point`` (the arithmetic of ``fake_quant``: the reciprocal
    first, fp32 (fp64 for fp64 x), round half to even; grid as in ``fake_quant``). ``zero_point`` moves a grid
    that does not fit int8 into it (an unsigned 8-bit grid takes -128). NaN becomes ``zero_point``; +-inf
    the grid's bounds."""
    _check_rows("quantize_per_tensor", x, KERNEL_FLOAT_DTYPES + (torch.float64,))
    if not isinstance(scale, Tensor) or scale.dtype != torch.float32 or scale.numel() != 1:
        raise TypeError(f"quantize_per_tensor: scale must be one float32 value (a tensor of one element), got "
                        f"{_describe(scale)}")
    _check_bits(bits)
    qmin, qmax = ref.qrange(bits, signed)
    if isinstance(zero_point, bool) or not isinstance(zero_point, int) or not (
            -128 <= qmin + zero_point and qmax + zero_point <= 127):
        raise ValueError(f"quantize_per_tensor: zero_point must be an int that moves the grid [{qmin}, {qmax}] into "
                         f"int8, got {zero_point!r}")
    if scale.device != x.device:
        raise ValueError(f"quantize_per_tensor: x is on {x.device} but scale is on {scale.device}")
    if _values_checkable(scale):
        _check_positive_finite("quantize_per_tensor", "scale", scale.detach())
    return _deploy_call("quantize_per_tensor", torch.ops.hdrq.quantize_per_tensor.default, (x, scale), x, scale, bits,
                        bool(signed), zero_point)


def _check_int6_values(name: str, q: Tensor) -> None:
    lo, hi = int(q.min()), int(q.max())
    if lo < -32 or hi > 31:
        raise ValueError(f"{name}: values must lie in [-32, 31], got values in [{lo}, {hi}]")


def pack_int6(q: Tensor) -> Tensor:
    """Pack int8 values in [-32, 31] (shape ``[..., K]``, K a multiple of 4) into uint8 ``[..., 3K/4]``:
    four values per three bytes (see ``hdrq.reference.pack_int6`` for the bit layout). An offline op:
    it checks the value range, which syncs with the device."""
    if not isinstance(q, Tensor) or q.dtype != torch.int8:
        raise TypeError(f"pack_int6: q must be an int8 tensor, got {_describe(q)}")
    if q.dim() == 0 or q.shape[-1] % 4 != 0:
        raise ValueError(f"pack_int6: the last dimension must be a multiple of 4 (pad K with zeros), "
                         f"got shape {tuple(q.shape)}")
    if q.numel() > 0 and not torch.compiler.is_compiling():
        _check_int6_values("pack_int6", q)
    return torch.ops.hdrq.pack_int6.default(q)


def unpack_int6(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack_int6`: int8 tensor of ``shape``."""
    shape = [int(d) for d in shape]
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int6: packed must be a uint8 tensor, got {_describe(packed)}")
    if not shape or shape[-1] % 4 != 0:
        raise ValueError(f"unpack_int6: the last dimension of shape must be a multiple of 4, got {shape}")
    expect = (*shape[:-1], shape[-1] // 4 * 3)
    if tuple(packed.shape) != expect:
        raise ValueError(f"unpack_int6: for shape {shape} packed must have shape {expect}, "
                         f"got {tuple(packed.shape)}")
    return torch.ops.hdrq.unpack_int6.default(packed, shape)


@dataclasses.dataclass(frozen=True, eq=False)
class PackedWeight:
    """Integer weights ``[N, K]`` in the byte order of the GEMM kernels, with what it takes to read them.

    Made by :func:`pack_weight`, taken by :func:`int_matmul`: the bit width, the logical shape and the layout
    travel with the bytes, so a raw int8 matrix or bytes of another width or layout are refused instead of
    being misread.

    data: the bytes in the :data:`WEIGHT_LAYOUT` order: int8 ``[N, K]`` (8 bits) or uint8 ``[N, 3K/4]`` (6 bits).
    bits: 6 or 8.
    shape: ``(N, K)``.
    scale: fp32 ``[N]``, the per-output-channel step sizes (finite and > 0, checked when the weight is packed),
        or None for a weight that only :func:`int_matmul_int32` and :func:`unpack_weight` take.
    layout: :data:`WEIGHT_LAYOUT`.
    """

    data: Tensor
    bits: int
    shape: tuple
    scale: Optional[Tensor] = None
    layout: str = WEIGHT_LAYOUT

    def __post_init__(self):
        if self.bits not in WEIGHT_BITS:
            raise ValueError(f"PackedWeight: bits must be one of {WEIGHT_BITS}, got {self.bits!r}")
        if self.layout != WEIGHT_LAYOUT:
            raise ValueError(f"PackedWeight: layout {self.layout!r} is not the one these kernels read "
                             f"({WEIGHT_LAYOUT!r}); repack the integers with hdrq.ops.pack_weight")
        n, k = (int(d) for d in self.shape)
        object.__setattr__(self, "shape", (n, k))
        want = (torch.int8, (n, k)) if self.bits == 8 else (torch.uint8, (n, 3 * k // 4))
        if self.bits == 6 and k % 4 != 0:
            raise ValueError(f"PackedWeight: 6-bit weights need K a multiple of 4, got shape {(n, k)}")
        if not isinstance(self.data, Tensor) or (self.data.dtype, tuple(self.data.shape)) != want:
            raise ValueError(f"PackedWeight: {self.bits}-bit weights of shape {(n, k)} are {want[0]} bytes of shape "
                             f"{want[1]}, got {_describe(self.data)}")
        if self.scale is not None:
            s = self.scale
            if not isinstance(s, Tensor) or s.dtype != torch.float32 or tuple(s.shape) != (n,):
                raise ValueError(f"PackedWeight: scale must be float32 of shape ({n},), got {_describe(s)}")
            if s.device != self.data.device:
                raise ValueError(f"PackedWeight: data is on {self.data.device} but scale is on {s.device}")
            if not isinstance(s, torch._subclasses.FakeTensor) and s.device.type != "meta" and n > 0:
                _check_positive_finite("PackedWeight", "scale", s)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device) -> "PackedWeight":
        """The same weight on ``device``."""
        return dataclasses.replace(self, data=self.data.to(device),
                                   scale=None if self.scale is None else self.scale.to(device))


def pack_weight(q: Tensor, bits: int, scale: Optional[Tensor] = None) -> PackedWeight:
    """A :class:`PackedWeight` from canonical int8 weights ``q [N, K]`` (values on the signed ``bits`` grid) and
    their per-output-channel step sizes ``scale`` (``[N]``, or one value for every channel; finite and > 0).

    The bytes are permuted into the order the GEMM kernels read (``mma.m16n8k32`` fragment order, 6-bit values
    split into planes the kernels expand with masks and shifts; ``hdrq.reference.pack_weight`` has the exact
    layout), with tensor ops identical on every device. ``pack_int6`` stays the save format. An offline op: it
    checks the values, which syncs with the device."""
    if bits not in WEIGHT_BITS:
        raise ValueError(f"pack_weight: bits must be one of {WEIGHT_BITS}, got {bits!r}")
    if not isinstance(q, Tensor) or q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"pack_weight: q must be a 2-D int8 tensor [N, K], got {_describe(q)}")
    if bits == 6 and q.shape[1] % 4 != 0:
        raise ValueError(f"pack_weight: 6-bit weights need K a multiple of 4 (pad K with zeros), "
                         f"got shape {tuple(q.shape)}")
    if bits == 6 and q.numel() > 0 and not torch.compiler.is_compiling():
        _check_int6_values("pack_weight", q)
    n = q.shape[0]
    if scale is not None:
        if not isinstance(scale, Tensor) or not scale.dtype.is_floating_point or scale.numel() not in (1, n):
            raise ValueError(f"pack_weight: scale must be {n} (or 1) floating values, got {_describe(scale)}")
        scale = scale.detach().to(device=q.device, dtype=torch.float32).reshape(-1).expand(n).contiguous()
    return PackedWeight(ref.pack_weight(q, bits), bits, tuple(q.shape), scale)


def unpack_weight(w: PackedWeight) -> Tensor:
    """Inverse of :func:`pack_weight`: the int8 weights ``[N, K]``."""
    if not isinstance(w, PackedWeight):
        raise TypeError(f"unpack_weight: w must be a PackedWeight (hdrq.ops.pack_weight), got {_describe(w)}")
    return ref.unpack_weight(w.data, w.bits, *w.shape)


def _check_packed(name: str, w) -> None:
    if not isinstance(w, PackedWeight):
        raise TypeError(f"{name}: w must be a hdrq.ops.PackedWeight (hdrq.ops.pack_weight(q, bits, scale)), got "
                        f"{_describe(w)}; a raw matrix is refused: its bytes are not in the kernels' layout")


def _where(t: Tensor) -> tuple:
    # (index, is_cuda, is_meta): the device, compared without building torch.device objects on the hot path
    return t.get_device(), t.is_cuda, t.is_meta


def _check_a_q(name: str, a_q: Tensor, w: PackedWeight) -> None:
    if not isinstance(a_q, Tensor) or a_q.dtype != torch.int8 or a_q.dim() != 2:
        raise TypeError(f"{name}: a_q must be a 2-D int8 tensor [M, K], got {_describe(a_q)}")
    if a_q.shape[1] != w.shape[1]:
        raise ValueError(f"{name}: a_q is [M, K] = {tuple(a_q.shape)} but the weight is [N, K] = {w.shape}")
    if _where(a_q) != _where(w.data):
        raise ValueError(f"{name}: a_q is on {a_q.device} but the weight is on {w.data.device}")


_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def int_matmul(a_q: Tensor, a_scale: Tensor, w: PackedWeight, *, bias: Optional[Tensor] = None,
               out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``out = (a_q @ w_q^T) * a_scale[:, None] * w.scale[None, :] + bias``: exact int32 accumulation, the
    epilogue in fp32 in that order, cast to ``out_dtype`` once.

    a_q: int8 ``[M, K]`` (values of any grid up to 8 bits, signed or unsigned 6-bit); a_scale: fp32 ``[M]``
    (per token) or ``[1]`` (per tensor); w: a :class:`PackedWeight` with its step sizes
    (``pack_weight(w_q, bits, scale)``); bias: bfloat16/float16/float32 ``[N]`` or None; out_dtype: bfloat16,
    float16 or float32."""
    _check_packed("int_matmul", w)
    _check_a_q("int_matmul", a_q, w)
    n = w.shape[0]
    if w.scale is None:
        raise ValueError("int_matmul: the weight has no step sizes; pack it with hdrq.ops.pack_weight(q, bits, scale)")
    if (not isinstance(a_scale, Tensor) or a_scale.dtype != torch.float32 or a_scale.dim() != 1
            or a_scale.shape[0] not in (a_q.shape[0], 1)):
        raise TypeError(f"int_matmul: a_scale must be float32 of shape [M] = [{a_q.shape[0]}] or [1], got "
                        f"{_describe(a_scale)}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.dtype not in _OUT_DTYPES or bias.shape != (n,)):
        raise TypeError(f"int_matmul: bias must be a float16/bfloat16/float32 tensor of shape [N] = [{n}], "
                        f"got {_describe(bias)}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"int_matmul: out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    dev = _where(a_q)
    if _where(a_scale) != dev or (bias is not None and _where(bias) != dev):
        raise ValueError(f"int_matmul: a_q, a_scale and bias must be on one device, got {a_q.device}, "
                         f"{a_scale.device}" + ("" if bias is None else f", {bias.device}"))
    return _deploy_call("int_matmul", torch.ops.hdrq.int_matmul.default, (a_scale, bias), a_q, a_scale, w.data,
                        w.scale, w.bits, bias, out_dtype)


def int_matmul_int32(a_q: Tensor, w: PackedWeight) -> Tensor:
    """The exact int32 accumulator ``a_q @ w_q^T`` that :func:`int_matmul` scales, through the same kernels. For
    tests and debugging: the GEMM kernels must reproduce it bit for bit."""
    _check_packed("int_matmul_int32", w)
    _check_a_q("int_matmul_int32", a_q, w)
    return torch.ops.hdrq.int_matmul_int32.default(a_q, w.data, w.bits, w.shape[0])

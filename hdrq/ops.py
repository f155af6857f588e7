"""The seam: every kernel-backed hdrq op, as a ``torch.library`` custom op in the ``hdrq`` namespace.

Each op has
  * a pure-PyTorch reference (``hdrq.reference``): the definition of correct, used on CPU tensors;
  * a fake implementation, so ``torch.compile`` traces through it;
  * autograd where DESIGN §4 defines gradients (the backward is an op of its own, so it dispatches too);
  * device implementations (Triton in ``hdrq.kernels``, CUDA in ``hdrq._C``) that register themselves
    here with :func:`register_impl` when their package is imported.

Which implementation runs is chosen per call from the backend (``set_backend`` / env ``HDRQ_BACKEND``)
and the device of the inputs:
  * ``"reference"`` always runs the reference.
  * ``"triton"`` / ``"cuda"`` run that backend, or raise if it cannot run on the tensors' device
    (Triton runs on CPU tensors only under ``TRITON_INTERPRET=1``). If that backend has no
    implementation of a particular op, the op runs as under ``"auto"`` (with a one-time warning).
  * ``"auto"`` runs the fastest implementation available for the device: on CUDA tensors the CUDA
    kernel, else the Triton kernel, else the reference; on CPU tensors the reference.
A device implementation that cannot take particular inputs (a dtype, an alignment) raises
:class:`Unsupported`; the reference then runs instead, with a one-time warning, never a wrong result.

Eager calls on plain tensors skip the custom-op dispatch (see :func:`_direct`): they run the same
implementation through :func:`_run`, with autograd from :class:`_EagerQuantizer`. ``torch.compile``,
``torch.jit.trace``, tensor subclasses (fake tensors), dispatch modes and functorch transforms go through the
custom ops.

Code above this module calls the public functions below and never imports Triton or the extension.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import reference as ref

__all__ = [
    "fake_quant", "noise_fake_quant", "qdrop_fake_quant", "uniform_noise", "quantize_per_token",
    "pack_int6", "unpack_int6", "pack_weight", "unpack_weight", "int_matmul", "set_backend",
    "get_backend", "register_impl", "available_backends", "Unsupported", "NOISE_MODES",
]

NOISE_MODES = ("uniform", "histogram")
BACKENDS = ("auto", "reference", "triton", "cuda")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# ==================================================================================================
# Backend registry
# ==================================================================================================


class Unsupported(Exception):
    """Raised by a device implementation for inputs it cannot take; the reference runs instead."""


_backend: str = "auto"
_IMPLS: dict[str, dict[str, Callable]] = {"triton": {}, "cuda": {}}
_LOAD_ERRORS: dict[str, str] = {}
_LOADED: set[str] = set()
_WARNED: set[tuple] = set()
# Preference of "auto" on CUDA tensors, per op; ops not listed prefer Triton (the quantizer kernels).
_AUTO_ORDER = {"int_matmul": ("cuda", "triton")}
_BACKEND_MODULES = {"triton": "hdrq.kernels", "cuda": "hdrq._cuda"}


def set_backend(name: str) -> None:
    """Choose the implementation of every op: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown hdrq backend {name!r}; expected one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


set_backend(os.environ.get("HDRQ_BACKEND", "auto"))


def register_impl(op: str, backend: str, fn: Callable) -> None:
    """Register ``fn`` (same arguments as the reference ``hdrq.reference.<op>``) as ``backend``'s ``op``."""
    if backend not in _IMPLS:
        raise ValueError(f"cannot register backend {backend!r}; expected one of {tuple(_IMPLS)}")
    _IMPLS[backend][op] = fn


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load(backend: str) -> Optional[str]:
    """Import ``backend``'s module once (it registers its implementations). Returns why it failed."""
    if backend not in _LOADED:
        _LOADED.add(backend)
        try:
            importlib.import_module(_BACKEND_MODULES[backend])
        except Exception as e:  # ImportError, or a broken install: report it, never crash the op
            _LOAD_ERRORS[backend] = f"{type(e).__name__}: {e}"
    return _LOAD_ERRORS.get(backend)


def _unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """None if ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "cuda" and device.type != "cuda":
        return f"the CUDA kernels run on CUDA tensors only, got {device} tensors"
    if backend == "triton" and device.type == "cpu" and not _triton_interpreted():
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    if backend == "triton" and device.type not in ("cpu", "cuda"):
        return f"Triton kernels run on CUDA (or interpreted CPU) tensors, got {device} tensors"
    err = _load(backend)
    if err is not None:
        return f"importing {_BACKEND_MODULES[backend]} failed ({err})"
    return None


def available_backends(device: str | torch.device = "cuda") -> list[str]:
    """The backends that can run on ``device`` here (always includes "reference")."""
    device = torch.device(device)
    return ["reference"] + [b for b in ("triton", "cuda") if _unavailable_reason(b, device) is None]


def _warn_once(key: tuple, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _select(op: str, device: torch.device) -> tuple[str, Callable]:
    """The backend name and function that run ``op`` on ``device`` under the current backend."""
    reference = getattr(ref, op)
    backend = _backend
    if backend == "reference":
        return "reference", reference
    if backend != "auto":
        reason = _unavailable_reason(backend, device)
        if reason is not None:
            raise RuntimeError(f"hdrq backend {backend!r} was asked for but cannot run {op}: {reason}. "
                               f"Use hdrq.set_backend('auto') to run whatever is available.")
        if op in _IMPLS[backend]:
            return backend, _IMPLS[backend][op]
        _warn_once((op, backend, "missing"),
                   f"hdrq backend {backend!r} has no implementation of {op}; using the 'auto' choice")
    if device.type != "cuda":
        return "reference", reference
    for b in _AUTO_ORDER.get(op, ("triton", "cuda")):
        if _unavailable_reason(b, device) is None and op in _IMPLS[b]:  # the check imports b first
            return b, _IMPLS[b][op]
    return "reference", reference


def _run(op: str, device: torch.device, *args):
    backend, fn = _select(op, device)
    if backend == "reference":
        return fn(*args)
    try:
        return fn(*args)
    except Unsupported as why:
        _warn_once((op, backend, str(why)), f"hdrq: {backend} {op} does not support these inputs ({why}); "
                                            f"running the reference instead")
        return getattr(ref, op)(*args)


# ==================================================================================================
# The eager direct path
# ==================================================================================================

DIRECT = os.environ.get("HDRQ_DIRECT", "1") != "0"
"""Whether eager calls may bypass the custom-op dispatch (env ``HDRQ_DIRECT=0`` turns it off). A
``torch.library`` custom op costs tens of microseconds of host time per eager call (argument normalisation,
its autograd wrapper, a ``torch._dynamo.disable`` frame): a quantizer forward + backward spends ~60 us in it
against ~28 us on the direct path (2-core CPU, kernels stubbed out), and on slower hosts that bounds the
calibration of small blocks and the decode of converted layers. Results are identical either way (the same
implementation runs; tests compare the two paths)."""

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _direct(*tensors: Optional[Tensor]) -> bool:
    """True when a public call may run its implementation directly: eager mode, plain tensors, no dispatch
    mode, no ``torch.jit.trace`` and no functorch transform around it (those must see the custom op)."""
    if not DIRECT or torch.compiler.is_compiling() or torch.jit.is_tracing() or is_in_torch_dispatch_mode():
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TENSORS or torch._C._functorch.is_functorch_wrapped_tensor(t)):
            return False
    return True


class _EagerQuantizer(torch.autograd.Function):
    """Autograd of the quantizer ops on the direct path: the same saved tensors (x and the scale only; the
    noise is regenerated from the seed) and the same ``<op>_backward`` implementation as the custom ops'
    registered autograd."""

    @staticmethod
    def forward(ctx, op: str, x: Tensor, scale: Tensor, *args):
        ctx.op, ctx.args = op, args
        ctx.save_for_backward(x, scale)
        return _run(op, x.device, x, scale, *args)

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        # create_graph=True (grad mode on here) or a batched / traced grad: the backward custom op, which
        # handles those exactly as the registered autograd does (and refuses a second derivative loudly).
        if torch.is_grad_enabled() or not _direct(grad, x, scale):
            dx, ds = getattr(torch.ops.hdrq, ctx.op + "_backward")(grad, x, scale, *ctx.args)
        else:
            dx, ds = _run(ctx.op + "_backward", x.device, grad, x, scale, *ctx.args)
        return (None, dx, ds) + (None,) * len(ctx.args)


def _call(op: str, device: torch.device, tensors: tuple, *args):
    """Call ``op`` (one without a backward) with ``args`` on the fastest safe path. ``tensors``: its tensor
    arguments. Direct only when none of them asks for a gradient, so that such a call fails as the custom op does
    ("no autograd formula") instead of silently cutting or faking the graph."""
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if not wants_grad and _direct(*tensors):
        return _run(op, device, *args)
    return getattr(torch.ops.hdrq, op)(*args)


def _quantizer(op: str, x: Tensor, scale: Tensor, *args) -> Tensor:
    """Call quantizer ``op`` (fake_quant, noise_fake_quant or qdrop_fake_quant) on the fastest safe path."""
    if _direct(x, scale):
        if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
            return _EagerQuantizer.apply(op, x, scale, *args)
        return _run(op, x.device, x, scale, *args)
    return getattr(torch.ops.hdrq, op)(x, scale, *args)


# ==================================================================================================
# Input checks (shared by the public wrappers). Errors name what was received.
# ==================================================================================================


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int from 2 to 8, got {bits!r}")


def _values_checkable(t: Tensor) -> bool:
    """Value checks (NaN, sign) need the data on the host: done for CPU tensors, or on CUDA only with
    HDRQ_CHECK_VALUES=1, since the check would sync the host on every call."""
    if torch.compiler.is_compiling() or isinstance(t, torch._subclasses.FakeTensor):
        return False
    return t.device.type == "cpu" or os.environ.get("HDRQ_CHECK_VALUES", "0") == "1"


def _check_quant_args(name: str, x: Tensor, scale: Tensor, bits: int, axis: Optional[int]) -> Optional[int]:
    """Validate a quantizer call; returns the normalised axis."""
    if not isinstance(x, Tensor) or not isinstance(scale, Tensor):
        raise TypeError(f"{name}: x and scale must be tensors, got {type(x).__name__} and {type(scale).__name__}")
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
    if _values_checkable(scale) and scale.numel() > 0:
        bad = ~(torch.isfinite(scale) & (scale > 0))
        if bool(bad.any()):
            raise ValueError(f"{name}: every scale must be finite and > 0, got {scale[bad][:4].tolist()} "
                             f"({int(bad.sum())} bad of {scale.numel()})")
    return axis


def _check_seed(name: str, seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name}: seed must be an int, got {type(seed).__name__}")
    return seed & ref.SEED_MASK


# ==================================================================================================
# Custom ops: schemas (via type hints), dispatch, fakes, autograd
# ==================================================================================================

# ---- fake_quant -----------------------------------------------------------------------------------


@torch.library.custom_op("hdrq::fake_quant", mutates_args=())
def _fake_quant(x: Tensor, scale: Tensor, bits: int, signed: bool, axis: Optional[int]) -> Tensor:
    return _run("fake_quant", x.device, x, scale, bits, signed, axis)


@torch.library.custom_op("hdrq::fake_quant_backward", mutates_args=())
def _fake_quant_backward(grad: Tensor, x: Tensor, scale: Tensor, bits: int, signed: bool,
                         axis: Optional[int]) -> tuple[Tensor, Tensor]:
    return _run("fake_quant_backward", x.device, grad, x, scale, bits, signed, axis)


@_fake_quant.register_fake
def _(x, scale, bits, signed, axis):
    return torch.empty_like(x)


@_fake_quant_backward.register_fake
def _(grad, x, scale, bits, signed, axis):
    return torch.empty_like(x), torch.empty_like(scale)


def _fq_setup(ctx, inputs, output):
    x, scale, bits, signed, axis = inputs
    ctx.save_for_backward(x, scale)
    ctx.args = (bits, signed, axis)


def _fq_backward(ctx, grad):
    x, scale = ctx.saved_tensors
    dx, ds = torch.ops.hdrq.fake_quant_backward(grad, x, scale, *ctx.args)
    return dx, ds, None, None, None


_fake_quant.register_autograd(_fq_backward, setup_context=_fq_setup)

# ---- noise_fake_quant -----------------------------------------------------------------------------


@torch.library.custom_op("hdrq::noise_fake_quant", mutates_args=())
def _noise_fake_quant(x: Tensor, scale: Tensor, bits: int, signed: bool, axis: Optional[int], seed: int,
                      mode: str) -> Tensor:
    return _run("noise_fake_quant", x.device, x, scale, bits, signed, axis, seed, mode)


@torch.library.custom_op("hdrq::noise_fake_quant_backward", mutates_args=())
def _noise_fake_quant_backward(grad: Tensor, x: Tensor, scale: Tensor, bits: int, signed: bool,
                               axis: Optional[int], seed: int, mode: str) -> tuple[Tensor, Tensor]:
    return _run("noise_fake_quant_backward", x.device, grad, x, scale, bits, signed, axis, seed, mode)


@_noise_fake_quant.register_fake
def _(x, scale, bits, signed, axis, seed, mode):
    return torch.empty_like(x)


@_noise_fake_quant_backward.register_fake
def _(grad, x, scale, bits, signed, axis, seed, mode):
    return torch.empty_like(x), torch.empty_like(scale)


def _nfq_setup(ctx, inputs, output):
    x, scale, *rest = inputs
    ctx.save_for_backward(x, scale)  # the noise is regenerated from the seed, never stored
    ctx.args = tuple(rest)


def _nfq_backward(ctx, grad):
    x, scale = ctx.saved_tensors
    dx, ds = torch.ops.hdrq.noise_fake_quant_backward(grad, x, scale, *ctx.args)
    return (dx, ds) + (None,) * len(ctx.args)


_noise_fake_quant.register_autograd(_nfq_backward, setup_context=_nfq_setup)

# ---- qdrop_fake_quant -----------------------------------------------------------------------------


@torch.library.custom_op("hdrq::qdrop_fake_quant", mutates_args=())
def _qdrop_fake_quant(x: Tensor, scale: Tensor, bits: int, signed: bool, axis: Optional[int], seed: int,
                      p: float, noise: bool, mode: str) -> Tensor:
    return _run("qdrop_fake_quant", x.device, x, scale, bits, signed, axis, seed, p, noise, mode)


@torch.library.custom_op("hdrq::qdrop_fake_quant_backward", mutates_args=())
def _qdrop_fake_quant_backward(grad: Tensor, x: Tensor, scale: Tensor, bits: int, signed: bool,
                               axis: Optional[int], seed: int, p: float, noise: bool,
                               mode: str) -> tuple[Tensor, Tensor]:
    return _run("qdrop_fake_quant_backward", x.device, grad, x, scale, bits, signed, axis, seed, p, noise, mode)


@_qdrop_fake_quant.register_fake
def _(x, scale, bits, signed, axis, seed, p, noise, mode):
    return torch.empty_like(x)


@_qdrop_fake_quant_backward.register_fake
def _(grad, x, scale, bits, signed, axis, seed, p, noise, mode):
    return torch.empty_like(x), torch.empty_like(scale)


def _qdrop_backward(ctx, grad):
    x, scale = ctx.saved_tensors
    dx, ds = torch.ops.hdrq.qdrop_fake_quant_backward(grad, x, scale, *ctx.args)
    return (dx, ds) + (None,) * len(ctx.args)


_qdrop_fake_quant.register_autograd(_qdrop_backward, setup_context=_nfq_setup)

# ---- uniform_noise --------------------------------------------------------------------------------


@torch.library.custom_op("hdrq::uniform_noise", mutates_args=())
def _uniform_noise(shape: list[int], seed: int, device: torch.device) -> Tensor:
    return _run("uniform_noise", device, shape, seed, device)


@_uniform_noise.register_fake
def _(shape, seed, device):
    return torch.empty(shape, dtype=torch.float32, device=device)

# ---- quantize_per_token ---------------------------------------------------------------------------


@torch.library.custom_op("hdrq::quantize_per_token", mutates_args=())
def _quantize_per_token(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    return _run("quantize_per_token", x.device, x, bits)


@_quantize_per_token.register_fake
def _(x, bits):
    return (torch.empty(x.shape, dtype=torch.int8, device=x.device),
            torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device))

# ---- pack_int6 / unpack_int6 ----------------------------------------------------------------------


@torch.library.custom_op("hdrq::pack_int6", mutates_args=())
def _pack_int6(q: Tensor) -> Tensor:
    return _run("pack_int6", q.device, q)


@_pack_int6.register_fake
def _(q):
    return torch.empty((*q.shape[:-1], q.shape[-1] // 4 * 3), dtype=torch.uint8, device=q.device)


@torch.library.custom_op("hdrq::unpack_int6", mutates_args=())
def _unpack_int6(packed: Tensor, shape: list[int]) -> Tensor:
    return _run("unpack_int6", packed.device, packed, shape)


@_unpack_int6.register_fake
def _(packed, shape):
    return torch.empty(shape, dtype=torch.int8, device=packed.device)

# ---- int_matmul -----------------------------------------------------------------------------------


@torch.library.custom_op("hdrq::int_matmul", mutates_args=())
def _int_matmul(a_q: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, w_bits: int,
                bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    return _run("int_matmul", a_q.device, a_q, a_scale, w, w_scale, w_bits, bias, out_dtype)


@_int_matmul.register_fake
def _(a_q, a_scale, w, w_scale, w_bits, bias, out_dtype):
    return torch.empty((a_q.shape[0], w_scale.shape[0]), dtype=out_dtype, device=a_q.device)


# ==================================================================================================
# Public API (DESIGN §4): validate, then call the op
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
    return _quantizer("fake_quant", x, scale, bits, bool(signed), axis)


def noise_fake_quant(x: Tensor, scale: Tensor, *, bits: int, signed: bool = True, axis: Optional[int] = None,
                     seed: int, mode: str = "uniform") -> Tensor:
    """Noise quantization: ``x + s*u`` for elements strictly inside the grid (``s*qmin < x < s*qmax``);
    an element at or beyond a bound is set to that bound and gets no noise (exact zeros on an unsigned
    grid stay zero).

    ``mode="uniform"``: ``u ~ U[-0.5, 0.5)``; ``mode="histogram"``: ``u`` follows, per scale group, the
    256-bin histogram of the rounding errors ``round(x/s) - x/s`` of the strictly-inside elements. The
    noise is a function of (seed, element index) only; the backward regenerates it. Gradients: d/dx = 1
    strictly inside, else 0; d/ds = u inside, else qmin or qmax; summed per scale."""
    axis = _check_quant_args("noise_fake_quant", x, scale, bits, axis)
    seed = _check_seed("noise_fake_quant", seed)
    if mode not in NOISE_MODES:
        raise ValueError(f"noise_fake_quant: mode must be one of {NOISE_MODES}, got {mode!r}")
    return _quantizer("noise_fake_quant", x, scale, bits, bool(signed), axis, seed, mode)


def qdrop_fake_quant(x: Tensor, scale: Tensor, *, bits: int, signed: bool = True, axis: Optional[int] = None,
                     seed: int, p: float = 0.5, noise: bool = False, mode: str = "uniform") -> Tensor:
    """QDrop's activation quantizer in one op: ``where(r < p, x, q(x))`` with ``r ~ U[0, 1)`` drawn from
    stream 1 of ``seed`` (see ``hdrq.reference.drop_mask``) and ``q`` the hard (``noise=False``) or noise
    quantizer (its noise drawn from ``seed`` itself). Kept elements pass the gradient straight through."""
    axis = _check_quant_args("qdrop_fake_quant", x, scale, bits, axis)
    seed = _check_seed("qdrop_fake_quant", seed)
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
        raise ValueError(f"qdrop_fake_quant: p must be a probability in [0, 1], got {p!r}")
    if mode not in NOISE_MODES:
        raise ValueError(f"qdrop_fake_quant: mode must be one of {NOISE_MODES}, got {mode!r}")
    return _quantizer("qdrop_fake_quant", x, scale, bits, bool(signed), axis, seed, float(p), bool(noise), mode)


def uniform_noise(shape: Sequence[int], seed: int, device: str | torch.device | None = None) -> Tensor:
    """The noise source of ``noise_fake_quant``: fp32 ``u ~ U[-0.5, 0.5)`` of ``shape`` for ``seed``,
    identical on every backend (Philox4x32-10, see ``hdrq.reference``)."""
    shape = [int(d) for d in shape]
    if any(d < 0 for d in shape):
        raise ValueError(f"uniform_noise: shape must be non-negative, got {shape}")
    seed = _check_seed("uniform_noise", seed)
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _call("uniform_noise", device, (), shape, seed, device)


def quantize_per_token(x: Tensor, *, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric dynamic per-row quantization of ``x [M, K]``: int8 values in ``[-qmax, qmax]``
    (``qmax = 2^(bits-1) - 1``) and fp32 scales ``[M]`` with ``x ~= q * scale[:, None]``."""
    if not isinstance(x, Tensor) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"quantize_per_token: x must be a float16/bfloat16/float32 tensor, "
                        f"got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"quantize_per_token: x must be [M, K] with K >= 1, got shape {tuple(x.shape)}")
    _check_bits(bits)
    return _call("quantize_per_token", x.device, (x,), x, bits)


def _check_int6_values(q: Tensor) -> None:
    lo, hi = int(q.min()), int(q.max())
    if lo < -32 or hi > 31:
        raise ValueError(f"pack_int6: values must lie in [-32, 31], got values in [{lo}, {hi}]")


def pack_int6(q: Tensor) -> Tensor:
    """Pack int8 values in [-32, 31] (shape ``[..., K]``, K a multiple of 4) into uint8 ``[..., 3K/4]``:
    four values per three bytes (see ``hdrq.reference.pack_int6`` for the bit layout). An offline op:
    it checks the value range, which syncs with the device."""
    if not isinstance(q, Tensor) or q.dtype != torch.int8:
        raise TypeError(f"pack_int6: q must be an int8 tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    if q.dim() == 0 or q.shape[-1] % 4 != 0:
        raise ValueError(f"pack_int6: the last dimension must be a multiple of 4 (pad K with zeros), "
                         f"got shape {tuple(q.shape)}")
    if q.numel() > 0 and not torch.compiler.is_compiling():
        _check_int6_values(q)
    return _call("pack_int6", q.device, (q,), q)


def unpack_int6(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack_int6`: int8 tensor of ``shape``."""
    shape = [int(d) for d in shape]
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int6: packed must be a uint8 tensor, got "
                        f"{getattr(packed, 'dtype', type(packed).__name__)}")
    if not shape or shape[-1] % 4 != 0:
        raise ValueError(f"unpack_int6: the last dimension of shape must be a multiple of 4, got {shape}")
    expect = (*shape[:-1], shape[-1] // 4 * 3)
    if tuple(packed.shape) != expect:
        raise ValueError(f"unpack_int6: for shape {shape} packed must have shape {expect}, "
                         f"got {tuple(packed.shape)}")
    return _call("unpack_int6", packed.device, (packed,), packed, shape)


WEIGHT_BITS = (6, 8)


def pack_weight(q: Tensor, bits: int) -> Tensor:
    """The weight layout :func:`int_matmul` takes, from canonical int8 weights ``q [N, K]`` (K-major).

    Same dtype and shape as the canonical format (8 bits: int8 ``[N, K]``; 6 bits: uint8 ``[N, 3K/4]``,
    K a multiple of 4, values in [-32, 31]), with the bytes permuted into the order the CUDA GEMM reads
    (``mma.m16n8k32`` fragment order, 6-bit values split into planes the kernel expands with masks and
    shifts; see ``hdrq.reference.pack_weight`` for the exact layout). Matrices with N < 16 or K < 32 keep
    the canonical order. A pure permutation computed with tensor ops, identical on every device, so a
    packed weight moves between CPU and GPU. ``pack_int6`` stays the save format:
    ``pack_int6(unpack_weight(w, 6, n, k))``. An offline op: for 6 bits it checks the value range, which
    syncs with the device."""
    if bits not in WEIGHT_BITS:
        raise ValueError(f"pack_weight: bits must be one of {WEIGHT_BITS}, got {bits!r}")
    if not isinstance(q, Tensor) or q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"pack_weight: q must be a 2-D int8 tensor [N, K], got "
                        f"{getattr(q, 'dtype', type(q).__name__)} of shape {tuple(getattr(q, 'shape', ()))}")
    if bits == 6:
        if q.shape[1] % 4 != 0:
            raise ValueError(f"pack_weight: 6-bit weights need K a multiple of 4 (pad K with zeros), "
                             f"got shape {tuple(q.shape)}")
        if q.numel() > 0 and not torch.compiler.is_compiling():
            _check_int6_values(q)
    return ref.pack_weight(q, bits)


def unpack_weight(w: Tensor, bits: int, n: int, k: int) -> Tensor:
    """Inverse of :func:`pack_weight`: int8 ``[N, K]``."""
    _check_weight(w, bits, n, k, "unpack_weight")
    return ref.unpack_weight(w, bits, n, k)


def _check_weight(w: Tensor, bits: int, n: int, k: int, name: str) -> None:
    if bits not in WEIGHT_BITS:
        raise ValueError(f"{name}: w_bits must be one of {WEIGHT_BITS}, got {bits!r}")
    if bits == 8:
        if w.dtype != torch.int8 or tuple(w.shape) != (n, k):
            raise ValueError(f"{name}: 8-bit weights must be int8 [N, K] = [{n}, {k}], got {w.dtype} "
                             f"of shape {tuple(w.shape)}")
    else:
        if k % 4 != 0:
            raise ValueError(f"{name}: 6-bit weights need K a multiple of 4, got K = {k}")
        if w.dtype != torch.uint8 or tuple(w.shape) != (n, 3 * k // 4):
            raise ValueError(f"{name}: 6-bit weights must be pack_weight(q, 6), uint8 [N, 3K/4] = "
                             f"[{n}, {3 * k // 4}], got {w.dtype} of shape {tuple(w.shape)}")


def int_matmul(a_q: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, *, w_bits: int,
               bias: Optional[Tensor] = None, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``out = (a_q @ w_q^T) * a_scale[:, None] * w_scale[None, :] + bias``: exact int32 accumulation, the
    epilogue in fp32, cast to ``out_dtype`` once.

    a_q: int8 ``[M, K]`` (values of any grid up to 8 bits, signed or unsigned 6-bit); a_scale: fp32 ``[M]``
    (per token) or ``[1]`` (per tensor); w: ``pack_weight(w_q, w_bits)``; w_scale: fp32 ``[N]``;
    bias: ``[N]`` or None; out_dtype: bfloat16, float16 or float32."""
    if not all(isinstance(t, Tensor) for t in (a_q, a_scale, w, w_scale)):
        raise TypeError("int_matmul: a_q, a_scale, w and w_scale must be tensors")
    if a_q.dtype != torch.int8 or a_q.dim() != 2:
        raise TypeError(f"int_matmul: a_q must be a 2-D int8 tensor [M, K], got {a_q.dtype} of shape "
                        f"{tuple(a_q.shape)}")
    m, k = a_q.shape
    if w_scale.dtype != torch.float32 or w_scale.dim() != 1:
        raise TypeError(f"int_matmul: w_scale must be a 1-D float32 tensor [N], got {w_scale.dtype} of shape "
                        f"{tuple(w_scale.shape)}")
    n = w_scale.shape[0]
    _check_weight(w, w_bits, n, k, "int_matmul")
    if a_scale.dtype != torch.float32 or a_scale.dim() != 1 or a_scale.shape[0] not in (m, 1):
        raise TypeError(f"int_matmul: a_scale must be float32 of shape [M] = [{m}] or [1], got {a_scale.dtype} "
                        f"of shape {tuple(a_scale.shape)}")
    if bias is not None and (bias.dtype not in FLOAT_DTYPES[:3] or tuple(bias.shape) != (n,)):
        raise TypeError(f"int_matmul: bias must be a float16/bfloat16/float32 tensor of shape [N] = [{n}], "
                        f"got {bias.dtype} of shape {tuple(bias.shape)}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"int_matmul: out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    devices = {t.device for t in (a_q, a_scale, w, w_scale) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"int_matmul: all inputs must be on one device, got {sorted(map(str, devices))}")
    return _call("int_matmul", a_q.device, (a_q, a_scale, w, w_scale, bias), a_q, a_scale, w, w_scale, w_bits,
                 bias, out_dtype)


# ==================================================================================================
# int_matmul_int32: the int32 accumulator of int_matmul (a debug op: tests compare kernels to it exactly)
# ==================================================================================================

__all__.append("int_matmul_int32")
_AUTO_ORDER["int_matmul_int32"] = ("cuda", "triton")


@torch.library.custom_op("hdrq::int_matmul_int32", mutates_args=())
def _int_matmul_int32(a_q: Tensor, w: Tensor, w_bits: int) -> Tensor:
    return _run("int_matmul_int32", a_q.device, a_q, w, w_bits)


@_int_matmul_int32.register_fake
def _(a_q, w, w_bits):
    return torch.empty((a_q.shape[0], w.shape[0]), dtype=torch.int32, device=a_q.device)


def int_matmul_int32(a_q: Tensor, w: Tensor, *, w_bits: int) -> Tensor:
    """The exact int32 accumulator ``a_q @ w_q^T`` that :func:`int_matmul` scales, from the same inputs
    (``w = pack_weight(w_q, w_bits)``; N is ``w.shape[0]``), through the same kernels. For tests and
    debugging: the GEMM kernels must reproduce it bit for bit."""
    if not isinstance(a_q, Tensor) or not isinstance(w, Tensor):
        raise TypeError("int_matmul_int32: a_q and w must be tensors")
    if a_q.dtype != torch.int8 or a_q.dim() != 2:
        raise TypeError(f"int_matmul_int32: a_q must be a 2-D int8 tensor [M, K], got {a_q.dtype} of shape "
                        f"{tuple(a_q.shape)}")
    if w.dim() != 2:
        raise ValueError(f"int_matmul_int32: w must be pack_weight(w_q, w_bits), 2-D, got shape {tuple(w.shape)}")
    _check_weight(w, w_bits, w.shape[0], a_q.shape[1], "int_matmul_int32")
    if a_q.device != w.device:
        raise ValueError(f"int_matmul_int32: a_q is on {a_q.device} but w is on {w.device}")
    return _call("int_matmul_int32", a_q.device, (a_q, w), a_q, w, w_bits)

"""Launch plumbing shared by the Triton kernels: output allocation, dtypes, device guard, launch options.

Every output and workspace of a kernel wrapper is allocated through :func:`alloc`, looked up on this module
at call time, so a test can swap it for one that fills buffers with NaN / sentinel values and so catch
elements a kernel forgot to write (see tests/test_kernels_triton.py).
"""
import contextlib
import os

import torch

# FMA contraction would turn `x + s*u` into fma(s, u, x): one rounding instead of the reference's two, so
# outputs would differ from hdrq.reference in the last bit. Every launch passes these options.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output / workspace (the kernels write every element)."""
    return torch.empty(shape, dtype=dtype, device=device)


def takes(*tensors: torch.Tensor, dtypes=KERNEL_DTYPES) -> bool:
    """Whether the kernels take these dtypes; the wrappers run the reference for the others (float64)."""
    return all(t.dtype in dtypes for t in tensors)


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU whatever the current device is (Triton launches on the current one)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def soft_bf16(out_dtype: torch.dtype) -> bool:
    """Whether kernels must round fp32 to bf16 in software: the Triton interpreter (3.6 and 3.9) converts
    fp32 -> bf16 by truncating the mantissa, while the GPU (cvt.rn.bf16.f32) and torch round to nearest
    even. Only under TRITON_INTERPRET=1; compiled kernels use the hardware conversion."""
    return out_dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def needs_int64(*numels: int) -> bool:
    """True if an element index (plus one block of slack) may not fit int32."""
    return max(numels) + (1 << 16) >= 2**31

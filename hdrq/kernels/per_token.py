"""``quantize_per_token``: symmetric dynamic per-row quantization of activations for the deploy path.

x ``[M, K]`` (fp32 / bf16 / fp16, rows may be strided, columns contiguous) -> int8 ``q [M, K]`` on the grid
``[-qmax, qmax]`` (``qmax = 2^(bits-1) - 1``) and fp32 ``scale [M]``, ``x ~= q * scale[:, None]``; the same
arithmetic as ``hdrq.reference.quantize_per_token`` (``scale = absmax / qmax`` and ``1 / scale`` with IEEE
division, round half to even; a row holding a NaN or an infinity gets scale NaN and integers 0), so the results
are bit-identical.

One pass: a program loads ``BM`` whole rows (``BM * BK`` elements, 16-byte vector loads), reduces the row
absmax on chip and quantizes from registers. Rows longer than ``MAX_ONE_PASS`` are read twice (absmax, then
quantize); the second read mostly hits L2. Bytes per element: read 4 / 2 B, write 1 B; 8192 x 4096 bf16 moves
100.7 MB -> floor 33 us at 3 TB/s. Work: a compare, a multiply, a rounding and a clamp per element, no limit.
"""
import torch
import triton
import triton.language as tl

from hdrq import reference as ref

from . import runtime
from .quantizer import _clamp, _rint

# Longest row quantized from registers in one pass (elements per program at 8 warps: 32 per thread).
MAX_ONE_PASS = 8192
# Elements per program for short rows (several rows per program).
TILE = 4096


@triton.jit
def _max_nan(a, b):
    # NaN-propagating max, so a row holding NaN gets a NaN scale like torch.amax gives.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quantize_tile(x, inv, qmax):
    return _clamp(_rint(_clamp(x * inv[:, None], -qmax - 1.0, qmax + 1.0)), -qmax, qmax).to(tl.int8)


@triton.jit
def _per_token_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_m, qmax, BM: tl.constexpr, BK: tl.constexpr,
                      ONE_PASS: tl.constexpr, IDX64: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    if IDX64:
        rows = rows.to(tl.int64)
    cols = tl.arange(0, BK)
    rmask = rows < M
    x_rows = x_ptr + rows[:, None] * stride_m
    q_rows = q_ptr + rows[:, None] * K
    if ONE_PASS:
        m = rmask[:, None] & (cols[None, :] < K)
        x = tl.load(x_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
        amax = tl.reduce(tl.abs(x), 1, _max_nan)
    else:
        amax = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(0, K, BK):
            m = rmask[:, None] & (k0 + cols[None, :] < K)
            xk = tl.load(x_rows + k0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
            amax = _max_nan(amax, tl.reduce(tl.abs(xk), 1, _max_nan))
    scale = tl.math.div_rn(amax, qmax)
    finite = scale < float("inf")  # False for +inf and NaN (amax >= 0)
    scale = tl.where(finite, scale, float("nan"))
    inv = tl.where(scale > 0, tl.math.div_rn(1.0, scale), 0.0)
    tl.store(s_ptr + rows, scale, mask=rmask)
    if ONE_PASS:
        tl.store(q_rows + cols[None, :], tl.where(finite[:, None], _quantize_tile(x, inv, qmax), 0), mask=m)
    else:
        for k0 in range(0, K, BK):
            m = rmask[:, None] & (k0 + cols[None, :] < K)
            xk = tl.load(x_rows + k0 + cols[None, :], mask=m, other=0.0).to(tl.float32)
            tl.store(q_rows + k0 + cols[None, :], tl.where(finite[:, None], _quantize_tile(xk, inv, qmax), 0),
                     mask=m)


def quantize_per_token(x: torch.Tensor, bits: int):
    if not runtime.takes(x):
        return ref.quantize_per_token(x, bits)
    if x.stride(1) != 1:
        x = x.contiguous()  # rows may be strided, columns must be contiguous
    m, k = x.shape
    q = runtime.alloc((m, k), torch.int8, x.device)
    scale = runtime.alloc((m,), torch.float32, x.device)
    if m == 0 or k == 0:
        return q, scale
    qmax = float((1 << (bits - 1)) - 1)
    one_pass = k <= MAX_ONE_PASS
    bk = runtime.next_pow2(k) if one_pass else 2048
    bm = max(1, min(runtime.next_pow2(m), TILE // bk)) if one_pass else 1
    # 32 elements per thread in one pass, 8 warps when rows are read twice: the best of a launch sweep
    # (bench/tune_quant.py; the measured shares of copy bandwidth are in bench/RESULTS.md).
    num_warps = max(1, min(8, bm * bk // 1024)) if one_pass else 8
    with runtime.device_guard(x):
        _per_token_kernel[(triton.cdiv(m, bm),)](x, q, scale, m, k, x.stride(0), qmax, BM=bm, BK=bk,
                                                 ONE_PASS=one_pass,
                                                 IDX64=runtime.needs_int64(m * max(k, x.stride(0))),
                                                 num_warps=num_warps, **runtime.LAUNCH_OPTIONS)
    return q, scale

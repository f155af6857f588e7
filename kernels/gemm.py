"""Triton W8A8 / W6A6 GEMM with the epilogue fused, reading the weights in the ``pack_weight`` layout.

``out = fp32(a_q @ w^T) * a_scale[m] * w_scale[n] (+ bias[n])``, cast once to bf16 / fp16 / fp32 (or the int32
accumulator itself), the arithmetic of ``hdrq.reference.int_matmul`` in the same order with FMA contraction
off, so the results are bit-identical to the reference: int32 accumulation is exact, then the same three fp32
roundings.

Data. A: int8 ``[M, K]``, rows strided, unit stride along K. W: ``pack_weight(q, 8)``: full 16 x 32 *units*
of 512 bytes, unit (u, p) at byte ``(u * NPF + p) * 512`` (``NPF = N // 16``), inside which row ``16p + r``
and column ``32u + c`` sit at ``(2 * (r // 8) + c // 16) * 128 + 16 * (r % 8) + c % 16``: 16 consecutive K
columns of a row are 16 consecutive bytes, so a ``[BN, BK]`` tile loads as 16-byte vectors with offsets
``row_part[n] + col_part[k]``, and moving one ``BK`` step adds a constant. The K tail (K % 32 columns of the
full panels) and N tail (N % 16 rows) are stored row-major after the units; the tiles that touch them take
a second loop with per-element offsets and masks. 6-bit weights (``pack_weight(q, 6)``) are first expanded to
the 8-bit layout by :func:`expand_to_int8` (one pass: 0.75 B read + 1 B written per weight), then the 8-bit
kernel runs.

Tiles. Programs own ``BM x BN`` output tiles in grouped order (``GROUP_M`` row tiles share each weight
column tile while it is in L2) and, with ``SPLIT_K > 1``, a slice of K: they then write int32 partial tiles
that :func:`_epilogue_kernel` sums (exact in any order) before the epilogue. The configuration
(:class:`GemmConfig`) comes from the device's routing table (``hdrq._cuda``), tuned offline by
``bench/tune_gemm.py``: nothing is autotuned at run time, so no call synchronises the host.

Floors on an H100 (~3 TB/s measured copy bandwidth, 1979 dense int8 TOPS by the datasheet): weight bytes
``N*K`` (+ A ``M*K``, out ``2*M*N``) over bandwidth against ``2*M*N*K`` over the int8 peak. 4096 x 14336 is
memory-bound up to M ~ 330 (58.7 MB: 19.6 us) and compute-bound beyond (M = 8192: 486 us).

Also here: :func:`to_rowmajor` (the weights as a plain int8 ``[N, K]`` for ``torch._int_mm``) and
:func:`int_mm_matmul` (``torch._int_mm``, then this file's epilogue as one more pass over the int32 result).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from hdrq import reference as ref

from . import runtime
from .quantizer import _cast_out

PANEL, UNIT_K, PLANE = ref.GEMM_PANEL_ROWS, ref.GEMM_UNIT_K, ref.GEMM_PLANE_BYTES
assert (PANEL, UNIT_K, PLANE) == (16, 32, 128)  # the offsets below are written for these


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch options of the Triton GEMM (a routing-table entry's ``config``)."""

    bm: int = 128
    bn: int = 128
    bk: int = 128
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        if self.bk % UNIT_K or self.bn % PANEL or self.bm < 16 or self.split_k < 1:
            raise ValueError(f"GemmConfig: bk must be a multiple of 32, bn of 16, bm >= 16 and split_k >= 1, got "
                             f"{self}")


# The configurations bench/tune_gemm.py times for a routing table (and tests run on the GPU). Shared memory per
# stage is (bm + bn) * bk bytes: 384 x 128 x 3 stages = 144 KB at most, within an H100's 227 KB.
CANDIDATES = (
    # large M (tensor-core bound): wgmma-sized tiles
    GemmConfig(128, 256, 128, 8, 1, 8, 3),
    GemmConfig(256, 128, 128, 8, 1, 8, 3),
    GemmConfig(128, 128, 128, 8, 1, 8, 4),
    GemmConfig(128, 128, 128, 8, 1, 4, 4),
    # a few hundred rows: smaller row tiles, split-K where the tiles are few
    GemmConfig(64, 128, 256, 8, 1, 4, 3),
    GemmConfig(64, 128, 128, 8, 2, 4, 4),
    GemmConfig(64, 64, 256, 8, 1, 4, 4),
    # decode (M <= 64): the weight stream, split over K to keep every SM busy
    GemmConfig(16, 64, 256, 1, 4, 4, 4),
    GemmConfig(32, 64, 128, 1, 4, 4, 5),
    GemmConfig(64, 64, 128, 1, 2, 4, 4),
)


def candidates_for(m: int) -> tuple:
    """The :data:`CANDIDATES` worth timing at M = ``m``."""
    if m <= 64:
        return tuple(c for c in CANDIDATES if c.bm <= 64)
    if m <= 512:
        return tuple(c for c in CANDIDATES if 64 <= c.bm <= 128)
    return tuple(c for c in CANDIDATES if c.bm >= 64 and c.split_k == 1)


def default_config(m: int, n: int, k: int) -> GemmConfig:
    """A configuration for sizes no routing-table entry names: small row tiles and split-K while the output tiles
    alone would leave an H100-sized GPU idle (M in the decode range), else 128 x 128 tiles."""
    if m <= 64:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, 64)
        split = max(1, min(8, 132 // max(tiles, 1), k // 512))
        return GemmConfig(bm=bm, bn=64, bk=128, group_m=1, split_k=split, num_warps=4, num_stages=4)
    return GemmConfig()


# ==================================================================================================
# Kernels
# ==================================================================================================


@triton.jit
def _unit_offsets(rn, rk, NPF):
    """Byte offsets of rows ``rn`` (all in full panels) and columns ``rk`` (all in full units) in the layout."""
    row = (rn // 16) * 512 + ((rn % 16) // 8) * 256 + (rn % 8) * 16
    col = (rk // 32) * (NPF * 512) + ((rk % 32) // 16) * 128 + (rk % 16)
    return row[:, None] + col[None, :]


@triton.jit
def _any_offsets(rn, rk, K, NPF, KUF, TAIL_START, REST_START):
    """Byte offsets of any rows and columns: units, K tail (row-major, K % 32 wide) or N tail (row-major)."""
    rows_f = NPF * 16
    cols_f = KUF * 32
    in_rows = rn[:, None] < rows_f
    unit = _unit_offsets(rn, rk, NPF)
    tail = TAIL_START + rn[:, None] * (K - cols_f) + (rk[None, :] - cols_f)
    rest = REST_START + (rn[:, None] - rows_f) * K + rk[None, :]
    return tl.where(in_rows, tl.where(rk[None, :] < cols_f, unit, tail), rest)


@triton.jit
def _scale_tile(acc, rm, rn, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, A_PER_TOKEN: tl.constexpr,
                HAS_BIAS: tl.constexpr):
    """The epilogue in fp32, in the reference's order: ``fp32(acc) * a_scale * w_scale + bias``."""
    y = acc.to(tl.float32)
    if A_PER_TOKEN:
        y = y * tl.load(a_scale_ptr + rm, mask=rm < M, other=0.0)[:, None]
    else:
        y = y * tl.load(a_scale_ptr)
    y = y * tl.load(w_scale_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _gemm_kernel(a_ptr, w_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, K, stride_am, stride_om,
                 NPF, KUF, TAIL_START, REST_START, K_PER_SPLIT,
                 A_PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_MODE: tl.constexpr,
                 SOFT_BF16: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP_M: tl.constexpr):
    # OUT_MODE 0: the scaled output; 1: the int32 accumulator; 2: int32 partial tiles [splits, M, N]
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    # Steps whose weight tile lies wholly in full units: constant-stride 16-byte loads, no weight mask.
    fast_steps = tl.where(pid_n * BN + BN <= NPF * 16, tl.maximum(tl.minimum(k_hi, KUF * 32) - k_lo, 0) // BK, 0)
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    a_ptrs = a_ptr + rm[:, None] * stride_am + (k_lo + rk)[None, :]
    w_ptrs = w_ptr + _unit_offsets(rn, k_lo + rk, NPF)
    row_ok = rm[:, None] < M
    for _ in range(0, fast_steps):
        a = tl.load(a_ptrs, mask=row_ok, other=0)
        w = tl.load(w_ptrs)
        acc += tl.dot(a, tl.trans(w), out_dtype=tl.int32)
        a_ptrs += BK
        w_ptrs += (BK // 32) * NPF * 512
    for k0 in range(k_lo + fast_steps * BK, k_hi, BK):
        kk = k0 + rk
        k_ok = kk[None, :] < k_hi
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :], mask=row_ok & k_ok, other=0)
        w = tl.load(w_ptr + _any_offsets(rn, kk, K, NPF, KUF, TAIL_START, REST_START),
                    mask=(rn[:, None] < N) & k_ok, other=0)
        acc += tl.dot(a, tl.trans(w), out_dtype=tl.int32)
    mask = row_ok & (rn[None, :] < N)
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    if OUT_MODE == 2:
        out_ptrs += split * M * N
    if OUT_MODE == 0:
        y = _scale_tile(acc, rm, rn, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, A_PER_TOKEN, HAS_BIAS)
        tl.store(out_ptrs, _cast_out(y, out_ptr, SOFT_BF16), mask=mask)
    else:
        tl.store(out_ptrs, acc, mask=mask)


@triton.jit
def _epilogue_kernel(acc_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, M, N, SPLITS, stride_am, stride_om,
                     A_PER_TOKEN: tl.constexpr, HAS_BIAS: tl.constexpr, SOFT_BF16: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr):
    """``out`` from ``SPLITS`` int32 tiles ``[SPLITS, M, N]`` (row stride ``stride_am``): their sum, then the
    epilogue. SPLITS = 1: the epilogue alone (after ``torch._int_mm``)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    ptrs = acc_ptr + rm[:, None] * stride_am + rn[None, :]
    acc = tl.load(ptrs, mask=mask, other=0)
    for s in range(1, SPLITS):
        acc += tl.load(ptrs + s * M * N, mask=mask, other=0)
    y = _scale_tile(acc, rm, rn, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, A_PER_TOKEN, HAS_BIAS)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], _cast_out(y, out_ptr, SOFT_BF16), mask=mask)


@triton.jit
def _sext6(v):
    return ((v & 0x3F) ^ 0x20) - 0x20


@triton.jit
def _unpack_units_kernel(w_ptr, out_ptr, UNITS, NPF, K, BITS: tl.constexpr, ROWMAJOR: tl.constexpr,
                         UB: tl.constexpr):
    """The full units of a ``pack_weight(q, BITS)`` layout as int8 values: in the 8-bit layout
    (``ROWMAJOR=False``: four 128-byte planes per unit) or row-major ``[N, K]``. 6-bit planes hold
    ``P_c = x_c << 2 | (two bits of x_3)`` for c < 3 (``hdrq.reference.pack_weight``)."""
    u = tl.program_id(0) * UB + tl.arange(0, UB)
    i = tl.arange(0, 128)
    mask = u[:, None] < UNITS
    if BITS == 8:
        src = w_ptr + u[:, None] * 512 + i[None, :]
        v0 = tl.load(src, mask=mask, other=0).to(tl.int32)
        v1 = tl.load(src + 128, mask=mask, other=0).to(tl.int32)
        v2 = tl.load(src + 256, mask=mask, other=0).to(tl.int32)
        v3 = tl.load(src + 384, mask=mask, other=0).to(tl.int32)
    else:
        src = w_ptr + u[:, None] * 384 + i[None, :]
        p0 = tl.load(src, mask=mask, other=0).to(tl.int32) & 0xFF
        p1 = tl.load(src + 128, mask=mask, other=0).to(tl.int32) & 0xFF
        p2 = tl.load(src + 256, mask=mask, other=0).to(tl.int32) & 0xFF
        v0 = _sext6(p0 >> 2)
        v1 = _sext6(p1 >> 2)
        v2 = _sext6(p2 >> 2)
        v3 = _sext6(((p0 & 3) << 4) | ((p1 & 3) << 2) | (p2 & 3))
    if ROWMAJOR:
        # plane c = 2h + j, byte 16g + t: row 16p + 8h + g, column 32ku + 16j + t
        p = u % NPF
        ku = u // NPF
        g = i // 16
        t = i % 16
        dst = out_ptr + (16 * p[:, None] + g[None, :]) * K + (32 * ku[:, None] + t[None, :])
        tl.store(dst, v0.to(tl.int8), mask=mask)
        tl.store(dst + 16, v1.to(tl.int8), mask=mask)
        tl.store(dst + 8 * K, v2.to(tl.int8), mask=mask)
        tl.store(dst + 8 * K + 16, v3.to(tl.int8), mask=mask)
    else:
        dst = out_ptr + u[:, None] * 512 + i[None, :]
        tl.store(dst, v0.to(tl.int8), mask=mask)
        tl.store(dst + 128, v1.to(tl.int8), mask=mask)
        tl.store(dst + 256, v2.to(tl.int8), mask=mask)
        tl.store(dst + 384, v3.to(tl.int8), mask=mask)


# ==================================================================================================
# Wrappers
# ==================================================================================================

_UNITS_PER_PROGRAM = 8


def _unpack(w: torch.Tensor, bits: int, n: int, k: int, rowmajor: bool) -> torch.Tensor:
    """``pack_weight(q, bits)`` as ``pack_weight(q, 8)`` (``rowmajor=False``) or as ``q`` itself (``True``): the
    units by one kernel, the two tails (row-major in both layouts) by tensor ops."""
    geo = ref.gemm_layout_geometry(bits, n, k)
    npf, kuf = geo["full_panels"], geo["full_units"]
    rows_f, cols_f = PANEL * npf, UNIT_K * kuf
    out = runtime.alloc((n, k), torch.int8, w.device)
    units = npf * kuf
    flat = w.reshape(-1).view(torch.uint8)
    if units:
        with runtime.device_guard(w):
            _unpack_units_kernel[(triton.cdiv(units, _UNITS_PER_PROGRAM),)](
                flat, out, units, npf, k, BITS=bits, ROWMAJOR=rowmajor, UB=_UNITS_PER_PROGRAM, num_warps=4)
    tail = ref.from_canonical_bytes(flat[geo["tail_start"]:geo["rest_start"]], bits, rows_f, k - cols_f)
    rest = ref.from_canonical_bytes(flat[geo["rest_start"]:], bits, n - rows_f, k)
    if rowmajor:
        out[:rows_f, cols_f:] = tail
        out[rows_f:] = rest
    else:  # the 8-bit layout: the same regions, now one byte per weight
        o = out.view(-1)
        o[units * 512: units * 512 + tail.numel()] = tail.reshape(-1)
        o[units * 512 + tail.numel():] = rest.reshape(-1)
    return out


def expand_to_int8(w: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``pack_weight(q, 8)`` from ``w = pack_weight(q, 6)``."""
    return _unpack(w, 6, n, k, rowmajor=False)


def to_rowmajor(w: torch.Tensor, bits: int, n: int, k: int) -> torch.Tensor:
    """The integer weights ``q`` (int8 ``[N, K]``, row-major) from ``w = pack_weight(q, bits)``."""
    return _unpack(w, bits, n, k, rowmajor=True)


def _launch(out, a_q, a_scale, w8, w_scale, bias, n, config: GemmConfig, out_mode: int):
    m, k = a_q.shape
    geo = ref.gemm_layout_geometry(8, n, k)
    ktiles = triton.cdiv(k, config.bk)
    per_split = triton.cdiv(ktiles, config.split_k) * config.bk
    splits = triton.cdiv(k, per_split)
    part = out
    if splits > 1:
        part = runtime.alloc((splits, m, n), torch.int32, a_q.device)
    grid = (triton.cdiv(m, config.bm) * triton.cdiv(n, config.bn), splits)
    with runtime.device_guard(a_q):
        _gemm_kernel[grid](a_q, w8, a_scale, w_scale, bias if bias is not None else w_scale, part, m, n, k,
                           a_q.stride(0), part.stride(-2), geo["full_panels"], geo["full_units"], geo["tail_start"],
                           geo["rest_start"], per_split, A_PER_TOKEN=a_scale.numel() == m and m > 1,
                           HAS_BIAS=bias is not None, OUT_MODE=2 if splits > 1 else out_mode,
                           SOFT_BF16=runtime.soft_bf16(out.dtype), BM=config.bm, BN=config.bn, BK=config.bk,
                           GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages,
                           **runtime.LAUNCH_OPTIONS)
        if splits > 1 and out_mode == 1:
            torch.sum(part, dim=0, out=out)
        elif splits > 1:
            _epilogue(out, part, a_scale, w_scale, bias, splits)
    return out


def _epilogue(out, acc, a_scale, w_scale, bias, splits: int = 1):
    m, n = out.shape
    bm, bn = 32, 128
    with runtime.device_guard(out):
        _epilogue_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
            acc, a_scale, w_scale, bias if bias is not None else w_scale, out, m, n, splits, acc.stride(-2),
            out.stride(0), A_PER_TOKEN=a_scale.numel() == m and m > 1, HAS_BIAS=bias is not None,
            SOFT_BF16=runtime.soft_bf16(out.dtype), BM=bm, BN=bn, num_warps=4, **runtime.LAUNCH_OPTIONS)
    return out


def _int8_layout(w: torch.Tensor, w_bits: int, n: int, k: int) -> torch.Tensor:
    return w if w_bits == 8 else expand_to_int8(w, n, k)


def _prepared(a_q: torch.Tensor) -> torch.Tensor:
    return a_q if a_q.stride(1) == 1 else a_q.contiguous()


def int_matmul(a_q, a_scale, w, w_scale, w_bits, bias, out_dtype, config: Optional[GemmConfig] = None):
    """``hdrq.reference.int_matmul`` on the Triton GEMM (6-bit weights expanded first)."""
    m, k = a_q.shape
    n = w_scale.shape[0]
    out = runtime.alloc((m, n), out_dtype, a_q.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(ref.int_matmul(a_q, a_scale, w, w_scale, w_bits, bias, out_dtype))
    a_q, a_scale, w_scale = _prepared(a_q), a_scale.contiguous(), w_scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    return _launch(out, a_q, a_scale, _int8_layout(w, w_bits, n, k), w_scale, bias, n,
                   config or default_config(m, n, k), out_mode=0)


def int_matmul_int32(a_q, w, w_bits, n, config: Optional[GemmConfig] = None):
    """``hdrq.reference.int_matmul_int32`` on the Triton GEMM."""
    m, k = a_q.shape
    out = runtime.alloc((m, n), torch.int32, a_q.device)
    if m == 0 or n == 0 or k == 0:
        return out.zero_()
    ones = torch.ones(n, dtype=torch.float32, device=a_q.device)
    return _launch(out, _prepared(a_q), ones[:1], _int8_layout(w, w_bits, n, k), ones, None, n,
                   config or default_config(m, n, k), out_mode=1)


def int_mm_matmul(a_q, a_scale, w, w_scale, w_bits, bias, out_dtype):
    """``hdrq.reference.int_matmul`` as ``torch._int_mm`` (cuBLASLt int8) on the row-major weights, then the
    epilogue kernel: one more pass over the int32 result (and, per call, the weights turned row-major).
    ``torch._int_mm`` needs M > 16 and K, N multiples of 8 on CUDA."""
    m, k = a_q.shape
    n = w_scale.shape[0]
    acc = torch._int_mm(a_q.contiguous(), to_rowmajor(w, w_bits, n, k).t())
    out = runtime.alloc((m, n), out_dtype, a_q.device)
    bias = bias.contiguous() if bias is not None else None
    return _epilogue(out, acc, a_scale.contiguous(), w_scale.contiguous(), bias)

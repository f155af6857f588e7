"""Fused quantizer kernels: hard (LSQ) fake quantization, noise fake quantization (uniform or histogram
noise, drawn in-kernel with Philox), the QDrop activation quantizer, and their backward passes.

What each kernel computes is defined by ``hdrq.reference`` (same names, same arguments); the outputs are
bit-identical to it (fp32 math, one rounding to the output dtype, see "Exactness" below). Nothing above
``hdrq.ops`` calls this module; ``hdrq.ops`` registers the wrappers at the bottom as the ops' CUDA kernels (and,
for tests, their CPU kernels under the Triton interpreter). Inputs the kernels do not take (float64) run the
reference.

Layout
------
``x`` (made contiguous: one copy if it was not) is seen as ``[outer, C, inner]`` around the scale axis
(``C = 1`` for a per-tensor scale). Each program handles one channel ``c`` and one chunk of ``BLOCK``
consecutive positions ``t`` of that channel's ``outer * inner`` elements (its "plane"), so the scale, its
reciprocal and the clamp bounds are per-program scalars and the ``ds`` reduction is a per-program scalar.
A tile is ``[BLOCK // VEC, VEC]``: sub-rows of ``VEC`` elements that are contiguous in memory (16 bytes:
VEC = 4 for fp32, 8 for 16-bit types) so loads and stores are single 16-byte vector accesses. The linear
element index ``e = (o*C + c)*inner + j`` with ``(o, j) = divmod(t, inner)`` is computed in one of four
ways (``LAYOUT``):

  0  one channel (per tensor, or C == 1): ``e = t``.
  1  ``outer == 1`` (axis 0 of a weight): ``e = c*inner + t``.
  2  general, ``inner % VEC == 0``: one division per sub-row (a sub-row never crosses a row of ``inner``).
  3  general, ``inner % 4 != 0`` (odd shapes): one division per element.

Random numbers
--------------
Philox4x32-10 with counter ``e // 4`` and lane ``e % 4`` (``hdrq.reference``). When every sub-row starts
at a multiple of 4 (``ALIGNED``), a sub-row of VEC elements is covered by VEC/4 counters and all four
outputs of each ``tl.randint4x`` call are used: the four lanes are joined and reshaped into element order,
which stays inside each thread's registers (no layout conversion; checked on the sm_90 TTGIR). Odd shapes
(``ALIGNED == False``) draw one counter per element and select its lane: 4x the Philox work, correct.

Bytes and FLOPs per element (the roofline; floors at an H100's 3017 GB/s device-to-device copy)
----------------------------------------------------------------------------------
  forward   read x, write y: 8 B (fp32) / 4 B (bf16). Work: Philox 10 rounds per 4 elements (about 10
            integer ops / element), ~8 fp32 ops. 8192 x 8192: 537 MB fp32 -> floor 0.178 ms; 0.089 ms bf16.
  backward  read g, read x, write dx: 12 B / 6 B, plus one fp32 partial per program (BLOCK elements).
  histogram one extra read of x (the histogram pass) and, per element, an 8-step binary search of the
            channel's 256-entry cumulative histogram held on chip (``tl.gather``).

Exactness
---------
``v = x * (1/s)`` with an IEEE reciprocal (``div_rn``); round half to even with the 1.5 * 2**23 trick on
``v`` clamped to ``[qmin - 1, qmax + 1]``, the sign copied back (round(-0.3) = -0.0); clamps compare and
select like torch.clamp on the CPU (NaN passes through, -0.0 is not below 0); kernels are launched with
FMA contraction off (``runtime.LAUNCH_OPTIONS``) so ``x + s*u`` rounds twice like the reference. Under the
interpreter, fp32 -> bf16 is rounded in software (``runtime.soft_bf16``). ``ds`` is a sum: it is
reproducible run to run (per-program partial sums, then a fixed-order second pass, no float atomics) but
not bit-equal to torch's summation order.
"""
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from hdrq import reference as ref

from . import runtime

# NOISE constexpr values
HARD, UNIFORM, HISTOGRAM = 0, 1, 2
_NOISE_MODES = {"uniform": UNIFORM, "histogram": HISTOGRAM}

HIST_BINS = ref.HIST_BINS
assert HIST_BINS == 256  # the binary search below is unrolled for 256 bins
# Largest BLOCK (elements per program). 4096 elements = 16 KB of fp32 per program: 16 elements per thread
# at 8 warps, four (fp32) or two (bf16) 16-byte loads in flight per thread. bench/bench_quant.py sweeps it.
MAX_BLOCK = 4096
# Histogram mode's sampler (int64 binary search, gathers) needs ~2x the registers per element: at 4096 it
# takes 155-176 registers a thread (one CTA per SM), at 2048 80-92 (sm_90 cubin, cuobjdump).
HIST_MAX_BLOCK = 2048
# Smaller channels get the smallest of these that holds them. Few sizes = few compiled variants: a model
# has layers of many sizes, and each (BLOCK, layout, mode, dtype) is a separate Triton compilation.
BLOCK_SIZES = (256, 1024)


def block_size(n: int, max_block: Optional[int] = None) -> int:
    """Elements per program for ``n`` elements per channel (a power of two)."""
    cap = max_block or MAX_BLOCK
    for b in BLOCK_SIZES:
        if n <= b:
            return min(b, cap)
    return cap


# ==================================================================================================
# Device helpers
# ==================================================================================================


@triton.jit
def _rint(v):
    """Round half to even, like torch.round, for |v| <= 2**22 (callers clamp first); NaN stays NaN.

    Adding 1.5 * 2**23 to |v| moves it into [2**23, 2**24), where the fp32 spacing is 1, so the IEEE add
    itself rounds to the nearest integer (ties to even) and the subtraction is exact. The sign is then
    copied back bit for bit, so round(-0.3) is -0.0 as in torch. (libdevice rint would be one instruction
    but does not run in the interpreter.)"""
    a = (tl.abs(v) + 12582912.0) - 12582912.0
    sign = v.to(tl.uint32, bitcast=True) & 0x80000000
    return (a.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _clamp(v, lo, hi):
    # torch.clamp on the CPU, exactly: compare and select, so NaN passes through (comparisons are false)
    # and -0.0 stays -0.0 against a bound of 0 (unsigned grids: round(-0.3) = -0.0 is not below 0).
    # min/max instructions would return +0.0 there.
    return tl.where(v < lo, lo, tl.where(v > hi, hi, v))


@triton.jit
def _cast_out(y, ptr, SOFT_BF16: tl.constexpr):
    """fp32 ``y`` in the dtype of ``ptr``, rounded to nearest even (see ``runtime.soft_bf16``)."""
    if SOFT_BF16:
        b = y.to(tl.uint32, bitcast=True)
        b = (b + (0x7FFF + ((b >> 16) & 1))) >> 16  # round to nearest even on the 16 dropped bits
        b = tl.where(y != y, 0x7FC0, b)  # NaN stays NaN (the add above could carry out of its mantissa)
        return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(ptr.dtype.element_ty)


@triton.jit
def _philox4x32(seed, ctr):
    """Philox4x32-10 of counter ``(ctr_lo, ctr_hi, 0, 0)`` under key ``(seed_lo, seed_hi)``: bit-identical to
    ``tl.randint4x(seed, ctr)`` (and so to ``hdrq.reference.philox4x32``).

    Written out rather than calling ``tl.randint4x`` because that computes each round's 32x32-bit products
    with separate ``umulhi`` and ``mul`` (two IMADs each); one 64-bit product of the zero-extended operands
    is a single IMAD.WIDE.U32 whose two halves are the high and low words. Philox is most of the integer
    work per element, and 16-bit inputs need about 3 elements per clock per SM to stay memory bound."""
    seed = seed.to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c0 = ctr.to(tl.uint32)
    if ctr.dtype.primitive_bitwidth > 32:
        c1 = (ctr >> 32).to(tl.uint32)
    else:
        c1 = c0 * 0
    c2 = c0 * 0
    c3 = c0 * 0
    for _ in tl.static_range(10):
        pa = c0.to(tl.uint64) * 0xD2511F53
        pb = c2.to(tl.uint64) * 0xCD9E8D57
        c0 = (pb >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (pa >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = pb.to(tl.uint32)
        c3 = pa.to(tl.uint32)
        k0 = k0 + 0x9E3779B9  # uint32: wraps
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _bits24_rows(seed, e_row, ROWS: tl.constexpr, VEC: tl.constexpr):
    """Top 24 bits of the Philox draw of elements ``e_row[:, None] + [0, VEC)``; every ``e_row`` % 4 == 0.

    One Philox call per counter gives the draws of its four elements; joining the outputs as
    ``[.., (r0, r2), (r1, r3)]`` and flattening puts lane ``2*i + k`` at position ``2*i + k``. With VEC = 8
    the two counters of a sub-row run as two 1-D Philox calls joined innermost (position ``4*g + lane``):
    a [ROWS, 2] counter tensor instead makes Triton give the 64-bit products a layout of their own and
    shuffle the result through shared memory (seen in the sm_90 TTGIR); this form keeps everything in the
    registers of the thread that loads the sub-row."""
    ctr = e_row >> 2
    r0, r1, r2, r3 = _philox4x32(seed, ctr)
    if VEC == 8:
        s0, s1, s2, s3 = _philox4x32(seed, ctr + 1)
        r0 = tl.join(r0, s0)
        r1 = tl.join(r1, s1)
        r2 = tl.join(r2, s2)
        r3 = tl.join(r3, s3)
    else:
        tl.static_assert(VEC == 4, "sub-rows hold 4 or 8 elements")
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [ROWS, VEC])
    return (r >> 8).to(tl.int32)  # r is uint32: logical shift


@triton.jit
def _bits24_elems(seed, e):
    """Top 24 bits of the Philox draw of each element ``e`` (any alignment): one counter per element."""
    r0, r1, r2, r3 = _philox4x32(seed, e >> 2)
    lane = e & 3
    r = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return (r >> 8).to(tl.int32)


@triton.jit
def _bits24(seed, e_row, e, ROWS: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    if ALIGNED:
        return _bits24_rows(seed, e_row, ROWS, VEC)
    else:
        return _bits24_elems(seed, e)


@triton.jit
def _uniform(k):
    # u = k * 2**-24 - 0.5: exact in fp32 (k < 2**24), in [-0.5, 0.5)
    return k.to(tl.float32) * 5.9604644775390625e-08 - 0.5


@triton.jit
def _tile(c, chunk, plane, inner, cstride, BLOCK: tl.constexpr, VEC: tl.constexpr, LAYOUT: tl.constexpr,
          ALIGNED: tl.constexpr):
    """Element indices ``e`` ([ROWS, VEC]), the index of each sub-row's first element ``e_row`` ([ROWS]) and
    the in-range mask of chunk ``chunk`` of channel ``c`` (see the module docstring for LAYOUT)."""
    rows = tl.arange(0, BLOCK // VEC)
    cols = tl.arange(0, VEC)
    t_row = chunk * BLOCK + rows * VEC
    t = t_row[:, None] + cols[None, :]
    valid = t < plane
    if LAYOUT == 0:
        e_row = t_row
    elif LAYOUT == 1:
        e_row = c * inner + t_row
    elif LAYOUT == 2:
        e_row = t_row + (t_row // inner) * cstride + c * inner
    else:
        e_row = t_row  # unused: LAYOUT 3 is never ALIGNED
    if ALIGNED:
        e_row = tl.multiple_of(e_row, VEC)
    if LAYOUT == 3:
        e = t + (t // inner) * cstride + c * inner
    else:
        e = e_row[:, None] + cols[None, :]
    return e, e_row, valid


@triton.jit
def _program(n_chunks, IDX64: tl.constexpr):
    pid = tl.program_id(0)
    c = pid // n_chunks
    chunk = pid - c * n_chunks
    if IDX64:
        c = c.to(tl.int64)
        chunk = chunk.to(tl.int64)
    return pid, c, chunk


@triton.jit
def _load_hist(hist_ptr, c):
    """Counts, cumulative counts (int64 [256]) and total of channel ``c``'s rounding-error histogram."""
    counts = tl.load(hist_ptr + c * 256 + tl.arange(0, 256)).to(tl.int64)
    cum = tl.cumsum(counts, 0)
    total = tl.sum(counts, 0)
    return counts, cum, total


@triton.jit
def _hist_noise(k, counts, cum, total, ROWS: tl.constexpr, VEC: tl.constexpr):
    """``hdrq.reference.histogram_noise`` for draws ``k`` ([ROWS, VEC] int32, 24 bits), step by step.

    The bin is the first b with ``k*T < C[b] * 2**24`` (exact int64), found by an 8-step binary search over
    the 256 cumulative counts held on chip; then the same fp32 operations as the reference."""
    kk = tl.reshape(k, [ROWS * VEC]).to(tl.int64)
    target = kk * total
    cum_s = cum << 24
    # pos = #{i : cum_s[i] <= target}, the torch.searchsorted(right=True) position. cum_s[255] = T * 2**24 >
    # target whenever T > 0, so 8 steps (pos <= 255) suffice; T == 0 takes the uniform fallback below.
    pos = tl.zeros([ROWS * VEC], dtype=tl.int32)
    for i in tl.static_range(8):
        cand = pos + (128 >> i)
        pos = tl.where(tl.gather(cum_s, cand - 1, 0) <= target, cand, pos)
    b = tl.minimum(pos, 255)
    cnt = tl.gather(counts, b, 0)
    prev = tl.gather(cum, b, 0) - cnt  # C[b-1], or 0 for b == 0
    frac = tl.math.div_rn((target - (prev << 24)).to(tl.float32), (cnt << 24).to(tl.float32))
    u = (b - 128).to(tl.float32) * 0.00390625 + frac * 0.00390625
    u = tl.minimum(u, 0.4999999701976776)  # U_MAX: a draw at the top of bin 255 can round up to 0.5
    u = tl.where(total > 0, u, kk.to(tl.float32) * 5.9604644775390625e-08 - 0.5)
    return tl.reshape(u, [ROWS, VEC])


@triton.jit
def _noise(seed, e_row, e, counts, cum, total, ROWS: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr,
           NOISE: tl.constexpr):
    k = _bits24(seed, e_row, e, ROWS, VEC, ALIGNED)
    if NOISE == 2:
        return _hist_noise(k, counts, cum, total, ROWS, VEC)
    else:
        return _uniform(k)


@triton.jit
def _keep(mseed, e_row, e, p, ROWS: tl.constexpr, VEC: tl.constexpr, ALIGNED: tl.constexpr):
    # hdrq.reference.drop_mask: r = uniform(stream 1) + 0.5 (exact), kept where r < p (p rounded to fp32,
    # as torch compares an fp32 tensor with a Python float).
    return (_uniform(_bits24(mseed, e_row, e, ROWS, VEC, ALIGNED)) + 0.5) < p


# ==================================================================================================
# Kernels
# ==================================================================================================

# Seeds are typed int64 by annotation and never specialised: Triton would otherwise compile separate
# variants for seeds divisible by 16 and turn a seed of 1 into a constant.
_SEEDS = ["seed", "mseed"]


@triton.jit
def _fwd_tile(x_ptr, y_ptr, s, inv, qmin, qmax, seed, mseed, p, counts, cum, total, c, chunk, plane, inner,
              cstride, BLOCK: tl.constexpr, VEC: tl.constexpr, LAYOUT: tl.constexpr, ALIGNED: tl.constexpr,
              NOISE: tl.constexpr, QDROP: tl.constexpr, SOFT_BF16: tl.constexpr, MASKED: tl.constexpr):
    ROWS: tl.constexpr = BLOCK // VEC
    e, e_row, valid = _tile(c, chunk, plane, inner, cstride, BLOCK, VEC, LAYOUT, ALIGNED)
    if MASKED:
        x = tl.load(x_ptr + e, mask=valid, other=0.0).to(tl.float32)
    else:
        x = tl.load(x_ptr + e).to(tl.float32)
    if NOISE == 0:
        q = _clamp(_rint(_clamp(x * inv, qmin - 1.0, qmax + 1.0)), qmin, qmax)
        y = q * s
    else:
        u = _noise(seed, e_row, e, counts, cum, total, ROWS, VEC, ALIGNED, NOISE)
        lo = s * qmin
        hi = s * qmax
        # At or beyond a bound: the bound, no noise (so exact zeros on an unsigned grid stay zero).
        y = tl.where(x <= lo, lo, tl.where(x >= hi, hi, x + s * u))
    if QDROP:
        y = tl.where(_keep(mseed, e_row, e, p, ROWS, VEC, ALIGNED), x, y)
    y = _cast_out(y, y_ptr, SOFT_BF16)
    if MASKED:
        tl.store(y_ptr + e, y, mask=valid)
    else:
        tl.store(y_ptr + e, y)


@triton.jit(do_not_specialize=_SEEDS)
def _fwd_kernel(x_ptr, y_ptr, scale_ptr, hist_ptr, seed: tl.int64, mseed: tl.int64, p, qmin, qmax, plane, inner,
                cstride, n_chunks, BLOCK: tl.constexpr, VEC: tl.constexpr, LAYOUT: tl.constexpr,
                ALIGNED: tl.constexpr, NOISE: tl.constexpr, QDROP: tl.constexpr, IDX64: tl.constexpr,
                SOFT_BF16: tl.constexpr):
    pid, c, chunk = _program(n_chunks, IDX64)
    s = tl.load(scale_ptr + c).to(tl.float32)
    inv = tl.math.div_rn(1.0, s)
    if NOISE == 2:
        counts, cum, total = _load_hist(hist_ptr, c)
    else:
        counts, cum, total = s, s, s  # unused
    # Full chunks run without masks (so loads stay 16-byte vectors); only a channel's last chunk is masked.
    if (chunk + 1) * BLOCK <= plane:
        _fwd_tile(x_ptr, y_ptr, s, inv, qmin, qmax, seed, mseed, p, counts, cum, total, c, chunk, plane, inner,
                  cstride, BLOCK, VEC, LAYOUT, ALIGNED, NOISE, QDROP, SOFT_BF16, False)
    else:
        _fwd_tile(x_ptr, y_ptr, s, inv, qmin, qmax, seed, mseed, p, counts, cum, total, c, chunk, plane, inner,
                  cstride, BLOCK, VEC, LAYOUT, ALIGNED, NOISE, QDROP, SOFT_BF16, True)


@triton.jit
def _bwd_tile(g_ptr, x_ptr, dx_ptr, s, inv, qmin, qmax, seed, mseed, p, counts, cum, total, c, chunk, plane,
              inner, cstride, BLOCK: tl.constexpr, VEC: tl.constexpr, LAYOUT: tl.constexpr, ALIGNED: tl.constexpr,
              NOISE: tl.constexpr, QDROP: tl.constexpr, SOFT_BF16: tl.constexpr, MASKED: tl.constexpr):
    ROWS: tl.constexpr = BLOCK // VEC
    e, e_row, valid = _tile(c, chunk, plane, inner, cstride, BLOCK, VEC, LAYOUT, ALIGNED)
    if MASKED:
        x = tl.load(x_ptr + e, mask=valid, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + e, mask=valid, other=0.0).to(tl.float32)
    else:
        x = tl.load(x_ptr + e).to(tl.float32)
        g = tl.load(g_ptr + e).to(tl.float32)
    if QDROP:
        keep = _keep(mseed, e_row, e, p, ROWS, VEC, ALIGNED)
        gq = tl.where(keep, 0.0, g)  # kept elements bypass the quantizer
    else:
        gq = g
    if NOISE == 0:
        v = x * inv
        r = _rint(_clamp(v, qmin - 1.0, qmax + 1.0))
        below = r < qmin
        above = r > qmax
        inside = ~(below | above)
        ds_in = r - v
    else:
        below = x <= s * qmin
        above = x >= s * qmax
        inside = ~(below | above)
        ds_in = _noise(seed, e_row, e, counts, cum, total, ROWS, VEC, ALIGNED, NOISE)
    dx = tl.where(inside, gq, 0.0)
    ds = tl.where(inside, ds_in, tl.where(below, qmin, qmax)) * gq
    if QDROP:
        dx = tl.where(keep, g, dx)
    dx = _cast_out(dx, dx_ptr, SOFT_BF16)
    if MASKED:
        tl.store(dx_ptr + e, dx, mask=valid)
        ds = tl.where(valid, ds, 0.0)
    else:
        tl.store(dx_ptr + e, dx)
    return tl.sum(tl.sum(ds, 1), 0)


@triton.jit(do_not_specialize=_SEEDS)
def _bwd_kernel(g_ptr, x_ptr, dx_ptr, scale_ptr, ds_ptr, hist_ptr, seed: tl.int64, mseed: tl.int64, p, qmin,
                qmax, plane, inner, cstride, n_chunks, BLOCK: tl.constexpr, VEC: tl.constexpr,
                LAYOUT: tl.constexpr, ALIGNED: tl.constexpr, NOISE: tl.constexpr, QDROP: tl.constexpr,
                IDX64: tl.constexpr, SOFT_BF16: tl.constexpr):
    """dx, and one partial sum of ds per program at ``ds_ptr[pid]`` (pid = c * n_chunks + chunk): with one
    chunk per channel that is ds itself (stored in ds's dtype), else _sum_partials_kernel finishes it."""
    pid, c, chunk = _program(n_chunks, IDX64)
    s = tl.load(scale_ptr + c).to(tl.float32)
    inv = tl.math.div_rn(1.0, s)
    if NOISE == 2:
        counts, cum, total = _load_hist(hist_ptr, c)
    else:
        counts, cum, total = s, s, s  # unused
    if (chunk + 1) * BLOCK <= plane:
        part = _bwd_tile(g_ptr, x_ptr, dx_ptr, s, inv, qmin, qmax, seed, mseed, p, counts, cum, total, c, chunk,
                         plane, inner, cstride, BLOCK, VEC, LAYOUT, ALIGNED, NOISE, QDROP, SOFT_BF16, False)
    else:
        part = _bwd_tile(g_ptr, x_ptr, dx_ptr, s, inv, qmin, qmax, seed, mseed, p, counts, cum, total, c, chunk,
                         plane, inner, cstride, BLOCK, VEC, LAYOUT, ALIGNED, NOISE, QDROP, SOFT_BF16, True)
    tl.store(ds_ptr + pid, part.to(ds_ptr.dtype.element_ty))


@triton.jit
def _sum_partials_kernel(part_ptr, ds_ptr, C, n_chunks, CB: tl.constexpr, RB: tl.constexpr):
    """ds[c] = sum of part[c, :n_chunks], in a fixed order (so ds is reproducible run to run)."""
    ch = tl.program_id(0) * CB + tl.arange(0, CB)
    acc = tl.zeros([CB, RB], dtype=tl.float32)
    for start in range(0, n_chunks, RB):
        cols = start + tl.arange(0, RB)
        m = (ch[:, None] < C) & (cols[None, :] < n_chunks)
        acc += tl.load(part_ptr + ch[:, None] * n_chunks + cols[None, :], mask=m, other=0.0)
    tl.store(ds_ptr + ch, tl.sum(acc, 1).to(ds_ptr.dtype.element_ty), mask=ch < C)


@triton.jit
def _hist_kernel(x_ptr, scale_ptr, hist_ptr, qmin, qmax, plane, inner, cstride, n_chunks, BLOCK: tl.constexpr,
                 VEC: tl.constexpr, LAYOUT: tl.constexpr, ALIGNED: tl.constexpr, IDX64: tl.constexpr):
    """hist[c] += 256-bin histogram of the rounding errors of this program's elements strictly inside the grid
    (``hdrq.reference.rounding_error_histogram``). Integer atomics: the sum is order independent."""
    pid, c, chunk = _program(n_chunks, IDX64)
    s = tl.load(scale_ptr + c).to(tl.float32)
    inv = tl.math.div_rn(1.0, s)
    e, e_row, valid = _tile(c, chunk, plane, inner, cstride, BLOCK, VEC, LAYOUT, ALIGNED)
    x = tl.load(x_ptr + e, mask=valid, other=0.0).to(tl.float32)
    v = x * inv
    # Elements counted (strictly inside (s*qmin, s*qmax)) have |v| <= qmax + 1, so the clamp before rounding
    # does not change their error.
    err = _rint(_clamp(v, qmin - 1.0, qmax + 1.0)) - v
    b = _clamp(tl.floor((err + 0.5) * 256.0), 0.0, 255.0).to(tl.int32)
    inside = (x > s * qmin) & (x < s * qmax) & valid
    h = tl.histogram(tl.reshape(b, [BLOCK]), 256, mask=tl.reshape(inside, [BLOCK]))
    tl.atomic_add(hist_ptr + c * 256 + tl.arange(0, 256), h, mask=h != 0, sem="relaxed")


@triton.jit(do_not_specialize=_SEEDS)
def _uniform_kernel(out_ptr, seed: tl.int64, n, BLOCK: tl.constexpr, IDX64: tl.constexpr):
    pid = tl.program_id(0)
    if IDX64:
        pid = pid.to(tl.int64)
    e_row = tl.multiple_of(pid * BLOCK + tl.arange(0, BLOCK // 4) * 4, 4)
    e = e_row[:, None] + tl.arange(0, 4)[None, :]
    u = _uniform(_bits24_rows(seed, e_row, BLOCK // 4, 4))
    tl.store(out_ptr + e, u, mask=e < n)


# ==================================================================================================
# Host side: launch plans and the wrappers registered with hdrq.ops
# ==================================================================================================


@dataclass(frozen=True)
class LaunchPlan:
    """How a tensor is split into programs (see the module docstring)."""
    channels: int  # C (1 for a per-tensor scale)
    plane: int  # outer * inner: elements per channel
    inner: int
    cstride: int  # (C - 1) * inner
    block: int
    vec: int
    layout: int
    aligned: bool
    num_warps: int
    idx64: bool

    @property
    def n_chunks(self) -> int:
        return triton.cdiv(self.plane, self.block)

    @property
    def grid(self) -> tuple[int]:
        return (self.channels * self.n_chunks,)

    def meta(self) -> dict:
        return dict(BLOCK=self.block, VEC=self.vec, LAYOUT=self.layout, ALIGNED=self.aligned, IDX64=self.idx64)


def plan(shape, axis: Optional[int], element_size: int, max_block: Optional[int] = None) -> LaunchPlan:
    numel = 1
    for d in shape:
        numel *= d
    if axis is None:
        outer, channels, inner = 1, 1, numel
    else:
        outer, channels, inner = 1, shape[axis], 1
        for d in shape[:axis]:
            outer *= d
        for d in shape[axis + 1:]:
            inner *= d
    vec16 = max(4, 16 // element_size)
    if channels == 1:  # e = t: every sub-row starts at a multiple of VEC
        layout, vec, aligned = 0, vec16, True
        inner = outer * inner
        outer = 1
    else:
        vec = vec16 if inner % vec16 == 0 else 4
        aligned = inner % vec == 0
        layout = 1 if outer == 1 else (2 if aligned else 3)
    plane = outer * inner
    block = block_size(plane, max_block)
    num_warps = max(1, min(8, block // (vec * 64)))
    return LaunchPlan(channels, plane, inner, (channels - 1) * inner, block, vec, layout, aligned, num_warps,
                      runtime.needs_int64(numel))


def _qrange(bits: int, signed: bool) -> tuple[float, float]:
    qmin, qmax = ref.qrange(bits, signed)
    return float(qmin), float(qmax)


_SCALE_DTYPES = runtime.KERNEL_DTYPES + (torch.float64,)


def _prepare(x: torch.Tensor, scale: torch.Tensor):
    return x.contiguous(), scale.reshape(-1).contiguous()


def _histogram(x: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool, lp: LaunchPlan) -> torch.Tensor:
    """Per-channel rounding-error histograms, int32 [C * 256] (zeroed: programs accumulate into it)."""
    qmin, qmax = _qrange(bits, signed)
    hist = torch.zeros(lp.channels * HIST_BINS, dtype=torch.int32, device=x.device)
    _hist_kernel[lp.grid](x, scale, hist, qmin, qmax, lp.plane, lp.inner, lp.cstride, lp.n_chunks,
                          num_warps=lp.num_warps, **lp.meta(), **runtime.LAUNCH_OPTIONS)
    return hist


def rounding_error_histogram(x: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool,
                             axis: Optional[int]) -> torch.Tensor:
    """Triton version of ``hdrq.reference.rounding_error_histogram`` (int64 [C, 256]), for tests."""
    xc, sc = _prepare(x, scale)
    lp = plan(tuple(x.shape), axis, x.element_size())
    if x.numel() == 0:
        return torch.zeros(lp.channels, HIST_BINS, dtype=torch.int64, device=x.device)
    with runtime.device_guard(x):
        return _histogram(xc, sc, bits, signed, lp).reshape(lp.channels, HIST_BINS).to(torch.int64)


def _max_block(noise: int) -> int:
    return min(MAX_BLOCK, HIST_MAX_BLOCK) if noise == HISTOGRAM else MAX_BLOCK


def _forward(x, scale, bits, signed, axis, seed, noise, qdrop, p):
    xc, sc = _prepare(x, scale)
    y = runtime.alloc(x.shape, x.dtype, x.device)
    if x.numel() == 0:
        return y
    lp = plan(tuple(x.shape), axis, x.element_size(), _max_block(noise))
    qmin, qmax = _qrange(bits, signed)
    with runtime.device_guard(x):
        hist = _histogram(xc, sc, bits, signed, lp) if noise == HISTOGRAM else sc
        _fwd_kernel[lp.grid](xc, y, sc, hist, seed, ref.mix_seed(seed, 1) if qdrop else 0, float(p), qmin, qmax,
                             lp.plane, lp.inner, lp.cstride, lp.n_chunks, NOISE=noise, QDROP=qdrop,
                             SOFT_BF16=runtime.soft_bf16(x.dtype), num_warps=lp.num_warps, **lp.meta(),
                             **runtime.LAUNCH_OPTIONS)
    return y


def _backward(grad, x, scale, bits, signed, axis, seed, noise, qdrop, p):
    if grad.shape != x.shape:
        raise ValueError(f"grad must have x's shape {tuple(x.shape)}, got {tuple(grad.shape)}")
    xc, sc = _prepare(x, scale)
    gc = grad.contiguous()
    dx = runtime.alloc(x.shape, x.dtype, x.device)
    ds = runtime.alloc(scale.shape, scale.dtype, scale.device)
    if x.numel() == 0:
        return dx, ds.zero_()
    lp = plan(tuple(x.shape), axis, x.element_size(), _max_block(noise))
    qmin, qmax = _qrange(bits, signed)
    direct = lp.n_chunks == 1
    part = ds.view(-1) if direct else runtime.alloc((lp.channels * lp.n_chunks,), torch.float32, x.device)
    with runtime.device_guard(x):
        hist = _histogram(xc, sc, bits, signed, lp) if noise == HISTOGRAM else sc
        _bwd_kernel[lp.grid](gc, xc, dx, sc, part, hist, seed, ref.mix_seed(seed, 1) if qdrop else 0, float(p),
                             qmin, qmax, lp.plane, lp.inner, lp.cstride, lp.n_chunks, NOISE=noise, QDROP=qdrop,
                             SOFT_BF16=runtime.soft_bf16(x.dtype), num_warps=lp.num_warps, **lp.meta(),
                             **runtime.LAUNCH_OPTIONS)
        if not direct:
            rb = min(runtime.next_pow2(lp.n_chunks), 1024)
            cb = min(max(1, 2048 // rb), runtime.next_pow2(lp.channels))
            _sum_partials_kernel[(triton.cdiv(lp.channels, cb),)](
                part, ds.view(-1), lp.channels, lp.n_chunks, CB=cb, RB=rb, num_warps=4, **runtime.LAUNCH_OPTIONS)
    return dx, ds


# ---- the implementations registered with hdrq.ops (same arguments as hdrq.reference) -------------


def _takes(x, scale, grad=None) -> bool:
    return runtime.takes(x) and runtime.takes(scale, dtypes=_SCALE_DTYPES) and (
        grad is None or runtime.takes(grad, dtypes=_SCALE_DTYPES))


def fake_quant(x, scale, bits, signed, axis):
    if not _takes(x, scale):
        return ref.fake_quant(x, scale, bits, signed, axis)
    return _forward(x, scale, bits, signed, axis, 0, HARD, False, 0.0)


def fake_quant_backward(grad, x, scale, bits, signed, axis):
    if not _takes(x, scale, grad):
        return ref.fake_quant_backward(grad, x, scale, bits, signed, axis)
    return _backward(grad, x, scale, bits, signed, axis, 0, HARD, False, 0.0)


def noise_fake_quant(x, scale, bits, signed, axis, seed, mode):
    if not _takes(x, scale):
        return ref.noise_fake_quant(x, scale, bits, signed, axis, seed, mode)
    return _forward(x, scale, bits, signed, axis, seed, _NOISE_MODES[mode], False, 0.0)


def noise_fake_quant_backward(grad, x, scale, bits, signed, axis, seed, mode):
    if not _takes(x, scale, grad):
        return ref.noise_fake_quant_backward(grad, x, scale, bits, signed, axis, seed, mode)
    return _backward(grad, x, scale, bits, signed, axis, seed, _NOISE_MODES[mode], False, 0.0)


def qdrop_fake_quant(x, scale, bits, signed, axis, seed, p, noise, mode):
    if not _takes(x, scale):
        return ref.qdrop_fake_quant(x, scale, bits, signed, axis, seed, p, noise, mode)
    return _forward(x, scale, bits, signed, axis, seed, _NOISE_MODES[mode] if noise else HARD, True, p)


def qdrop_fake_quant_backward(grad, x, scale, bits, signed, axis, seed, p, noise, mode):
    if not _takes(x, scale, grad):
        return ref.qdrop_fake_quant_backward(grad, x, scale, bits, signed, axis, seed, p, noise, mode)
    return _backward(grad, x, scale, bits, signed, axis, seed, _NOISE_MODES[mode] if noise else HARD, True, p)


def uniform_noise(shape, seed, device):
    shape = [int(d) for d in shape]
    n = 1
    for d in shape:
        n *= d
    out = runtime.alloc(shape, torch.float32, torch.device(device))
    if n == 0:
        return out
    block = block_size(n)
    with runtime.device_guard(out):
        _uniform_kernel[(triton.cdiv(n, block),)](out, seed, n, BLOCK=block, IDX64=runtime.needs_int64(n),
                                                  num_warps=max(1, min(8, block // 256)),
                                                  **runtime.LAUNCH_OPTIONS)
    return out

"""Pure-PyTorch reference implementations of every hdrq op.

These functions are the *definition of correct*: the Triton and CUDA kernels are tested against them
bit for bit where the arithmetic allows it (see the notes on each function), and they are what runs on
CPU tensors and under ``hdrq.set_backend("reference")``. They work on CPU and CUDA tensors alike.

Conventions shared with the kernels (change one, change all):

* A step size ``s`` is applied as ``v = x * (1 / s)`` (the reciprocal first, as
  ``torch.fake_quantize_per_channel_affine`` does), all arithmetic in fp32 (fp64 for fp64 inputs), and the
  result is cast to the input dtype once.
* Rounding is round-half-to-even (``torch.round``).
* Random numbers are Philox4x32-10 keyed by the 64-bit seed, counter = element index // 4, lane =
  element index % 4 (bit-identical to ``triton.language.randint4x(seed, index // 4)``); a 32-bit draw ``r``
  becomes ``u = (r >> 8) * 2**-24 - 0.5``, exactly representable, in [-0.5, 0.5).
* "Element index" is the row-major linear index of the element in the logical shape of ``x``, whatever
  its strides.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """The integer grid ``[qmin, qmax]`` of a ``bits``-bit quantizer."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def broadcast_scale(scale: Tensor, x: Tensor, axis: Optional[int]) -> Tensor:
    """``scale`` reshaped to broadcast against ``x``: a scalar for ``axis=None``, else ``[1,..,C,..,1]``."""
    if axis is None:
        return scale.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


def reduce_to_scale(t: Tensor, scale: Tensor, axis: Optional[int]) -> Tensor:
    """Sum ``t`` (shaped like x) over everything but ``axis``; the result has ``scale``'s shape."""
    if axis is None:
        return t.sum().reshape(scale.shape)
    dims = [d for d in range(t.dim()) if d != axis % t.dim()]
    return t.sum(dim=dims).reshape(scale.shape) if dims else t.reshape(scale.shape)


# --------------------------------------------------------------------------------------------------
# Philox4x32-10, in int64 tensors holding uint32 values
# --------------------------------------------------------------------------------------------------

_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_U32 = 0xFFFFFFFF
SEED_MASK = (1 << 63) - 1  # seeds are taken modulo 2**63 so every backend sees the same non-negative int64


def philox4x32(seed: int, counter: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Four uint32 streams (as int64 tensors) for counters ``counter`` (int64, >= 0) under ``seed``.

    Same as Triton's ``randint4x(seed, counter)``: state ``(c_lo, c_hi, 0, 0)``, key ``(seed_lo, seed_hi)``.

    Each round needs the full 64-bit product of two uint32 values. It is taken as one int64 multiply that wraps
    modulo 2**64 (two's complement, as torch's integer multiply does on CPU and CUDA): the low 64 bits of the
    product are exact, so ``p & 0xFFFFFFFF`` and ``(p >> 32) & 0xFFFFFFFF`` are its two halves even when the
    signed value overflowed. The tests pin this bit for bit to Triton's Philox."""
    seed &= SEED_MASK
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    c0 = counter & _U32
    c1 = (counter >> 32) & _U32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        pb = c2.mul_(_PHILOX_ROUND_B)  # c2 is not needed after this round except through pb
        pa = c0.mul_(_PHILOX_ROUND_A)
        c0 = (pb >> 32).bitwise_and_(_U32).bitwise_xor_(c1).bitwise_xor_(k0)
        c2 = (pa >> 32).bitwise_and_(_U32).bitwise_xor_(c3).bitwise_xor_(k1)
        c1 = pb.bitwise_and_(_U32)
        c3 = pa.bitwise_and_(_U32)
        k0 = (k0 + _PHILOX_KEY_A) & _U32
        k1 = (k1 + _PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


def random_bits24(numel: int, seed: int, device) -> Tensor:
    """The top 24 bits of the Philox draw of every element index in ``[0, numel)``, as int64."""
    counter = torch.arange((numel + 3) // 4, device=device, dtype=torch.int64)
    lanes = torch.stack(philox4x32(seed, counter), dim=1).reshape(-1)[:numel]
    return lanes >> 8


def uniform_noise(shape, seed: int, device) -> Tensor:
    """``u ~ U[-0.5, 0.5)`` in fp32 with 2**24 levels, one per element of ``shape`` (row-major order)."""
    shape = tuple(int(d) for d in shape)
    numel = 1
    for d in shape:
        numel *= d
    bits = random_bits24(numel, seed, device)
    return (bits.to(torch.float32) * 2.0**-24 - 0.5).reshape(shape)


def mix_seed(seed: int, *streams: int) -> int:
    """A new seed for sub-stream(s) ``streams`` of ``seed`` (SplitMix64 finaliser), in [0, 2**63).

    Used for the QDrop drop mask (stream 1 of the noise seed), per-layer and per-step seeds."""
    z = seed & 0xFFFFFFFFFFFFFFFF
    for s in streams:
        z = (z + 0x9E3779B97F4A7C15 * (s + 1)) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
    return z & SEED_MASK


# --------------------------------------------------------------------------------------------------
# Hard fake quantization (LSQ gradients, same as torch._fake_quantize_learnable_per_channel_affine)
# --------------------------------------------------------------------------------------------------


def fake_quant(x: Tensor, scale: Tensor, bits: int, signed: bool, axis: Optional[int]) -> Tensor:
    qmin, qmax = qrange(bits, signed)
    cdt = compute_dtype(x)
    s = broadcast_scale(scale.to(cdt), x, axis)
    r = torch.round(x.to(cdt) * (1.0 / s))
    # Compare-and-select instead of torch.clamp: CUDA's clamp turns -0.0 into +0.0 at qmin = 0 while the CPU's
    # keeps it, and the kernels keep it; this way the reference gives the same signed zeros on every device.
    q = torch.where(r < qmin, qmin, torch.where(r > qmax, qmax, r))
    return (q * s).to(x.dtype)


def fake_quant_backward(grad: Tensor, x: Tensor, scale: Tensor, bits: int, signed: bool,
                        axis: Optional[int]) -> tuple[Tensor, Tensor]:
    """d/dx = 1 where ``qmin <= round(x/s) <= qmax`` else 0; d/ds = ``round(x/s) - x/s`` in range, else
    qmin or qmax; both times ``grad``, d/ds summed per scale."""
    qmin, qmax = qrange(bits, signed)
    cdt = compute_dtype(x)
    s = broadcast_scale(scale.to(cdt), x, axis)
    g = grad.to(cdt)
    v = x.to(cdt) * (1.0 / s)
    r = torch.round(v)
    below, above = r < qmin, r > qmax
    inside = ~(below | above)
    dx = torch.where(inside, g, torch.zeros_like(g))
    ds_elem = torch.where(inside, r - v, torch.where(below, torch.full_like(v, qmin), torch.full_like(v, qmax)))
    ds = reduce_to_scale(ds_elem * g, scale, axis)
    return dx.to(x.dtype), ds.to(scale.dtype)


# --------------------------------------------------------------------------------------------------
# Noise fake quantization
# --------------------------------------------------------------------------------------------------

HIST_BINS = 256


def _grouped(t: Tensor, axis: Optional[int]) -> Tensor:
    """``t`` as ``[groups, elements per group]``: one group per scale."""
    if axis is None:
        return t.reshape(1, -1)
    groups = t.shape[axis]
    return t.movedim(axis, 0).reshape(groups, t.numel() // groups if groups else 0)


def _ungrouped(t: Tensor, like: Tensor, axis: Optional[int]) -> Tensor:
    if axis is None:
        return t.reshape(like.shape)
    moved = list(like.shape)
    moved.insert(0, moved.pop(axis))
    return t.reshape(moved).movedim(0, axis)


def rounding_error_histogram(x: Tensor, scale: Tensor, bits: int, signed: bool,
                             axis: Optional[int]) -> Tensor:
    """Per scale group, the 256-bin histogram (int64 counts) over [-0.5, 0.5] of the rounding errors
    ``round(x/s) - x/s`` of the elements strictly inside the grid (``s*qmin < x < s*qmax``; an element at a
    bound is clamped, gets no noise and is not counted). Shape ``[groups, 256]``.

    Bin of an error e: ``clamp(floor((e + 0.5) * 256), 0, 255)``, computed in fp32."""
    qmin, qmax = qrange(bits, signed)
    xf = x.to(torch.float32)
    s = broadcast_scale(scale.to(torch.float32), x, axis)
    v = xf * (1.0 / s)
    err = torch.round(v) - v
    inside = (xf > s * qmin) & (xf < s * qmax)
    bins = torch.clamp(torch.floor((err + 0.5) * HIST_BINS), 0, HIST_BINS - 1)
    # an element outside the grid counts nothing; its bin (NaN for a non-finite x) must still be a valid index
    bins = torch.where(inside, bins, torch.zeros_like(bins)).to(torch.int64)
    bins_g = _grouped(bins, axis)
    inside_g = _grouped(inside, axis).to(torch.int64)
    groups = bins_g.shape[0]
    flat = bins_g + torch.arange(groups, device=x.device).unsqueeze(1) * HIST_BINS
    counts = torch.zeros(groups * HIST_BINS, dtype=torch.int64, device=x.device)
    counts.scatter_add_(0, flat.reshape(-1), inside_g.reshape(-1))
    return counts.reshape(groups, HIST_BINS)


# 0.5 - 2**-25: the largest fp32 below 0.5. A draw at the very top of bin 255 can round up to 0.5.
U_MAX = 0.4999999701976776


def histogram_noise(x: Tensor, scale: Tensor, bits: int, signed: bool, axis: Optional[int],
                    seed: int) -> Tensor:
    """Noise drawn from each scale group's rounding-error histogram by inverse-CDF sampling.

    With the 24-bit draw ``k`` of an element and its group's integer histogram (cumulative counts ``C``,
    total ``T``): the bin ``b`` is the first with ``k*T < C[b] * 2**24`` (exact integer arithmetic), the
    position inside the bin ``f = fp32(k*T - C[b-1]*2**24) / fp32(count[b] * 2**24)`` (the continuous
    inverse CDF of the piecewise-uniform density), and ``u = min((b - 128)/256 + f/256, U_MAX)``. A group
    with no in-range element falls back to the uniform draw ``k * 2**-24 - 0.5``. Returns fp32 like x."""
    counts = rounding_error_histogram(x, scale, bits, signed, axis)  # [G, 256]
    cum = counts.cumsum(1)
    total = cum[:, -1:]  # [G, 1]
    k = _grouped(random_bits24(x.numel(), seed, x.device).reshape(x.shape), axis)  # [G, n]
    target = k * total
    b = torch.searchsorted(cum << 24, target.contiguous(), right=True).clamp_(max=HIST_BINS - 1)
    prev = torch.where(b > 0, torch.gather(cum, 1, (b - 1).clamp(min=0)), torch.zeros_like(b))
    cnt = torch.gather(counts, 1, b)
    frac = (target - (prev << 24)).to(torch.float32) / (cnt << 24).to(torch.float32)
    u = (b - HIST_BINS // 2).to(torch.float32) * (1.0 / HIST_BINS) + frac * (1.0 / HIST_BINS)
    u = torch.clamp(u, max=U_MAX)
    uniform = k.to(torch.float32) * 2.0**-24 - 0.5
    u = torch.where(total > 0, u, uniform)
    return _ungrouped(u, x, axis)


def quant_noise(x: Tensor, scale: Tensor, bits: int, signed: bool, axis: Optional[int], seed: int,
                mode: str) -> Tensor:
    """The noise ``u`` that ``noise_fake_quant`` adds (fp32, shaped like x)."""
    if mode == "uniform":
        return uniform_noise(x.shape, seed, x.device)
    return histogram_noise(x, scale, bits, signed, axis, seed)


def noise_fake_quant_from_noise(x: Tensor, scale: Tensor, u: Tensor, bits: int, signed: bool,
                                axis: Optional[int]) -> Tensor:
    """``y = x + s*u`` strictly inside the grid (``s*qmin < x < s*qmax``); an element at or beyond a bound is
    set to that bound and gets no noise (the HDRQ authors' rule: post-ReLU zeros on an unsigned grid stay 0)."""
    qmin, qmax = qrange(bits, signed)
    cdt = compute_dtype(x)
    xf = x.to(cdt)
    s = broadcast_scale(scale.to(cdt), x, axis)
    lo, hi = s * qmin, s * qmax
    y = torch.where(xf <= lo, lo, torch.where(xf >= hi, hi, xf + s * u.to(cdt)))
    return y.to(x.dtype)


def noise_fake_quant(x: Tensor, scale: Tensor, bits: int, signed: bool, axis: Optional[int], seed: int,
                     mode: str) -> Tensor:
    u = quant_noise(x, scale, bits, signed, axis, seed, mode)
    return noise_fake_quant_from_noise(x, scale, u, bits, signed, axis)


def noise_fake_quant_backward(grad: Tensor, x: Tensor, scale: Tensor, bits: int, signed: bool,
                              axis: Optional[int], seed: int, mode: str) -> tuple[Tensor, Tensor]:
    """d/dx = 1 strictly inside the grid, else 0; d/ds = u inside, qmin at or below the lower bound, qmax at
    or above the upper one; d/ds summed per scale. The noise is regenerated from the seed (nothing was stored
    by the forward)."""
    qmin, qmax = qrange(bits, signed)
    cdt = compute_dtype(x)
    xf = x.to(cdt)
    g = grad.to(cdt)
    s = broadcast_scale(scale.to(cdt), x, axis)
    lo, hi = s * qmin, s * qmax
    below, above = xf <= lo, xf >= hi
    inside = ~(below | above)
    u = quant_noise(x, scale, bits, signed, axis, seed, mode).to(cdt)
    dx = torch.where(inside, g, torch.zeros_like(g))
    ds_elem = torch.where(inside, u, torch.where(below, torch.full_like(u, qmin), torch.full_like(u, qmax)))
    ds = reduce_to_scale(ds_elem * g, scale, axis)
    return dx.to(x.dtype), ds.to(scale.dtype)


# --------------------------------------------------------------------------------------------------
# QDrop activation quantizer: where(r < p, x, q(x))
# --------------------------------------------------------------------------------------------------


def drop_mask(shape, seed: int, p: float, device) -> Tensor:
    """True where the element keeps its full-precision value: ``r < p`` for ``r ~ U[0, 1)`` drawn from
    stream 1 of ``seed`` (independent of the quantization noise, which uses ``seed`` itself)."""
    r = uniform_noise(shape, mix_seed(seed, 1), device) + 0.5
    return r < p


def qdrop_fake_quant(x: Tensor, scale: Tensor, bits: int, signed: bool, axis: Optional[int], seed: int,
                     p: float, noise: bool, mode: str) -> Tensor:
    q = (noise_fake_quant(x, scale, bits, signed, axis, seed, mode) if noise
         else fake_quant(x, scale, bits, signed, axis))
    return torch.where(drop_mask(x.shape, seed, p, x.device), x, q)


def qdrop_fake_quant_backward(grad: Tensor, x: Tensor, scale: Tensor, bits: int, signed: bool,
                              axis: Optional[int], seed: int, p: float, noise: bool,
                              mode: str) -> tuple[Tensor, Tensor]:
    keep = drop_mask(x.shape, seed, p, x.device)
    gq = torch.where(keep, torch.zeros_like(grad), grad)
    if noise:
        dx, ds = noise_fake_quant_backward(gq, x, scale, bits, signed, axis, seed, mode)
    else:
        dx, ds = fake_quant_backward(gq, x, scale, bits, signed, axis)
    return torch.where(keep, grad, dx).to(x.dtype), ds


# --------------------------------------------------------------------------------------------------
# Deploy-side ops
# --------------------------------------------------------------------------------------------------


def quantize_per_token(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Symmetric dynamic quantization of each row of ``x [M, K]``: ``scale = absmax / qmax`` (fp32),
    ``q = clamp(round(x * (1/scale)), -qmax, qmax)`` as int8; a row of zeros gets scale 0 and q = 0, a row holding
    a NaN or an infinity gets scale NaN and q = 0."""
    qmax = (1 << (bits - 1)) - 1
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1)  # NaN if the row holds one
    # A tensor divisor, not the Python int: torch's CUDA division by a scalar multiplies by its reciprocal,
    # which is not the IEEE quotient the CPU and the kernels compute.
    scale = amax / torch.full_like(amax, qmax)
    finite = torch.isfinite(scale)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    q = torch.clamp(torch.round(xf * inv.unsqueeze(-1)), -qmax, qmax)
    q = torch.where(finite.unsqueeze(-1), q, torch.zeros_like(q))
    return q.to(torch.int8), scale


def quantize_per_tensor(x: Tensor, scale: Tensor, bits: int, signed: bool, zero_point: int) -> Tensor:
    """Static quantization with one step size: ``clamp(round(x * (1/s)), qmin, qmax) + zero_point`` as int8, in
    fp32 (fp64 for fp64 x) with the reciprocal first, as :func:`fake_quant`. NaN becomes ``zero_point``."""
    qmin, qmax = qrange(bits, signed)
    cdt = compute_dtype(x)
    v = torch.round(x.to(cdt) * (1.0 / scale.to(cdt).reshape(())))
    q = torch.where(v < qmin, qmin, torch.where(v > qmax, qmax, v))
    q = torch.where(torch.isnan(q), torch.zeros_like(q), q)
    return (q + zero_point).to(torch.int8)


def pack_int6(q: Tensor) -> Tensor:
    """Pack int6 values (int8 tensor in [-32, 31], last dim K a multiple of 4) into ``[..., 3K/4]`` uint8.

    Four values ``v0..v3`` (6-bit two's complement each) form the 24-bit word
    ``v0 | v1 << 6 | v2 << 12 | v3 << 18``, stored little-endian in three bytes."""
    k = q.shape[-1]
    v = (q.to(torch.int32) & 0x3F).reshape(*q.shape[:-1], k // 4, 4)
    word = v[..., 0] | (v[..., 1] << 6) | (v[..., 2] << 12) | (v[..., 3] << 18)
    packed = torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dim=-1)
    return packed.reshape(*q.shape[:-1], 3 * (k // 4)).to(torch.uint8)


def unpack_int6(packed: Tensor, shape) -> Tensor:
    """Inverse of :func:`pack_int6`: int8 tensor of ``shape``."""
    shape = tuple(int(d) for d in shape)
    b = packed.to(torch.int32).reshape(*shape[:-1], shape[-1] // 4, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    v = torch.stack([(word >> (6 * i)) & 0x3F for i in range(4)], dim=-1)
    v = torch.where(v >= 32, v - 64, v)
    return v.reshape(shape).to(torch.int8)


# The kernel weight layout (pack_weight). Shared constants: csrc/gemm_device.cuh (kUnitK, the panel and plane
# geometry) mirrors them.
GEMM_PANEL_ROWS = 16   # output channels per panel: two n8 blocks of mma.m16n8k32
GEMM_UNIT_K = 32       # reduction length of one unit: the k of mma.m16n8k32
GEMM_PLANE_BYTES = 128  # one 8 x 16-byte core matrix; lane l of a warp owns bytes [4l, 4l + 4)


def gemm_layout_geometry(bits: int, n: int, k: int) -> dict:
    """Where the three regions of the :func:`pack_weight` layout lie, in bytes (see its docstring)."""
    npf, kuf = n // GEMM_PANEL_ROWS, k // GEMM_UNIT_K
    unit_bytes = 4 * GEMM_PLANE_BYTES if bits == 8 else 3 * GEMM_PLANE_BYTES
    k_tail = k - GEMM_UNIT_K * kuf

    def row_bytes(kk: int) -> int:
        return kk if bits == 8 else 3 * kk // 4

    units_end = npf * kuf * unit_bytes
    return {"full_panels": npf, "full_units": kuf, "unit_bytes": unit_bytes, "k_tail": k_tail,
            "tail_start": units_end, "rest_start": units_end + GEMM_PANEL_ROWS * npf * row_bytes(k_tail),
            "total": n * row_bytes(k)}


def _canonical_bytes(q: Tensor, bits: int) -> Tensor:
    """Row-major bytes of ``q``: raw int8 for 8 bits, :func:`pack_int6` for 6 bits; flattened uint8."""
    if bits == 8:
        return q.contiguous().view(torch.uint8).reshape(-1)
    return pack_int6(q).reshape(-1)


def from_canonical_bytes(b: Tensor, bits: int, rows: int, cols: int) -> Tensor:
    """Int8 ``[rows, cols]`` from row-major canonical bytes (raw int8, or ``pack_int6`` for 6 bits): the tail
    regions of the :func:`pack_weight` layout."""
    if bits == 8:
        return b.view(torch.int8).reshape(rows, cols)
    return unpack_int6(b.reshape(rows, 3 * cols // 4), (rows, cols))


def pack_weight(q: Tensor, bits: int) -> Tensor:
    """The weight layout of ``int_matmul`` (the CUDA GEMM's operand B), from int8 weights ``q [N, K]``.

    The result has the dtype and shape of the canonical format (int8 ``[N, K]`` for 8 bits, uint8
    ``[N, 3K/4]`` for 6 bits) but its bytes are permuted, so that every warp of the GEMM reads its
    ``mma.m16n8k32`` B fragments with conflict-free 16-byte loads. It is a pure byte permutation computed
    with ordinary tensor ops, identical on every device (a packed weight moves between CPU and GPU).
    ``pack_int6`` stays the save format; :func:`unpack_weight` inverts this.

    Three regions, in this order (``NPf = N // 16`` full panels, ``KUf = K // 32`` full units):

    1. *Units*: for ``u`` in ``range(KUf)``, for panel ``p`` in ``range(NPf)``: the unit of rows
       ``16p .. 16p+15`` and columns ``32u .. 32u+31``. A unit is made of four 128-byte *planes*
       (8 x 16-byte core matrices, row-major): plane ``c = 2h + j`` holds rows ``16p + 8h + g`` (g < 8) and
       columns ``32u + 16j + 4t + b`` (t, b < 4) at byte ``16g + 4t + b``. So lane ``l = 4g + t`` of a warp
       finds its ``mma.m16n8k32`` B fragment of n8 block h (``b0`` = plane 2h, ``b1`` = plane 2h+1) at
       byte ``4l`` of the planes: one ``ldmatrix.x4`` per unit. 8 bits: the four planes, 512 bytes.
       6 bits: three planes, 384 bytes, with ``x_c`` the 6-bit two's-complement code of plane c's value:
       ``P_q = (x_q << 2) | ((x_3 >> (4 - 2q)) & 3)`` per byte (q < 3). The kernel rebuilds
       ``4 * value`` per byte with masks and shifts only (``P_q & 0xFC`` and the low two bits of the three
       planes), multiplies with that, and shifts the int32 accumulator right by 2 (exact).
    2. *K tail* of the full panels: rows ``0 .. 16*NPf - 1``, columns ``32*KUf .. K-1``, row-major
       canonical bytes (raw int8, or ``pack_int6`` of those columns).
    3. *N tail*: rows ``16*NPf .. N-1``, all columns, row-major canonical bytes.

    Matrices with N < 16 or K < 32 are therefore stored exactly as in the canonical format.
    """
    n, k = q.shape
    geo = gemm_layout_geometry(bits, n, k)
    npf, kuf = geo["full_panels"], geo["full_units"]
    rows_f, cols_f = GEMM_PANEL_ROWS * npf, GEMM_UNIT_K * kuf
    parts = []
    if npf and kuf:
        # [p, h, g, u, j, t, b] -> [u, p, h, j, g, t, b]: unit (u, p), plane (h, j), byte (g, t, b)
        t = q[:rows_f, :cols_f].reshape(npf, 2, 8, kuf, 2, 4, 4).permute(3, 0, 1, 4, 2, 5, 6)
        planes = t.reshape(kuf, npf, 4, GEMM_PLANE_BYTES)
        if bits == 8:
            parts.append(planes.contiguous().view(torch.uint8).reshape(-1))
        else:
            x = planes.to(torch.int32) & 0x3F
            shift = torch.tensor([4, 2, 0], dtype=torch.int32, device=q.device).reshape(3, 1)
            p = (x[:, :, :3] << 2) | ((x[:, :, 3:] >> shift) & 0x3)
            parts.append(p.to(torch.uint8).reshape(-1))
    parts.append(_canonical_bytes(q[:rows_f, cols_f:], bits))
    parts.append(_canonical_bytes(q[rows_f:, :], bits))
    flat = torch.cat(parts)
    if bits == 8:
        return flat.view(torch.int8).reshape(n, k)
    return flat.reshape(n, 3 * k // 4)


def unpack_weight(w: Tensor, bits: int, n: int, k: int) -> Tensor:
    """Inverse of :func:`pack_weight`: int8 ``[N, K]``."""
    geo = gemm_layout_geometry(bits, n, k)
    npf, kuf = geo["full_panels"], geo["full_units"]
    rows_f, cols_f = GEMM_PANEL_ROWS * npf, GEMM_UNIT_K * kuf
    flat = w.reshape(-1).view(torch.uint8)
    q = torch.empty((n, k), dtype=torch.int8, device=w.device)
    if npf and kuf:
        units = flat[: geo["tail_start"]].reshape(kuf, npf, -1, GEMM_PLANE_BYTES)
        if bits == 8:
            planes = units.view(torch.int8)
        else:
            p = units.to(torch.int32)
            x3 = (((p[:, :, 0] & 3) << 4) | ((p[:, :, 1] & 3) << 2) | (p[:, :, 2] & 3)).unsqueeze(2)
            x = torch.cat([p >> 2, x3], dim=2)  # 6-bit codes of the four planes
            planes = torch.where(x >= 32, x - 64, x).to(torch.int8)
        # [u, p, h, j, g, t, b] -> [p, h, g, u, j, t, b]
        q[:rows_f, :cols_f] = planes.reshape(kuf, npf, 2, 2, 8, 4, 4).permute(1, 2, 4, 0, 3, 5, 6).reshape(
            rows_f, cols_f)
    q[:rows_f, cols_f:] = from_canonical_bytes(flat[geo["tail_start"]: geo["rest_start"]], bits, rows_f,
                                                k - cols_f)
    q[rows_f:, :] = from_canonical_bytes(flat[geo["rest_start"]:], bits, n - rows_f, k)
    return q


def int_matmul_acc(a_q: Tensor, w_q: Tensor) -> Tensor:
    """Exact int32 ``a_q [M, K] @ w_q [N, K]^T``. Products are summed in float64, which is exact while
    ``|acc| < 2**53`` (always, for int8 inputs and K < 2**38)."""
    acc = a_q.to(torch.float64) @ w_q.to(torch.float64).t()
    return acc.to(torch.int32)


def int_matmul(a_q: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, w_bits: int,
               bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """``out = fp32(acc) * a_scale[:, None] * w_scale[None, :] + bias``, in fp32 in that order, cast once.
    ``a_scale`` has M entries (per token) or one (per tensor)."""
    n, k = w_scale.shape[0], a_q.shape[1]
    acc = int_matmul_acc(a_q, unpack_weight(w, w_bits, n, k)).to(torch.float32)
    out = acc * a_scale.to(torch.float32).reshape(-1, 1) * w_scale.to(torch.float32).reshape(1, -1)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)


def int_matmul_int32(a_q: Tensor, w: Tensor, w_bits: int, n: int) -> Tensor:
    """The int32 accumulator of ``int_matmul``: ``a_q @ unpack_weight(w)^T`` exactly."""
    return int_matmul_acc(a_q, unpack_weight(w, w_bits, n, a_q.shape[1]))

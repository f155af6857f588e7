"""CPU emulation of csrc/gemm_mma.cu, statement by statement, to prove its index math without a GPU.

Every function below mirrors the CUDA function of the same name (same variables, same formulas): the
loaders (which 16-byte chunk each thread copies where, the zero-filled edges, the edge units rebuilt from
the canonical regions), the pipeline (which k-tile goes into which stage), the fragment loads and the
split-K reduction. The hardware instructions are emulated from their *definitions*, independently of the
layout code: ``ldmatrix`` from the PTX ISA description, ``mma.m16n8k32.s8`` from the fragment maps of the
PTX ISA (the same maps CuTe encodes as ``SM80_16x8x32_S32S8S8S32_TN``). So if pack_weight and the kernel
disagreed about where a weight lies, or the kernel fed the tensor cores the wrong bytes, the emulated
accumulator would differ from the reference.

The tile configurations are parsed from the CUDA sources, so the emulator always runs what is compiled.
"""
from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass

import numpy as np

CSRC = pathlib.Path(__file__).resolve().parents[1] / "csrc"

PANEL_ROWS, UNIT_K, PLANE_BYTES = 16, 32, 128


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Traits:
    """MmaTraits<BITS, MF, WM, WN, NPW, BKU, STAGES> of gemm_mma.cu."""

    BITS: int
    MF: int
    WM: int
    WN: int
    NPW: int
    BKU: int
    STAGES: int

    @property
    def threads(self): return 32 * self.WM * self.WN

    @property
    def BM(self): return 16 * self.MF * self.WM

    @property
    def BN(self): return 16 * self.NPW * self.WN

    @property
    def BK(self): return 32 * self.BKU

    @property
    def panels(self): return self.BN // 16

    @property
    def unit_bytes(self): return 4 * PLANE_BYTES if self.BITS == 8 else 3 * PLANE_BYTES

    @property
    def a_stride(self): return self.BK + 16

    @property
    def a_stage_bytes(self): return self.BM * self.a_stride

    @property
    def b_stage_bytes(self): return self.BKU * self.panels * self.unit_bytes

    @property
    def stage_bytes(self): return self.a_stage_bytes + self.b_stage_bytes

    @property
    def a_chunks(self): return self.BM * self.BK // 16

    @property
    def b_chunks(self): return self.b_stage_bytes // 16

    @property
    def chunks_per_unit(self): return self.unit_bytes // 16

    @property
    def NB(self): return 2 * self.NPW


def parse_configs() -> dict[int, tuple[int, ...]]:
    """{config index: (MF, WM, WN, NPW, BKU, STAGES)} from csrc/gemm.h and csrc/gemm_mma.cu."""
    header = (CSRC / "gemm.h").read_text()
    index = {name: int(v) for name, v in re.findall(r"(kMma\w+)\s*=\s*(\d+)", header)}
    src = (CSRC / "gemm_mma.cu").read_text()
    aliases = {name: tuple(int(x) for x in args.split(","))
               for name, args in re.findall(r"using (\w+) = MmaTraits<B,\s*([\d,\s]+)>;", src)}
    cases = re.findall(r"case (kMma\w+): return f\((\w+)<B>\{\}\);", src)
    default = re.search(r"default: return f\((\w+)<B>\{\}\);", src).group(1)
    configs = {index[name]: aliases[alias] for name, alias in cases}
    covered = set(configs)
    for i in range(index["kMmaNumConfigs"]):
        if i not in covered:
            configs[i] = aliases[default]
    return configs


def traits(config: int, bits: int) -> Traits:
    return Traits(bits, *parse_configs()[config])


# ------------------------------------------------------------------------------------------- layout (gemm_device.cuh)


@dataclass(frozen=True)
class Geometry:
    n: int
    k: int
    full_panels: int
    full_units: int
    k_tail: int
    tail_start: int
    rest_start: int


def unit_bytes(bits):
    return 4 * PLANE_BYTES if bits == 8 else 3 * PLANE_BYTES


def row_bytes(bits, cols):
    return cols if bits == 8 else 3 * cols // 4


def geometry(bits, n, k) -> Geometry:
    full_panels, full_units = n // PANEL_ROWS, k // UNIT_K
    k_tail = k - UNIT_K * full_units
    tail_start = full_panels * full_units * unit_bytes(bits)
    rest_start = tail_start + PANEL_ROWS * full_panels * row_bytes(bits, k_tail)
    return Geometry(n, k, full_panels, full_units, k_tail, tail_start, rest_start)


def unit_offset(bits, g: Geometry, u, p):
    return (u * g.full_panels + p) * unit_bytes(bits)


def edge_weight(bits, w: np.ndarray, g: Geometry, row, col) -> int:
    if row >= g.n or col >= g.k:
        return 0
    if row < PANEL_ROWS * g.full_panels:
        assert col >= UNIT_K * g.full_units, "edge_weight precondition: not inside a full unit"
        line = g.tail_start + row * row_bytes(bits, g.k_tail)
        c = col - UNIT_K * g.full_units
    else:
        line = g.rest_start + (row - PANEL_ROWS * g.full_panels) * row_bytes(bits, g.k)
        c = col
    if bits == 8:
        return int(w[line + c].astype(np.int8))
    grp = line + 3 * (c >> 2)
    word = int(w[grp]) | (int(w[grp + 1]) << 8) | (int(w[grp + 2]) << 16)
    v = (word >> (6 * (c & 3))) & 0x3F
    return v - 64 if v >= 32 else v


def edge_chunk(bits, w, n, k, u, p, off) -> np.ndarray:
    g = geometry(bits, n, k)
    plane = off // PLANE_BYTES
    grow = (off % PLANE_BYTES) // 16
    out = np.zeros(16, dtype=np.uint8)
    if bits == 8:
        row = PANEL_ROWS * p + 8 * (plane >> 1) + grow
        col = UNIT_K * u + 16 * (plane & 1)
        for i in range(4):
            for b in range(4):
                out[4 * i + b] = edge_weight(8, w, g, row, col + 4 * i + b) & 0xFF
    else:
        row_q = PANEL_ROWS * p + 8 * (plane >> 1) + grow
        col_q = UNIT_K * u + 16 * (plane & 1)
        row_3 = PANEL_ROWS * p + 8 + grow
        col_3 = UNIT_K * u + 16
        shift = 4 - 2 * plane
        for i in range(4):
            for b in range(4):
                xq = edge_weight(6, w, g, row_q, col_q + 4 * i + b) & 0x3F
                x3 = edge_weight(6, w, g, row_3, col_3 + 4 * i + b) & 0x3F
                out[4 * i + b] = ((xq << 2) | ((x3 >> shift) & 0x3)) & 0xFF
    return out


def expand6(p0, p1, p2):
    """Vectorised over lanes (uint32 arrays)."""
    r0 = p0 & 0xFCFCFCFC
    r1 = p1 & 0xFCFCFCFC
    r2 = p2 & 0xFCFCFCFC
    r3 = (((p0 & 0x03030303) << 6) | ((p1 & 0x03030303) << 4) | ((p2 & 0x03030303) << 2)) & 0xFFFFFFFF
    return [r0.astype(np.uint32), r1.astype(np.uint32), r2.astype(np.uint32), r3.astype(np.uint32)]


# ------------------------------------------------------------------------------------------- instructions (from their definitions)


_LANES = np.arange(32)


def _u32(byte_rows: np.ndarray) -> np.ndarray:
    """[32, 4] uint8 -> [32] uint32, byte 0 in bits 0-7."""
    return np.ascontiguousarray(byte_rows, dtype=np.uint8).view("<u4").reshape(32).astype(np.uint32)


def ldmatrix_x4(smem: np.ndarray, addrs: np.ndarray) -> list[np.ndarray]:
    """PTX ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8i..8i+7 hold the addresses of the 8 rows (16
    bytes each) of matrix i; lane l receives in register i the b16 pair at columns 2*(l%4), 2*(l%4)+1 of
    row l/4 of matrix i, i.e. bytes 4*(l%4) .. 4*(l%4)+3 of that row."""
    addrs = np.asarray(addrs)
    assert addrs.shape == (32,) and np.all(addrs % 16 == 0), "ldmatrix rows must be 16-byte aligned"
    regs = []
    for i in range(4):
        row_addr = addrs[8 * i + _LANES // 4]
        idx = row_addr[:, None] + 4 * (_LANES % 4)[:, None] + np.arange(4)[None, :]
        regs.append(_u32(smem[idx]))
    return regs


def ld_shared_u32(smem: np.ndarray, addrs: np.ndarray) -> np.ndarray:
    addrs = np.asarray(addrs)
    assert np.all(addrs % 4 == 0)
    return _u32(smem[addrs[:, None] + np.arange(4)[None, :]])


def _bytes_s8(reg: np.ndarray) -> np.ndarray:
    """[32] uint32 -> [32, 4] int64 (signed bytes, element 0 in bits 0-7)."""
    return np.ascontiguousarray(reg, dtype="<u4").view(np.int8).reshape(32, 4).astype(np.int64)


# Fragment maps of mma.m16n8k32 with .s8 operands, from the PTX ISA (groupID g = lane >> 2,
# threadID_in_group t = lane % 4; element i of a fragment is byte i % 4 of register i // 4):
#   A (16x32): a_i, i < 16 -> row g + 8 * ((i // 4) % 2), col 4t + i % 4 + 16 * (i // 8)
#   B (32x8):  b_i, i < 8  -> row (k) 4t + i % 4 + 16 * (i // 4), col (n) g
#   C (16x8):  c_i, i < 4  -> row g + 8 * (i // 2), col 2t + i % 2
_G, _T = (_LANES >> 2)[:, None], (_LANES & 3)[:, None]
_I16, _I8, _I4 = np.arange(16)[None, :], np.arange(8)[None, :], np.arange(4)[None, :]
_A_ROW, _A_COL = _G + 8 * ((_I16 // 4) % 2), 4 * _T + _I16 % 4 + 16 * (_I16 // 8)
_B_ROW, _B_COL = 4 * _T + _I8 % 4 + 16 * (_I8 // 4), np.broadcast_to(_G, (32, 8))
_C_ROW, _C_COL = _G + 8 * (_I4 // 2), 2 * _T + _I4 % 2


def mma_s8_16832(d: np.ndarray, a: list[np.ndarray], b0: np.ndarray, b1: np.ndarray) -> None:
    """mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32: d [32 lanes, 4] += A (16x32) @ B (32x8)."""
    av = np.concatenate([_bytes_s8(r) for r in a], axis=1)      # [32, 16]: element i = byte i%4 of reg i//4
    bv = np.concatenate([_bytes_s8(b0), _bytes_s8(b1)], axis=1)  # [32, 8]
    A = np.full((16, 32), 1 << 40, dtype=np.int64)  # every element must be written exactly once
    B = np.full((32, 8), 1 << 40, dtype=np.int64)
    A[_A_ROW, _A_COL] = av
    B[_B_ROW, _B_COL] = bv
    assert A.max() < (1 << 40) and B.max() < (1 << 40), "fragment maps do not cover the tile"
    C = A @ B
    d[:] = (d.astype(np.int64) + C[_C_ROW, _C_COL]).astype(np.int32)


# ------------------------------------------------------------------------------------------- the kernel


@dataclass
class Problem:
    a: np.ndarray        # flat int8 global memory holding A
    a_base: int          # element offset of A[0, 0] (alignment = a_base % 16 for a 16-aligned buffer)
    lda: int
    w: np.ndarray        # flat uint8: pack_weight bytes
    m: int
    n: int
    k: int
    bits: int
    a_scale: np.ndarray = None  # float32 [M] or [1]; None with w_scale None: int32 output
    w_scale: np.ndarray = None  # float32 [N]
    bias: np.ndarray = None     # float32 [N] or None


def load_a_bytes(P: Problem, m, k) -> np.ndarray:
    out = np.zeros(16, dtype=np.uint8)
    if m < P.m:
        src = P.a_base + m * P.lda
        for b in range(16):
            if k + b < P.k:
                out[b] = P.a[src + k + b].view(np.uint8)
    return out


def load_stage(T: Traits, P: Problem, smem, sA, sB, m0, n0, kt, a_vec, log):
    k0 = kt * T.BK
    for i in range(cdiv(T.a_chunks, T.threads)):
        for tid in range(T.threads):
            c = tid + i * T.threads
            if T.a_chunks % T.threads == 0 or c < T.a_chunks:
                row = c // (T.BK // 16)
                col = (c % (T.BK // 16)) * 16
                m = m0 + row
                k = k0 + col
                dst = sA + row * T.a_stride + col
                log.append(("A", dst))
                if a_vec:
                    left = P.k - k
                    nbytes = (16 if left >= 16 else (left if left > 0 else 0)) if m < P.m else 0
                    src = P.a_base + m * P.lda + k if nbytes > 0 else P.a_base
                    assert src % 16 == 0, "cp.async 16 needs a 16-byte aligned source"
                    assert 0 <= src and src + nbytes <= len(P.a), "A read out of bounds"
                    smem[dst: dst + 16] = 0
                    smem[dst: dst + nbytes] = P.a[src: src + nbytes].view(np.uint8)
                else:
                    smem[dst: dst + 16] = load_a_bytes(P, m, k)
    g = geometry(T.BITS, P.n, P.k)
    p0 = n0 // PANEL_ROWS
    for i in range(cdiv(T.b_chunks, T.threads)):
        for tid in range(T.threads):
            c = tid + i * T.threads
            if T.b_chunks % T.threads == 0 or c < T.b_chunks:
                unit = c // T.chunks_per_unit
                off = (c % T.chunks_per_unit) * 16
                ku = unit // T.panels
                pl = unit % T.panels
                u = kt * T.BKU + ku
                pn = p0 + pl
                dst = sB + unit * T.unit_bytes + off
                log.append(("B", dst))
                if pn < g.full_panels and u < g.full_units:
                    src = unit_offset(T.BITS, g, u, pn) + off
                    assert src % 16 == 0 and src + 16 <= len(P.w)
                    smem[dst: dst + 16] = P.w[src: src + 16]
                else:
                    smem[dst: dst + 16] = edge_chunk(T.BITS, P.w, P.n, P.k, u, pn, off)


def run_block(T: Traits, P: Problem, bx, by, bz, grid_z, partials, counters, grid_x, out) -> None:
    """One thread block of gemm_mma_kernel; returns after writing its outputs (or its partial)."""
    smem = np.full(T.STAGES * T.stage_bytes, 0xA5, dtype=np.uint8)  # garbage, as on the GPU
    m0, n0 = by * T.BM, bx * T.BN
    kt_total = cdiv(P.k, T.BK)
    kt_begin = kt_total * bz // grid_z
    kt_end = kt_total * (bz + 1) // grid_z
    nkt = kt_end - kt_begin
    a_vec = (P.lda % 16 == 0) and (P.a_base % 16 == 0)
    warps = T.WM * T.WN
    acc = np.zeros((warps, T.MF, T.NB, 32, 4), dtype=np.int32)

    def stage_a(s): return s * T.stage_bytes
    def stage_b(s): return s * T.stage_bytes + T.a_stage_bytes

    log = []
    loaded = {}
    for s in range(T.STAGES - 1):
        if s < nkt:
            load_stage(T, P, smem, stage_a(s), stage_b(s), m0, n0, kt_begin + s, a_vec, log)
            loaded[s] = kt_begin + s
    lanes = np.arange(32)
    for it in range(nkt):
        nxt = it + T.STAGES - 1
        if nxt < nkt:
            s = nxt % T.STAGES
            assert s != it % T.STAGES, "the stage being loaded is the one being read"
            load_stage(T, P, smem, stage_a(s), stage_b(s), m0, n0, kt_begin + nxt, a_vec, log)
            loaded[s] = kt_begin + nxt
        assert loaded[it % T.STAGES] == kt_begin + it, "stage holds the wrong k-tile"
        sA, sB = stage_a(it % T.STAGES), stage_b(it % T.STAGES)
        for warp in range(warps):
            warp_m, warp_n = warp // T.WN, warp % T.WN
            a_row = warp_m * T.MF * 16 + (lanes & 7) + 8 * ((lanes >> 3) & 1)
            a_col = 16 * (lanes >> 4)
            b_plane_off = (lanes >> 3) * PLANE_BYTES + (lanes & 7) * 16
            for ku in range(T.BKU):
                af = [ldmatrix_x4(smem, sA + (a_row + 16 * mf) * T.a_stride + 32 * ku + a_col) for mf in range(T.MF)]
                bf = []
                for np_ in range(T.NPW):
                    unit = sB + (ku * T.panels + warp_n * T.NPW + np_) * T.unit_bytes
                    if T.BITS == 8:
                        bf.append(ldmatrix_x4(smem, unit + b_plane_off))
                    else:
                        q0 = ld_shared_u32(smem, unit + 4 * lanes)
                        q1 = ld_shared_u32(smem, unit + PLANE_BYTES + 4 * lanes)
                        q2 = ld_shared_u32(smem, unit + 2 * PLANE_BYTES + 4 * lanes)
                        bf.append(expand6(q0, q1, q2))
                for mf in range(T.MF):
                    for np_ in range(T.NPW):
                        for h in range(2):
                            mma_s8_16832(acc[warp, mf, 2 * np_ + h], af[mf], bf[np_][2 * h], bf[np_][2 * h + 1])

    g_, t_ = lanes >> 2, lanes & 3

    def row_of(warp, mf, r): return (warp // T.WN) * T.MF * 16 + 16 * mf + g_ + 8 * (r >> 1)
    def col_of(warp, nb, r): return ((warp % T.WN) * T.NB + nb) * 8 + 2 * t_ + (r & 1)

    if grid_z > 1:
        tile = by * grid_x + bx
        tile_elems = T.BM * T.BN
        base = (tile * grid_z + bz) * tile_elems
        for warp in range(warps):
            for mf in range(T.MF):
                for nb in range(T.NB):
                    for r in range(4):
                        rows, cols = row_of(warp, mf, r), col_of(warp, nb, r)
                        ok = m0 + rows < P.m
                        partials[base + rows[ok] * T.BN + cols[ok]] = acc[warp, mf, nb][ok, r]
        counters[tile] += 1
        if counters[tile] != grid_z:
            return
        for z in range(grid_z):
            if z == bz:
                continue
            other = (tile * grid_z + z) * tile_elems
            for warp in range(warps):
                for mf in range(T.MF):
                    for nb in range(T.NB):
                        for r in range(4):
                            rows, cols = row_of(warp, mf, r), col_of(warp, nb, r)
                            ok = m0 + rows < P.m
                            acc[warp, mf, nb][ok, r] += partials[other + rows[ok] * T.BN + cols[ok]]
        counters[tile] = 0

    for warp in range(warps):
        for mf in range(T.MF):
            for nb in range(T.NB):
                for hr in range(2):
                    v0 = acc[warp, mf, nb][:, 2 * hr].copy()
                    v1 = acc[warp, mf, nb][:, 2 * hr + 1].copy()
                    if T.BITS == 6:
                        assert np.all(v0 % 4 == 0) and np.all(v1 % 4 == 0), "6-bit accumulator not 4 * acc"
                        v0 >>= 2
                        v1 >>= 2
                    m = m0 + row_of(warp, mf, 2 * hr)
                    n = n0 + col_of(warp, nb, 2 * hr)
                    for lane in range(32):
                        store_pair(P, out, m[lane], n[lane], v0[lane], v1[lane])


def scale_one(P: Problem, acc, sa, n):
    f32 = np.float32
    v = f32(f32(f32(acc) * sa) * P.w_scale[n])
    if P.bias is not None:
        v = f32(v + P.bias[n])
    return v


def store_pair(P: Problem, out, m, n, v0, v1):
    if m >= P.m or n >= P.n:
        return
    two = n + 1 < P.n
    if P.w_scale is None:  # int32 output: the accumulator
        out[m, n] = v0
        if two:
            out[m, n + 1] = v1
        return
    sa = P.a_scale[m if len(P.a_scale) == P.m and P.m != 1 else 0]
    out[m, n] = scale_one(P, v0, sa, n)
    if two:
        out[m, n + 1] = scale_one(P, v1, sa, n + 1)


def run_kernel(T: Traits, P: Problem, splits: int, order=None) -> np.ndarray:
    """The whole grid (ceil(N/BN), ceil(M/BM), splits), blocks in `order` (default: z fastest, so split-K
    partials arrive in every order across tiles). Returns the int32 accumulator, or the fp32 output when
    P has scales; unwritten entries keep a sentinel (int32) or NaN (fp32)."""
    if P.w_scale is None:
        out = np.full((P.m, P.n), np.int32(-0x5A5A5A5B), dtype=np.int32)
    else:
        out = np.full((P.m, P.n), np.nan, dtype=np.float32)
    gx, gy = cdiv(P.n, T.BN), cdiv(P.m, T.BM)
    partials = np.full(gx * gy * splits * T.BM * T.BN, 0x7B7B7B7B, dtype=np.int32)
    counters = np.zeros(gx * gy, dtype=np.int32)
    blocks = [(bx, by, bz) for by in range(gy) for bx in range(gx) for bz in range(splits)]
    if order is not None:
        blocks = [blocks[i] for i in order(len(blocks))]
    for bx, by, bz in blocks:
        run_block(T, P, bx, by, bz, splits, partials, counters, gx, out)
    assert np.all(counters == 0), "split-K counters must be left at zero"
    return out

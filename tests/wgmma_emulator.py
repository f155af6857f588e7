"""CPU emulation of csrc/gemm_wgmma.cu: what its producer puts in shared memory and what its wgmma reads.

Mirrors the kernel's index math (step -> tile, TMA box coordinates, bulk-copy sources, the 6-bit staging
items and their expansion, descriptor start addresses, epilogue indices) and emulates the hardware from
its definitions, independently of the kernel:

* TMA with CU_TENSOR_MAP_SWIZZLE_128B: box row r, byte x lands at r*128 + ((x//16) ^ (r%8))*16 + x%16 of a
  1024-byte aligned tile; out-of-bounds elements are zero.
* wgmma shared-memory operands, K-major, as CuTe's make_gmma_desc documents them (units of 16 bytes):
  no swizzle  ((8,n),2):((1,SBO),LBO);   128B swizzle  Swizzle<3,4,3> o ((8,n),2):((8,SBO),1),
  the swizzle applied to the byte address (bits 4-6 ^= bits 7-9).
* the m64nNk32 s32 accumulator layout, CuTe's CLayout_64xN:
  ((4,8,4),(2,2,N/8)):((128,1,16),(64,8,512)) over (M 64, N) column-major.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

import gemm_emulator as E

SRC = (E.CSRC / "gemm_wgmma.cu").read_text()


def _const(name: str) -> int:
    m = re.search(rf"\b{name} = (\d+)", SRC)
    assert m, name
    return int(m.group(1))


BM, BK = int(re.search(r"kBM = kDecode \? \d+ : (\d+);", SRC).group(1)), _const("kBK")
LOOKAHEAD = int(re.search(r"kLookahead = (\d+)", SRC).group(1))
BKU = BK // 32
A_STAGE = BM * BK
SLOTS = LOOKAHEAD + 1
# WgTraits: the tile width and stages of each configuration
WIDE_BN, NARROW_BN = (int(x) for x in re.search(r"kBN = kWide \? (\d+) : (\d+);", SRC).groups())
WIDE6_STAGES, STAGES = (int(x) for x in re.search(
    r"kStages = \(kWide \|\| kDecode\) && BITS == 6 \? (\d+) : (\d+);", SRC).groups())
DECODE_BM = int(re.search(r"kBM = kDecode \? (\d+) : 128;", SRC).group(1))
SCHEDULES = ("cooperative", "pingpong", "cooperative256", "decode64", "cluster256")  # WgmmaConfig 0..4


@dataclass(frozen=True)
class Cfg:
    """One WgTraits<BITS, CONFIG> instantiation."""
    bn: int
    stages: int
    bm: int = 128
    consumers: int = 2

    @property
    def panels(self) -> int:
        return self.bn // 16

    @property
    def b_stage(self) -> int:
        return BKU * self.panels * 512

    @property
    def staging(self) -> int:
        return BKU * self.panels * 384

    @property
    def items(self) -> int:
        return BKU * self.panels * 8


def cfg(schedule: str, bits: int) -> Cfg:
    wide, decode = schedule in ("cooperative256", "cluster256"), schedule == "decode64"
    return Cfg(WIDE_BN if wide else NARROW_BN, WIDE6_STAGES if (wide or decode) and bits == 6 else STAGES,
               DECODE_BM if decode else 128, 1 if decode else 2)


# the 128-wide configurations (cooperative, ping-pong)
BN = NARROW_BN
PANELS, B_STAGE, STAGING, ITEMS = cfg("cooperative", 8).panels, cfg("cooperative", 8).b_stage, \
    cfg("cooperative", 8).staging, cfg("cooperative", 8).items

# descriptor parameters the kernel uses (parsed, so the emulation follows the source)
_A_DESC = re.search(r"smem_desc\(sA \+ s \* kAStageBytes \+ half \* 64 \* kBK \+ ku \* 32, (\d+), (\d+), (\d)\)", SRC)
A_LBO, A_SBO, A_LAYOUT = (int(x) for x in _A_DESC.groups())
_B_DESC = re.search(r"smem_desc\(sB \+ s \* kBStageBytes \+ ku \* kPanels \* 4 \* layout::kPlaneBytes,\s*"
                    r"layout::kPlaneBytes,\s*2 \* layout::kPlaneBytes, (\d)\)", SRC)
B_LBO, B_SBO, B_LAYOUT = 128, 256, int(_B_DESC.group(1))


PINGPONG_BRANCH = 'static_assert(kBN == 128, "ping-pong'  # first line of the kernel's ping-pong consumer branch


def _schedule_halves() -> dict[str, list[tuple[int, int]]]:
    """Per consumer schedule, the kernel's (accumulator half read through a_desc, its epilogue row offset
    in the tile) pairs, parsed from the wgmma calls and the epilogue calls of each branch."""
    coop = SRC[SRC.index("if constexpr (!kPingPong) {"):SRC.index(PINGPONG_BRANCH)]
    pp = SRC[SRC.index(PINGPONG_BRANCH):SRC.index("#else")]
    out = {}
    for name, part in (("cooperative", coop), ("pingpong", pp)):
        reads = dict(re.findall(r"wgmma_s8_m64n(?:128k32|Nk32<kBN>)\((\w+), a_desc\(s, (\w+), ku\)", part))
        rows = dict(re.findall(r"epilogue\((\w+), ti\.m0(?: \+ ([\w *]+))?, ti\.n0\)", part))
        assert reads and set(reads) == set(rows), (name, reads, rows)
        out[name] = [(reads[acc], rows[acc] or "0") for acc in sorted(reads)]
    out["cooperative256"] = out["cooperative"]  # the same branch, 64 x 256 accumulators
    out["decode64"] = out["cooperative"]        # the same branch with one consumer (c = 0)
    out["cluster256"] = out["cooperative"]      # the same branch; the cluster changes who loads the weights
    return out


SCHEDULE_HALVES = _schedule_halves()


def swizzle128(offset: np.ndarray) -> np.ndarray:
    """Swizzle<3,4,3> on byte offsets from a 1024-byte aligned base."""
    return offset ^ (((offset >> 7) & 7) << 4)


def tma_tile_sw128(a: np.ndarray, m: int, k: int, row0: int, col0: int, bm: int = BM) -> np.ndarray:
    """The 1024-aligned shared tile a 2-D TMA load (box BK bytes x bm rows, 128B swizzle) writes."""
    tile = np.zeros(bm * BK, dtype=np.uint8)
    r = np.arange(bm)[:, None]
    x = np.arange(BK)[None, :]
    rows, cols = row0 + r, col0 + x
    ok = (rows < m) & (cols < k)
    vals = np.where(ok, a[np.minimum(rows, m - 1), np.minimum(cols, k - 1)].view(np.uint8), 0)
    tile[swizzle128(r * BK + x).reshape(-1)] = vals.reshape(-1)
    return tile


def read_operand(smem: np.ndarray, start: int, rows: int, lbo: int, sbo: int, layout: int) -> np.ndarray:
    """[rows, 32] int8 matrix a K-major wgmma operand descriptor (k32 of 8-bit elements) reads."""
    r = np.arange(rows)[:, None]
    kk = np.arange(32)[None, :]
    if layout == 0:      # ((8,n),2):((1,SBO),LBO) in 16-byte units
        off = start + (r % 8) * 16 + (r // 8) * sbo + (kk // 16) * lbo + kk % 16
    else:                # Swizzle<3,4,3> o ((8,n),2):((8,SBO),1)
        assert layout == 1
        off = swizzle128(start + (r % 8) * 128 + (r // 8) * sbo + (kk // 16) * 16 + kk % 16)
    return smem[off].view(np.int8).astype(np.int64)


def acc_coords(n: int = NARROW_BN):
    """(row, col) of accumulator register v of thread T (0..127) of m64nNk32, from CuTe's CLayout_64xN."""
    T = np.arange(128)[:, None]
    v = np.arange(n // 2)[None, :]
    t4, g8, w4 = T % 4, (T // 4) % 8, T // 32
    v0, v1, v2 = v % 2, (v // 2) % 2, v // 4
    idx = 128 * t4 + 1 * g8 + 16 * w4 + 64 * v0 + 8 * v1 + 512 * v2  # column-major over (64, n)
    return idx % 64, idx // 64


@dataclass
class Problem:
    a: np.ndarray  # int8 [M, K]
    w: np.ndarray  # uint8 pack_weight bytes
    m: int
    n: int
    k: int
    bits: int


def step_of(f, kt_per_item, m_tiles, num_tiles, bx, grid, bm=BM, bn=NARROW_BN):
    """The kernel's step_of: (m0, n0, kt, tile, split) of CTA bx's f-th step."""
    item = bx + (f // kt_per_item) * grid
    tile, split = item % num_tiles, item // num_tiles
    return (tile % m_tiles) * bm, (tile // m_tiles) * bn, split * kt_per_item + f % kt_per_item, tile, split


def produce_b_8bit(P: Problem, n0: int, kt: int, stage: np.ndarray, c: Cfg = cfg("cooperative", 8)) -> None:
    geo = E.geometry(8, P.n, P.k)
    p0 = n0 // 16
    panels = min(c.panels, geo.full_panels - p0)
    units = min(BKU, geo.full_units - kt * BKU)
    assert panels >= 1 and units >= 1
    for ku in range(units):
        src = E.unit_offset(8, geo, kt * BKU + ku, p0)
        nbytes = panels * 512
        assert src % 16 == 0 and nbytes % 16 == 0 and src + nbytes <= len(P.w)
        dst = ku * c.panels * 512
        stage[dst: dst + nbytes] = P.w[src: src + nbytes]


def produce_b_8bit_multicast(P: Problem, n0: int, kt: int, stage: np.ndarray, c: Cfg) -> None:
    """The weight stage of a cluster pair: CTA `rank` copies k-units [rank * BKU/2, (rank + 1) * BKU/2) and
    multicasts them, so both CTAs' stages receive both halves. Checks that the halves cover every unit of the
    stage once."""
    geo = E.geometry(8, P.n, P.k)
    p0 = n0 // 16
    panels = min(c.panels, geo.full_panels - p0)
    units = min(BKU, geo.full_units - kt * BKU)
    written = np.zeros(BKU, dtype=int)
    for rank in range(2):
        for ku in range(rank * (BKU // 2), min(units, (rank + 1) * (BKU // 2))):
            src = E.unit_offset(8, geo, kt * BKU + ku, p0)
            nbytes = panels * 512
            dst = ku * c.panels * 512
            stage[dst: dst + nbytes] = P.w[src: src + nbytes]
            written[ku] += 1
    assert list(written[:units]) == [1] * units and not written[units:].any()


def produce_b_6bit(P: Problem, n0: int, kt: int, stage: np.ndarray, staging: np.ndarray,
                   c: Cfg = cfg("cooperative", 6)) -> None:
    """The 128 producer threads: cp.async of the packed quads into a staging slot, then expand6 into B."""
    geo = E.geometry(6, P.n, P.k)
    p0 = n0 // 16
    PANELS, ITEMS = c.panels, c.items
    for tid in range(128):
        for i in range(ITEMS // 128):
            item = tid + i * 128
            unit, quad = item // 8, item % 8
            u, pn = kt * BKU + unit // PANELS, p0 + unit % PANELS
            if u < geo.full_units and pn < geo.full_panels:
                src = E.unit_offset(6, geo, u, pn) + quad * 16
                for q in range(3):
                    assert (src + q * 128) % 16 == 0
                    staging[(item * 3 + q) * 16: (item * 3 + q + 1) * 16] = P.w[src + q * 128: src + q * 128 + 16]
    for tid in range(128):
        for i in range(ITEMS // 128):
            item = tid + i * 128
            unit, quad = item // 8, item % 8
            u, pn = kt * BKU + unit // PANELS, p0 + unit % PANELS
            if u < geo.full_units and pn < geo.full_panels:
                qs = [staging[(item * 3 + q) * 16: (item * 3 + q + 1) * 16].view("<u4").astype(np.uint32)
                      for q in range(3)]
                regs = E.expand6(*qs)  # per lane of the quad: 4 planes
                dst = unit * 512 + quad * 16
                for c in range(4):
                    stage[dst + c * 128: dst + c * 128 + 16] = regs[c].astype("<u4").view(np.uint8)


def _halves(schedule: str):
    """[(consumer, half read, epilogue row offset)] of one tile under a schedule; the cooperative consumer c
    reads half c, the ping-pong consumer of the tile both halves (the consumer does not change the data)."""
    out = []
    for c in range(2):
        for half_expr, row_expr in SCHEDULE_HALVES[schedule]:
            half = eval(half_expr, {"c": c})  # "c" or a literal
            rows = eval(row_expr, {"c": c})
            if schedule == "pingpong" or half == c:  # cooperative(256): consumer c, half c
                out.append((half, rows))
        if schedule in ("pingpong", "decode64"):  # one consumer per tile
            break
    return out


def run_kernel(P: Problem, grid: int, schedule: str = "cooperative", splits: int = 1) -> np.ndarray:
    """The kernel's output (int32 accumulators) for CTAs 0..grid-1 walking work items (tile, K split); with
    splits > 1 every item stores its partial tile at the kernel's partial-buffer indices and each tile's
    partials are summed in split order before the epilogue (as the last-arriving split does)."""
    assert P.n % 16 == 0 and P.k % 32 == 0, "the wgmma path needs N % 16 == 0 and K % 32 == 0"
    c = cfg(schedule, P.bits)
    BM_, BN = c.bm, c.bn
    mc = schedule == "cluster256"  # clusters of two CTAs on M-tiles 2i, 2i+1 of one N-tile
    assert not mc or (P.bits == 8 and splits == 1), "the cluster configuration: 8-bit weights, no split-K"
    m_tiles = E.cdiv(P.m, BM_)
    num_tiles = m_tiles * E.cdiv(P.n, BN)
    kt_total = E.cdiv(P.k, BK)
    kt_per_item = E.cdiv(kt_total, splits)
    m_pairs = E.cdiv(m_tiles, 2)
    num_items = m_pairs * E.cdiv(P.n, BN) if mc else num_tiles * splits
    walkers = grid // 2 if mc else grid

    def step(f, walker, rank):  # the kernel's step lambda
        if mc:
            item = walker + (f // kt_per_item) * walkers
            pair, nt = item % m_pairs, item // m_pairs
            return (2 * pair + rank) * BM_, nt * BN, f % kt_per_item, 0, 0
        return step_of(f, kt_per_item, m_tiles, num_tiles, walker, walkers, BM_, BN)
    out = np.full((P.m, P.n), np.int32(-0x5A5A5A5B), dtype=np.int32)
    partials = np.full((num_tiles, splits, BM_ * BN), -7, dtype=np.int64)  # poisoned, like a fresh buffer
    arrived = np.zeros(num_tiles, dtype=np.int64)
    rows, cols = acc_coords(BN)
    halves = _halves(schedule)
    ctas = [(w, r) for w in range(min(walkers, num_items)) for r in ((0, 1) if mc else (0,))]
    for bx, rank in ctas:
        my_items = (num_items - 1 - bx) // walkers + 1
        sB = np.full(c.b_stage, 0xC3, dtype=np.uint8)  # stale bytes where nothing is copied
        sA = np.full(BM_ * BK, 0x77, dtype=np.uint8)  # (read, never stored, by a pair's CTA past M)
        staging = np.zeros(c.staging, dtype=np.uint8)
        f = 0
        for _ in range(my_items):
            m0, n0, kt0, tile, split = step(f, bx, rank)
            acc = np.zeros((2, 64, BN), dtype=np.int64)  # per 64-row half of the tile
            for kt in range(kt_per_item):
                mm0, nn0, kk, tt, ss = step(f, bx, rank)
                assert (mm0, nn0, kk, tt, ss) == (m0, n0, kt0 + kt, tile, split)
                f += 1
                if kk >= kt_total:  # padding step: nothing loaded, no wgmma
                    continue
                if not (mc and m0 >= P.m):  # (no A load for the pair's M-tile past M: its rows are never stored)
                    sA = tma_tile_sw128(P.a, P.m, P.k, m0, kk * BK, BM_)
                if mc:
                    produce_b_8bit_multicast(P, n0, kk, sB, c)
                elif P.bits == 8:
                    produce_b_8bit(P, n0, kk, sB, c)
                else:
                    produce_b_6bit(P, n0, kk, sB, staging, c)
                for half, _rows in halves:
                    for ku in range(BKU):
                        A = read_operand(sA, half * 64 * BK + ku * 32, 64, A_LBO, A_SBO, A_LAYOUT)
                        B = read_operand(sB, ku * c.panels * 512, BN, B_LBO, B_SBO, B_LAYOUT)
                        acc[half] += A @ B.T
            regs = {half: acc[half][rows, cols] for half, _ in halves}  # thread T's [128, BN / 2] registers
            if splits > 1:
                # reduce_splits: store this split's partial, count it in; the last one sums the others
                for half, row_off in halves:
                    for T in range(128):
                        w, lane = T // 32, T % 32
                        g, t = lane >> 2, lane & 3
                        row0 = row_off + 16 * w + g
                        for j in range(BN // 8):
                            for hr in range(2):
                                if m0 + row0 + 8 * hr < P.m:
                                    i0 = (row0 + 8 * hr) * BN + 8 * j + 2 * t
                                    v = [4 * j + 2 * hr, 4 * j + 2 * hr + 1]
                                    partials[tile, split, i0: i0 + 2] = regs[half][T, v]
                arrived[tile] += 1
                if arrived[tile] < splits:
                    continue
                arrived[tile] = 0
                for half, row_off in halves:
                    for T in range(128):
                        w, lane = T // 32, T % 32
                        g, t = lane >> 2, lane & 3
                        row0 = row_off + 16 * w + g
                        for z in range(splits):
                            if z == split:
                                continue
                            for j in range(BN // 8):
                                for hr in range(2):
                                    if m0 + row0 + 8 * hr < P.m:
                                        i0 = (row0 + 8 * hr) * BN + 8 * j + 2 * t
                                        v = [4 * j + 2 * hr, 4 * j + 2 * hr + 1]
                                        regs[half][T, v] += partials[tile, z, i0: i0 + 2]
            for half, row_off in halves:
                # registers of thread T of the warpgroup holding this half, then the kernel's epilogue indices
                d = regs[half]
                for T in range(128):
                    w, lane = T // 32, T % 32
                    g, t = lane >> 2, lane & 3
                    for j in range(BN // 8):
                        for hr in range(2):
                            v = d[T, [4 * j + 2 * hr, 4 * j + 2 * hr + 1]]
                            m = m0 + row_off + 16 * w + g + 8 * hr
                            n = n0 + 8 * j + 2 * t
                            if P.bits == 6:
                                # columns past N hold stale shared memory (never stored); the others are 4*acc
                                assert not (m < P.m and n < P.n) or np.all(v[: 1 + (n + 1 < P.n)] % 4 == 0)
                                v = v >> 2
                            if m < P.m and n < P.n:
                                out[m, n] = v[0]
                                if n + 1 < P.n:
                                    out[m, n + 1] = v[1]
    assert not arrived.any(), "a tile's splits did not all arrive"
    return out

"""CPU emulation of the Hopper wgmma GEMM (csrc/gemm_wgmma.cu): producer data movement (TMA with 128-byte
swizzle, bulk copies of pack_weight units, the 6-bit staging + expansion), the operand descriptors read as
CuTe documents the canonical K-major layouts, the persistent tile walk and the accumulator layout, against
the exact reference accumulator (tests/wgmma_emulator.py)."""
import numpy as np
import pytest
import torch

import wgmma_emulator as W
from hdrq import ops
from hdrq import reference as ref


def problem(m, n, k, bits, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lim = 128 if bits == 8 else 32
    q = torch.randint(-lim, lim, (n, k), dtype=torch.int8, generator=gen)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)
    w = ops.pack_weight(q, bits).data.reshape(-1).view(torch.uint8).numpy()
    return W.Problem(a.numpy(), w, m, n, k, bits), ref.int_matmul_acc(a, q).numpy()


@pytest.mark.parametrize("schedule", ["cooperative", "pingpong", "cooperative256", "decode64"])
@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("m,n,k,grid", [(200, 272, 544, 3), (1, 16, 32, 1), (130, 128, 128, 2), (64, 48, 96, 1),
                                        (130, 400, 96, 2)])
def test_emulated_wgmma_accumulator_is_exact(schedule, bits, m, n, k, grid):
    P, expect = problem(m, n, k, bits)
    assert np.array_equal(W.run_kernel(P, grid, schedule), expect)


@pytest.mark.parametrize("m,n,k,grid", [(200, 272, 544, 2), (1, 16, 32, 2), (130, 400, 96, 4), (300, 512, 160, 2),
                                        (520, 272, 64, 6)])
def test_emulated_cluster_kernel_is_exact(m, n, k, grid):
    """The 2-CTA cluster configuration: pairs of M-tiles (an odd last pair: the second CTA loads no A and
    stores nothing), weight halves multicast by each CTA (covering every unit once), 8-bit."""
    P, expect = problem(m, n, k, 8)
    assert np.array_equal(W.run_kernel(P, grid, "cluster256"), expect)


@pytest.mark.parametrize("schedule", ["decode64"])
@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("m,n,k,grid,splits", [(1, 272, 544, 3, 2), (64, 48, 1056, 5, 3), (17, 144, 672, 2, 6),
                                               (70, 32, 288, 4, 3)])
def test_emulated_wgmma_split_k_is_exact(schedule, bits, m, n, k, grid, splits):
    """Split-K items (tile, split) over a persistent grid, with padding steps past K in the last split
    (1056 = 8.25 k-tiles of 128 in 3 splits of 3; 672 = 5.25 in 6 of 1: one split all padding)."""
    P, expect = problem(m, n, k, bits)
    assert np.array_equal(W.run_kernel(P, grid, schedule, splits), expect)


def test_schedules_parsed_from_the_kernel():
    """Cooperative: consumer c reads half c and writes rows 64c..; ping-pong: one consumer, both halves;
    the 128 x 256 configuration: the cooperative branch with wider tiles and, for 6-bit, fewer stages."""
    assert (W.NARROW_BN, W.WIDE_BN, W.STAGES, W.WIDE6_STAGES) == (128, 256, 4, 3)
    assert W.cfg("cooperative256", 8).b_stage == 32768 and W.cfg("cooperative256", 6).stages == 3
    assert W.SCHEDULE_HALVES["cooperative"] == [("c", "64 * c")]
    assert W.SCHEDULE_HALVES["pingpong"] == [("0", "0"), ("1", "64")]
    assert W._halves("cooperative") == [(0, 0), (1, 64)] and W._halves("pingpong") == [(0, 0), (1, 64)]
    assert W._halves("decode64") == [(0, 0)] and W.cfg("decode64", 8).bm == 64
    assert "static constexpr bool kSplitK = kDecode;" in W.SRC  # the emulator runs split-K for decode64 only


def test_tile_constants_parsed():
    assert (W.BM, W.BN, W.BK) == (128, 128, 128) and W.STAGES >= 2 and W.LOOKAHEAD >= 1
    assert (W.A_LBO, W.A_SBO, W.A_LAYOUT) == (16, 1024, 1) and W.B_LAYOUT == 0


def test_accumulator_layout_is_a_bijection():
    rows, cols = W.acc_coords()
    flat = rows * W.BN + cols
    assert sorted(flat.reshape(-1).tolist()) == list(range(64 * W.BN))
    # the kernel's epilogue formula for register 4j + 2hr + i of thread T = 32w + 4g + t
    T = np.arange(128)[:, None]
    v = np.arange(W.BN // 2)[None, :]
    w, g, t = T // 32, (T % 32) >> 2, T & 3
    j, hr, i = v // 4, (v // 2) % 2, v % 2
    assert np.array_equal(rows, 16 * w + g + 8 * hr) and np.array_equal(cols, 8 * j + 2 * t + i)


def test_6bit_expansion_equals_the_8bit_layout_of_4w():
    """What the 6-bit producer writes into a B stage is byte for byte what the 8-bit path copies for 4*w."""
    n, k = 256, 256
    q = torch.randint(-32, 32, (n, k), dtype=torch.int8)
    w6 = ops.pack_weight(q, 6).data.reshape(-1).view(torch.uint8).numpy()
    w8 = ops.pack_weight((4 * q.to(torch.int32)).to(torch.int8), 8).data.reshape(-1).view(torch.uint8).numpy()
    for n0, kt in [(0, 0), (128, 1)]:
        s6 = np.zeros(W.B_STAGE, dtype=np.uint8)
        s8 = np.zeros(W.B_STAGE, dtype=np.uint8)
        W.produce_b_6bit(W.Problem(None, w6, 1, n, k, 6), n0, kt, s6, np.zeros(W.STAGING, dtype=np.uint8))
        W.produce_b_8bit(W.Problem(None, w8, 1, n, k, 8), n0, kt, s8)
        assert np.array_equal(s6, s8)


def test_emulation_detects_a_wrong_descriptor(monkeypatch):
    P, expect = problem(64, 32, 64, 8)
    monkeypatch.setattr(W, "B_LBO", 256)  # K-adjacent and N-adjacent core-matrix strides swapped
    monkeypatch.setattr(W, "B_SBO", 128)
    assert not np.array_equal(W.run_kernel(P, 1), expect)


def test_tma_swizzle_round_trip():
    """The 128B-swizzled A tile read through the kernel's A descriptor gives back the rows of A."""
    a = np.random.default_rng(0).integers(-128, 128, (150, 300), dtype=np.int64).astype(np.int8)
    tile = W.tma_tile_sw128(a, 150, 300, 128, 128)  # rows 128.. (22 valid), columns 128..255
    for c in range(2):
        for ku in range(W.BKU):
            got = W.read_operand(tile, c * 64 * W.BK + ku * 32, 64, W.A_LBO, W.A_SBO, W.A_LAYOUT)
            rows = np.arange(128 + 64 * c, 128 + 64 * c + 64)
            want = np.zeros((64, 32), dtype=np.int64)
            valid = rows < 150
            want[valid] = a[rows[valid], 128 + 32 * ku: 160 + 32 * ku]
            assert np.array_equal(got, want)


# ------------------------------------------------------------------------------ barrier protocol (simulated)

import wgmma_protocol as WP  # noqa: E402


@pytest.mark.parametrize("kind", ["cooperative", "pingpong", "decode64", "cluster"])
@pytest.mark.parametrize("stages,kt_total,my_tiles", [(4, 5, 5), (4, 1, 6), (2, 3, 4), (4, 32, 3), (3, 2, 7)])
def test_barrier_protocol_holds(kind, stages, kt_total, my_tiles):
    """Random interleavings of producer, consumer warps, load landings and wgmma completions: every wait
    passes on its own phase, every full wait sees its own step's data, no stage is overwritten while read,
    nothing deadlocks; with and without split-K padding steps (not in ping-pong, which has no split-K); for
    the cluster, two CTAs whose weight halves are multicast into both (landing in each separately)."""
    proto = WP.Protocol(pingpong=kind == "pingpong", stages=stages, consumers=1 if kind == "decode64" else 2,
                        cluster=2 if kind == "cluster" else 1)
    for pad_tail in ([0] if kind in ("pingpong", "cluster") else [0, min(2, kt_total)]):
        for seed in range(30 if kind != "cluster" else 15):
            WP.simulate(proto, kt_total, my_tiles, seed, pad_tail)


@pytest.mark.parametrize("change", [dict(order_barrier=False), dict(order_parity="wrong"), dict(warps=4, stages=1),
                                    dict(pingpong=False, cluster=2, release_peers=False)])
def test_barrier_simulation_catches_a_broken_protocol(change):
    """Without the order barrier a ping-pong consumer runs ahead and its parity wait passes a phase early;
    a wrong order parity deadlocks or does the same; one stage cannot overlap loads with reads (deadlock
    with one group kept in flight); in a cluster whose consumers release only their own CTA's stage, the
    peer's multicast overwrites a stage still being read. The simulation must report each."""
    proto = WP.Protocol(**{"pingpong": True, **change})
    failures = 0
    for seed in range(60):
        try:
            WP.simulate(proto, 5, 6, seed)
        except WP.Violation:
            failures += 1
    assert failures > 0


def test_kernel_uses_the_simulated_protocol():
    """The formulas of csrc/gemm_wgmma.cu that the simulation models (a change there must be mirrored in
    tests/wgmma_protocol.py)."""
    src = W.SRC
    # readers x warps, x CTAs of the cluster (each consumer warp arrives on every CTA's empty barrier)
    assert "mbar_init(&empty_bar[s], (kPingPong ? 4 : 4 * T::kConsumers) * T::kClusterSize);" in src
    assert ("mbar_arrive_cluster(&empty_bar[s], 0);\n      mbar_arrive_cluster(&empty_bar[s], 1);" in src
            and "static constexpr int kClusterSize = kMulticast ? 2 : 1;" in src)
    # the full barrier expects the CTA's A tile and the whole weight stage (its half and the peer's)
    assert ("mbar_arrive_expect_tx(&full_bar[s], (has_a ? kAStageBytes : 0) + units * panels * 4 * "
            "layout::kPlaneBytes);") in src
    assert "bulk_load_multicast(" in src and "uint16_t(0x3)" in src
    assert "static constexpr int kConsumers = kDecode ? 1 : 2;" in src
    # padding steps: the producer arrives without loading; the consumers wait for them after the item's real
    # steps and release them at once
    assert "if (ti.kt >= kt_total) {  // padding step: nothing to load\n          mbar_arrive(&full_bar[s]);" in src
    assert "const int kt_valid = min(kt_per_item, kt_total - ti.kt);" in src
    assert ("for (int kt = max(kt_valid, 0); kt < kt_per_item; ++kt, ++f) {  // padding: nothing loaded, nothing "
            "read\n        const int s = f % kStages;\n        mbar_wait(&full_bar[s], (f / kStages) & 1);\n"
            "        if (lane == 0) release(s);") in src
    assert "mbar_init(&full_bar[s], BITS == 8 ? 1 : 128)" in src
    assert "mbar_init(&order_bar[0], 4);" in src and "mbar_init(&order_bar[1], 4);" in src
    assert "if (i > 0) mbar_wait(&order_bar[c], (c == 1 ? mine : mine - 1) & 1);" in src
    assert "mbar_wait(&empty_bar[s], ((f / kStages) & 1) ^ 1);" in src
    assert src.count("mbar_wait(&full_bar[s], (f / kStages) & 1);") == 3  # cooperative, padding, ping-pong
    assert src.count("wgmma.wait_group.sync.aligned 1;") == 2
    pp = src[src.index(W.PINGPONG_BRANCH):]
    # ping-pong: the order arrive comes after the mainloop and before the final wait_group 0
    assert pp.index("mbar_arrive(&order_bar[c ^ 1]);") < pp.index("wgmma.wait_group.sync.aligned 0;")
    assert "for (int i = c, mine = 0; i < my_items; i += 2, ++mine)" in pp and "int f = i * kt_per_item;" in pp

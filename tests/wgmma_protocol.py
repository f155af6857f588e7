"""A simulation of the synchronisation protocol of csrc/gemm_wgmma.cu: mbarrier phases, parity waits, the
asynchronous TMA landings and wgmma groups, under random interleavings of the producer and the consumer warps.

What the kernel's barriers must guarantee, and what :func:`simulate` checks on every run:

* a consumer warp that passes its `full` wait for pipeline step f passes it on the phase that step f's load
  completed, and finds step f's data in the stage (the parity wait cannot tell phase q from phase q - 2, so
  a consumer running too far ahead would pass early); the producer likewise passes `empty` on the phase
  that released the stage's previous step;
* padding steps (split-K items past K: the producer arrives without loading, the consumers wait for them
  after their item's real steps and release them at once) keep the phases in step;
* the data is still there when the warp releases the stage (no load lands while a wgmma may read it);
* nothing deadlocks, and every step is produced and consumed once per consumer that needs it.

The model follows the kernel's protocol, parameter by parameter (barrier counts, which parity each wait
uses, when each arrive happens); it is not generated from the source, so a change to the kernel's
barriers must be mirrored here (tests/test_wgmma_emulated.py pins the kernel's formulas to this model).

mbarrier semantics (PTX ISA, "mbarrier"): a phase completes when its pending arrivals and its pending
transaction bytes both reach zero; `try_wait.parity(P)` succeeds iff the current (incomplete) phase's parity
differs from P, i.e. it is only meaningful for the current phase and the one before it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field


class Barrier:
    def __init__(self, count: int):
        self.count = count
        self.pending = count
        self.tx = 0
        self.phase = 0  # completed phases

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:  # (tx < 0 only before this CTA's own arrive.expect_tx)
            self.phase += 1
            self.pending = self.count

    def arrive(self, expect_tx: int = 0):
        assert self.pending > 0, "more arrivals than the barrier's count in one phase"
        self.tx += expect_tx
        self.pending -= 1
        self._maybe_complete()

    def complete_tx(self, n: int = 1):
        # The count may go negative: a peer's multicast can land before this CTA's own arrive.expect_tx of
        # the same phase (the PTX tx-count is signed); the phase completes only when both are back at zero.
        self.tx -= n
        self._maybe_complete()

    def test_parity(self, parity: int) -> bool:
        return (self.phase & 1) != parity


class Violation(AssertionError):
    pass


@dataclass
class Protocol:
    """The kernel's choices; the defaults are what csrc/gemm_wgmma.cu does. Tests flip them to show the
    simulation catches a broken protocol."""

    pingpong: bool
    stages: int = 4
    consumers: int = 2             # consumer warpgroups (the 64-row decode configuration has one)
    warps: int = 4                 # warps per consumer warpgroup (lane 0 of each arrives)
    order_barrier: bool = True     # ping-pong: wait for the other consumer's mainloop before starting one
    order_parity: str = "kernel"   # "kernel": consumer 1 waits completion `mine`, consumer 0 `mine - 1`
    groups_in_flight: int = 1      # wgmma.wait_group N after each stage's commit
    cluster: int = 1               # CTAs per cluster; 2: each multicasts half of the weight stage to both
    release_peers: bool = True     # cluster: consumers arrive on every CTA's empty barrier, not only their own


@dataclass
class _State:
    proto: Protocol
    full: list                     # [cta][stage]
    empty: list                    # [cta][stage]
    order: list                    # [cta][2]
    stage_data: list               # [cta][stage]: {part: step} of what landed
    inflight: list = field(default_factory=list)       # (destination cta, stage, part, step) not landed
    issued: dict = field(default_factory=dict)         # (cta, consumer, group) -> warps that issued it
    consumed: dict = field(default_factory=dict)       # (cta, step) -> consumers that released it

    def parts(self, r: int) -> list:
        """What a stage of CTA r receives per step: its own A tile and each CTA's half of the weights (one
        part when there is no cluster)."""
        return ["AB"] if self.proto.cluster == 1 else ["A"] + [("B", q) for q in range(self.proto.cluster)]


def _producer(st: _State, r: int, steps: int, pad):
    P = st.proto
    S = P.stages
    for f in range(steps):
        s = f % S
        yield lambda s=s, f=f: st.empty[r][s].test_parity(((f // S) & 1) ^ 1)
        if st.empty[r][s].phase != f // S:
            raise Violation(f"CTA {r}'s producer passed the empty wait of step {f} (stage {s}) at phase "
                            f"{st.empty[r][s].phase}, not {f // S}")
        if pad(f):
            st.full[r][s].arrive()  # padding step: a plain arrive, nothing loaded
            continue
        st.full[r][s].arrive(expect_tx=len(st.parts(r)))  # arrive.expect_tx of everything this CTA receives
        if P.cluster == 1:
            st.inflight.append((r, s, "AB", f))
        else:
            st.inflight.append((r, s, "A", f))  # its own A tile
            for dst in range(P.cluster):       # its half of the weights, multicast: lands in every CTA
                st.inflight.append((dst, s, ("B", r), f))


def _consumer_warp(st: _State, r: int, c: int, tiles: list[int], kt_total: int, pad):
    """One warp of consumer warpgroup c of CTA r over its tiles (local tile indices)."""
    P = st.proto
    S = P.stages
    group = 0  # this consumer's wgmma groups, in issue order
    for mine, i in enumerate(tiles):
        if P.pingpong and P.order_barrier and i > 0:
            if P.order_parity == "kernel":
                parity = (mine if c == 1 else mine - 1) & 1
            else:  # a wrong formula, for the tests
                parity = mine & 1
            yield lambda parity=parity: st.order[r][c].test_parity(parity)
        window = []  # (stage, step, group) whose wgmma may still be reading
        steps = [i * kt_total + kt for kt in range(kt_total)]
        real = [f for f in steps if not pad(f)]
        assert real == steps[:len(real)], "padding steps come last in an item"

        def wait_full(f):
            s = f % S
            yield lambda: st.full[r][s].test_parity((f // S) & 1)
            if st.full[r][s].phase != f // S + 1:
                raise Violation(f"CTA {r} consumer {c} passed the full wait of step {f} (stage {s}) at phase "
                                f"{st.full[r][s].phase}, not {f // S + 1}")

        for f in real:
            s = f % S
            yield from wait_full(f)
            _check_data(st, r, c, s, f, "passed the full wait of")
            st.issued[r, c, group] = st.issued.get((r, c, group), 0) + 1
            window.append((s, f, group))
            group += 1
            # wgmma.wait_group N: all but the newest N groups complete (each needs all warps to have issued it)
            while len(window) > P.groups_in_flight:
                s0, f0, g0 = window.pop(0)
                yield lambda g0=g0: st.issued.get((r, c, g0), 0) == P.warps
                _release(st, r, c, s0, f0)
        if P.pingpong and P.order_barrier:
            st.order[r][c ^ 1].arrive()
        for s0, f0, g0 in window:  # wait_group 0
            yield lambda g0=g0: st.issued.get((r, c, g0), 0) == P.warps
            _release(st, r, c, s0, f0)
        for f in steps[len(real):]:  # padding steps: wait, then release at once (nothing was loaded or read)
            yield from wait_full(f)
            _release(st, r, c, f % S, f, padding=True)


def _check_data(st: _State, r: int, c: int, s: int, f: int, what: str) -> None:
    got = st.stage_data[r][s]
    if any(got.get(part) != f for part in st.parts(r)):
        raise Violation(f"CTA {r} consumer {c} {what} step {f} (stage {s}), but the stage holds {got}")


def _release(st: _State, r: int, c: int, s: int, f: int, padding: bool = False):
    if not padding:
        _check_data(st, r, c, s, f, "released (after its wgmma could read it)")
    for dst in (range(st.proto.cluster) if st.proto.release_peers else [r]):
        st.empty[dst][s].arrive()
    st.consumed.setdefault((r, f), []).append(c)


def simulate(proto: Protocol, kt_total: int, my_tiles: int, seed: int, pad_tail: int = 0,
             max_events: int = 400_000) -> None:
    """One random interleaving of the producer and consumer warps of a CTA (or of each CTA of a cluster)
    over my_tiles work items of kt_total steps each, with loads landing in any order (a multicast lands in
    each CTA separately); with pad_tail, the last pad_tail steps of every other item are padding (split-K
    items past K). Raises Violation on a broken guarantee or a deadlock."""
    rng = random.Random(seed)
    P = proto
    assert not (P.pingpong and pad_tail), "ping-pong runs without split-K"
    assert P.cluster == 1 or not P.pingpong, "the cluster configuration is cooperative"

    def pad(f: int) -> bool:
        return (f // kt_total) % 2 == 1 and f % kt_total >= kt_total - pad_tail

    readers = 1 if P.pingpong else P.consumers  # consumers reading each stage, per CTA
    empty_count = readers * P.warps * (P.cluster if P.release_peers else 1)
    st = _State(P, [[Barrier(1) for _ in range(P.stages)] for _ in range(P.cluster)],
                [[Barrier(empty_count) for _ in range(P.stages)] for _ in range(P.cluster)],
                [[Barrier(P.warps), Barrier(P.warps)] for _ in range(P.cluster)],
                [[{} for _ in range(P.stages)] for _ in range(P.cluster)])
    steps = my_tiles * kt_total
    agents = []
    for r in range(P.cluster):
        agents.append(_producer(st, r, steps, pad))
        for c in range(2 if P.pingpong else P.consumers):
            tiles = list(range(c, my_tiles, 2)) if P.pingpong else list(range(my_tiles))
            agents += [_consumer_warp(st, r, c, tiles, kt_total, pad) for _ in range(P.warps)]
    waits = {}
    for a in agents:  # run each to its first wait
        try:
            waits[a] = next(a)
        except StopIteration:
            pass
    for _ in range(max_events):
        ready = [a for a, cond in waits.items() if cond()]
        choices = len(ready) + (1 if st.inflight else 0)
        if choices == 0:
            if not waits:
                break
            raise Violation(f"deadlock: {len(waits)} warps waiting, no load in flight")
        pick = rng.randrange(choices)
        if pick == len(ready):  # a load lands (loads may land out of order)
            dst, s, part, f = st.inflight.pop(rng.randrange(len(st.inflight)))
            st.stage_data[dst][s][part] = f
            st.full[dst][s].complete_tx()
            continue
        a = ready[pick]
        try:
            waits[a] = next(a)
        except StopIteration:
            del waits[a]
    else:
        raise Violation("did not finish")
    want = [0] if P.pingpong else list(range(P.consumers))
    for r in range(P.cluster):
        for f in range(steps):
            got = sorted(st.consumed.get((r, f), []))
            expect = [((f // kt_total) % 2)] if P.pingpong else want
            if got != sorted(e for e in expect for _ in range(P.warps)):
                raise Violation(f"CTA {r} step {f} released by {got}, expected consumers {expect} x {P.warps} warps")

"""The CUDA backend of ``hdrq.ops``: the W8A8 / W6A6 GEMM kernels of ``hdrq._C`` (csrc/).

Importing this module loads the extension (an ImportError when it was not built: the seam in
``hdrq.ops`` reports it and uses the other implementations) and registers

* ``int_matmul``: ``epilogue(a_q @ w^T)``, bf16 / fp16 / fp32 out;
* ``int_matmul_int32``: the same kernels writing the exact int32 accumulator (tests compare it bit for bit).

Kernel paths (``csrc/gemm_mma.cu``):

* ``decode``: M <= 64 (one M tile of 16, 32 or 64 rows), a weight stream with split-K;
* ``mma``: any M, 64x128 or 128x128 tiles of ``mma.sync`` (sm_80 and up);
* ``wgmma``: Hopper (sm_90a) large M, ``csrc/gemm_wgmma.cu``: TMA + warpgroup ``wgmma``, 128x128 tiles,
  persistent, both consumer warpgroups on every tile (cooperative); needs N % 16 == 0, K % 32 == 0 and
  16-byte aligned A rows (else ``mma`` runs);
* ``wgmma_pp``: the same kernel with the ping-pong consumer schedule (alternate tiles per consumer, one's
  epilogue under the other's mainloop);
* ``wgmma256``: cooperative with 128x256 tiles (a third less L2 and shared-memory traffic per operation);
* ``wgmma_decode``: 64x128 tiles, one consumer warpgroup, two CTAs per SM and split-K: the weight stream of
  M <= 64 on Hopper through ``wgmma`` instead of ``mma.sync``;
* ``wgmma_mc``: 128x256 tiles in clusters of two CTAs on adjacent M-tiles, each loading half of the weight
  stage and multicasting it to both (half the weight traffic from L2); 8-bit weights (6-bit ones are
  expanded first).

6-bit weights on a wgmma path either expand inside the kernel's producer or, with *expansion* (``Plan.expand``,
``GemmDispatch.w6_expand_min_m``, env ``HDRQ_W6_EXPAND=1|0`` to force it on or off), are first expanded to the
8-bit layout by one pass (``csrc/gemm_expand.cu``: 0.75 B read + 1 B written per weight) into a per-stream
buffer of N*K bytes, and the 8-bit kernel runs.

The path of each call is ``HDRQ_GEMM_PATH`` (``auto`` | ``decode`` | ``mma`` | ``wgmma`` | ``wgmma_pp`` |
``wgmma256`` | ``wgmma_decode`` | ``wgmma_mc``, read on every call so tests can force each one) or, under
``auto``, :class:`GemmDispatch` (the M crossovers, in one place).
A forced path that cannot take the inputs raises ``hdrq.ops.Unsupported`` (the reference runs, with a
warning), never a wrong answer. Before ``auto`` first sends a call to a wgmma path on a device, it checks that
configuration once against the ``mma`` kernel on a small problem with ragged tiles (one host sync, outside
any CUDA-graph capture) and keeps it off that device, with a warning, if they disagree. :data:`PATH_CALLS`
counts the launches per path (tests check that a forced path really ran).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library: registers the hdrq_C ops)
from . import ops

WGMMA_PATHS = {"wgmma": 0, "wgmma_pp": 1, "wgmma256": 2, "wgmma_decode": 3, "wgmma_mc": 4}  # -> WgmmaConfig
PATHS = ("auto", "decode", "mma", *WGMMA_PATHS)
_CXX_PATH = {"decode": 0, "mma": 0, **{path: 1 for path in WGMMA_PATHS}}  # 0: the mma.sync kernels
EIGHT_BIT_ONLY = ("wgmma_mc",)  # 6-bit weights on these paths are always expanded first (Plan.expand)
# Config indices of hdrq_C path 0 (csrc/gemm.h, MmaConfig)
_TILE64, _TILE128 = 3, 4
# Decode configurations (csrc/gemm.h, MmaConfig): name -> (index, largest M it takes). Several per M
# bucket; GemmDispatch.decode_configs picks one per bucket (bench/tune_gemm.py measures them all).
DECODE_CONFIGS = {
    "Decode16": (0, 16), "Decode32": (1, 32), "Decode64": (2, 64),
    "Decode16K256": (5, 16), "Decode16Deep": (6, 16), "Decode32N128": (7, 32), "Decode64N128": (8, 64),
}

PATH_CALLS: collections.Counter = collections.Counter()


@dataclasses.dataclass
class GemmDispatch:
    """How ``int_matmul`` picks its kernel, tiles and split-K on CUDA. Change crossovers here only."""

    decode_max_m: int = 64
    """M <= this: the decode path (weights streamed once; M padded to 16, 32 or 64 rows)."""
    wgmma_decode_max_m: Optional[int] = None
    """Hopper: M <= this (and <= decode_max_m) takes ``wgmma_decode`` instead of the mma.sync decode kernels;
    None: never under ``auto``. Off until measured (written 2026-11-27 without a GPU)."""
    wgmma_decode_bits: tuple = (6, 8)
    """Weight widths that take ``wgmma_decode`` under ``auto`` once ``wgmma_decode_max_m`` is set."""
    wgmma_decode_blocks_per_sm: float = 2.0
    """Split-K target of ``wgmma_decode``: work items per SM (two CTAs fit on an SM)."""
    wgmma_decode_partial_fraction: float = 1.0
    """``wgmma_decode``'s cap on split-K partial traffic as a fraction of the weight bytes (its 64x128 tiles
    are few: 32 on N = 4096, so it needs more splits than max_partial_fraction allows; the partials of one
    call are a few MB and stay in L2)."""
    decode_configs: tuple = ((16, "Decode16", 1.0), (32, "Decode32", 1.5), (64, "Decode64", 1.5))
    """Per decode M bucket, smallest first: (largest M, configuration name in DECODE_CONFIGS, blocks per SM
    that split-K aims at: enough weight bytes in flight to saturate HBM). Fitted by bench/tune_gemm.py on an
    H100 (2026-11-26; every configuration x 1-16 splits, 3 shapes, M in {1, 16, 32, 64}, both widths): these
    are within 1.3-3.4% (geometric mean) of the best plan of each case; the previous 2.0 blocks per SM was
    4-10% off, and the other configurations (K step 256, 8 stages, 128-wide N) lost on this GPU."""
    wgmma_min_m: Optional[int] = dataclasses.field(
        default_factory=lambda: int(os.environ.get("HDRQ_WGMMA_MIN_M", "256")) or None)
    """Hopper: M >= this may take the wgmma path under ``auto`` (env ``HDRQ_WGMMA_MIN_M``; 0 turns it off).
    256: measured on an H100 (bench/RESULTS.md, 2026-11-26), W8A8 wgmma beats mma from M = 256 (84 vs 108 us on
    4096x14336) to M = 8192 (1287 vs 2452 us); M in (64, 256) was not measured."""
    wgmma_path: str = "wgmma"
    """Which wgmma configuration ``auto`` uses for M >= wgmma_min_m: ``"wgmma"`` (cooperative 128x128, measured
    above), ``"wgmma_pp"`` (ping-pong), ``"wgmma256"`` (cooperative 128x256) or ``"wgmma_mc"`` (128x256 in
    2-CTA clusters with weight multicast). The last three were written 2026-11-27 without a GPU: exact on the
    CPU emulation, the barrier protocol simulated, not yet run or timed on a GPU; bench_gemm times every one
    as forced rows. (``wgmma_mc`` runs 8-bit weights: with 6 in ``wgmma_bits`` every 6-bit call there is
    expanded first, whatever ``w6_expand_min_m`` says.)"""
    w6_expand_min_m: Optional[int] = None
    """6-bit weights at M >= this take a wgmma path with expansion (see the module docstring); None: never
    under ``auto``. Off until measured: the pass costs ~N*K*1.75 bytes of traffic (~35 us on 14336 x 4096 at
    3 TB/s) against a GEMM of 2*M*N*K operations, so it can only pay at large M."""
    wgmma_bits: tuple = (8,)
    """Weight widths that take wgmma under ``auto``: 6-bit wgmma (in-kernel expansion) measured no faster than
    mma (458 vs 462 us at M = 2048, 1913 vs 1829 us at M = 8192 on 4096x14336), so 6-bit stays on mma."""
    wgmma_min_waves: float = 0.45
    """... and only when its 128x128 tiles fill at least this fraction of the SMs (else mma's smaller tiles
    keep more of the GPU busy). 0.45 lets N = 4096 at M = 256 (64 tiles, 0.48 of 132 SMs) take wgmma: measured
    on an H100 (bench/RESULTS.md, 2026-11-26 run 5) 84.8 vs 110.3 us (4096x14336) and 36.2 vs 37.3 us (4096x4096)
    for W8A8 against the mma path it took at 0.9."""
    mma_blocks_per_sm: float = 1.0
    """General path: split K only while the output tiles fill fewer than this many blocks per SM."""
    max_partial_fraction: float = 0.25
    """Split-K moves 8 bytes (write + read, mostly in L2) per output element per split: at most this
    fraction of the weight bytes, so partial sums never cost the decode stream much."""
    max_splits: int = 16
    min_k_tiles_per_split: int = 2
    partials_per_stream: int = 1 << 21
    """int32 elements of the split-K partial buffer per stream (8 MiB); larger needs fall back to fewer splits."""
    counter_slots: int = 64
    """Streams per device that can run split-K (each needs its own zeroed counters, 32 KB; a stream beyond
    these runs without split-K: correct, slower at small M)."""


DISPATCH = GemmDispatch()


@dataclasses.dataclass(frozen=True)
class Plan:
    path: str      # "decode" | "mma" | one of WGMMA_PATHS
    config: int    # hdrq_C config index of that path
    splits: int
    bm: int
    bn: int
    bk: int
    expand: bool = False  # 6-bit weights expanded to the 8-bit layout first, then the 8-bit kernel


# ---------------------------------------------------------------------------------------- devices

_DEVICE_INFO: dict[int, tuple[int, int]] = {}
_TILE_INFO: dict[tuple[int, int, int], tuple[int, ...]] = {}


def _device_info(index: int) -> tuple[int, int]:
    """(compute capability as 10*major + minor, SM count) of CUDA device ``index``."""
    if index not in _DEVICE_INFO:
        p = torch.cuda.get_device_properties(index)
        _DEVICE_INFO[index] = (10 * p.major + p.minor, p.multi_processor_count)
    return _DEVICE_INFO[index]


def tile_info(path: int, config: int, w_bits: int) -> tuple[int, ...]:
    """(bm, bn, bk, threads, smem bytes, split-K counters) of a kernel configuration, from the library."""
    key = (path, config, w_bits)
    if key not in _TILE_INFO:
        _TILE_INFO[key] = tuple(int(v) for v in torch.ops.hdrq_C.gemm_info(path, config, w_bits))
    return _TILE_INFO[key]


# ---------------------------------------------------------------------------------------- planning


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _splits(m: int, n: int, k: int, w_bits: int, bm: int, bn: int, bk: int, sms: int,
            blocks_per_sm: float, d: GemmDispatch, partial_fraction: Optional[float] = None) -> int:
    tiles = _cdiv(m, bm) * _cdiv(n, bn)
    want = _cdiv(int(blocks_per_sm * sms), tiles)
    weight_bytes = n * k * w_bits / 8
    fraction = d.max_partial_fraction if partial_fraction is None else partial_fraction
    by_traffic = int(fraction * weight_bytes / (8 * m * n))
    by_k = _cdiv(k, bk) // d.min_k_tiles_per_split
    splits = max(1, min(want, by_traffic, by_k, d.max_splits))
    while splits > 1 and tiles * splits * bm * bn > d.partials_per_stream:
        splits -= 1
    if tiles > tile_info(0, 0, w_bits)[5]:
        splits = 1
    return splits


def plan(m: int, n: int, k: int, w_bits: int, device: torch.device, path: str = "auto",
         dispatch: Optional[GemmDispatch] = None, a_aligned: bool = True) -> Plan:
    """The kernel, tiles and split-K that ``int_matmul`` uses for these sizes on ``device`` (``a_aligned``:
    the rows of A start on 16-byte boundaries). Raises :class:`hdrq.ops.Unsupported` for a path that cannot
    take them."""
    d = dispatch or DISPATCH
    cc, sms = _device_info(device.index if device.index is not None else torch.cuda.current_device())
    if cc < 80:
        raise ops.Unsupported(f"the GEMM kernels need sm_80 or newer, got compute capability {cc // 10}.{cc % 10}")
    if path not in PATHS:
        raise ValueError(f"HDRQ_GEMM_PATH must be one of {PATHS}, got {path!r}")
    wgmma_ok = cc == 90 and n % 16 == 0 and k % 32 == 0 and a_aligned
    expand_wanted = w_bits == 6 and _w6_expand(m, d)

    def kernel_bits(wgmma_path: str) -> int:  # the weight width the wgmma kernel runs on that path
        return 8 if w_bits == 6 and (expand_wanted or wgmma_path in EIGHT_BIT_ONLY) else w_bits

    if path == "auto":
        if m <= d.decode_max_m:
            path = "decode"
            if (d.wgmma_decode_max_m is not None and m <= d.wgmma_decode_max_m and wgmma_ok
                    and w_bits in d.wgmma_decode_bits and _wgmma_verified(device, "wgmma_decode")):
                path = "wgmma_decode"
        elif (d.wgmma_min_m is not None and wgmma_ok and m >= d.wgmma_min_m
              and (w_bits in d.wgmma_bits or expand_wanted)
              and _cdiv(m, 128) * _cdiv(n, tile_info(1, WGMMA_PATHS[d.wgmma_path], kernel_bits(d.wgmma_path))[1])
              >= d.wgmma_min_waves * sms
              and _wgmma_verified(device, d.wgmma_path)):
            path = d.wgmma_path
        else:
            path = "mma"
    if path in WGMMA_PATHS:
        if not wgmma_ok:
            raise ops.Unsupported(f"the wgmma path needs an sm_90 GPU, N % 16 == 0, K % 32 == 0 and 16-byte aligned "
                                  f"A rows; got compute capability {cc // 10}.{cc % 10}, N={n}, K={k}")
        config = WGMMA_PATHS[path]
        bits = kernel_bits(path)
        expand = bits != w_bits
        bm, bn, bk = tile_info(1, config, bits)[:3]
        splits = 1
        if path == "wgmma_decode":
            splits = _splits(m, n, k, bits, bm, bn, bk, sms, d.wgmma_decode_blocks_per_sm, d,
                             d.wgmma_decode_partial_fraction)
            per_split = _cdiv(_cdiv(k, bk), splits)
            splits = _cdiv(_cdiv(k, bk), per_split)  # no split made only of padding steps past K
        return Plan(path, config, splits, bm, bn, bk, expand)
    if path == "decode":
        _, name, blocks_per_sm = next((b for b in d.decode_configs if m <= b[0]), d.decode_configs[-1])
        config = DECODE_CONFIGS[name][0]
    else:
        bm128, bn128 = tile_info(0, _TILE128, w_bits)[:2]
        config = _TILE128 if _cdiv(m, bm128) * _cdiv(n, bn128) >= sms else _TILE64
        blocks_per_sm = d.mma_blocks_per_sm
    bm, bn, bk = tile_info(0, config, w_bits)[:3]
    if _cdiv(m, bm) > 65535:
        raise ops.Unsupported(f"M = {m} needs more than 65535 row tiles of {bm}")
    splits = _splits(m, n, k, w_bits, bm, bn, bk, sms, blocks_per_sm, d)
    return Plan(path, config, splits, bm, bn, bk)


def _w6_expand(m: int, d: GemmDispatch) -> bool:
    """Whether 6-bit weights on a wgmma path are expanded first: HDRQ_W6_EXPAND=1 / 0 forces it, else
    GemmDispatch.w6_expand_min_m."""
    forced = os.environ.get("HDRQ_W6_EXPAND", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(f"HDRQ_W6_EXPAND must be 0 or 1, got {forced!r}")
    return d.w6_expand_min_m is not None and m >= d.w6_expand_min_m


SPLIT_K_WGMMA = ("wgmma_decode",)  # the wgmma configurations with split-K (csrc/gemm_wgmma.cu)


def plan_for_config(m: int, n: int, k: int, w_bits: int, config: str, splits: int,
                    device: Optional[torch.device] = None) -> Plan:
    """The plan of decode configuration ``config`` (a name in :data:`DECODE_CONFIGS`, or a wgmma path of
    :data:`SPLIT_K_WGMMA`) with ``splits`` K splits, for ``int_gemm_out(..., plan_override=...)``; ValueError if
    K has fewer stage tiles than splits; ops.Unsupported if a wgmma path cannot take the sizes on ``device``
    (default: the current CUDA device)."""
    if config in SPLIT_K_WGMMA:
        plan(m, n, k, w_bits, device or torch.device("cuda", torch.cuda.current_device()), config)  # or Unsupported
        path, cxx, index = config, 1, WGMMA_PATHS[config]
    else:
        path, cxx, index = "decode", 0, DECODE_CONFIGS[config][0]
    bm, bn, bk = tile_info(cxx, index, w_bits)[:3]
    if not 1 <= splits <= _cdiv(k, bk):
        raise ValueError(f"{config}: {splits} splits of K = {k} in steps of {bk}")
    return Plan(path, index, splits, bm, bn, bk)


# ---------------------------------------------------------------------------------------- wgmma check

_WGMMA_VERIFIED: dict[tuple[int, str], bool] = {}  # (device index, wgmma path) -> passed the check


_CHECK_SHAPES = ((200, 272, 544), (2048, 2048, 512))  # ragged last tiles; more tiles than SMs (persistence)
_CHECK_SPLIT = (17, 272, 2080, 3)  # split-K paths also: 17 k-tiles in 3 splits of 6 (one padding step)
_CHECK_ODD_PAIR = (300, 272, 544)  # cluster paths also: 3 M-tiles, so the last pair's second CTA is past M


def _wgmma_mismatch(device: torch.device, shapes=_CHECK_SHAPES[:1], path: str = "wgmma") -> Optional[str]:
    """None if the wgmma kernel (schedule ``path``) reproduces the mma kernel's int32 accumulator exactly on
    ``shapes`` for both weight widths (and, for a split-K path, on _CHECK_SPLIT with its splits), else what
    went wrong. Syncs the host."""
    gen = torch.Generator(device=device).manual_seed(1234)
    cases = [(m, n, k, None) for m, n, k in shapes] + ([_CHECK_SPLIT] if path in SPLIT_K_WGMMA else [])
    if path in EIGHT_BIT_ONLY:  # (the cluster configuration)
        cases.append((*_CHECK_ODD_PAIR, None))
    for m, n, k, splits in cases:
        for bits in (8, 6):
            lim = 128 if bits == 8 else 32
            q = torch.randint(-lim, lim, (n, k), dtype=torch.int8, device=device, generator=gen)
            w = ops.pack_weight(q, bits)
            a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device, generator=gen)
            ones = torch.ones(n, dtype=torch.float32, device=device)
            got = torch.empty((m, n), dtype=torch.int32, device=device)
            want = torch.empty_like(got)
            try:
                run = (dict(path=path) if splits is None
                       else dict(plan_override=plan_for_config(m, n, k, bits, path, splits, device)))
                int_gemm_out(got, a, ones[:1], w, ones, None, bits, **run)
                int_gemm_out(want, a, ones[:1], w, ones, None, bits, path="mma")
                same = torch.equal(got, want)
            except Exception as e:  # a launch failure is reported, not raised: mma still works
                return f"{type(e).__name__}: {e}"
            if not same:
                bad = (got != want).sum().item()
                how = "" if splits is None else f" with {splits} K splits"
                return (f"{path}{how}: {bad} of {m * n} accumulators differ from mma.sync at (M, N, K) = "
                        f"({m}, {n}, {k}), {bits}-bit")
    return None


def _wgmma_verified(device: torch.device, path: str = "wgmma") -> bool:
    """Whether the wgmma kernel with schedule ``path`` agrees with the mma kernel on this device (checked
    once, exactly, on a problem with a partial last tile in M, N and K, for both weight widths). Inside a
    CUDA-graph capture an unchecked device counts as not verified (the check needs a host sync), so the
    capture uses mma."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if (index, path) in _WGMMA_VERIFIED:
        return _WGMMA_VERIFIED[index, path]
    if torch.cuda.is_current_stream_capturing():
        return False
    why = _wgmma_mismatch(torch.device("cuda", index), path=path)
    if why is not None:
        warnings.warn(f"hdrq: the wgmma GEMM ({path}) failed its first-use check on cuda:{index} ({why}); using "
                      f"the mma.sync kernels there", RuntimeWarning)
    _WGMMA_VERIFIED[index, path] = why is None
    return why is None


def wgmma_canary(path: str = "wgmma", timeout: float = 180.0) -> tuple[bool, str]:
    """Run the wgmma kernel (schedule ``path``) against the mma kernel in a *separate process* (so a kernel
    that faults or hangs cannot take the caller's CUDA context down): (passed, its output). For tests and
    benchmarks, which run this before they launch the wgmma kernel in-process."""
    if path not in WGMMA_PATHS:
        raise ValueError(f"wgmma_canary: path must be one of {tuple(WGMMA_PATHS)}, got {path!r}")
    import subprocess
    import sys

    code = ("import sys, torch, hdrq._cuda as c\n"
            "cc = torch.cuda.get_device_capability()\n"
            "if cc != (9, 0): print(f'not an sm_90 GPU: {cc}'); sys.exit(3)\n"
            f"why = c._wgmma_mismatch(torch.device('cuda', 0), c._CHECK_SHAPES, {path!r})\n"
            "torch.cuda.synchronize()\n"
            f"print(why or '{path} == mma on every check shape'); sys.exit(0 if why is None else 1)\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"the wgmma check did not finish in {timeout:.0f} s (a hang)"
    return r.returncode == 0, (r.stdout + r.stderr).strip()[-2000:]


# ---------------------------------------------------------------------------------------- workspace


class _Workspace:
    """Split-K scratch of one device: zeroed counters (``counter_slots`` x one per output tile, created
    once outside CUDA-graph capture; the kernels leave them zero) and, per stream, a partial-sum buffer
    that needs no initialisation (so it may be created during capture). Streams get their own slot, so
    concurrent streams never share counters."""

    def __init__(self, device: torch.device, slots: int, counters_per_slot: int):
        self.counters = torch.zeros((slots, counters_per_slot), dtype=torch.int32, device=device)
        self.slot_of: dict[int, int] = {}
        self.partials: dict[int, Tensor] = {}
        self.expanded: dict[int, Tensor] = {}
        # Buffers outgrown by a later call stay allocated: a CUDA graph captured earlier may still use them.
        self.retired: list[Tensor] = []

    def expand_buffer(self, stream: int, nbytes: int) -> Tensor:
        """The stream's uint8 buffer for expanded 6-bit weights, at least nbytes (16-byte aligned)."""
        buf = self.expanded.get(stream)
        if buf is None or buf.numel() < nbytes:
            if buf is not None:
                self.retired.append(buf)
            buf = self.expanded[stream] = torch.empty(nbytes, dtype=torch.uint8, device=self.counters.device)
        return buf

    def get(self, stream: int, elems: int) -> Optional[tuple[Tensor, Tensor]]:
        slot = self.slot_of.get(stream)
        if slot is None:
            if len(self.slot_of) >= self.counters.shape[0]:
                return None
            slot = self.slot_of[stream] = len(self.slot_of)
        part = self.partials.get(stream)
        if part is None or part.numel() < elems:
            if part is not None:
                self.retired.append(part)
            part = self.partials[stream] = torch.empty(elems, dtype=torch.int32, device=self.counters.device)
        return self.counters[slot], part


_WORKSPACES: dict[int, _Workspace] = {}
_EMPTY: dict[int, Tensor] = {}


def _device_workspace(device: torch.device, counters_per_slot: int) -> Optional[_Workspace]:
    ws = _WORKSPACES.get(device.index)
    if ws is None:
        if torch.cuda.is_current_stream_capturing():
            return None  # zeroed counters cannot be made inside a capture
        ws = _WORKSPACES[device.index] = _Workspace(device, DISPATCH.counter_slots, counters_per_slot)
    return ws


def _workspace(device: torch.device, elems: int, counters_per_slot: int) -> Optional[tuple[Tensor, Tensor]]:
    ws = _device_workspace(device, counters_per_slot)
    if ws is None:
        return None  # inside a capture before any split-K call: this call runs without split-K
    return ws.get(torch.cuda.current_stream(device).cuda_stream, elems)


def _expanded_weight(w: Tensor, n: int, k: int) -> Tensor:
    """pack_weight(q, 8) of the 6-bit pack_weight(q, 6) tensor ``w``, in the stream's expansion buffer (valid
    until the next expanding call on this stream)."""
    ws = _device_workspace(w.device, tile_info(0, 0, 8)[5])
    if ws is None:  # first call of the device inside a capture: a buffer of this capture's own
        buf = torch.empty(n * k, dtype=torch.uint8, device=w.device)
    else:
        buf = ws.expand_buffer(torch.cuda.current_stream(w.device).cuda_stream, n * k)
    w8 = buf[: n * k].view(torch.int8).view(n, k)
    torch.ops.hdrq_C.expand_w6(w8, w, n, k)
    PATH_CALLS["expand_w6"] += 1
    return w8


def expand_w6(w: Tensor, n: int, k: int) -> Tensor:
    """A new int8 tensor ``pack_weight(q, 8)`` from ``w = pack_weight(q, 6)`` ([N, 3K/4] uint8, CUDA), by the
    expansion kernel; N % 16 == 0 and K % 32 == 0. (What ``Plan.expand`` runs before the 8-bit kernel.)"""
    w8 = torch.empty((n, k), dtype=torch.int8, device=w.device)
    torch.ops.hdrq_C.expand_w6(w8, w, n, k)
    return w8


def _empty_int32(device: torch.device) -> Tensor:
    if device.index not in _EMPTY:
        _EMPTY[device.index] = torch.empty(0, dtype=torch.int32, device=device)
    return _EMPTY[device.index]


# ---------------------------------------------------------------------------------------- launch


def _current_path() -> str:
    return os.environ.get("HDRQ_GEMM_PATH", "auto").strip().lower() or "auto"


def int_gemm_out(out: Tensor, a_q: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                 w_bits: int, path: Optional[str] = None, plan_override: Optional[Plan] = None) -> Plan:
    """Run the GEMM into a caller-provided ``out`` ([M, N], bf16/fp16/fp32, or int32 for the accumulator)
    and return the plan it ran. Raises :class:`hdrq.ops.Unsupported` for inputs the kernels cannot take.
    (Tests call this with poisoned ``out`` tensors.) ``plan_override``: run exactly this plan (path, config,
    splits; from :func:`plan_for_config`) instead of the dispatcher's: for tests and bench/tune_gemm.py."""
    if a_q.device.type != "cuda":
        raise ops.Unsupported(f"the CUDA GEMM runs on CUDA tensors, got {a_q.device}")
    m, k = a_q.shape
    n = w_scale.shape[0]
    if m == 0 or n == 0 or k == 0:
        raise ops.Unsupported(f"empty GEMM (M, N, K) = ({m}, {n}, {k})")
    if max(m, n, k) >= 2**31 - 1:
        raise ops.Unsupported(f"sizes beyond int32: (M, N, K) = ({m}, {n}, {k})")
    if a_q.stride(1) != 1:
        raise ops.Unsupported(f"a_q must have unit stride along K, got strides {tuple(a_q.stride())}")
    if not w.is_contiguous() or w.data_ptr() % 16 != 0:
        raise ops.Unsupported("w must be contiguous and 16-byte aligned (a fresh pack_weight tensor is)")
    for name, t in (("a_scale", a_scale), ("w_scale", w_scale), ("bias", bias)):
        if t is not None and not t.is_contiguous():
            raise ops.Unsupported(f"{name} must be contiguous, got strides {tuple(t.stride())}")
    a_aligned = a_q.stride(0) % 16 == 0 and a_q.data_ptr() % 16 == 0
    pl = plan_override or plan(m, n, k, w_bits, a_q.device, path or _current_path(), a_aligned=a_aligned)
    if pl.expand:
        if w_bits != 6:
            raise ValueError(f"a plan with expand=True runs 6-bit weights, got w_bits={w_bits}")
        w, w_bits = _expanded_weight(w, n, k), 8
    splits = pl.splits
    counters = partials = _empty_int32(a_q.device)
    if splits > 1:
        tiles = _cdiv(m, pl.bm) * _cdiv(n, pl.bn)
        counters_per_slot = tile_info(_CXX_PATH[pl.path], pl.config, w_bits)[5]
        ws = _workspace(a_q.device, max(tiles * splits * pl.bm * pl.bn, DISPATCH.partials_per_stream),
                        counters_per_slot)
        if ws is None:
            splits = 1
        else:
            counters, partials = ws
    torch.ops.hdrq_C.int_gemm(out, a_q, a_scale, w, w_scale, bias, counters, partials, w_bits,
                              _CXX_PATH[pl.path], pl.config, splits)
    PATH_CALLS[pl.path] += 1
    return dataclasses.replace(pl, splits=splits)


def int_matmul(a_q: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, w_bits: int, bias: Optional[Tensor],
               out_dtype: torch.dtype) -> Tensor:
    out = torch.empty((a_q.shape[0], w_scale.shape[0]), dtype=out_dtype, device=a_q.device)
    int_gemm_out(out, a_q, a_scale, w, w_scale, bias, w_bits)
    return out


def int_matmul_int32(a_q: Tensor, w: Tensor, w_bits: int) -> Tensor:
    n = w.shape[0]
    out = torch.empty((a_q.shape[0], n), dtype=torch.int32, device=a_q.device)
    # The scales are not read for int32 output; the op still checks their shapes.
    ones = torch.ones(max(n, 1), dtype=torch.float32, device=a_q.device)
    int_gemm_out(out, a_q, ones[:1], w, ones[:n], None, w_bits)
    return out


# ---------------------------------------------------------------------------------------- registration


@torch.library.register_fake("hdrq_C::int_gemm")
def _(out, a_q, a_scale, w, w_scale, bias, counters, partials, w_bits, path, config, splits):
    return None


@torch.library.register_fake("hdrq_C::expand_w6")
def _(w8, w6, n, k):
    return None


ops.register_impl("int_matmul", "cuda", int_matmul)
ops.register_impl("int_matmul_int32", "cuda", int_matmul_int32)

"""``int_matmul`` on CUDA: the routing among the GEMM implementations, and the glue of the CUDA C++ kernels.

``hdrq.ops`` registers :func:`int_matmul` (and :func:`int_matmul_int32`) as the ops' CUDA kernels. Each call
takes the :class:`Route` of its sizes, from the device's routing table (:func:`routing_table`), to one of

* ``decode``: the ``mma.sync`` decode kernels of ``hdrq._C`` (csrc/gemm_mma.cu): M <= 64, weights streamed once
  with split-K; ``mma``: the same file's general kernel, any M;
* ``wgmma``, ``wgmma_pp``, ``wgmma256``, ``wgmma_decode``, ``wgmma_mc``: the Hopper (sm_90a) kernels of
  csrc/gemm_wgmma.cu (cooperative 128x128, ping-pong, 128x256, 64x128 split-K decode, 2-CTA clusters with weight
  multicast; the last four only where a tuned table names them); 6-bit weights optionally expanded to the 8-bit
  layout first (``Route.expand``: csrc/gemm_expand.cu, then the 8-bit kernel);
* ``triton``: the Triton GEMM with the epilogue fused (``hdrq.kernels.gemm``; 6-bit weights expanded first),
  with the table's tile configuration;
* ``int_mm``: ``torch._int_mm`` (cuBLASLt) on the weights made row-major, then the epilogue kernel.

A routing table is JSON (``hdrq/gemm_tables/``, or the file named by env ``HDRQ_GEMM_TABLE``): rules tried in
order, the first whose bits, M bound and (optionally) N and K match gives the route; ``bench/tune_gemm.py
--table-out`` measures every implementation on the device and writes one. Env ``HDRQ_GEMM_PATH`` (read on every
call, so tests and benchmarks can force each implementation, also while a CUDA graph is captured) overrides the
table; ``HDRQ_W6_EXPAND=1|0`` forces the expansion of 6-bit weights on a wgmma path on or off.

A route the inputs cannot take (no extension, not sm_90, ``N % 16``, ``torch._int_mm``'s limits, ...) runs the
Triton GEMM instead, which takes anything: never a wrong result. Nothing here checks results or syncs the host:
the correctness of every path is the tests' business. :data:`PATH_CALLS` counts the calls per path taken (tests
check that a forced path really ran).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Optional

import torch
from torch import Tensor

from hdrq.kernels import gemm as triton_gemm
from hdrq.kernels.gemm import GemmConfig

try:
    from . import _C  # noqa: F401  (loads the library: registers the CUDA kernels of the hdrq::int_gemm ops)
    EXTENSION_ERROR: Optional[str] = None
except ImportError as e:  # not built (no nvcc at install time): the Triton GEMM serves every route
    EXTENSION_ERROR = f"{type(e).__name__}: {e}"

WGMMA_PATHS = {"wgmma": 0, "wgmma_pp": 1, "wgmma256": 2, "wgmma_decode": 3, "wgmma_mc": 4}  # -> WgmmaConfig
CXX_PATHS = ("decode", "mma", *WGMMA_PATHS)
PATHS = ("auto", *CXX_PATHS, "triton", "int_mm")
_CXX_PATH = {"decode": 0, "mma": 0, **{path: 1 for path in WGMMA_PATHS}}  # 0: the mma.sync kernels
EIGHT_BIT_ONLY = ("wgmma_mc",)  # 6-bit weights on these paths are always expanded first
SPLIT_K_WGMMA = ("wgmma_decode",)  # the wgmma configurations with split-K (csrc/gemm_wgmma.cu)
# Config indices of hdrq::int_gemm path 0 (csrc/gemm.h, MmaConfig)
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
    """How the CUDA C++ kernels are planned once a route names them: tiles and split-K."""

    decode_configs: tuple = ((16, "Decode16", 1.0), (32, "Decode32", 1.5), (64, "Decode64", 1.5))
    """Per decode M bucket, smallest first: (largest M, configuration name in DECODE_CONFIGS, blocks per SM that
    split-K aims at: enough weight bytes in flight to saturate HBM). Fitted by bench/tune_gemm.py on an H100 (every
    configuration x 1-16 splits, 3 shapes, M in {1, 16, 32, 64}, both widths; bench/RESULTS.md)."""
    wgmma_decode_blocks_per_sm: float = 2.0
    """Split-K target of ``wgmma_decode``: work items per SM (two CTAs fit on an SM)."""
    wgmma_decode_partial_fraction: float = 1.0
    """``wgmma_decode``'s cap on split-K partial traffic as a fraction of the weight bytes (its 64x128 tiles are
    few: 32 on N = 4096, so it needs more splits than max_partial_fraction allows; the partials stay in L2)."""
    mma_blocks_per_sm: float = 1.0
    """General path: split K only while the output tiles fill fewer than this many blocks per SM."""
    max_partial_fraction: float = 0.25
    """Split-K moves 8 bytes (write + read, mostly in L2) per output element per split: at most this fraction of
    the weight bytes, so partial sums never cost the decode stream much."""
    max_splits: int = 16
    min_k_tiles_per_split: int = 2
    partials_per_stream: int = 1 << 21
    """int32 elements of the split-K partial buffer per stream (8 MiB); larger needs fall back to fewer splits."""
    counter_slots: int = 64
    """Streams per device that can run split-K (each needs its own zeroed counters, 32 KB; a stream beyond these
    runs without split-K: correct, slower at small M)."""


DISPATCH = GemmDispatch()

# ==================================================================================================
# Routing tables
# ==================================================================================================


@dataclasses.dataclass(frozen=True)
class Route:
    """Which implementation runs a call: ``path`` (one of :data:`PATHS` but ``auto``), ``expand`` (6-bit
    weights on a wgmma path: expanded to the 8-bit layout first) and ``config`` (the Triton GEMM's tiles)."""

    path: str
    expand: bool = False
    config: Optional[GemmConfig] = None


@dataclasses.dataclass(frozen=True)
class Rule:
    """One routing-table entry: calls with ``bits``-bit weights and M <= ``max_m`` (None: any M), and N / K equal
    to ``n`` / ``k`` where those are given, take ``route``."""

    bits: int
    max_m: Optional[int]
    route: Route
    n: Optional[int] = None
    k: Optional[int] = None

    def matches(self, m: int, n: int, k: int, bits: int) -> bool:
        return (self.bits == bits and (self.max_m is None or m <= self.max_m) and (self.n is None or self.n == n)
                and (self.k is None or self.k == k))


@dataclasses.dataclass
class RoutingTable:
    rules: list
    meta: dict
    path: Optional[str] = None

    def route(self, m: int, n: int, k: int, bits: int) -> Route:
        for rule in self.rules:
            if rule.matches(m, n, k, bits):
                return rule.route
        return Route("triton")

    @classmethod
    def from_json(cls, doc: dict, path: Optional[str] = None) -> "RoutingTable":
        if doc.get("format") != "hdrq-gemm-routes" or doc.get("version") != 1:
            raise ValueError(f"{path or 'routing table'}: not an hdrq-gemm-routes version 1 file")
        rules = []
        for i, r in enumerate(doc["rules"]):
            if r["path"] not in PATHS[1:] or r["bits"] not in (6, 8):
                raise ValueError(f"{path or 'routing table'}: rule {i} has path {r['path']!r}, bits {r['bits']!r}")
            config = GemmConfig(**r["config"]) if r.get("config") else None
            rules.append(Rule(r["bits"], r.get("max_m"), Route(r["path"], bool(r.get("expand", False)), config),
                              r.get("n"), r.get("k")))
        return cls(rules, {k: v for k, v in doc.items() if k != "rules"}, path)

    def to_json(self) -> dict:
        rules = []
        for r in self.rules:
            d = {"bits": r.bits, "max_m": r.max_m, "path": r.route.path}
            d.update({key: v for key, v in (("n", r.n), ("k", r.k)) if v is not None})
            if r.route.expand:
                d["expand"] = True
            if r.route.config is not None:
                d["config"] = dataclasses.asdict(r.route.config)
            rules.append(d)
        return {**self.meta, "format": "hdrq-gemm-routes", "version": 1, "rules": rules}


TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemm_tables")


def _generic_table() -> RoutingTable:
    """For a device without a table: the decode kernels for M <= 64 (where they were built for), the Triton GEMM
    elsewhere."""
    decode = [] if EXTENSION_ERROR else [Rule(b, 64, Route("decode")) for b in (8, 6)]
    return RoutingTable(decode, {"source": "generic rules: no routing table for this device"})


def load_table(path: str) -> RoutingTable:
    with open(path) as f:
        return RoutingTable.from_json(json.load(f), path)


def _table_for(name: str) -> RoutingTable:
    forced = os.environ.get("HDRQ_GEMM_TABLE")
    if forced:
        return load_table(forced)
    if os.path.isdir(TABLE_DIR):
        for file in sorted(os.listdir(TABLE_DIR)):
            if file.endswith(".json"):
                table = load_table(os.path.join(TABLE_DIR, file))
                if name in table.meta.get("device", {}).get("names", ()):
                    return table
    return _generic_table()


_TABLES: dict[int, RoutingTable] = {}
_ROUTES: dict[tuple, Route] = {}


def routing_table(index: Optional[int] = None) -> RoutingTable:
    """The routing table of CUDA device ``index`` (default: the current one)."""
    index = torch.cuda.current_device() if index is None else index
    if index not in _TABLES:
        _TABLES[index] = _table_for(torch.cuda.get_device_name(index))
    return _TABLES[index]


def set_routing_table(table: Optional[RoutingTable], index: Optional[int] = None) -> None:
    """Use ``table`` on device ``index`` from now on (None: the device's default again)."""
    index = torch.cuda.current_device() if index is None else index
    _TABLES.pop(index, None)
    if table is not None:
        _TABLES[index] = table
    _ROUTES.clear()


def _forced_route(m: int, n: int, k: int) -> Optional[Route]:
    path = os.environ.get("HDRQ_GEMM_PATH", "auto").strip().lower() or "auto"
    if path == "auto":
        return None
    if path not in PATHS:
        raise ValueError(f"HDRQ_GEMM_PATH must be one of {PATHS}, got {path!r}")
    return Route(path, _w6_expand_forced() or path in EIGHT_BIT_ONLY,
                 triton_gemm.default_config(m, n, k) if path == "triton" else None)


def _w6_expand_forced() -> bool:
    forced = os.environ.get("HDRQ_W6_EXPAND", "").strip()
    if forced not in ("", "0", "1"):
        raise ValueError(f"HDRQ_W6_EXPAND must be 0 or 1, got {forced!r}")
    return forced == "1"


def route(m: int, n: int, k: int, bits: int, index: int) -> Route:
    """The route of a call on device ``index``: ``HDRQ_GEMM_PATH`` if set, else the routing table's."""
    forced = _forced_route(m, n, k)
    if forced is not None:
        return forced
    key = (index, m, n, k, bits)
    r = _ROUTES.get(key)
    if r is None:
        if len(_ROUTES) > 4096:
            _ROUTES.clear()
        r = _ROUTES[key] = routing_table(index).route(m, n, k, bits)
    return r


# ==================================================================================================
# Planning of the C++ kernels
# ==================================================================================================


@dataclasses.dataclass(frozen=True)
class Plan:
    path: str      # "decode" | "mma" | one of WGMMA_PATHS
    config: int    # hdrq::int_gemm config index of that path
    splits: int
    bm: int
    bn: int
    bk: int
    expand: bool = False  # 6-bit weights expanded to the 8-bit layout first, then the 8-bit kernel


class CannotRun(Exception):
    """A C++ route cannot take these inputs (the caller runs the Triton GEMM instead)."""


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
        _TILE_INFO[key] = tuple(int(v) for v in torch.ops.hdrq.gemm_info(path, config, w_bits))
    return _TILE_INFO[key]


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


def plan(m: int, n: int, k: int, w_bits: int, device: torch.device, path: str, expand: bool = False,
         dispatch: Optional[GemmDispatch] = None, a_aligned: bool = True) -> Plan:
    """Tiles and split-K of C++ path ``path`` for these sizes on ``device`` (``a_aligned``: the rows of A start on
    16-byte boundaries; ``expand``: 6-bit weights on a wgmma path run expanded). Raises :class:`CannotRun` where
    the path cannot take them."""
    d = dispatch or DISPATCH
    if EXTENSION_ERROR is not None:
        raise CannotRun(f"the CUDA extension hdrq._C is not available ({EXTENSION_ERROR})")
    if path not in CXX_PATHS:
        raise ValueError(f"plan: path must be one of {CXX_PATHS}, got {path!r}")
    cc, sms = _device_info(device.index if device.index is not None else torch.cuda.current_device())
    if cc < 80:
        raise CannotRun(f"the GEMM kernels need sm_80 or newer, got compute capability {cc // 10}.{cc % 10}")
    if path in WGMMA_PATHS:
        if not (cc == 90 and n % 16 == 0 and k % 32 == 0 and a_aligned):
            raise CannotRun(f"the wgmma path needs an sm_90 GPU, N % 16 == 0, K % 32 == 0 and 16-byte aligned A "
                            f"rows; got compute capability {cc // 10}.{cc % 10}, N={n}, K={k}")
        config = WGMMA_PATHS[path]
        bits = 8 if w_bits == 6 and (expand or path in EIGHT_BIT_ONLY) else w_bits
        bm, bn, bk = tile_info(1, config, bits)[:3]
        splits = 1
        if path == "wgmma_decode":
            splits = _splits(m, n, k, bits, bm, bn, bk, sms, d.wgmma_decode_blocks_per_sm, d,
                             d.wgmma_decode_partial_fraction)
            per_split = _cdiv(_cdiv(k, bk), splits)
            splits = _cdiv(_cdiv(k, bk), per_split)  # no split made only of padding steps past K
        return Plan(path, config, splits, bm, bn, bk, bits != w_bits)
    if path == "decode":
        _, name, blocks_per_sm = next((b for b in d.decode_configs if m <= b[0]), d.decode_configs[-1])
        config = DECODE_CONFIGS[name][0]
    else:
        bm128, bn128 = tile_info(0, _TILE128, w_bits)[:2]
        config = _TILE128 if _cdiv(m, bm128) * _cdiv(n, bn128) >= sms else _TILE64
        blocks_per_sm = d.mma_blocks_per_sm
    bm, bn, bk = tile_info(0, config, w_bits)[:3]
    if _cdiv(m, bm) > 65535:
        raise CannotRun(f"M = {m} needs more than 65535 row tiles of {bm}")
    splits = _splits(m, n, k, w_bits, bm, bn, bk, sms, blocks_per_sm, d)
    return Plan(path, config, splits, bm, bn, bk)


def plan_for_config(m: int, n: int, k: int, w_bits: int, config: str, splits: int,
                    device: Optional[torch.device] = None) -> Plan:
    """The plan of decode configuration ``config`` (a name in :data:`DECODE_CONFIGS`, or a wgmma path of
    :data:`SPLIT_K_WGMMA`) with ``splits`` K splits, for ``int_gemm_out(..., plan_override=...)``; ValueError if
    K has fewer stage tiles than splits; :class:`CannotRun` if a wgmma path cannot take the sizes on ``device``
    (default: the current CUDA device)."""
    if config in SPLIT_K_WGMMA:
        plan(m, n, k, w_bits, device or torch.device("cuda", torch.cuda.current_device()), config)  # or CannotRun
        path, cxx, index = config, 1, WGMMA_PATHS[config]
    else:
        path, cxx, index = "decode", 0, DECODE_CONFIGS[config][0]
    bm, bn, bk = tile_info(cxx, index, w_bits)[:3]
    if not 1 <= splits <= _cdiv(k, bk):
        raise ValueError(f"{config}: {splits} splits of K = {k} in steps of {bk}")
    return Plan(path, index, splits, bm, bn, bk)


# ==================================================================================================
# Split-K workspace (zeroed counters, created outside graph capture) and the 6-bit expansion buffer
# ==================================================================================================


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


def _expanded_weight(w: Tensor, n: int, k: int) -> Tensor:
    """pack_weight(q, 8) of the 6-bit pack_weight(q, 6) tensor ``w``, in the stream's expansion buffer (valid
    until the next expanding call on this stream)."""
    ws = _device_workspace(w.device, tile_info(0, 0, 8)[5])
    if ws is None:  # first call of the device inside a capture: a buffer of this capture's own
        buf = torch.empty(n * k, dtype=torch.uint8, device=w.device)
    else:
        buf = ws.expand_buffer(torch.cuda.current_stream(w.device).cuda_stream, n * k)
    w8 = buf[: n * k].view(torch.int8).view(n, k)
    torch.ops.hdrq.expand_w6(w8, w, n, k)
    PATH_CALLS["expand_w6"] += 1
    return w8


def expand_w6(w: Tensor, n: int, k: int) -> Tensor:
    """A new int8 tensor ``pack_weight(q, 8)`` from ``w = pack_weight(q, 6)`` ([N, 3K/4] uint8, CUDA), by the
    expansion kernel of csrc/gemm_expand.cu; N % 16 == 0 and K % 32 == 0."""
    w8 = torch.empty((n, k), dtype=torch.int8, device=w.device)
    torch.ops.hdrq.expand_w6(w8, w, n, k)
    return w8


def _empty_int32(device: torch.device) -> Tensor:
    if device.index not in _EMPTY:
        _EMPTY[device.index] = torch.empty(0, dtype=torch.int32, device=device)
    return _EMPTY[device.index]


# ==================================================================================================
# Launch
# ==================================================================================================


def int_gemm_out(out: Tensor, a_q: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor],
                 w_bits: int, path: str = "decode", expand: bool = False,
                 plan_override: Optional[Plan] = None) -> Plan:
    """Run C++ path ``path`` into a caller-provided ``out`` ([M, N], bf16/fp16/fp32, or int32 for the accumulator)
    and return the plan it ran; :class:`CannotRun` for inputs the path cannot take. (Tests call this with poisoned
    ``out`` tensors.) ``plan_override``: run exactly this plan (from :func:`plan_for_config`): for tests and
    bench/tune_gemm.py."""
    m, k = a_q.shape
    n = w_scale.shape[0]
    if m == 0 or n == 0 or k == 0:
        raise CannotRun(f"empty GEMM (M, N, K) = ({m}, {n}, {k})")
    if max(m, n, k) >= 2**31 - 1:
        raise CannotRun(f"sizes beyond int32: (M, N, K) = ({m}, {n}, {k})")
    if a_q.stride(1) != 1:
        raise CannotRun(f"a_q must have unit stride along K, got strides {tuple(a_q.stride())}")
    if not w.is_contiguous() or w.data_ptr() % 16 != 0:
        raise CannotRun("w must be contiguous and 16-byte aligned (a fresh pack_weight tensor is)")
    for name, t in (("a_scale", a_scale), ("w_scale", w_scale), ("bias", bias)):
        if t is not None and not t.is_contiguous():
            raise CannotRun(f"{name} must be contiguous, got strides {tuple(t.stride())}")
    a_aligned = a_q.stride(0) % 16 == 0 and a_q.data_ptr() % 16 == 0
    pl = plan_override or plan(m, n, k, w_bits, a_q.device, path, expand, a_aligned=a_aligned)
    if pl.expand:
        w, w_bits = _expanded_weight(w, n, k), 8
    splits = pl.splits
    counters = partials = _empty_int32(a_q.device)
    if splits > 1:
        tiles = _cdiv(m, pl.bm) * _cdiv(n, pl.bn)
        ws = _device_workspace(a_q.device, tile_info(_CXX_PATH[pl.path], pl.config, w_bits)[5])
        got = None if ws is None else ws.get(torch.cuda.current_stream(a_q.device).cuda_stream,
                                             max(tiles * splits * pl.bm * pl.bn, DISPATCH.partials_per_stream))
        if got is None:  # inside a capture before any split-K call, or out of counter slots
            splits = 1
        else:
            counters, partials = got
    torch.ops.hdrq.int_gemm(out, a_q, a_scale, w, w_scale, bias, counters, partials, w_bits, _CXX_PATH[pl.path],
                            pl.config, splits)
    PATH_CALLS[pl.path] += 1
    return dataclasses.replace(pl, splits=splits)


def _int_mm_takes(m: int, n: int, k: int) -> bool:
    return m > 16 and n % 8 == 0 and k % 8 == 0


def int_matmul(a_q: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, w_bits: int, bias: Optional[Tensor],
               out_dtype: torch.dtype) -> Tensor:
    """The CUDA kernel of ``hdrq::int_matmul``: the call's route (module docstring)."""
    m, k = a_q.shape
    n = w_scale.shape[0]
    r = route(m, n, k, w_bits, a_q.device.index)
    if r.path in CXX_PATHS and m and n and k:
        out = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
        try:
            int_gemm_out(out, a_q, a_scale, w, w_scale, bias, w_bits, r.path, r.expand)
            return out
        except CannotRun:
            pass
    elif r.path == "int_mm" and _int_mm_takes(m, n, k):
        PATH_CALLS["int_mm"] += 1
        return triton_gemm.int_mm_matmul(a_q, a_scale, w, w_scale, w_bits, bias, out_dtype)
    PATH_CALLS["triton"] += 1
    return triton_gemm.int_matmul(a_q, a_scale, w, w_scale, w_bits, bias, out_dtype,
                                  r.config or triton_gemm.default_config(m, n, k))


def int_matmul_int32(a_q: Tensor, w: Tensor, w_bits: int, n: int) -> Tensor:
    """The CUDA kernel of ``hdrq::int_matmul_int32``: the int32 accumulator through the call's route (the
    ``int_mm`` route is the Triton GEMM here)."""
    m, k = a_q.shape
    r = route(m, n, k, w_bits, a_q.device.index)
    if r.path in CXX_PATHS and m and n and k:
        out = torch.empty((m, n), dtype=torch.int32, device=a_q.device)
        ones = torch.ones(n, dtype=torch.float32, device=a_q.device)  # not read for int32 output
        try:
            int_gemm_out(out, a_q, ones[:1], w, ones, None, w_bits, r.path, r.expand)
            return out
        except CannotRun:
            pass
    PATH_CALLS["triton"] += 1
    return triton_gemm.int_matmul_int32(a_q, w, w_bits, n, r.config or triton_gemm.default_config(m, n, k))

"""Regenerate bench/gemm_resources.md: the compile-time resource report of the GEMM kernels (csrc/gemm_*.cu).

For every kernel instantiation and architecture (sm_80, sm_90a): registers, spills, stack, shared memory
(static from ptxas, dynamic from the kernels' own TileShape), and SASS instruction counts from cuobjdump
(IMMA = mma.sync, IGMMA = wgmma integer tensor-core instructions, LDSM = ldmatrix, LDGSTS = cp.async,
UTMALDG = TMA tensor loads, UBLKCP = bulk copies, LDL/STL = local memory, which must be zero). Kernels that
reallocate registers between warpgroups (setmaxnreg) get a note with the per-warpgroup limits from the SASS. Also the compile time of each file. Needs nvcc and cuobjdump, no GPU.

    python bench/gemm_resources.py            # writes bench/gemm_resources.md
"""
from __future__ import annotations

import collections
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
ARCHS = [("sm_80", "-gencode=arch=compute_80,code=sm_80"), ("sm_90a", "-gencode=arch=compute_90a,code=sm_90a")]
# csrc/gemm.h WgmmaConfig, by index
WGMMA_NAMES = ["cooperative", "ping-pong", "cooperative 128x256", "decode 64x128", "cluster 128x256 multicast"]
SASS_OPS = ["IMMA", "IGMMA", "LDSM", "LDGSTS", "UTMALDG", "UBLKCP", "LDL", "STL"]

DRIVER = r"""
#include <cstdio>
#include <initializer_list>
#include "gemm.h"
int main() {
  for (int bits : {8, 6})
    for (int c = 0; c < hdrq::kMmaNumConfigs; ++c) {
      hdrq::TileShape s = hdrq::mma_tile_shape(c, bits);
      std::printf("mma %d %d %d %d %d %d %d\n", c, bits, s.bm, s.bn, s.bk, s.threads, s.smem_bytes);
    }
  for (int bits : {8, 6})
    for (int c = 0; c < hdrq::kWgmmaNumConfigs; ++c) {
      hdrq::TileShape s = hdrq::wgmma_tile_shape(c, bits);
      std::printf("wgmma %d %d %d %d %d %d %d\n", c, bits, s.bm, s.bn, s.bk, s.threads, s.smem_bytes);
    }
  return 0;
}
"""


def find_cuobjdump() -> str:
    """cuobjdump from PATH, the CUDA toolkit, or the copies pip packages ship (triton's, nvidia-cuda-cuobjdump)."""
    import glob
    import shutil

    found = shutil.which("cuobjdump") or next(iter(glob.glob("/usr/local/cuda*/bin/cuobjdump")), None)
    if found:
        return found
    import site

    for base in site.getsitepackages():
        for pattern in ("triton/backends/nvidia/bin/cuobjdump", "nvidia/*/bin/cuobjdump"):
            hits = glob.glob(os.path.join(base, pattern))
            if hits:
                return hits[0]
    sys.exit("cuobjdump not found (pip install nvidia-cuda-cuobjdump, or use the CUDA toolkit's)")


def sh(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    return r.stdout + r.stderr


def config_names() -> dict[tuple[int, ...], str]:
    """MmaTraits template arguments (without BITS) -> config name, from gemm_mma.cu."""
    src = open(os.path.join(CSRC, "gemm_mma.cu")).read()
    return {tuple(int(x) for x in args.split(",")): name
            for name, args in re.findall(r"using (\w+) = MmaTraits<B,\s*([\d,\s]+)>;", src)}


def kernel_label(mangled: str, names: dict) -> str:
    m = re.search(r"MmaTraitsILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)E", mangled)
    if m:
        bits, *rest = (int(x) for x in m.groups())
        return f"mma {names.get(tuple(rest), rest)} w{bits}"
    m = re.search(r"gemm_wgmma_kernelILi(\d+)ELi(\d+)E", mangled)
    if m:
        return f"wgmma {WGMMA_NAMES[int(m.group(2))]} w{m.group(1)}"
    if "expand_w6_kernel" in mangled:
        return "expand w6 -> w8"
    return mangled


def main():
    names = config_names()
    rows = []
    compile_s = {}
    with tempfile.TemporaryDirectory() as tmp:
        objs = []
        for cu in sorted(f for f in os.listdir(CSRC) if f.endswith(".cu")):
            obj = os.path.join(tmp, cu + ".o")
            t = time.time()
            log = sh(["nvcc", "-std=c++17", "-O3", "-Xptxas", "-v", *(g for _, g in ARCHS), "-c",
                      os.path.join(CSRC, cu), "-o", obj])
            compile_s[cu] = time.time() - t
            objs.append(obj)
            # ptxas: "Compiling entry function 'NAME' for 'sm_XX'" ... "N bytes stack frame, S bytes spill stores,
            # L bytes spill loads" ... "Used R registers, ... B bytes smem"
            current = None
            info = {}
            for line in log.splitlines():
                m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
                if m:
                    current = (m.group(1), m.group(2))
                    info[current] = {}
                    continue
                if current is None:
                    continue
                m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
                if m and "stack" not in info[current]:
                    info[current].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
                m = re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", line)
                if m:
                    info[current].update(regs=int(m.group(1)), smem=int(m.group(2) or 0))
                    current = None
            sass = sh([find_cuobjdump(), "-sass", obj])
            counts = collections.defaultdict(collections.Counter)
            maxreg = collections.defaultdict(dict)
            func, arch = None, None
            for line in sass.splitlines():
                m = re.search(r"arch = (sm_\w+)", line)
                if m:
                    arch = m.group(1)
                m = re.search(r"Function : (\S+)", line)
                if m:
                    func = m.group(1)
                    continue
                if func:
                    m = re.search(r"USETMAXREG\.(TRY_ALLOC|DEALLOC)\S*\s+(?:U?P\w+,\s*)?(0x[0-9a-f]+)", line)
                    if m:
                        maxreg[(func, arch)][m.group(1)] = int(m.group(2), 16)
                    m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", line)
                    if m:
                        op = m.group(1)
                        for want in SASS_OPS:
                            if op == want:
                                counts[(func, arch)][want] += 1
            for (fn, a), d in sorted(info.items(), key=lambda kv: (kv[0][1], kv[0][0])):
                if "regs" not in d or (cu == "gemm_wgmma.cu" and a == "sm_80"):
                    continue  # (the wgmma kernels' sm_80 build is a stub that traps)
                c = counts.get((fn, a), collections.Counter())
                mr = maxreg.get((fn, a), {})
                split = f"{mr['TRY_ALLOC']} / {mr['DEALLOC']}" if len(mr) == 2 else ""
                spills = d.get("spill_st", 0) + d.get("spill_ld", 0)
                rows.append((cu, kernel_label(fn, names), a, d["regs"], split, spills, d.get("stack", 0), d["smem"],
                             *(c[o] for o in SASS_OPS)))
        # dynamic shared memory from the kernels' own TileShape, through a host-only driver
        drv = os.path.join(tmp, "drv.cpp")
        with open(drv, "w") as f:
            f.write(DRIVER)
        exe = os.path.join(tmp, "drv")
        sh(["nvcc", "-std=c++17", "-I", CSRC, drv, *objs, "-o", exe])
        shapes = {}
        for line in sh([exe]).splitlines():
            kind, c, bits, bm, bn, bk, threads, smem = line.split()
            shapes[(kind, int(c), int(bits))] = (int(bm), int(bn), int(bk), int(threads), int(smem))

    header = os.popen("nvcc --version | tail -2 | head -1").read().strip()
    out = ["## GEMM kernels: compile-time resources", "",
           f"Generated by `python bench/gemm_resources.py` ({datetime.date.today()}, {header}); do not edit by hand.",
           "Registers, spills and stack from `ptxas -v`; static shared memory from ptxas, dynamic from each "
           "configuration's TileShape; SASS instruction counts from `cuobjdump -sass` (static counts in the binary; "
           "LDL/STL = local memory, must be 0).", "",
           "| file | kernel | arch | regs | setmaxnreg consumers / producer | spill bytes | stack | static smem | "
           + " | ".join(SASS_OPS) + " |",
           "|" + "---|" * (8 + len(SASS_OPS))]
    for r in rows:
        out.append("| " + " | ".join(str(v) for v in r) + " |")
    out += ["", "Tile configurations (`csrc/gemm_mma.cu`, `csrc/gemm_wgmma.cu`):", "",
            "| kernel | config | w_bits | BM | BN | BK | threads | dynamic smem (bytes) |", "|---|---|---|---|---|---|---|---|"]
    cfg_names = ["Decode16", "Decode32", "Decode64", "Tile64", "Tile128", "Decode16K256", "Decode16Deep",
                 "Decode32N128", "Decode64N128"]
    for (kind, c, bits), (bm, bn, bk, threads, smem) in sorted(shapes.items()):
        if bm == 0:
            continue  # a configuration that does not take this weight width
        name = (cfg_names[c] if c < len(cfg_names) else c) if kind == "mma" else f"persistent, {WGMMA_NAMES[c]}"
        out.append(f"| {kind} | {name} | {bits} | {bm} | {bn} | {bk} | {threads} | {smem} |")
    out += ["", "Compile time on this machine (`nvcc -O3`, sm_80 + sm_90a, one file at a time): " +
            ", ".join(f"{k} {v:.0f} s" for k, v in compile_s.items()) + f" ({os.cpu_count()} CPU cores).", ""]
    path = os.path.join(ROOT, "bench", "gemm_resources.md")
    with open(path, "w") as f:
        f.write("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()

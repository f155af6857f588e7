"""Merge benchmark: the HDRQ noise-sampling merge of one 4096 x 4096 layer, ours against the authors' loop.

One layer of N = 2 (and N = 3) models: random 4-bit integers, per-output-channel step sizes, 100 candidates
(the authors' setting); with independent integers about half the elements (N = 2) are ambiguous. Timed:

* ours, ``hdrq.merge.merge_weight(method="hdrq")`` on the GPU: candidates scored in chunks (one matmul per
  chunk, one host sync per layer), noise from ``hdrq.ops.uniform_noise`` (Philox; the Triton kernel under
  "auto") and, for comparison, from a seeded CUDA ``torch.Generator`` (``rng="torch"``);
* the alternative: the HDRQ authors' merge loop, re-implemented in eager PyTorch for N = 2 (one full-size
  candidate per iteration, ``torch.rand_like`` noise on the whole tensor, two ``F.cosine_similarity``, a host
  sync per candidate);
* ``method="average"`` (no sampling), the floor of any merge;
* the same merge on the CPU for reference: measured with few candidates and extrapolated to 100 (the
  per-candidate cost times 100 plus the fixed cost), since 100 Philox candidates on CPU take minutes.

Before timing, the GPU merge of a smaller layer is checked against the CPU merge (same integers).

    python bench/bench_merge.py --out merge.json [--quick]
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cli, section, time_ms, write  # noqa: E402

from hdrq import ops  # noqa: E402
from hdrq.merge import merge_weight  # noqa: E402

SIZE, BITS, CANDIDATES = 4096, 4, 100


def layer(n: int, size: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ints = [torch.randint(-(1 << (BITS - 1)), 1 << (BITS - 1), (size, size), generator=g, dtype=torch.int32)
            for _ in range(n)]
    steps = [torch.rand(size, generator=g) * 0.01 + 0.005 for _ in range(n)]
    return [x.to(device) for x in ints], [s.to(device) for s in steps]


def authors_loop(ints, steps, candidates: int):
    """The authors' merge of two layers (lamb = 0.5), as their eval code does it, on the layers' device."""
    s1, s2 = (s[:, None] for s in steps)
    w1, w2 = ints[0].float() * s1, ints[1].float() * s2
    S = (s1 + s2) / 2
    avg = (w1 + w2) / 2
    odd = ((ints[0] + ints[1]) % 2 == 1).float()
    best, c1_best, c2_best = None, 0.0, 0.0
    for i in range(candidates):
        n1 = (torch.rand_like(w1) - 0.5) * s1 * odd
        n2 = (torch.rand_like(w2) - 0.5) * s2 * odd
        cand = torch.round(((w1 - n1) + (w2 - n2)) / 2 / S) * S
        c1 = F.cosine_similarity((cand - w1).flatten(), (avg - w1).flatten(), dim=0).abs()
        c2 = F.cosine_similarity((cand - w2).flatten(), (avg - w2).flatten(), dim=0).abs()
        if i == 0 or (c1 > c1_best and c2 > c2_best):  # a host sync per candidate, as theirs
            best, c1_best, c2_best = cand, c1, c2
    return best


def cpu_seconds(ints, steps, candidates: int, rng: str, n_models: int) -> float:
    t0 = time.perf_counter()
    merge_weight(ints[:n_models], steps[:n_models], bits=BITS, seed=1, candidates=candidates, rng=rng)
    return time.perf_counter() - t0


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    if not torch.cuda.is_available():
        sys.exit("bench_merge.py needs a CUDA GPU")
    dev = torch.device("cuda")
    # which implementation "auto" runs on CUDA: the Triton kernel, unless it could not be registered
    noise_backend = "reference" if ops.CUDA_KERNELS_ERROR else "triton"

    # correctness first: GPU merge == CPU merge on a smaller layer
    ci, cs = layer(3, 384, "cpu", seed=1)
    cpu = merge_weight(ci, cs, bits=BITS, seed=3, candidates=20)
    gpu = merge_weight([x.to(dev) for x in ci], [s.to(dev) for s in cs], bits=BITS, seed=3, candidates=20)
    same = torch.equal(gpu.integers.cpu(), cpu.integers) and gpu.accepted == cpu.accepted
    print(f"check 384x384 N=3: GPU == CPU: {same} (accepted {gpu.accepted})")

    ints, steps = layer(3, SIZE, dev)
    rows, notes = [], []
    for n in ((2,) if args.quick else (2, 3)):
        res = merge_weight(ints[:n], steps[:n], bits=BITS, seed=1, candidates=CANDIDATES)
        amb = res.ambiguous
        for rng in (("philox",) if args.quick and n > 2 else ("philox", "torch")):
            ms = time_ms(lambda: merge_weight(ints[:n], steps[:n], bits=BITS, seed=1, candidates=CANDIDATES,
                                              rng=rng))
            rows.append([f"ours hdrq (rng={rng})", n, CANDIDATES, amb, round(ms, 2),
                         round(ms / CANDIDATES * 1e3, 1), round(amb * n * CANDIDATES / (ms * 1e-3) / 1e9, 1)])
        ms = time_ms(lambda: merge_weight(ints[:n], steps[:n], bits=BITS, method="average"))
        rows.append(["ours average (no sampling)", n, 0, 0, round(ms, 2), float("nan"), float("nan")])
        if n == 2:
            ms = time_ms(lambda: authors_loop(ints[:2], steps[:2], CANDIDATES), warmup_ms=50, rep_ms=400)
            rows.append(["authors' loop, eager PyTorch", 2, CANDIDATES, amb, round(ms, 2),
                         round(ms / CANDIDATES * 1e3, 1), float("nan")])
    notes.append(f"{SIZE}x{SIZE} int{BITS}, per-channel steps; uniform_noise on CUDA runs the {noise_backend} "
                 f"implementation. 'Gnoise/s': ambiguous elements x models x candidates per second.")

    # CPU reference: measured at two candidate counts, extrapolated linearly to 100
    cpu_rows = []
    ci, cs = [x.cpu() for x in ints], [s.cpu() for s in steps]
    lo_c, hi_c = (1, 3) if args.quick else (2, 6)
    for rng in ("philox", "torch"):
        t_lo = cpu_seconds(ci, cs, lo_c, rng, 2)
        t_hi = cpu_seconds(ci, cs, hi_c, rng, 2)
        per = max(t_hi - t_lo, 0.0) / (hi_c - lo_c)
        fixed = max(t_lo - lo_c * per, 0.0)
        cpu_rows.append([f"ours hdrq (rng={rng})", 2, f"{lo_c} / {hi_c}", round(t_lo, 2), round(t_hi, 2),
                         round(per * 1e3, 1), round(fixed + CANDIDATES * per, 1)])
    sections = [
        section(f"HDRQ merge of one {SIZE}x{SIZE} layer, GPU", ["merge", "N", "candidates", "ambiguous",
                "ms per layer", "us per candidate", "Gnoise/s"], rows, " ".join(notes)),
        section(f"HDRQ merge of one {SIZE}x{SIZE} layer, CPU ({torch.get_num_threads()} threads)",
                ["merge", "N", "candidates run", "s (fewer)", "s (more)", "ms per candidate",
                 f"s for {CANDIDATES} (extrapolated)"], cpu_rows,
                "Wall time of single runs; the 100-candidate time is fixed + 100 x per-candidate, extrapolated."),
    ]
    write(args.out, sections, {"gpu_matches_cpu": same})


if __name__ == "__main__":
    main()

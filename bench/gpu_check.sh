#!/usr/bin/env bash
# The GPU check: build hdrq (with the CUDA extension) on a GPU machine without touching its torch, run the
# `cuda`-marked tests and compute-sanitizer, tune the GEMM routing table, and run the benchmarks; logs and JSON go
# to OUTDIR (at most 8 files: check.log, gemm_table.json and one JSON per tuning / benchmark).
#
#   bench/gpu_check.sh OUTDIR [STAGES]     STAGES: any of build,test,sanitize,racecheck,tune,bench,host,profile
#
# On one H100, as two calls of at most 8 minutes each, the second right after the first (a warm machine keeps the
# build; a cold one rebuilds it, ~1 min more):
#
#   1.  bash bench/gpu_check.sh $OUT build,test,sanitize      build <= 150 s, cuda tests <= 270 s, memcheck <= 60 s
#   2.  bash bench/gpu_check.sh $OUT build,tune,bench         routing table <= 170 s (writes OUT/gemm_table.json, which
#                                                            the benchmarks then use), bench_gemm <= 70 s, decoder
#                                                            MLP eager / compiled <= 100 s, Llama generate <= 120 s
#
# Each stage has its own time limit (below), so a hang or a slow stage cannot eat the call; a stage that runs out
# says so in check.log and the next one starts. What call 2 measures first: every route of int_matmul, the five
# opt-in wgmma configurations among them (each checked out of process first), timed at every M bucket of the three
# shapes (tune_gemm.json), and the table made from them. Optional stages for a third call: racecheck, host
# (bench/host_cost.py and bench/profile_host.py), profile (Nsight Compute on bench/profile_gemm.py).
set -uo pipefail
OUTDIR=${1:?usage: bench/gpu_check.sh OUTDIR [STAGES]}
STAGES=${2:-build,test,sanitize}
TESTS=${TESTS:-tests/test_gemm_cuda.py tests/test_kernels_triton.py tests/test_nn.py tests/test_deploy.py tests/test_ops.py}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/check.log"
TABLE="$OUTDIR/gemm_table.json"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}
has() { [[ ",$STAGES," == *",$1,"* ]]; }
say() { echo "=== $(date +%H:%M:%S) $*" | tee -a "$LOG"; }
run() { local t=$1; shift; say "$*"; timeout "$t" "$@" 2>&1 | tee -a "$LOG" | tail -n 30; local rc=${PIPESTATUS[0]};
        [ "$rc" = 124 ] && say "TIMED OUT after $t s: $*"; return "$rc"; }

say "GPU: $(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader)"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$LOG"

if has build; then
  if $PY -c "import hdrq._C" 2>/dev/null && [ -z "$(find csrc setup.py -newer hdrq/_C*.so 2>/dev/null)" ]; then
    say "build: hdrq._C is built and up to date"
  else
    # --no-deps --no-build-isolation: never replace the machine's CUDA torch.
    run 150 env HDRQ_BUILD_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -q -e . \
      || { say "BUILD FAILED"; exit 1; }
  fi
  $PY -c "import hdrq.ops as o, hdrq._cuda as c; print('CUDA kernels:', o.CUDA_KERNELS_ERROR or 'registered', '| extension:', c.EXTENSION_ERROR or 'loaded', '| routing table:', c.routing_table().path or 'generic')" 2>&1 | tee -a "$LOG"
fi

if has test; then
  run 270 $PY -m pytest -q -m cuda -p no:cacheprovider --timeout 120 --durations=8 -rfE $TESTS \
    || say "CUDA TESTS FAILED (or timed out)"
fi

SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if has sanitize; then
  run 60 "$SAN" --tool memcheck --error-exitcode 1 $PY bench/sanitize_gemm.py --small || say "MEMCHECK FAILED"
fi
if has racecheck; then
  run 120 "$SAN" --tool racecheck --error-exitcode 1 $PY bench/sanitize_gemm.py --small || say "RACECHECK FAILED"
fi

if has tune; then
  run 170 $PY bench/tune_gemm.py --out "$OUTDIR/tune_gemm.json" --table-out "$TABLE" --budget-s 130 \
    || say "TUNE FAILED"
fi

if has bench; then
  table=()
  [ -f "$TABLE" ] && table=(--table "$TABLE") && export HDRQ_GEMM_TABLE="$TABLE"
  run 70 $PY bench/bench_gemm.py --out "$OUTDIR/bench_gemm.json" "${table[@]}" || say "BENCH gemm FAILED"
  run 100 $PY bench/bench_deploy.py --out "$OUTDIR/bench_deploy.json" || say "BENCH deploy FAILED"
  run 120 $PY bench/bench_llama.py --out "$OUTDIR/bench_llama.json" --budget-s 100 || say "BENCH llama FAILED"
fi

if has host; then
  run 60 $PY bench/host_cost.py --out "$OUTDIR/host_cost.json" --calls 2000 || say "HOST COST FAILED"
  run 60 $PY bench/profile_host.py --out "$OUTDIR/host_profile.txt" --calls 200 || say "HOST PROFILE FAILED"
fi

if has profile; then
  NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  say "ncu on bench/profile_gemm.py -> $OUTDIR/ncu_gemm.txt"
  timeout 240 "$NCU" -k regex:gemm_ --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section WarpStateStats \
    --section SchedulerStats --section Occupancy $PY bench/profile_gemm.py > "$OUTDIR/ncu_gemm.txt" 2>&1 \
    || say "PROFILE FAILED"
  grep -E "^  [a-z_]+gemm|Duration|Compute \(SM\) Throughput|Memory Throughput|ok$|WRONG" "$OUTDIR/ncu_gemm.txt" \
    | head -n 80 | tee -a "$LOG"
fi
say "done"

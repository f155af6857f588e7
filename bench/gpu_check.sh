#!/usr/bin/env bash
# The one GPU check: build hdrq (with the CUDA extension) on a GPU machine without touching its torch, run the
# `cuda`-marked tests, the compute-sanitizer runs and the kernel benchmarks, and write logs and JSON to OUTDIR.
#
#   bench/gpu_check.sh OUTDIR [STAGES]      STAGES: any of build,test,sanitize,profile,tune,bench
#                                           (default: build,test,sanitize,bench)
#   profile: Nsight Compute on bench/profile_gemm.py (every GEMM path once at M = 2048 and at decode sizes):
#   OUTDIR/ncu_gemm.txt with speed of light, tensor-pipe use, memory tables, warp stall reasons; and
#   bench/profile_host.py: OUTDIR/host_profile.txt, where an eager QLinear's host time goes.
#   tune: bench/tune_gemm.py (decode configurations x splits; writes OUTDIR/dispatch.json, which the bench
#   stage's bench_gemm.py then uses) and bench/tune_quant.py (autograd profile, per-token launch sweep).
#
# Budget: on an H100, build ~1 min (16 jobs), GEMM tests ~4 min, sanitizer ~2 min, profile ~2 min, bench_gemm
# ~3 min: run it as two calls (build,test then sanitize,profile,bench) to stay under a 10-minute command limit. Each stage has its own timeout so a hang cannot eat the budget. OUTDIR receives at most 8 files:
# check.log (everything, in order) and one bench_<area>.json per benchmark.
set -uo pipefail
OUTDIR=${1:?usage: bench/gpu_check.sh OUTDIR [STAGES]}
STAGES=${2:-build,test,sanitize,bench}
BENCHES=${BENCHES:-gemm quant calib merge deploy}   # which bench/bench_<area>.py to run, in order
TESTS=${TESTS:-tests}                               # which test files the `test` stage runs
TUNES=${TUNES:-gemm quant}                          # which bench/tune_<area>.py the `tune` stage runs
mkdir -p "$OUTDIR"
LOG="$OUTDIR/check.log"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}
has() { [[ ",$STAGES," == *",$1,"* ]]; }
say() { echo "=== $(date +%H:%M:%S) $*" | tee -a "$LOG"; }
run() { local t=$1; shift; say "$*"; timeout "$t" "$@" 2>&1 | tee -a "$LOG" | tail -n 40; return "${PIPESTATUS[0]}"; }

say "GPU: $(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader)"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$LOG"

if has build; then
  # --no-deps --no-build-isolation: never replace the machine's CUDA torch.
  run 300 env HDRQ_BUILD_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -v -e . \
    || { say "BUILD FAILED"; exit 1; }
  $PY -c "import hdrq, hdrq.ops as o; print('backends on cuda:', o.available_backends('cuda'))" 2>&1 | tee -a "$LOG"
fi

if has test; then
  run 420 $PY -m pytest -q -m cuda -p no:cacheprovider --durations=8 -rfE $TESTS || say "CUDA TESTS FAILED"
fi

if has sanitize && [ -f bench/sanitize_gemm.py ]; then
  SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  run 120 "$SAN" --tool memcheck --error-exitcode 1 $PY bench/sanitize_gemm.py || say "MEMCHECK FAILED"
  run 120 "$SAN" --tool racecheck --error-exitcode 1 $PY bench/sanitize_gemm.py --small || say "RACECHECK FAILED"
fi

if has profile; then
  NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  # every gemm_ launch of the script: per call the int32 check launch, then the bf16 epilogue launch
  say "ncu on bench/profile_gemm.py -> $OUTDIR/ncu_gemm.txt"
  timeout 240 "$NCU" -k regex:gemm_ --section SpeedOfLight --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section WarpStateStats \
    --section SchedulerStats --section Occupancy $PY bench/profile_gemm.py > "$OUTDIR/ncu_gemm.txt" 2>&1 \
    || say "PROFILE FAILED"
  grep -E "^  [a-z_]+gemm|Duration|Compute \(SM\) Throughput|Memory Throughput|ok$|WRONG" "$OUTDIR/ncu_gemm.txt" \
    | head -n 80 | tee -a "$LOG"
  # where an eager converted layer's host time goes (cProfile + kernel time of one QLinear)
  run 120 $PY bench/profile_host.py --out "$OUTDIR/host_profile.txt" --calls 200 || say "HOST PROFILE FAILED"
fi

if has tune; then
  if [[ " $TUNES " == *" gemm "* ]]; then
    run 300 $PY bench/tune_gemm.py --out "$OUTDIR/tune_gemm.json" --dispatch-out "$OUTDIR/dispatch.json" \
      || say "TUNE gemm FAILED"
  fi
  if [[ " $TUNES " == *" quant "* ]]; then
    run 120 $PY bench/tune_quant.py --out "$OUTDIR/tune_quant.json" || say "TUNE quant FAILED"
  fi
fi

if has bench; then
  for b in $BENCHES; do
    [ -f "bench/bench_$b.py" ] || continue
    extra=()
    [ "$b" = gemm ] && [ -f "$OUTDIR/dispatch.json" ] && extra=(--dispatch "$OUTDIR/dispatch.json")
    limit=120
    [ "$b" = gemm ] && limit=300  # every forced kernel path at M > 64: ~200 timed rows
    [ "$b" = stream ] && limit=420  # a 7B-shaped 2-layer slice calibrated twice (reference, triton) + a profile
    run $limit $PY "bench/bench_$b.py" --out "$OUTDIR/bench_$b.json" "${extra[@]}" || say "BENCH $b FAILED"
  done
fi
say "done"

#!/usr/bin/env bash
# One command for a bare GPU machine: the gpu tests, then the quick profiling suite, summary last.
# Installs nothing (the machine's python3 already has torch, Triton and pandas, and no network):
# the repository goes on PYTHONPATH. With $OUT set, the logs are written there as they grow (a run
# cut short still leaves them), and the benchmark's recorded run is copied there at the end.
# The tests get at most TEST_SECONDS (default 420) so that the benchmark always runs within a
# 10-minute call; they spread over CPU workers (compiling dominates) where pytest-xdist is present.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
reports=reports/gpu_check
logs="${OUT:-$reports}"
mkdir -p "$reports" "$logs"
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(), "torch", torch.__version__)' || exit 1

workers=()
python3 -c 'import xdist' 2>/dev/null && workers=(-n "${TEST_WORKERS:-8}")
timeout "${TEST_SECONDS:-420}" python3 -m pytest -m gpu -q -p no:cacheprovider ${workers[@]+"${workers[@]}"} tests 2>&1 \
    | tee "$logs/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
[ "$tests_rc" -eq 124 ] && echo "gpu tests stopped after ${TEST_SECONDS:-420} s" | tee -a "$logs/gpu_tests.log"
# Recorded: the run lands in benchmarks/results/<date>-<device>-<suite>/ (CSV, summary, plots, meta.json).
python3 -m profiling.bench --suite "${SUITE:-quick}" --record 2>&1 | tee "$logs/bench.log"
bench_rc=${PIPESTATUS[0]}

if [ -n "${OUT:-}" ]; then
    # The record comes back under $OUT/results/: copy it into benchmarks/results/ and commit it.
    latest=$(ls -td benchmarks/results/*/ 2>/dev/null | head -n 1)
    [ -n "$latest" ] && mkdir -p "$OUT/results" && cp -r "$latest" "$OUT/results/"
fi
echo "gpu tests exit code $tests_rc, benchmark exit code $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

#!/usr/bin/env bash
# One command for a bare GPU machine: the gpu tests, then the quick profiling suite, summary last.
# Installs nothing (the machine's python3 already has torch, Triton and pandas, and no network):
# the repository goes on PYTHONPATH. With $OUT set, the test log, CSV and summary are copied there.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
reports=reports/gpu_check
mkdir -p "$reports"
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(), "torch", torch.__version__)' || exit 1

python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$reports/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
python3 -m profiling.bench --suite "${SUITE:-quick}" --out "$reports" 2>&1 | tee "$reports/bench.log"
bench_rc=${PIPESTATUS[0]}

if [ -n "${OUT:-}" ]; then
    cp "$reports"/gpu_tests.log "$reports"/bench.log "$OUT"/ 2>/dev/null
    latest=$(ls -t "$reports"/bench-*.csv 2>/dev/null | head -n 1)
    [ -n "$latest" ] && cp "$latest" "${latest%.csv}.md" "$OUT"/
fi
echo "gpu tests exit code $tests_rc, benchmark exit code $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

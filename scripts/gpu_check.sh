#!/usr/bin/env bash
# The GPU check: one call on a lent GPU machine that always returns evidence. It installs nothing
# (the machine's python3 has torch, Triton, pandas and pytest; there is no network): the repository
# goes on PYTHONPATH.
#
# What a lease is (see the device tool's README): one H200 (sm_90, 132 SMs), 15 minutes of device
# time per session in all, machine start (1-2 min) included, at most 10 minutes a call, and at most
# 8 files back from $OUT, two folders deep. So:
#
#   OUT=$OUT bash scripts/gpu_check.sh       one call of at most BUDGET_S (default 480) seconds of
#       wall time, under one deadline, each step under its own timeout, in the order a decision needs:
#         1 env       versions, device properties, provenance             -> $OUT/meta.json
#         2 barrier   every counter reaches programs x steps; the driver refuses a grid one program
#                     larger than our residency estimate and the launcher runs it stepwise; a grid
#                     that cannot meet gives up within seconds and raises; the floor in us per step
#                     for 1..132 programs                                 -> $OUT/barrier.csv
#         3 smoke     forward and backward of every cell and dtype, defaults and every candidate of
#                     a few shapes, untuned (RNN_AUTOTUNE=0, its own cache), -v, a per-test timeout
#                                                                         -> $OUT/tests.log
#         4 sanitize  compute-sanitizer racecheck and memcheck on one small multi-program persistent
#                     forward and backward                                -> $OUT/sanitizer.log
#         5 bench     ours against cuDNN eager and graphed at the shapes that decide the project (the
#                     `decide` suite: LSTM and GRU, bf16 and fp16, B 16 and 64, H 256-1024, T 512,
#                     forward and training), tuned on first use, each case's rows appended as it
#                     finishes                     -> $OUT/<date>-<device>-decide/{results,summary,meta}
#         6 gpu tests the remaining `gpu` tests while time lasts, untuned   -> $OUT/tests.log
#       and the whole console in $OUT/gpu_check.log: 8 files, each written as it grows. Plots are
#       drawn afterwards, on any machine, from the CSV.
#   scripts/gpu_check.sh --full N            part N (1-5) of a longer run, for a session that can
#       afford more calls, each part under the same rules (BUDGET_S, steps, at most 8 files):
#         1 all `gpu` tests   2 compiles per second on threads against worker processes
#         (scripts.compile_rate), then the forward and backward autotune sweep of the suites' shapes (a
#         second call goes on where the first stopped)   3 latency and packed suites   4 training and
#         throughput suites   5 bf16 training parity against torch.nn (scripts.train --compare)
#       Tuned configs live in reports/gpu_check/autotune-cache/ (RNN_CACHE_DIR), for every part and
#       the default run; part 2 returns them as $OUT/autotune-cache/autotune.json: where the machine
#       was released between calls, put that file back there and `carry` the folder.
#   scripts/gpu_check.sh --dry-run           the same steps on this CPU (the Triton interpreter, tiny
#       shapes, the same files in $OUT or reports/gpu_check/out, the deadline logic too; BUDGET_S
#       default 150): tests/test_gpu_check.py runs it in CI.
#
# Afterwards, here: `python -m profiling.record --adopt <the returned folder>` files the evidence
# and the benchmark run under benchmarks/results/ (resolving the commit: the copy has no .git), then
# `python -m profiling.publish` regenerates README's Performance section; commit both.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

mode=default part=""
case "${1:-}" in
    "") ;;
    --dry-run) mode=dry ;;
    --full) mode=full part="${2:-}"
            case "$part" in 1|2|3|4|5) ;; *) echo "usage: $0 [--dry-run | --full 1|2|3|4|5]" >&2; exit 2 ;; esac ;;
    *) echo "usage: $0 [--dry-run | --full 1|2|3|4|5]" >&2; exit 2 ;;
esac

reports=reports/gpu_check
out="${OUT:-$reports/out}"
mkdir -p "$out" "$reports"
main_log="$out/gpu_check.log"
export RNN_CACHE_DIR="${RNN_CACHE_DIR:-$PWD/$reports/autotune-cache}"
smoke_cache="$PWD/$reports/smoke-cache"

if [ "$mode" = dry ]; then
    export TRITON_INTERPRET=1
    BUDGET_S=${BUDGET_S:-150}
else
    BUDGET_S=${BUDGET_S:-480}
    if ! python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check: no CUDA device (scripts/gpu_check.sh --dry-run runs the steps on a CPU)" | tee -a "$main_log" >&2
        exit 1
    fi
fi
RESERVE_S=${RESERVE_S:-10}  # left at the end for the summary
deadline=$((SECONDS + BUDGET_S))
workers=()
python3 -c 'import xdist' 2>/dev/null && [ "$mode" != dry ] && workers=(-n "${TEST_WORKERS:-8}")
timeouts=()
python3 -c 'import pytest_timeout' 2>/dev/null && timeouts=(--timeout "${TEST_TIMEOUT:-120}")
summary=()
status=0

say() { echo "$*" | tee -a "$main_log"; }

# step NAME CAP LOG COMMAND...: run COMMAND under timeout min(CAP, what the deadline leaves), its
# output appended to LOG (and the console); a step with under 15 s left is skipped.
step() {
    local name=$1 cap=$2 log=$3
    shift 3
    local left=$((deadline - SECONDS - RESERVE_S))
    if [ "$left" -lt 15 ]; then
        say "== $name: skipped, ${left}s left of the budget"
        summary+=("$name: skipped (budget)")
        return
    fi
    local limit=$((cap < left ? cap : left)) start=$SECONDS
    say "== $name: at most ${limit}s ($((deadline - SECONDS))s of the ${BUDGET_S}s budget left)"
    [ "$log" != "$main_log" ] && echo "== $name" >> "$log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    [ "$log" != "$main_log" ] && tail -n 3 "$log" >> "$main_log"
    local verdict="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="stopped at ${limit}s"; status=1
    elif [ "$rc" -ne 0 ]; then verdict="exit $rc"; status=1; fi
    say "== $name: $verdict after $((SECONDS - start))s"
    summary+=("$name: $verdict ($((SECONDS - start))s)")
}

smoke_k="per_dtype or every_candidate or every_backward_candidate"
if [ "$mode" = dry ]; then
    smoke=(tests/test_kernels.py -m interpreter -k "cannot_meet or gives_up or empty_steps or (resident and LSTM)")
    gpu_rest=(tests/test_gpu.py tests/test_profiling_gpu.py -m gpu)
    bench_args=(--suite decide --device cpu --cells lstm --dtypes fp32 --hidden 16 --batch 2 --seq 4 --warmup-ms 1
                --rep-ms 5)
else
    smoke=(tests/test_gpu.py -m gpu -k "$smoke_k")
    gpu_rest=(tests -m gpu -k "not ($smoke_k)")
    bench_args=(--suite decide)
fi

# Tests run untuned (tests of tuning turn it on themselves), with a cache of their own.
untuned=(env RNN_AUTOTUNE=0 RNN_CACHE_DIR="$smoke_cache")
pytest_args=(-m pytest -v -p no:cacheprovider -rfE ${workers[@]+"${workers[@]}"} ${timeouts[@]+"${timeouts[@]}"})
sanitize() {
    if ! command -v compute-sanitizer >/dev/null; then
        echo "compute-sanitizer not found: the program runs unchecked"
        RNN_AUTOTUNE=0 python3 -m scripts.gpu_probe sanitize
        return
    fi
    local rc=0 tool
    for tool in memcheck racecheck; do
        echo "-- compute-sanitizer --tool $tool"
        RNN_AUTOTUNE=0 RNN_CACHE_DIR="$smoke_cache" timeout 70 compute-sanitizer --tool "$tool" --error-exitcode 3 \
            python3 -m scripts.gpu_probe sanitize || rc=$?
    done
    return $rc
}
sweep() {
    local name left
    for name in latency training packed throughput; do
        left=$((deadline - SECONDS - RESERVE_S - 30))
        if [ "$left" -le 0 ]; then echo "sweep: time is up before $name"; break; fi
        python3 -m scripts.autotune --suite "$name" --record --results "$out" --skip-cached --time-limit "$left" \
            || return 1
    done
}
export -f sanitize sweep
export smoke_cache out deadline RESERVE_S
# bench SUITE ARGS...: the command recording a suite into $out as each case finishes, starting no
# case in the last 45 s of the budget (the case in progress then still has to end).
bench() {
    local left=$((deadline - SECONDS - RESERVE_S - 45))
    echo python3 -m profiling.bench --record --results "$out" --no-plots --time-limit "$((left > 1 ? left : 1))" "$@"
}

say "gpu_check ${mode}${part:+ part $part}: $(date -u +%FT%TZ), budget ${BUDGET_S}s, output in $out"
step env 60 "$main_log" python3 -m scripts.gpu_probe env --out "$out/meta.json" --budget "$BUDGET_S"
case "$mode$part" in
    default|dry)
        step barrier 90 "$main_log" python3 -m scripts.gpu_probe barrier --out "$out/barrier.csv"
        step smoke 150 "$out/tests.log" "${untuned[@]}" python3 "${pytest_args[@]}" "${smoke[@]}"
        step sanitize 150 "$out/sanitizer.log" bash -c sanitize
        step bench 600 "$main_log" $(bench "${bench_args[@]}")
        step "gpu tests" 600 "$out/tests.log" "${untuned[@]}" python3 "${pytest_args[@]}" "${gpu_rest[@]}"
        ;;
    full1) step "gpu tests" 600 "$out/tests.log" "${untuned[@]}" python3 "${pytest_args[@]}" tests -m gpu ;;
    full2)
        step "compile rate" 120 "$main_log" python3 -m scripts.compile_rate
        step sweep 600 "$main_log" bash -c sweep
        mkdir -p "$out/autotune-cache" && cp "$RNN_CACHE_DIR/autotune.json" "$out/autotune-cache/" 2>/dev/null
        ;;
    full3) step latency 600 "$main_log" $(bench --suite latency); step packed 600 "$main_log" $(bench --suite packed) ;;
    full4) step training 600 "$main_log" $(bench --suite training)
           step throughput 600 "$main_log" $(bench --suite throughput) ;;
    full5)
        step "training parity" 600 "$main_log" python3 -m scripts.train --task charlm --cell lstm --layers 2 \
            --hidden 512 --seq-len 256 --batch 64 --steps 300 --lr 2e-3 --dtype bf16 --compare --record --results "$out"
        ;;
esac

files=$(find "$out" -type f | wc -l)
say "== summary (${SECONDS}s of ${BUDGET_S}s; $files files in $out$([ "$files" -gt 8 ] && echo ': over the 8 that come back'))"
for line in "${summary[@]}"; do say "   $line"; done
say "gpu_check exit code $status"
exit $status

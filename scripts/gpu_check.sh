#!/usr/bin/env bash
# One command for a bare GPU machine. Installs nothing (the machine's python3 already has torch,
# Triton and pandas, and no network): the repository goes on PYTHONPATH. With $OUT set, logs are
# written there as they grow (a run cut short still leaves them), and every run recorded under
# benchmarks/results/ by this call is copied to $OUT/results/ at the end: file each of those folders
# with `python -m profiling.record --adopt FOLDER` (it resolves the commit the copy, without .git, ran)
# and commit them.
#
#   scripts/gpu_check.sh            the gpu tests (at most TEST_SECONDS, default 420), then the quick
#                                   suite (SUITE=...), recorded: fits one 10-minute call
#   scripts/gpu_check.sh --full N   part N of the full run, five calls of under 10 minutes each,
#                                   about 30 minutes of H100 time in all, in this order:
#       1  the gpu tests (at most 360 s)
#       2  the forward and backward autotune sweep of the shapes the latency, training, packed and
#          throughput suites run (recorded; 360 s; shapes already tuned are left, so a second call
#          of part 2 goes on where the first stopped)
#       3  the latency and packed suites, recorded (240 s + 120 s)
#       4  the training and throughput suites, recorded (240 s + 120 s)
#       5  convergence parity: scripts.train --compare, a 2-layer LSTM language model in bf16, ours
#          and torch.nn from the same weights on the same batches, recorded (at most 300 s)
#     A suite past its time starts no new case and records the cases measured (its summary says so).
#     The tuned configs live in reports/gpu_check/autotune-cache/ (RNN_CACHE_DIR) and are copied to
#     $OUT/autotune-cache/: where the machine was released between calls, put them back there and
#     carry that path, so that parts 3 and 4 measure tuned kernels.
# Tests spread over CPU workers (compiling dominates) where pytest-xdist is present.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
reports=reports/gpu_check
logs="${OUT:-$reports}"
mkdir -p "$reports" "$logs" benchmarks/results
part=""
if [ "${1:-}" = "--full" ]; then
    part="${2:-}"
    case "$part" in 1|2|3|4|5) ;; *) echo "usage: $0 [--full 1|2|3|4|5]" >&2; exit 2 ;; esac
    export RNN_CACHE_DIR="${RNN_CACHE_DIR:-$PWD/$reports/autotune-cache}"
elif [ -n "${1:-}" ]; then
    echo "usage: $0 [--full 1|2|3|4|5]" >&2
    exit 2
fi
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name(), "torch", torch.__version__)' || exit 1
marker="$reports/.started"
touch "$marker"

status=0
gpu_tests() {  # $1: seconds
    local workers=()
    python3 -c 'import xdist' 2>/dev/null && workers=(-n "${TEST_WORKERS:-8}")
    timeout "$1" python3 -m pytest -m gpu -q -p no:cacheprovider ${workers[@]+"${workers[@]}"} tests 2>&1 \
        | tee "$logs/gpu_tests.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "gpu tests stopped after $1 s" | tee -a "$logs/gpu_tests.log"
    echo "gpu tests exit code $rc"
    [ "$rc" -eq 0 ] || status=1
}
suite() {  # $1: suite, $2: seconds after which it starts no new case ('' for none)
    python3 -m profiling.bench --suite "$1" --record ${2:+--time-limit "$2"} 2>&1 | tee "$logs/bench-$1.log"
    local rc=${PIPESTATUS[0]}
    echo "benchmark $1 exit code $rc"
    [ "$rc" -eq 0 ] || status=1
}
sweep() {  # $1: seconds for all the suites' shapes together
    local start=$SECONDS left
    for name in latency training packed throughput; do
        left=$(( $1 - (SECONDS - start) ))
        if [ "$left" -le 0 ]; then echo "sweep: time is up before $name"; break; fi
        python3 -m scripts.autotune --suite "$name" --record --skip-cached --time-limit "$left" 2>&1 \
            | tee -a "$logs/autotune.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    done
}
train_parity() {  # $1: seconds
    timeout "$1" python3 -m scripts.train --task charlm --cell lstm --layers 2 --hidden 512 --seq-len 256 \
        --batch 64 --steps 300 --lr 2e-3 --dtype bf16 --compare --record 2>&1 | tee "$logs/train.log"
    local rc=${PIPESTATUS[0]}
    echo "training parity exit code $rc"
    [ "$rc" -eq 0 ] || status=1
}

case "$part" in
    "") gpu_tests "${TEST_SECONDS:-420}"; suite "${SUITE:-quick}" "" ;;
    1) gpu_tests "${TEST_SECONDS:-360}" ;;
    2) sweep 360 ;;
    3) suite latency 240; suite packed 120 ;;
    4) suite training 240; suite throughput 120 ;;
    5) train_parity 300 ;;
esac

if [ -n "${OUT:-}" ]; then
    for run in $(find benchmarks/results -mindepth 1 -maxdepth 1 -type d -newer "$marker"); do
        mkdir -p "$OUT/results" && cp -r "$run" "$OUT/results/"
    done
    [ -n "$part" ] && [ -d "$RNN_CACHE_DIR" ] && cp -r "$RNN_CACHE_DIR" "$OUT/autotune-cache"
fi
echo "gpu_check ${part:+part $part }exit code $status"
exit $status

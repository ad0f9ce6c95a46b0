#!/usr/bin/env bash
# Installs the project with its test and profiling extras.
# CPU machines get the pinned CPU build of torch 2.13, Triton 3.6 (the GPU machine's version) and
# numpy < 2.4 (Triton 3.6's interpreter fails on numpy 2.4). A machine whose torch already sees a
# GPU keeps its own torch and Triton.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "setup: torch with CUDA found; keeping its torch and Triton"
    "$PY" -m pip install -q -e '.[test,profiling]'
else
    "$PY" -m pip install -q 'torch==2.13.0' 'triton==3.6.0' 'numpy<2.4' -e '.[test,profiling]'
fi

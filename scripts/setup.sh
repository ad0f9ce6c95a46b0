#!/usr/bin/env bash
# Installs the project: on a CPU machine with its test and profiling extras.
# CPU machines get the pinned CPU build of torch 2.13, Triton 3.6 (the GPU machine's version) and
# numpy < 2.4 (Triton 3.6's interpreter fails on numpy 2.4). A machine whose torch already sees a
# GPU (a lent one has no network) keeps its own torch and Triton and downloads nothing: it says what
# it found, installs the project itself without an index or build isolation, and names the extras it
# lacks and what they disable, installing none (scripts/gpu_check.sh installs nothing either).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "setup: torch with CUDA found; keeping its torch and Triton, downloading nothing"
    "$PY" - <<'EOF' || echo "setup: could not report the versions"
import importlib.metadata
import importlib.util


def version(module, dist=None):
    """The installed version, 'found' where it has no metadata, None where it is missing."""
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        return importlib.metadata.version(dist or module)
    except importlib.metadata.PackageNotFoundError:
        return "found"


import torch

try:
    device = torch.cuda.get_device_name(0)
except Exception as exc:  # a driver that torch cannot talk to
    device = f"unreadable ({type(exc).__name__})"
print(f"setup: torch {torch.__version__}, CUDA {torch.version.cuda}, device {device}")
try:
    import triton
    triton_version = triton.__version__
except ImportError as exc:
    triton_version = f"missing ({exc})"
print(f"setup: Triton {triton_version}, numpy {version('numpy') or 'missing'}")
ONNX_TEST = "the ONNX export test (test_compiled.py::test_onnx_export_runs_in_onnxruntime fails)"
EXTRAS = [  # (distribution, module, what is lost without it)
    ("pytest", "pytest", "the tests"),
    ("pytest-timeout", "pytest_timeout", "the tests' time limit (pyproject's timeout is not enforced)"),
    ("pytest-xdist", "xdist", "parallel tests (-n): gpu_check.sh runs the gpu tests on one worker"),
    ("hypothesis", "hypothesis", "tests/test_differential.py (not collectable: --ignore it)"),
    ("pandas", "pandas", "profiling.bench and publish, scripts.train, scripts.autotune, "
                         "and tests/test_profiling*.py, test_records.py, test_train*.py"),
    ("matplotlib", "matplotlib", "the plots (runs are recorded without them)"),
    ("onnx", "onnx", ONNX_TEST),
    ("onnxscript", "onnxscript", ONNX_TEST),
    ("onnxruntime", "onnxruntime", ONNX_TEST),
    ("flashrnn", "flashrnn", "the flashrnn peer (its benchmark rows say not measured) and "
                             "test_profiling.py::test_flashrnn_mapping_matches_torch_nn (fails)"),
]
found = {dist: version(module, dist) for dist, module, _ in EXTRAS}
print("setup: extras found: " + (", ".join(f"{d} {v}" for d, v in found.items() if v) or "none"))
for dist, _, loss in EXTRAS:
    if not found[dist]:
        print(f"setup: missing {dist}, not installed (nothing is downloaded here); without it: {loss}")
EOF
    if "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .; then
        echo "setup: installed the project itself (editable; nothing downloaded, no extra installed)"
    else
        echo "setup: the project could not be installed without a download; it runs from the repository root"
        echo "setup: with that root on PYTHONPATH instead: export PYTHONPATH=$PWD (scripts/gpu_check.sh does so)"
    fi
else
    "$PY" -m pip install -q 'torch==2.13.0' 'triton==3.6.0' 'numpy<2.4' -e '.[test,profiling]'
fi

"""Kernel variants (forward and backward) compile for an H100 (sm_90) on this CPU machine,
without the interpreter: the heuristic defaults of a few sizes and the bf16 autotuning candidates
of the largest fit the H100's shared memory, and the defaults spill no registers (ptxas's report). Compiler-only errors
fail here, not on the GPU. The full sweep over kernels.configs.TUNED_SIZES is
`python -m scripts.compile_check --space` (most of an hour on two cores)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Its own process group, so that a timeout also ends the compiler pool's workers (killing the
    # parent alone left them compiling for minutes); the limit is below pytest's own.
    process = subprocess.Popen([sys.executable, "-m", "scripts.compile_check", "--quick", "--space"], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=840)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail("compile_check --quick --space ran past 840 s:\n" + stdout[-2000:] + stderr[-2000:])
    assert process.returncode == 0, stdout[-4000:] + stderr[-4000:]
    assert "variants compiled for sm_90 within limits" in stdout

"""Kernel variants (forward and backward) compile for an H100 (sm_90) on this CPU machine,
without the interpreter: the heuristic defaults of a few sizes and the bf16 autotuning candidates
of the largest fit the H100's shared memory, and the defaults spill no registers (ptxas's report). Compiler-only errors
fail here, not on the GPU. The full sweep over kernels.configs.TUNED_SIZES is
`python -m scripts.compile_check --space` (most of an hour on two cores)."""
import json
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


# Run without the interpreter, against a stand-in driver for an H100 (no GPU here): the JIT's own
# path (kernel.warmup) asks, a worker process compiles, and the JIT then finds the worker's entry.
WORKER_CHECK = """
import json, sys
import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from kernels import tuning
from kernels.cells import Cell
from kernels.configs import KernelConfig
from scripts.compile_check import launch_arguments

driver.set_active(tuning.TargetDriver(GPUTarget("cuda", 90, 32)))
events = []
knobs.compilation.listener = lambda *, src, cache_hit, **_: events.append([src.fn.__name__, cache_hit])
variants = [("fwd", {"has_h0": False}), ("bwd", {"has_dhn": False})]

def compile(variant):
    kernel, flags = variant
    fn, values, meta, launch = launch_arguments(Cell.RNN_TANH, "fp32", 16, KernelConfig(16, 16), True, 1, flags,
                                                kernel, 16)
    fn.warmup(*values.values(), grid=(1, 1, 1), **meta, **launch)

workers = tuning.Workers(1)
left = tuning.compile_in_processes(compile, variants, workers)
workers.close()
here = list(events)
events.clear()
for variant in variants:
    compile(variant)
print(json.dumps(dict(left=len(left), here=here, after=events)))
"""


def test_worker_compiles_are_the_jits_cache_entries(tmp_path):
    """A compile request made by the JIT here and compiled by a worker process lands under the
    on-disk cache key that the JIT here then looks up (forward and backward kernels): a cache hit,
    not a second compile. Fails if any part of the specialisation, options, target or environment
    differs between the two."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    process = subprocess.run([sys.executable, "-c", WORKER_CHECK], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-4000:]
    result = json.loads(process.stdout.splitlines()[-1])
    assert result["left"] == 0 and result["here"] == []  # the worker compiled both, nothing compiled here
    assert result["after"] == [["rnn_fwd_kernel", True], ["rnn_bwd_kernel", True]]


def test_compile_rate_estimate_shows_its_arithmetic():
    """scripts.compile_rate's estimate for more cores: processes take S + ceil(n / cores) rounds of
    a compile's CPU seconds (backward reusing the workers); threads n x c x (f + (1 - f) / cores),
    f from the speed-up of N threads on the cores they had (Amdahl) or at least the front end's
    share; none from threads that had too few cores to tell."""
    from scripts.compile_rate import estimate

    one = dict(fwd=dict(n=25, wall=20.0, cpu=20.0, front_end=0.25), bwd=dict(n=17, wall=17.0, cpu=17.0,
                                                                             front_end=0.5))
    two = dict(fwd=dict(wall=12.5), bwd=dict(wall=17.0))  # 1.6x: f = 0.25; 1x: f = 1
    lines = estimate({"threads:1": one, "threads:2": two}, (2.0, 3.0), 16, 2.0)
    assert "processes on 16 cores: forward 3.0 + 1.6 = 4.6 s; forward + backward 3.0 + 1.6 + 2.0 = 6.6 s" in lines
    # f = 0.25: 25 x 0.8 x (0.25 + 0.75/16) = 5.9 s; f = 1: 17 x 1 = 17 s
    assert "threads, f from 2 threads on 16 cores: forward 5.9 = 5.9 s; forward + backward 5.9 + 17.0 = 22.9 s" \
        in lines
    # front end: 25 x 0.8 x (0.25 + 0.75/16) = 5.9; 17 x 1 x (0.5 + 0.5/16) = 9.0
    assert "threads, f >= front end on 16 cores: forward 5.9 = 5.9 s; forward + backward 5.9 + 9.0 = 15.0 s" in lines
    lines = estimate({"threads:1": one, "threads:2": two}, (2.0, 3.0), 16, 1.1)
    assert not any(line.startswith("threads, f from 2 threads") for line in lines)

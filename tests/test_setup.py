"""scripts/setup.sh: on a machine whose torch sees CUDA (a lent GPU machine, no network) it downloads
nothing and says what it found; on a CPU machine it makes the pinned install CI relies on. Run with
a python3 whose torch, Triton and pip are stand-ins (pip records its arguments) and which sees no
other installed package."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ["pytest", "pytest-timeout", "pytest-xdist", "hypothesis", "pandas", "matplotlib", "onnx", "onnxscript",
          "onnxruntime", "flashrnn"]


def _setup(tmp_path, cuda: bool, pip_rc: int = 0):
    """(exit code, output, each pip call's arguments) of setup.sh under the stand-in python3."""
    fake = tmp_path / "site"
    for package, text in {
        "torch": (f"__version__ = '2.11.0+cu130'\n\n\nclass version:\n    cuda = '13.0'\n\n\n"
                  f"class cuda:\n    is_available = staticmethod(lambda: {cuda})\n"
                  f"    get_device_name = staticmethod(lambda index=0: 'NVIDIA H200')\n"),
        "triton": "__version__ = '3.6.0'\n",
        "pytest": "",  # an extra that is there
        "pip": "",
    }.items():
        (fake / package).mkdir(parents=True)
        (fake / package / "__init__.py").write_text(text)
    (fake / "pip" / "__main__.py").write_text(
        "import json, os, sys\n"
        "with open(os.environ['PIP_CALLS'], 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        f"sys.exit({pip_rc})\n")
    python = tmp_path / "python3"
    # -S: none of this machine's site-packages, so the stand-ins are all there is.
    python.write_text(f"#!/bin/sh\nPYTHONPATH='{fake}' exec '{sys.executable}' -S \"$@\"\n")
    python.chmod(0o755)
    calls = tmp_path / "pip_calls"
    env = dict(os.environ, PYTHON=str(python), PIP_CALLS=str(calls))
    run = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True, env=env,
                         timeout=60)
    pip = [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return run.returncode, run.stdout + run.stderr, pip


def test_setup_on_a_gpu_machine_downloads_nothing_and_reports(tmp_path):
    rc, out, pip = _setup(tmp_path, cuda=True)
    assert rc == 0, out
    assert pip == [["install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."]]
    assert "torch 2.11.0+cu130, CUDA 13.0, device NVIDIA H200" in out
    assert "Triton 3.6.0, numpy missing" in out
    assert "extras found: pytest found" in out
    for extra in EXTRAS[1:]:
        assert f"setup: missing {extra}, not installed" in out, extra
    assert "setup: missing pytest," not in out
    assert "installed the project itself" in out


def test_setup_on_a_gpu_machine_falls_back_to_pythonpath(tmp_path):
    rc, out, pip = _setup(tmp_path, cuda=True, pip_rc=1)
    assert rc == 0, out
    assert len(pip) == 1 and "--no-index" in pip[0]
    assert f"export PYTHONPATH={ROOT}" in out


@pytest.mark.parametrize("pip_rc", [0, 1])
def test_setup_on_a_cpu_machine_makes_the_pinned_install(tmp_path, pip_rc):
    rc, out, pip = _setup(tmp_path, cuda=False, pip_rc=pip_rc)
    assert pip == [["install", "-q", "torch==2.13.0", "triton==3.6.0", "numpy<2.4", "-e", ".[test,profiling]"]]
    assert rc == pip_rc, out  # a failed install fails CI
    assert "setup:" not in out


def test_gpu_check_installs_nothing():
    code = [line for line in (ROOT / "scripts" / "gpu_check.sh").read_text().splitlines()
            if not line.lstrip().startswith("#")]
    assert not [line for line in code if re.search(r"\bpip3?\b|setup\.sh|\binstall\b", line)]

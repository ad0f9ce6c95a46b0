"""scripts/gpu_check.sh --dry-run: the GPU check's steps on the CPU (the interpreter, tiny shapes),
with the files it returns from a device call and its deadline, and the evidence filed as a record
(profiling.record --adopt), as a session does with what a GPU returns."""
import json
import os
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from profiling import record

pytestmark = pytest.mark.interpreter

ROOT = Path(__file__).resolve().parents[1]
EVIDENCE = {"gpu_check.log", "meta.json", "barrier.csv", "tests.log", "sanitizer.log"}


def _dry_run(tmp_path, **env):
    out = tmp_path / "out"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # a run of its own
    environ.update(OUT=str(out), RNN_CACHE_DIR=str(tmp_path / "cache"), **env)
    start = time.monotonic()
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=600)
    return proc, out, time.monotonic() - start


def test_dry_run_returns_its_evidence_in_eight_files(tmp_path):
    proc, out, elapsed = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert elapsed < 120
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(files) == 8, files
    run = next(p for p in out.iterdir() if p.is_dir())
    assert run.name.endswith("-cpu-decide")
    assert set(files) == EVIDENCE | {f"{run.name}/{name}" for name in ("results.csv", "summary.md", "meta.json")}

    log = (out / "gpu_check.log").read_text()
    for step in ("env", "barrier", "smoke", "sanitize", "bench", "gpu tests"):
        assert f"   {step}: ok (" in log, log[-3000:]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "gpu_check" and meta["device"] == "cpu" and meta["budget_s"] == 150
    barrier = pd.read_csv(out / "barrier.csv").set_index("check")
    assert bool(barrier.loc["gives_up", "ok"]) and float(barrier.loc["gives_up", "value"]) < 10
    assert bool(barrier.loc["counters", "ok"]) and "needs CUDA" in barrier.loc["floor", "note"]
    tests = (out / "tests.log").read_text()
    assert "test_a_barrier_that_cannot_meet_raises_instead_of_hanging PASSED" in tests  # -v: every name
    assert " passed" in tests and "failed" not in tests
    assert "forward error" in (out / "sanitizer.log").read_text()
    frame = pd.read_csv(run / "results.csv")
    ours = frame[(frame.impl == "ours") & (frame.metric == "us_per_step")]
    assert len(ours) == 2 and (ours.status == "ok").all() and (ours["median"] > 0).all()
    assert json.loads((run / "meta.json").read_text())["cases_measured"] == 2

    # Filed as a session files what a GPU returned: the evidence and the benchmark run, each a record.
    results = tmp_path / "results"
    assert record.main(["--adopt", str(out), "--results", str(results)]) == 0
    filed = {info["kind"]: info["path"] for info in record.runs(results)}
    assert set(filed) == {"gpu_check", "bench"}
    assert {p.name for p in filed["gpu_check"].iterdir()} == EVIDENCE
    assert (filed["bench"] / "results.csv").is_file()


def test_dry_run_keeps_to_its_budget(tmp_path):
    """With too little budget left for a step, the step is skipped and said so; what ran is returned."""
    proc, out, elapsed = _dry_run(tmp_path, BUDGET_S="30")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert elapsed < 40
    log = (out / "gpu_check.log").read_text()
    assert "   env: ok (" in log and "   bench: skipped (budget)" in log and "   gpu tests: skipped (budget)" in log
    assert (out / "meta.json").is_file()

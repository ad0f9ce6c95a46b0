"""Recorded benchmark runs (profiling/record.py) and README's Performance section generated from them
(profiling/publish.py)."""
import json
import math
import shutil
import subprocess

import pandas as pd
import pytest

from profiling import bench, publish, record, report
from profiling.cases import select


def test_readme_performance_section_matches_the_records():
    """README's block is exactly what benchmarks/results/ gives: no figure typed by hand."""
    assert publish.main(["--check"]) == 0


def test_record_keeps_a_cpu_run_with_its_provenance(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # ours on its CPU path (torch.nn's native), as a CPU user runs it
    argv = ["--suite", "cpu", "--record", "--results", str(tmp_path), "--cells", "lstm", "--hidden", "8",
            "--batch", "1,2", "--seq", "4", "--warmup-ms", "1", "--rep-ms", "2"]
    assert bench.main(argv) == 0
    # The same day's second run gets a folder of its own; stopped at its time limit, it keeps the
    # one case measured and says so.
    assert bench.main(argv + ["--time-limit", "0"]) == 0
    runs = record.runs(tmp_path)
    assert len(runs) == 2 and runs[0]["path"] != runs[1]["path"]
    total = runs[0]["cases_total"]
    assert total > 1 and runs[0]["cases_measured"] == total == runs[1]["cases_total"] and runs[1]["cases_measured"] == 1
    assert (f"Stopped at the time limit (0 s): 1 of {total} cases measured"
            in (runs[1]["path"] / record.SUMMARY_NAME).read_text())
    assert runs[1]["kind"] == "bench"
    run = runs[0]
    assert run["path"].name.startswith(run["timestamp"][:10] + "-cpu-cpu")
    assert run["gpu"] is False and run["device"] == "cpu" and run["driver"] == ""
    assert run["command"] == "python -m profiling.bench " + " ".join(argv)
    assert run["git_dirty"] in (True, False) and len(run["git_commit"]) == 40
    frame = pd.read_csv(run["path"] / record.CSV_NAME)
    assert list(frame.columns) == report.SCHEMA and set(frame.device) == {"cpu"}
    assert (frame[frame.metric == "us_per_step"].query("impl == 'ours' and status == 'ok'")["median"] > 0).all()
    assert (run["path"] / record.SUMMARY_NAME).read_text().startswith("## cpu on cpu")
    # A CPU run is on record but publishes nothing: the section still says no GPU run is recorded.
    assert "No GPU run is recorded" in publish.render(tmp_path, tmp_path)


def _gpu_run(root, suite, timestamp, us_per_step, **extra_meta):
    """A recorded run as a GPU session leaves it, with made-up times (ours, cudnn, cudnn_graph)."""
    case = select(suite)[0]
    meta = dict(timestamp=timestamp, git_commit="a" * 40, device="NVIDIA H100 80GB HBM3", torch_version="2.11",
                triton_version="3.6.0", cudnn_version="91000", suite=suite)
    rows = []
    for impl, us in us_per_step.items():
        ms = us * case.T / 1e3
        rows += report.metric_rows(meta, case, impl, (ms, ms, ms), 10.0 if impl == "ours" else 20.0,
                                   1e-3 if impl == "ours" else 0.0, {},
                                   floor_us=0.5 if impl == "ours" else math.nan)  # a made-up barrier floor
    path = record.run_dir(meta, root)
    report.to_frame(rows).to_csv(path / record.CSV_NAME, index=False)
    (path / f"{record.PLOT_STEM}-LSTM-bf16.png").write_bytes(b"png")
    record.write_meta(path, dict(meta, gpu=True, git_dirty=False, driver="570.1", command="python -m profiling.bench",
                                 **extra_meta))
    return case


def test_publish_takes_the_latest_gpu_run_of_each_suite(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    _gpu_run(results, "quick", "2026-11-20T10:00:00+00:00", {"ours": 4.0, "cudnn": 8.0, "cudnn_graph": 6.0})
    case = _gpu_run(results, "quick", "2026-11-21T10:00:00+00:00",
                    {"ours": 2.0, "cudnn": 8.0, "cudnn_graph": 6.0, "flashrnn": 5.0},
                    cases_measured=1, cases_total=3)  # stopped at its time limit
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{publish.BEGIN}\nstale\n{publish.END}\n\n## after\n")
    argv = ["--readme", str(readme), "--results", str(results)]
    assert publish.main(argv + ["--check"]) == 1
    assert publish.main(argv) == 0 and publish.main(argv + ["--check"]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n") and text.endswith(f"{publish.END}\n\n## after\n") and "stale" not in text
    block = text.split(publish.BEGIN)[1].split(publish.END)[0]
    assert "2026-11-21" in block and "2026-11-20" not in block  # the latest run only
    assert "; 1 of 3 cases;" in block
    row = next(line for line in block.splitlines() if line.startswith(f"| {case.id} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = next(line for line in block.splitlines() if line.startswith("| case |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    values = dict(zip(columns, cells))
    assert math.isclose(float(values["speedup vs cudnn"]), 4.0) and math.isclose(
        float(values["speedup vs cudnn_graph"]), 3.0) and math.isclose(float(values["memory vs cudnn"]), 0.5)
    assert float(values["ours floor x"]) == 4.0 and float(values["flashrnn us/step"]) == 5.0
    assert float(values["ours MiB"]) == 10.0 and float(values["cudnn MiB"]) == 20.0
    assert "benchmarks/results/2026-11-21-nvidia-h100-80gb-hbm3-quick/plot-LSTM-bf16.png" in block
    # A newer autotune sweep on the GPU is no benchmark run: it is not published.
    sweep = record.run_dir(dict(timestamp="2026-11-23T00:00:00+00:00", device="NVIDIA H100 80GB HBM3",
                                suite="autotune-quick"), results)
    record.write_meta(sweep, dict(timestamp="2026-11-23T00:00:00+00:00", device="NVIDIA H100 80GB HBM3",
                                  suite="quick", gpu=True, kind="autotune"))
    assert publish.main(argv + ["--check"]) == 0
    # A newer CPU run changes nothing.
    shutil.copytree(results / "2026-11-21-nvidia-h100-80gb-hbm3-quick", results / "2026-11-22-cpu-quick")
    meta = json.loads((results / "2026-11-22-cpu-quick" / record.META_NAME).read_text())
    record.write_meta(results / "2026-11-22-cpu-quick", dict(meta, timestamp="2026-11-22T00:00:00+00:00",
                                                              gpu=False, device="cpu"))
    assert publish.main(argv + ["--check"]) == 0


def _copy_without_git(tmp_path):
    """HEAD's files as a lent machine gets them: no .git, plus what .gitignore ignores."""
    if not (record.ROOT / ".git").exists():
        pytest.skip("needs the git checkout: the copy is made from its HEAD")
    copy = tmp_path / "copy"
    copy.mkdir()
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=record.ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(copy)], input=archive, check=True)
    for ignored in ("rnn/__pycache__/ops.cpython-312.pyc", "tests/__pycache__/stale.py", "tests/.hypothesis/x.py",
                    "build/lib/rnn/ops.py"):
        (copy / ignored).parent.mkdir(parents=True, exist_ok=True)
        (copy / ignored).write_text("# ignored\n")
    return copy


def _run_in_copy(copy, src, monkeypatch):
    """What profiling.bench --record leaves in a copy without .git: meta.json and results.csv
    (rows with git_commit unknown)."""
    meta = dict(timestamp="2026-12-01T10:00:00+00:00", git_commit="unknown", device="NVIDIA H200", torch_version="2.11",
                triton_version="3.6.0", cudnn_version="91000", suite="quick")
    with monkeypatch.context() as patch:
        patch.setattr(record, "ROOT", copy)
        info = record.provenance(meta, ["--suite", "quick", "--record"])
    assert info["git_commit"] == "unknown" and info["git_dirty"] is None
    src.mkdir()
    case = select("quick")[0]
    rows = report.metric_rows(meta, case, "ours", (1.0, 0.9, 1.1), 10.0, 1e-3, {})
    report.to_frame(rows).to_csv(src / record.CSV_NAME, index=False)
    (src / "logs").mkdir()
    (src / "logs" / "bench-quick.log").write_text("log\n")
    record.write_meta(src, info)
    return info


def _head():
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=record.ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_run_without_git_is_adopted_at_the_commit_its_sources_match(tmp_path, monkeypatch):
    copy = _copy_without_git(tmp_path)
    info = _run_in_copy(copy, tmp_path / "src", monkeypatch)
    tracked = subprocess.run(["git", "ls-tree", "-r", "--name-only", "HEAD"], cwd=record.ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    manifest = info["source_manifest"]
    assert set(manifest) == {p for p in tracked if record.in_manifest(p, record._ignore_patterns(record.ROOT))}
    assert "rnn/ops.py" in manifest and "scripts/setup.sh" in manifest and ".ci/run" in manifest
    assert manifest == record.commit_manifest("HEAD")  # blob hashes as git computes them
    results = tmp_path / "results"
    assert record.main(["--adopt", str(tmp_path / "src"), "--results", str(results)]) == 0
    (run,) = record.runs(results)
    assert run["path"].name == "2026-12-01-nvidia-h200-quick"
    assert run["git_commit"] == _head() and run["git_dirty"] is False and run["dirty_paths"] == []
    assert run["git_commit_from"] == "source_manifest" and run["source_manifest"] == manifest
    assert (run["path"] / "logs" / "bench-quick.log").read_text() == "log\n"
    before, after = pd.read_csv(tmp_path / "src" / record.CSV_NAME), pd.read_csv(run["path"] / record.CSV_NAME)
    assert set(before.git_commit) == {"unknown"} and set(after.git_commit) == {_head()}
    pd.testing.assert_frame_equal(before.drop(columns="git_commit"), after.drop(columns="git_commit"))
    # The same run adopted twice is refused.
    assert record.main(["--adopt", str(tmp_path / "src"), "--results", str(results)]) == 1
    assert len(record.runs(results)) == 1


def test_a_run_from_changed_sources_is_adopted_dirty_with_the_paths(tmp_path, monkeypatch):
    copy = _copy_without_git(tmp_path)
    with open(copy / "rnn" / "ops.py", "a") as f:
        f.write("# changed on the lent machine\n")
    (copy / "tests" / "test_new.py").write_text("def test_new():\n    pass\n")  # untracked, not ignored
    _run_in_copy(copy, tmp_path / "src", monkeypatch)
    (tmp_path / "src" / "autotune.csv").write_text("kernel,git_commit,us_per_step\nfwd,unknown,1.5\n")
    assert record.main(["--adopt", str(tmp_path / "src"), "--results", str(tmp_path / "results")]) == 0
    (run,) = record.runs(tmp_path / "results")
    assert run["git_commit"] == _head() and run["git_dirty"] is True
    assert run["dirty_paths"] == ["rnn/ops.py", "tests/test_new.py"]
    assert (run["path"] / "autotune.csv").read_text() == f"kernel,git_commit,us_per_step\nfwd,{_head()},1.5\n"
    assert set(pd.read_csv(run["path"] / record.CSV_NAME).git_commit) == {_head()}


def test_a_run_cut_short_keeps_every_case_it_finished(tmp_path, monkeypatch):
    """Each case's rows are appended, and the summary and meta.json rewritten, as it finishes: a run
    killed during its second case (a device call at its limit) keeps the first."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    finished, real = [], bench.measure_case

    def measure_case(case, *args, **kwargs):
        if finished:
            raise KeyboardInterrupt  # what a kill looks like from inside: nothing after this runs
        finished.append(case)
        return real(case, *args, **kwargs)

    monkeypatch.setattr(bench, "measure_case", measure_case)
    argv = ["--suite", "cpu", "--record", "--results", str(tmp_path), "--cells", "lstm", "--hidden", "8",
            "--batch", "1,2", "--seq", "4", "--warmup-ms", "1", "--rep-ms", "2", "--no-plots"]
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv)
    [run] = record.runs(tmp_path)
    frame = pd.read_csv(run["path"] / record.CSV_NAME)
    assert list(frame.columns) == report.SCHEMA and set(frame.case_id) == {finished[0].id}
    assert run["cases_measured"] == 1 and run["cases_total"] > 1
    assert f"In progress: 1 of {run['cases_total']} cases measured" in (run["path"] / record.SUMMARY_NAME).read_text()
    assert not list(run["path"].glob("*.png"))

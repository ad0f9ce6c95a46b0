"""The profiling entries that need CUDA (cudnn, the CUDA-graphed entries, compiled_loop, flashrnn)
and the barrier floor, on a GPU: each builds, equals cuDNN, and a small suite runs end to end.
GPU only."""
import math
import time

import pandas as pd
import pytest
import torch

from kernels.barrier import empty_steps
from kernels.configs import KernelConfig
from kernels.forward import LaunchInfo
from profiling import bench, report
from profiling.cases import Case
from profiling.impls import REGISTRY
from profiling.measure import barrier_floor_us

pytestmark = pytest.mark.gpu

CUDA_ENTRIES = [name for name, impl in REGISTRY.items() if "cuda" in impl.devices]


def test_empty_steps_count_every_arrival():
    # 16 programs per group, 2 batch tiles, 2 directions: each counter ends at programs x steps.
    counters = empty_steps((16, 2, 2), 4, 7, torch.device("cuda"))
    torch.cuda.synchronize()
    assert counters.tolist() == [16 * 7] * 4


def test_a_grid_that_cannot_meet_gives_up_within_seconds():
    """Counters that start one arrival short: no step's barrier can complete. Every program gives
    up once (kernels.barrier.PATIENCE polls), waits no more, and the launch is reported."""
    from kernels.barrier import watch

    start = time.perf_counter()
    counters = empty_steps((4, 1, 1), 4, 3, torch.device("cuda"), behind=1)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(f"gave up after {elapsed:.2f} s")
    assert counters.tolist() == [4 * 3 - 1]
    with pytest.raises(RuntimeError, match=r"empty_steps_kernel on grid \(4, 1, 1\)"):
        watch.check()
    assert elapsed < 60
    watch.check()  # reported once


def test_barrier_floor():
    cfg = KernelConfig(hidden_block=16, batch_block=16)
    barrier = LaunchInfo("rnn_fwd_kernel", cfg, (16, 1, 1), True)
    floor = barrier_floor_us([barrier], 64, torch.device("cuda"))
    assert 0 < floor < 100
    two = barrier_floor_us([barrier, barrier], 64, torch.device("cuda"))
    assert 1.2 * floor < two < 3 * floor  # summed over the call's launches
    single = LaunchInfo("rnn_fwd_kernel", cfg, (1, 1, 1), True)
    stepwise = LaunchInfo("rnn_fwd_kernel", cfg, (16, 1, 1), False)
    assert math.isnan(barrier_floor_us([single, stepwise], 64, torch.device("cuda")))


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("name", CUDA_ENTRIES)
def test_cuda_entries_equal_cudnn(name, pass_):
    impl = REGISTRY[name]
    reason = impl.unavailable()
    if reason:
        pytest.skip(reason)  # e.g. flashrnn where the package is not installed
    case = Case("LSTM", T=16, B=4, input_size=64, hidden_size=64, dtype="bf16", pass_=pass_)
    device = torch.device("cuda")
    expected = REGISTRY["cudnn"].build(case, device).output().double()
    runner = impl.build(case, device)
    out = runner.output().double()
    assert out.shape == expected.shape and torch.isfinite(out).all()
    assert (out - expected).norm() / expected.norm() < 3e-2, name  # bf16
    runner.step()
    torch.cuda.synchronize()


def test_quick_suite_on_the_gpu(tmp_path):
    """Every CUDA entry on two small cases of the quick suite: rows ok (or saying why not), and
    ours' barrier floor measured where its launches have a barrier."""
    code = bench.main(["--suite", "quick", "--out", str(tmp_path), "--cells", "lstm", "--hidden", "512",
                       "--batch", "16", "--seq", "32", "--dtypes", "bf16", "--impls", ",".join(CUDA_ENTRIES),
                       "--rep-ms", "5", "--warmup-ms", "2"])
    assert code == 0
    (csv,) = tmp_path.glob("bench-quick-*.csv")
    frame = pd.read_csv(csv)
    assert list(frame.columns) == report.SCHEMA
    statuses = set(frame.status)
    assert statuses <= {"ok", "unsupported", "not measured: flashrnn is not installed (pip install flashrnn)"}, statuses
    ok = frame[(frame.status == "ok") & (frame.metric == "us_per_step")]
    assert {"ours", "cudnn", "cudnn_graph", "ours_graph"} <= set(ok.impl) and (ok["median"] > 0).all()
    errors = frame[(frame.metric == "rel_err") & (frame.status == "ok") & (frame.impl != "cudnn")]
    assert (errors["median"] < 3e-2).all()
    ours = frame[frame.impl == "ours"].set_index(["case_id", "metric"])["median"]
    for case_id in frame.case_id.unique():
        config = frame[(frame.impl == "ours") & (frame.case_id == case_id)].config.iloc[0]
        barrier = "persistent" in config and "grid[1," not in config
        assert math.isfinite(ours[case_id, "barrier_floor_us"]) == barrier, config
        if barrier:
            # A step cannot beat an empty step of its grid (0.9: two timings' noise).
            assert ours[case_id, "floor_ratio"] > 0.9


def test_autotune_sweep_records_forward_and_backward(monkeypatch, tmp_path):
    import json

    from scripts import autotune
    monkeypatch.setenv("RNN_CACHE_DIR", str(tmp_path / "cache"))
    argv = ["--cells", "gru", "--hidden", "64", "--batch", "2", "--seq", "16", "--passes", "fwd,bwd", "--record",
            "--results", str(tmp_path / "results")]
    assert autotune.main(argv) == 0
    (run,) = (tmp_path / "results").iterdir()
    meta = json.loads((run / "meta.json").read_text())
    assert meta["kind"] == "autotune" and meta["gpu"] and meta["shapes_tuned"] == 2
    frame = pd.read_csv(run / "autotune.csv")
    assert set(frame.kernel) == {"rnn_fwd", "rnn_bwd"}
    assert frame.groupby("kernel").winner.sum().tolist() == [1, 1]
    assert autotune.main(argv + ["--skip-cached"]) == 0  # a second call leaves the cached shapes
    second = max((tmp_path / "results").iterdir(), key=lambda p: p.stat().st_mtime)
    assert json.loads((second / "meta.json").read_text())["shapes_cached"] == 2

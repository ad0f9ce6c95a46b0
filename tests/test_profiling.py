"""profiling/: the FLOP formula, the suites, the CSV schema, the cpu suite end to end, the overhead
suite's host metrics and the graph and compiled entries."""
import dataclasses
import itertools
import math

import pandas as pd
import pytest
import torch

from profiling import bench, flashrnn_peer, report
from profiling.cases import HOST_SUITES, SUITE_IMPLS, SUITES, Case, matmul_flops, select
from profiling.impls import BASELINE, REGISTRY, CellLoop, torch_module
from profiling.measure import is_gpu_work


def test_flops_single_layer_lstm():
    # DESIGN.md's measured case: 9.6 ms for 2.2 TFLOP is 228 TFLOP/s.
    case = Case("LSTM", T=512, B=256, input_size=1024, hidden_size=1024)
    assert matmul_flops(case) == 512 * (2 * 256 * 4 * 1024 * 1024 * 2)
    assert matmul_flops(case) / 9.6e-3 / 1e12 == pytest.approx(229, abs=1)


def test_flops_stacked_bidirectional_projection_and_backward():
    T, B, I, H, P = 3, 5, 7, 11, 4
    case = Case("LSTM", T, B, I, H, num_layers=2, bidirectional=True, proj_size=P, dtype="fp32")
    layer0 = 2 * (2 * B * 4 * H * (I + P) + 2 * B * H * P)
    layer1 = 2 * (2 * B * 4 * H * (2 * P + P) + 2 * B * H * P)
    assert matmul_flops(case) == T * (layer0 + layer1)
    training = Case("LSTM", T, B, I, H, num_layers=2, bidirectional=True, proj_size=P, dtype="fp32",
                    pass_="fwdbwd")
    assert matmul_flops(training) == 3 * matmul_flops(case)
    gru = Case("GRU", T, B, I, H)
    rnn = Case("RNN_RELU", T, B, I, H)
    assert matmul_flops(gru) == T * 2 * B * 3 * H * (I + H)
    assert matmul_flops(rnn) == T * 2 * B * H * (I + H)


def test_packed_cases_count_real_tokens():
    case = Case("LSTM", T=40, B=6, input_size=3, hidden_size=5, num_layers=2, bidirectional=True, packed=True)
    lengths = case.lengths()
    assert torch.equal(lengths, case.lengths()), "a case's lengths must not change between runs"
    assert int(lengths.max()) == 40 and int(lengths.min()) >= 10
    assert case.tokens == int(lengths.sum()) < 40 * 6
    padded = Case("LSTM", T=40, B=6, input_size=3, hidden_size=5, num_layers=2, bidirectional=True)
    assert matmul_flops(case) * padded.tokens == matmul_flops(padded) * case.tokens
    assert "packed" in case.id and case.lengths() is not None and padded.lengths() is None


def test_suites():
    for name, cases in SUITES.items():
        assert cases, name
        assert len(set(cases)) == len(cases), f"{name} repeats a case"
    assert 8 <= len(SUITES["quick"]) <= 16
    assert {c.B for c in SUITES["latency"]} == {1, 8, 16, 32, 64}
    assert {c.hidden_size for c in SUITES["latency"]} == {128, 256, 512, 1024}
    assert all(c.B >= 128 for c in SUITES["throughput"])
    assert {c.num_layers for c in SUITES["stacked"]} >= {2, 4} and any(c.bidirectional for c in SUITES["stacked"])
    assert {c.pass_ for c in SUITES["training"]} == {"fwdbwd"}
    assert set(SUITES["all"]) == set().union(*(SUITES[n] for n in ("quick", "latency", "throughput", "stacked",
                                                                    "training", "packed")))
    packed = [c for c in SUITES["packed"] if c.packed]
    assert packed and all(c.__class__(**{**c.__dict__, "packed": False}) in SUITES["packed"] for c in packed)
    assert all(c.hidden_size <= 64 and c.dtype == "fp32" for c in SUITES["cpu"])
    decide = SUITES["decide"]  # gpu_check's: every combination, forward first, B=16 before 64
    assert {(c.cell, c.dtype, c.B, c.hidden_size, c.T, c.pass_) for c in decide} == set(itertools.product(
        ("LSTM", "GRU"), ("bf16", "fp16"), (16, 64), (256, 512, 1024), (512,), ("fwd", "fwdbwd")))
    assert [c.pass_ for c in decide] == sorted(c.pass_ for c in decide)
    assert [c.B for c in decide[:12]] == [16] * 12 and SUITE_IMPLS["decide"] == ("ours", "ours_graph", "cudnn",
                                                                                  "cudnn_graph")


def test_overrides_replace_the_suite_dimensions():
    cases = select("latency", cells=["GRU"], hidden=[96], batch=[2, 3], seq=[10])
    assert {(c.cell, c.hidden_size, c.input_size, c.T) for c in cases} == {("GRU", 96, 96, 10)}
    assert sorted(c.B for c in cases) == [2, 3]
    with pytest.raises(ValueError, match="unknown suite"):
        select("nope")
    with pytest.raises(ValueError, match="cell"):
        Case("LSTMX", 1, 1, 1, 1)


def test_cell_loop_matches_torch_nn():
    case = Case("GRU", T=5, B=3, input_size=4, hidden_size=6, num_layers=2, bidirectional=True, dtype="fp64")
    module = torch_module(case, "cpu")
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    assert torch.allclose(CellLoop(module, "GRU")(x)[0], module(x)[0], rtol=0, atol=1e-12)


def test_metric_rows_follow_the_schema():
    case = Case("LSTM", T=4, B=2, input_size=3, hidden_size=5, dtype="fp32")
    meta = report.run_metadata(torch.device("cpu"), "cpu")
    rows = report.metric_rows(meta, case, "ours", (2.0, 1.0, 3.0), math.nan, 1e-7, {"backend": "reference"},
                              first_call_s=1.5)
    frame = report.to_frame(rows)
    assert frame.set_index("metric").loc["first_call_s", "median"] == 1.5
    assert list(frame.columns) == report.SCHEMA
    assert set(frame.metric) == set(report.METRICS) - set(report.HOST_METRICS)  # only host suites write them
    with_host = report.to_frame(report.metric_rows(meta, case, "ours", (2.0, 1.0, 3.0), math.nan, 1e-7, {},
                                                   host=((40.0, 30.0, 50.0), 3.0))).set_index("metric")
    assert set(with_host.index) == set(report.METRICS)
    assert tuple(with_host.loc["host_us", ["median", "p20", "p80"]]) == (40.0, 30.0, 50.0)
    assert with_host.loc["launches", "median"] == 3.0 and with_host.loc["launches", "unit"] == "1/call"
    by_metric = frame.set_index("metric")
    assert math.isnan(by_metric.loc["barrier_floor_us", "median"]) and math.isnan(by_metric.loc["floor_ratio", "median"])
    floored = report.to_frame(report.metric_rows(meta, case, "ours", (2.0, 1.0, 3.0), math.nan, 0.0, {},
                                                 floor_us=100.0)).set_index("metric")
    assert tuple(floored.loc["floor_ratio", ["median", "p20", "p80"]]) == (5.0, 2.5, 7.5)  # 500 us per step / 100
    assert by_metric.loc["us_per_step", "median"] == pytest.approx(2.0 * 1e3 / 4)
    assert by_metric.loc["tokens_per_s", "p20"] == pytest.approx(4 * 2 / 3e-3)  # slow end of the rates
    assert by_metric.loc["tflops", "median"] == pytest.approx(matmul_flops(case) / 2e-3 / 1e12)


def test_cpu_suite_end_to_end(tmp_path, capsys):
    code = bench.main(["--suite", "cpu", "--out", str(tmp_path), "--cells", "lstm,gru", "--hidden", "8",
                       "--batch", "3", "--seq", "4", "--rep-ms", "1", "--warmup-ms", "1"])
    assert code == 0
    csvs = list(tmp_path.glob("bench-cpu-*.csv"))
    assert len(csvs) == 1 and csvs[0].with_suffix(".md").exists()
    frame = pd.read_csv(csvs[0])
    assert list(frame.columns) == report.SCHEMA
    assert set(frame.device) == {"cpu"}
    assert set(frame.impl) == {name for name, impl in REGISTRY.items() if not impl.opt_in}
    assert not set(frame.metric) & set(report.HOST_METRICS)
    # GPU-only entries (cuDNN, graphs, compiled_loop) have rows that say why they have no value.
    gpu_only = {name for name, impl in REGISTRY.items() if "cpu" not in impl.devices and not impl.opt_in}
    assert "cudnn" in gpu_only
    assert set(frame[frame.impl.isin(gpu_only)].status) == {"not measured: needs CUDA"}
    frame = frame[~frame.impl.isin(gpu_only)]
    assert set(frame.status) <= {"ok", "unsupported"}
    assert set(frame[frame.status == "unsupported"].impl) <= {"torch_loop"}  # no packed cell loop
    assert set(frame.cell) == {"LSTM", "GRU"} and set(frame.hidden_size) == {8} and set(frame["T"]) == {4}
    assert frame.packed.any()
    times = frame[(frame.metric == "time_ms") & (frame.status == "ok")]
    assert (times["median"] > 0).all() and (times.p20 <= times.p80).all()
    errors = frame[(frame.metric == "rel_err") & (frame.impl == "ours")]
    assert (errors["median"] < 1e-5).all()
    firsts = frame[(frame.metric == "first_call_s") & (frame.status == "ok")]
    assert len(firsts) and (firsts["median"] > 0).all()  # every measured entry's first result took time
    ours = frame[frame.impl == "ours"]
    assert set(ours.backend) <= {"reference", "triton", "native"} and ours.backend.notna().all()
    out = capsys.readouterr().out
    assert "No GPU figures" in out and "speedup vs torch_nn" in out and "ours first call s" in out
    assert "- cudnn: not measured: needs CUDA (every case)" in out


def test_gpu_suite_refused_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the refusal only exists without it
    assert bench.main(["--suite", "quick", "--out", str(tmp_path)]) == 2


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")  # optional at run time; the profiling extra installs it
    case_rows = []
    meta = report.run_metadata(torch.device("cpu"), "cpu")
    for H in (4, 8):
        for B in (1, 4):
            case = Case("GRU", T=8, B=B, input_size=H, hidden_size=H, dtype="fp32")
            for impl, ms in (("ours", 1.0), ("torch_nn", 2.0)):
                case_rows += report.metric_rows(meta, case, impl, (ms * B, ms, ms * 2), math.nan, 0.0, {})
    case_rows += report.metric_rows(meta, Case("LSTM", T=8, B=1, input_size=4, hidden_size=4, dtype="fp32"),
                                    "ours", (1.0, 1.0, 1.0), math.nan, 0.0, {})  # a single point: no plot
    written = report.plots(report.to_frame(case_rows), tmp_path, "t", baseline="torch_nn")
    names = sorted(p.name for p in written)
    assert names == sorted(["t-GRU-H4-L1-T8-fp32-fwd.png", "t-GRU-H8-L1-T8-fp32-fwd.png",  # against batch
                            "t-GRU-vs-H-B1-L1-T8-fp32-fwd.png", "t-GRU-vs-H-B4-L1-T8-fp32-fwd.png",  # hidden size
                            "t-GRU-speedup-L1-T8-fp32-fwd.png"])  # the H x B heat map
    assert all(p.stat().st_size > 1000 for p in written)
    assert report.plots(report.to_frame(case_rows), tmp_path, "u") and not list(tmp_path.glob("u-*speedup*"))


def test_registry_has_the_graph_and_compiled_entries():
    assert REGISTRY["ours_graph"].devices == ("cuda",) == REGISTRY["cudnn_graph"].devices
    assert REGISTRY["ours_compiled"].devices == ("cuda", "cpu")
    assert REGISTRY["ours_compiled"].opt_in  # default runs skip its compiles; the overhead suite names it
    packed = Case("LSTM", 4, 2, 3, 5, packed=True)
    assert not REGISTRY["ours_graph"].supports(packed) and REGISTRY["ours_graph"].supports(Case("LSTM", 4, 2, 3, 5))


def test_overhead_suite():
    cases = SUITES["overhead"]
    assert len(cases) == 16
    assert {(c.cell, c.T, c.B, c.hidden_size) for c in cases} == {
        (cell, T, B, H) for cell in ("LSTM", "GRU") for T in (1, 16) for B in (1, 8) for H in (128, 256)}
    assert all(c.input_size == c.hidden_size and c.dtype == "bf16" and c.pass_ == "fwd" and c.num_layers == 1
               and not c.bidirectional and not c.packed and not c.proj_size for c in cases)
    assert "overhead" in HOST_SUITES and not set(HOST_SUITES) & {"quick", "cpu", "all"}
    assert {"ours", "cudnn", "ours_graph", "cudnn_graph", BASELINE["cpu"]} <= set(SUITE_IMPLS["overhead"])
    assert set(SUITE_IMPLS["overhead"]) <= set(REGISTRY)


def test_overhead_suite_on_the_cpu_writes_host_metrics(tmp_path, capsys):
    code = bench.main(["--suite", "overhead", "--device", "cpu", "--out", str(tmp_path), "--cells", "lstm",
                       "--hidden", "8", "--batch", "2", "--seq", "2", "--impls", "ours,torch_nn",
                       "--rep-ms", "1", "--warmup-ms", "1"])
    assert code == 0
    (csv,) = tmp_path.glob("bench-overhead-*.csv")
    frame = pd.read_csv(csv)
    assert list(frame.columns) == report.SCHEMA and set(frame.device) == {"cpu"}
    assert set(frame.status) == {"ok"} and set(frame.impl) == {"ours", "torch_nn"}
    for impl in ("ours", "torch_nn"):
        rows = frame[frame.impl == impl].set_index("metric")
        assert set(rows.index) == set(report.METRICS)
        assert rows.loc["host_us", "unit"] == "us" and 0 < rows.loc["host_us", "median"] < math.inf
        assert rows.loc["host_us", "p20"] <= rows.loc["host_us", "p80"]
        assert math.isnan(rows.loc["launches", "median"])  # no GPU, nothing launched
    assert "host us" in csv.with_suffix(".md").read_text() and "No GPU figures" in capsys.readouterr().out


def test_gpu_work_events():
    # torch.profiler events as launches_per_call sees them: kineto's activity type where recorded,
    # else the device type less the GPU side of record_function ranges.
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(kind, device=cuda, annotation=False):
        return type("Event", (), dict(activity_type=kind, device_type=device, is_user_annotation=annotation))()

    assert [is_gpu_work(event(k)) for k in ("kernel", "gpu_memcpy", "gpu_memset", "gpu_user_annotation",
                                            "cuda_runtime")] == [True, True, True, False, False]
    assert is_gpu_work(event(None)) and not is_gpu_work(event(None, annotation=True))
    assert not is_gpu_work(event(None, device=cpu)) and not is_gpu_work(event("cpu_op", device=cpu))


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
def test_ours_compiled_runs_on_the_cpu(pass_):
    case = Case("GRU", T=3, B=2, input_size=4, hidden_size=8, dtype="fp32", pass_=pass_)
    runner = REGISTRY["ours_compiled"].build(case, torch.device("cpu"))
    assert runner.details["first_call_s"] > 0 and runner.details["config"].startswith("compiled, first call")
    expected = REGISTRY["torch_nn"].build(case, torch.device("cpu")).output()
    out = runner.output()
    assert out.shape == expected.shape
    assert ((out - expected).norm() / expected.norm()).item() < 1e-5
    runner.step()  # a timed step after the first call


@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
def test_compiled_loop_runs_on_the_cpu(pass_):
    """The compiled cell loop (a GPU peer: CUDA-graphed by reduce-overhead there) builds and equals
    torch.nn; its first call's seconds are kept apart from the timed steps."""
    case = Case("LSTM", T=3, B=2, input_size=4, hidden_size=8, dtype="fp32", pass_=pass_)
    assert REGISTRY["compiled_loop"].opt_in and REGISTRY["compiled_loop"].devices == ("cuda",)
    assert not REGISTRY["compiled_loop"].supports(Case("LSTM", T=512, B=2, input_size=4, hidden_size=8))
    runner = REGISTRY["compiled_loop"].build(case, torch.device("cpu"))
    assert runner.details["first_call_s"] > 0 and runner.details["config"].startswith("compiled, first call")
    expected = REGISTRY["torch_nn"].build(case, torch.device("cpu")).output()
    assert ((runner.output() - expected).norm() / expected.norm()).item() < 1e-5
    runner.step()


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN_TANH"])
def test_flashrnn_mapping_matches_torch_nn(cell):
    """torch.nn's weights mapped to FlashRNN's (Wx, R, b), run through its pure-PyTorch backend on
    the CPU, give torch.nn's outputs and gradients: two layers, both directions, float64."""
    case = Case(cell, T=6, B=3, input_size=5, hidden_size=7, num_layers=2, bidirectional=True, dtype="fp64")
    module = torch_module(case, "cpu")
    x = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)
    out = flashrnn_peer.FlashRNNStack(module, cell, "vanilla")(x)[0]
    expected = module(x)[0]
    assert (out - expected).norm() / expected.norm() < 1e-12
    upstream = torch.randn_like(expected)
    inputs = [x, *module.parameters()]
    for ours, ref in zip(torch.autograd.grad(out, inputs, upstream), torch.autograd.grad(expected, inputs, upstream)):
        assert (ours - ref).norm() / ref.norm() < 1e-12


def test_flashrnn_entry(monkeypatch):
    entry = REGISTRY["flashrnn"]
    assert entry.devices == ("cuda",) and not entry.opt_in and entry.unavailable() is None  # the test extra has it
    assert not entry.supports(Case("RNN_RELU", 4, 2, 3, 5)) and not entry.supports(Case("LSTM", 4, 2, 3, 5, packed=True))
    assert not entry.supports(Case("LSTM", 4, 2, 3, 5, proj_size=2)) and entry.supports(Case("GRU", 4, 2, 3, 5))
    assert flashrnn_peer.backends(Case("GRU", 4, 2, 8, 8)) == ["cuda"]
    assert "triton_fused" in flashrnn_peer.backends(Case("LSTM", 4, 2, 8, 64))
    assert "triton_fused" not in flashrnn_peer.backends(Case("LSTM", 4, 2, 8, 128))
    # The runner keeps the fastest backend that runs; on the CPU only the pure-PyTorch one does.
    monkeypatch.setattr(flashrnn_peer, "backends", lambda case: ["cuda", "vanilla"])
    case = Case("GRU", T=3, B=2, input_size=4, hidden_size=8, dtype="fp32", pass_="fwdbwd")
    runner = entry.build(case, torch.device("cpu"))
    assert runner.details["backend"] == "flashrnn vanilla"
    assert runner.details["config"].startswith("cuda: ") and "vanilla" in runner.details["config"]
    expected = REGISTRY["torch_nn"].build(case, torch.device("cpu")).output()
    assert ((runner.output() - expected).norm() / expected.norm()).item() < 1e-5
    runner.step()
    monkeypatch.setattr(flashrnn_peer, "backends", lambda case: ["cuda"])
    with pytest.raises(RuntimeError, match="no flashrnn backend runs this case"):
        entry.build(case, torch.device("cpu"))


def test_unavailable_entries_get_rows_saying_why(monkeypatch):
    monkeypatch.setattr(flashrnn_peer.importlib.util, "find_spec", lambda name: None)
    assert "not installed" in REGISTRY["flashrnn"].unavailable()
    runs_here = dataclasses.replace(REGISTRY["torch_loop"], unavailable=lambda: "peer is not installed")
    monkeypatch.setitem(REGISTRY, "peer", runs_here)
    case = Case("GRU", T=3, B=2, input_size=4, hidden_size=8, dtype="fp32")
    meta = report.run_metadata(torch.device("cpu"), "cpu")
    rows = bench.measure_case(case, ["torch_nn", "peer"], torch.device("cpu"), meta, 1, 1)
    frame = report.to_frame(rows)
    assert set(frame[frame.impl == "peer"].status) == {"not measured: peer is not installed"}
    assert set(frame[frame.impl == "torch_nn"].status) == {"ok"}

"""The forward launcher and kernel against the float64 reference, partition by partition.

Outputs are poisoned with NaN before each launch, so an element the kernel never writes fails.
Under the interpreter several programs per group only run stepwise (a grid barrier between
programs that run one after another would deadlock); one program per group runs persistently.
"""
import time

import pytest
import torch

from helpers import CELL_IDS, PARTITIONS, TOL, assert_close, run_backward, run_layer
from kernels.cells import Cell
from kernels.configs import KernelConfig, describe

pytestmark = pytest.mark.interpreter


# The partitions every kernel runs (helpers.PARTITIONS), and the forward's fused-gate layouts.
PARTITIONS = dict(PARTITIONS, **{
    # all gates in one dot (LSTM/GRU; one gate has nothing to fuse): one program, then ten of 4 units
    "fused-single": (dict(H=40), KernelConfig(hidden_block=64, batch_block=16, fused_gates=True), True),
    "fused-multi": (dict(H=40, B=18), KernelConfig(hidden_block=16, batch_block=16, fused_gates=True,
                                                    persistent=False), False),
    "fused-chunked": (dict(H=40), KernelConfig(hidden_block=64, batch_block=16, k_block=16, fused_gates=True),
                      True),
})


@pytest.mark.parametrize("partition", PARTITIONS, ids=list(PARTITIONS))
@pytest.mark.parametrize("cell", list(Cell), ids=CELL_IDS)
def test_partitions(cell, partition, kernel_device):
    torch.manual_seed(1)
    sizes, config, persistent = PARTITIONS[partition]
    result, ref = run_layer(cell, config=config, device=kernel_device, **sizes)
    assert_close(result, ref, TOL[torch.float64])
    info = result[3]
    assert info.persistent == persistent
    H, B = sizes.get("H", 17), sizes.get("B", 3)
    assert info.grid == (-(-H // info.config.hidden_block), -(-B // info.config.batch_block), 2)


@pytest.mark.parametrize("chunked", [False, True], ids=["resident", "chunked-fused"])
@pytest.mark.parametrize("cell", list(Cell), ids=CELL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dtypes(cell, dtype, chunked, kernel_device):
    torch.manual_seed(2)
    config = KernelConfig(32, 16, k_block=16, fused_gates=True) if chunked else None
    result, ref = run_layer(cell, dtype=dtype, device=kernel_device, H=24, config=config)
    assert result[0].dtype == dtype and result[1].dtype == dtype
    # fp32 under the interpreter is full precision; on a GPU this test may see tf32 only if enabled.
    assert_close(result, ref, TOL[dtype])


@pytest.mark.parametrize("config", [None, KernelConfig(16, 16, persistent=False),
                                    KernelConfig(32, 16, k_block=16)], ids=["single", "multi", "chunked"])
@pytest.mark.parametrize("cell", list(Cell), ids=CELL_IDS)
def test_packed_and_layouts(cell, config, kernel_device):
    """Packed sequences (lengths 1 and T included), batch_first strides, no h0, no bias."""
    torch.manual_seed(3)
    lengths = torch.tensor([6, 5, 2, 1])
    result, ref = run_layer(cell, T=6, B=4, H=18, lengths=lengths, batch_first=True, h0=False, bias=False,
                            config=config, device=kernel_device)
    assert result[0].shape == (14, 36)  # one row per real token
    assert_close(result, ref, TOL[torch.float64])
    result, ref = run_layer(cell, T=5, B=3, H=18, batch_first=True, config=config, device=kernel_device)
    assert_close(result, ref, TOL[torch.float64])


@pytest.mark.parametrize("config", [KernelConfig(32, 16), KernelConfig(16, 16, persistent=False),
                                    KernelConfig(16, 16, k_block=16, persistent=False)],
                         ids=["single", "multi", "chunked-multi"])
@pytest.mark.parametrize("cell", [Cell.LSTM, Cell.GRU, Cell.RNN_TANH], ids=["LSTM", "GRU", "RNN_TANH"])
def test_packed_tiles_skip_idle_steps(cell, config, kernel_device):
    """Two batch tiles, the second of short sequences only: its programs skip the steps where all
    of them are idle (first in reverse, last forward) and must still hand over the right state."""
    torch.manual_seed(13)
    lengths = torch.tensor([7] * 3 + [6] * 13 + [3, 2, 2, 1])
    result, ref = run_layer(cell, T=7, B=20, H=24, lengths=lengths, config=config, device=kernel_device)
    assert result[3].grid[1] == 2
    assert_close(result, ref, TOL[torch.float64])


def test_unidirectional_and_t1(kernel_device):
    torch.manual_seed(4)
    for T, D in ((1, 1), (1, 2), (3, 1)):
        result, ref = run_layer(Cell.LSTM, T=T, D=D, device=kernel_device,
                                config=KernelConfig(16, 16, persistent=False))
        assert_close(result, ref, TOL[torch.float64])


@pytest.mark.parametrize("cell", [Cell.GRU, Cell.LSTM], ids=["gru", "lstm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["fp64", "fp16"])
def test_stepwise_equals_persistent(cell, dtype, kernel_device):
    """One program per group may run either way; both must give the same bits. With 16-bit
    inputs h is exchanged in 16 bits, but each program's own h (GRU's update reads it) and c
    must cross stepwise launches in full precision, as they stay in registers in one launch."""
    torch.manual_seed(5)
    a, _ = run_layer(cell, H=30, dtype=dtype, config=KernelConfig(32, 16, persistent=True), device=kernel_device)
    torch.manual_seed(5)
    b, _ = run_layer(cell, H=30, dtype=dtype, config=KernelConfig(32, 16, persistent=False), device=kernel_device)
    assert a[3].persistent and not b[3].persistent
    for x, y in zip(a[:3], b[:3]):
        assert (x is None and y is None) or torch.equal(x, y)


def test_empty_batch(kernel_device):
    result, ref = run_layer(Cell.LSTM, B=0, device=kernel_device)
    assert result[0].shape == ref[0].shape == (5, 0, 34)


@pytest.mark.parametrize("cell", [Cell.LSTM, Cell.GRU], ids=["LSTM", "GRU"])
def test_fused_four_units_per_program(cell, kernel_device):
    """hidden_block=4: a 16-column fused dot, the narrowest the hardware takes."""
    torch.manual_seed(6)
    result, ref = run_layer(cell, H=10, device=kernel_device,
                            config=KernelConfig(hidden_block=4, batch_block=16, fused_gates=True, persistent=False))
    assert result[3].grid[0] == 3
    assert_close(result, ref, TOL[torch.float64])


def test_narrow_unfused_dot_refused():
    with pytest.raises(ValueError, match="narrower"):
        run_layer(Cell.RNN_TANH, config=KernelConfig(hidden_block=8, batch_block=16, fused_gates=True))


def test_persistent_multi_program_refused_by_interpreter():
    with pytest.raises(ValueError, match="interpreter"):
        run_layer(Cell.RNN_TANH, H=40, config=KernelConfig(16, 16, persistent=True))


@pytest.mark.parametrize("kwargs", [dict(hidden_block=12, batch_block=16), dict(hidden_block=2, batch_block=16),
                                    dict(hidden_block=16, batch_block=8),
                                    dict(hidden_block=16, batch_block=16, num_warps=3),
                                    dict(hidden_block=16, batch_block=16, k_block=24)])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        KernelConfig(**kwargs)


@pytest.mark.parametrize("cell", [Cell.LSTM, Cell.GRU, Cell.RNN_RELU], ids=["LSTM", "GRU", "RNN_RELU"])
def test_every_candidate_of_a_shape(cell, kernel_device):
    """Each config the autotuner may pick for an H=80, B=20 bidirectional layer (W_hh resident or
    streamed in two K chunks, gates fused or not, 4 to 64 units per program, the reduction split
    among 8 warps: parts of 16 rows, the last three all padding) computes the layer."""
    from kernels.configs import candidate_configs
    configs = candidate_configs(80, 20, cell.gates, 8, directions=2)
    assert {c.k_block for c in configs} == {None, 64} and {c.split_k for c in configs} == {1, 8}
    # Stepwise, since the interpreter runs one program at a time; warps and stages change nothing there.
    partitions = dict.fromkeys(KernelConfig(c.hidden_block, c.batch_block, k_block=c.k_block,
                                            fused_gates=c.fused_gates, persistent=False, split_k=c.split_k)
                               for c in configs)
    for config in partitions:
        torch.manual_seed(7)
        result, ref = run_layer(cell, T=3, B=20, H=80, I=8, D=2, device=kernel_device, config=config)
        assert_close(result, ref, TOL[torch.float64])


def test_launchers_run_on_the_inputs_gpu(monkeypatch):
    """Triton launches on the current device: the launchers make the input's GPU current (a model
    on cuda:1 while cuda:0 is current). Checked with a stand-in tensor and a recording guard."""
    import contextlib
    from types import SimpleNamespace

    from kernels.backward import rnn_bwd, tune_backward
    from kernels.forward import on_input_device, rnn_fwd, tune_forward

    current = []

    @contextlib.contextmanager
    def device_guard(device):
        current.append(device)
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "device", device_guard)
    seen = on_input_device(lambda cell, x: list(current))
    gpu1 = torch.device("cuda", 1)
    assert seen(Cell.LSTM, SimpleNamespace(is_cuda=True, device=gpu1)) == [gpu1]
    assert seen(Cell.LSTM, torch.zeros(1)) == []
    assert all(f.__code__ is seen.__code__ for f in (rnn_fwd, rnn_bwd, tune_forward, tune_backward))  # all guarded


def test_empty_steps_without_a_barrier(kernel_device):
    """The barrier floor's empty time loop launches as the persistent kernels do; with one program
    per group it has no barrier (the interpreter cannot run one) and counts nothing. The GPU test
    (tests/test_profiling_gpu.py) checks the barrier's counts."""
    from kernels.barrier import empty_steps

    counters = empty_steps((1, 2, 2), 4, 5, kernel_device)
    assert counters.tolist() == [0, 0, 0, 0]


class _RefusingCooperative:
    """A kernel whose cooperative launches the driver refuses (as under MPS); others run."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if kwargs.get("launch_cooperative_grid"):
                raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")
            return self.kernel[grid](*args, **kwargs)
        return launch

    def __getattr__(self, name):
        return getattr(self.kernel, name)


@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_refused_cooperative_launch_falls_back_to_a_launch_per_step(kind, kernel_device, monkeypatch):
    """A persistent launch the driver refuses runs as one launch per step, with one warning, and
    the results are right; other launch errors still raise."""
    from helpers import assert_grads_close, run_backward
    from kernels import backward, forward

    # The module under test takes its grid as co-resident (the interpreter would run it stepwise).
    monkeypatch.setattr(forward if kind == "forward" else backward, "_choose_persistent", lambda *args: True)
    monkeypatch.setattr(forward, "_residency_cache", {})
    monkeypatch.setattr(forward, "_warned_refusal", [])
    config = KernelConfig(hidden_block=16, batch_block=16)  # 2 programs per group: a barrier
    torch.manual_seed(9)
    with pytest.warns(RuntimeWarning, match="refused a persistent"):
        if kind == "forward":
            monkeypatch.setattr(forward, "rnn_fwd_kernel", _RefusingCooperative(forward.rnn_fwd_kernel))
            result, ref = run_layer(Cell.GRU, T=4, B=3, H=17, I=5, device=kernel_device, config=config)
            assert_close(result, ref, TOL[torch.float64])
            info = result[3]
        else:
            monkeypatch.setattr(backward, "rnn_bwd_kernel", _RefusingCooperative(backward.rnn_bwd_kernel))
            ours, ref, res = run_backward(Cell.LSTM, T=4, B=3, H=17, config=config, device=kernel_device)
            assert_grads_close(ours, ref, TOL[torch.float64])
            info = res.info
    assert not info.persistent and info.grid[0] == 2
    assert list(forward._residency_cache.values()) == [False]  # later calls go stepwise at once
    with pytest.raises(RuntimeError, match="illegal address"):
        forward.run_persistent("key", lambda: None, lambda: (_ for _ in ()).throw(RuntimeError("illegal address")))


@pytest.mark.parametrize("cell", list(Cell), ids=CELL_IDS)
# One program per group: one persistent launch walks every step (the interpreter runs several
# programs a launch per step, where no step has a next one to load ahead).
@pytest.mark.parametrize("config", [KernelConfig(hidden_block=64, batch_block=16),
                                    KernelConfig(hidden_block=64, batch_block=64, k_block=16)],
                         ids=["resident", "streamed"])
def test_input_projection_prefetch(cell, config, kernel_device):
    """Each step's input projection is loaded during the step before: the reference, padded and
    packed (sequences that end early: the load ahead must stop with them), both directions (the
    reverse one prefetches backwards in time)."""
    for lengths in (None, torch.tensor([5, 3, 1])):
        torch.manual_seed(11)
        result, ref = run_layer(cell, T=5, B=3, H=40, I=6, D=2, device=kernel_device, config=config,
                                lengths=lengths)
        assert result[3].persistent and result[3].grid[0] == 1
        assert_close(result, ref, TOL[torch.float64])


@pytest.mark.interpreter
def test_a_barrier_that_cannot_meet_raises_instead_of_hanging(kernel_device):
    """The interpreter runs programs one after another: the first of two waits at the grid barrier
    for the second, which cannot arrive. Its wait is bounded: it gives up, and the launch raises,
    naming the kernel and grid, within seconds; the error is reported once."""
    from kernels.barrier import empty_steps

    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"empty_steps_kernel on grid \(2, 1, 1\).*gave up"):
        empty_steps((2, 1, 1), 4, 3, kernel_device)
    assert time.perf_counter() - start < 10
    assert empty_steps((1, 1, 1), 4, 3, kernel_device).tolist() == [0]


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_a_layer_whose_barrier_gives_up_raises_with_its_config(kind, kernel_device, monkeypatch):
    """A persistent launch of two programs per group, forced under the interpreter (where they run
    one after another, so the barrier can never meet), raises a RuntimeError naming the kernel, its
    grid and its config instead of hanging or returning what it computed."""
    from kernels import backward, forward

    monkeypatch.setattr(forward if kind == "forward" else backward, "_choose_persistent", lambda *args: True)
    config = KernelConfig(hidden_block=16, batch_block=16)
    kernel = "rnn_fwd_kernel" if kind == "forward" else "rnn_bwd_kernel"
    with pytest.raises(RuntimeError, match=rf"{kernel} on grid \(2, 1, 1\) with config {describe(config)}"):
        if kind == "forward":
            run_layer(Cell.GRU, T=4, B=3, H=17, I=5, D=1, device=kernel_device, config=config)
        else:
            run_backward(Cell.LSTM, T=4, B=3, H=17, D=1, config=config, device=kernel_device)

"""scripts.autotune's sweep on the CPU: which shapes a suite's sweep tunes, its refusals. Tuning
itself needs CUDA (tests/test_gpu.py); the tuning paths run through the interpreter in
tests/test_configs.py and tests/test_backward.py."""
import torch

from kernels.cells import Cell
from profiling.cases import select
from scripts import autotune


def test_suite_shapes_cover_every_kernel_the_suite_tunes():
    shapes = autotune.suite_shapes("training")
    cases = select("training")
    expected = {(c.cell, c.hidden_size, c.B, c.dtype) for c in cases}
    for kernel in ("rnn_fwd", "rnn_bwd"):  # the training suite runs backward passes
        assert {(s.cell.name, s.hidden, s.batch, s.dtype) for s in shapes if s.kernel == kernel} == expected
    assert len(shapes) == len(set(shapes)) == 2 * len(expected)
    assert all(s.seq == 512 and s.directions == 1 for s in shapes)
    latency = autotune.suite_shapes("latency")
    assert {s.kernel for s in latency} == {"rnn_fwd"} and Cell.RNN_TANH in {s.cell for s in latency}
    packed = autotune.suite_shapes("packed")  # bidirectional LSTMs, fwd and fwdbwd; projections left out
    assert {(s.kernel, s.directions, s.hidden) for s in packed} == {("rnn_fwd", 2, 512), ("rnn_bwd", 2, 512)}


def test_refusals(capsys):
    assert autotune.main(["--passes", "sideways"]) == 2
    assert autotune.main(["--suite", "nope"]) == 2
    if not torch.cuda.is_available():
        assert autotune.main(["--suite", "quick"]) == 2
        assert "no CUDA device" in capsys.readouterr().err

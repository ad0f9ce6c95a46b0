"""rnn::layer_fwd and rnn::layer_bwd as PyTorch operators: torch.library.opcheck (schema, fake
implementation against the real one, autograd registration, AOT dispatch with dynamic shapes)
for every cell, with and without the optional tensors, padded and packed, on each CPU
implementation: the kernels through the interpreter, torch's native RNN, the reference loop."""
import pytest
import torch

from kernels.cells import Cell
from rnn import ops

H, I, B, T = 5, 3, 3, 4
BATCH_SIZES = torch.tensor([3, 3, 2, 1])  # packed lengths 4, 3, 2

CASES = [  # (cell, directions, bias, h0, c0, proj, packed)
    (Cell.LSTM, 2, True, True, True, False, False),
    (Cell.LSTM, 1, False, False, False, False, True),
    (Cell.LSTM, 2, True, True, False, True, True),
    (Cell.LSTM, 1, True, False, True, True, False),
    (Cell.GRU, 2, True, True, False, False, True),
    (Cell.GRU, 1, True, False, False, False, False),
    (Cell.RNN_TANH, 1, False, True, False, False, False),
    (Cell.RNN_RELU, 2, True, False, False, False, True),
]


def _case_id(case):
    cell, D, bias, h0, c0, proj, packed = case
    return "-".join([cell.name, f"D{D}", "bias" if bias else "nobias", "h0" if h0 else "", "c0" if c0 else "",
                     "proj" if proj else "", "packed" if packed else "padded"]).replace("--", "-").replace("--", "-")


def _op_args(cell, D, bias, h0, c0, proj, packed, requires_grad=True, backend="triton"):
    torch.manual_seed(0)
    G, P = cell.gates, 2 if proj else H
    grad = dict(dtype=torch.float64, requires_grad=requires_grad)
    weights = []
    for _ in range(D):
        weights += [torch.randn(G * H, I, **grad), torch.randn(G * H, P, **grad)]
        weights += [torch.randn(G * H, **grad), torch.randn(G * H, **grad)] if bias else []
        if proj:
            weights.append(torch.randn(P, H, **grad))
    x = torch.randn(int(BATCH_SIZES.sum()), I, **grad) if packed else torch.randn(T, B, I, **grad)
    states = (torch.randn(D, B, P, **grad) if h0 else None,
              torch.randn(D, B, H, **grad) if c0 and cell == Cell.LSTM else None)
    return (x, *states, weights, BATCH_SIZES if packed else None, int(cell), bias, proj, requires_grad, backend)


BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter), "native", "reference"]


def test_layer_backend_follows_the_environment(monkeypatch):
    """What the callers pass as ``backend`` on the CPU: the kernels under the interpreter, the
    reference loop with RNN_BACKEND=reference, else torch's native RNN."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.layer_backend(cpu) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert ops.layer_backend(cpu) == "native"
    monkeypatch.setenv("RNN_BACKEND", "reference")
    assert ops.layer_backend(cpu) == "reference"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_opcheck_layer_fwd(case, backend):
    torch.library.opcheck(torch.ops.rnn.layer_fwd.default, _op_args(*case, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES[:5], ids=_case_id)
def test_opcheck_layer_bwd(case, backend):
    """layer_bwd on a real forward's results, with every upstream gradient and with some absent."""
    x, h0, c0, weights, batch_sizes, cell, bias, proj, _, _ = _op_args(*case, requires_grad=False, backend=backend)
    out, h_n, c_n, saved, m, m_n = torch.ops.rnn.layer_fwd(x, h0, c0, weights, batch_sizes, cell, bias, proj, True,
                                                           backend)
    hidden, hidden_n = (m, m_n) if proj and backend == "triton" else (out, h_n)
    d_out, d_hn, d_cn = torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n)
    for grads in ((d_out, d_hn, d_cn if cell == int(Cell.LSTM) else None), (d_out, None, None)):
        torch.library.opcheck(torch.ops.rnn.layer_bwd.default,
                              (x, h0, c0, weights, batch_sizes, hidden, saved, hidden_n, *grads, cell, bias, proj,
                               True, backend),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_fake_layer_fwd_gives_shapes_only():
    """Under FakeTensorMode the op computes no values (the kernels never run) and the shapes
    follow the inputs, packed batches included (their batch size from a given state)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    real = _op_args(Cell.LSTM, 2, True, True, True, True, True)  # the fused backend: it saves most
    launches = []
    with FakeTensorMode() as mode, ops.recording(launches):
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else
                [mode.from_tensor(w) for w in a] if isinstance(a, list) else a for a in real]
        out, h_n, c_n, saved, m, m_n = torch.ops.rnn.layer_fwd(*args)
    N = int(BATCH_SIZES.sum())
    assert (out.shape, h_n.shape, c_n.shape) == ((N, 2 * 2), (2, B, 2), (2, B, H))
    assert (saved.shape, m.shape, m_n.shape) == ((N, 2, 5, H), (N, 2 * H), (2, B, H))
    assert launches == []  # nothing ran




@pytest.mark.interpreter
def test_modules_under_a_dispatch_mode_call_the_ops():
    """Eager calls skip the dispatcher only where nothing would see it: under a dispatch mode
    (FakeTensorMode, FlopCounterMode, a user's) the modules call rnn::layer_fwd / layer_bwd,
    forward and backward, with the same results."""
    import rnn
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = rnn.GRU(3, 4, num_layers=2, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    want = model(x)[0]
    want_grad, = torch.autograd.grad(want.square().sum(), x)
    with Spy():
        got = model(x)[0]
        got_grad, = torch.autograd.grad(got.square().sum(), x)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    assert seen.count("rnn.layer_fwd.default") == 2 and seen.count("rnn.layer_bwd.default") == 2

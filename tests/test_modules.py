"""The module API: torch.nn's parameters, initialisation, state_dict and repr; from_torch; which
backend ran; dropout in training."""
import copy

import pytest
import torch

import rnn
from helpers import TOL, check_autocast, compare_modules, make_pair, rel_err

CLASSES = [(rnn.RNN, torch.nn.RNN, {}), (rnn.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
           (rnn.LSTM, torch.nn.LSTM, {}), (rnn.LSTM, torch.nn.LSTM, {"proj_size": 3}), (rnn.GRU, torch.nn.GRU, {})]
CLASS_IDS = ["RNN-tanh", "RNN-relu", "LSTM", "LSTM-proj", "GRU"]
SHAPES = dict(input_size=5, hidden_size=7, num_layers=2, bidirectional=True, batch_first=True, dropout=0.25)


@pytest.mark.parametrize("ours_cls, torch_cls, extra", CLASSES, ids=CLASS_IDS)
def test_same_parameters_init_state_dict_and_repr(ours_cls, torch_cls, extra):
    torch.manual_seed(7)
    ref = torch_cls(**SHAPES, **extra)
    torch.manual_seed(7)
    ours = ours_cls(**SHAPES, **extra)
    assert isinstance(ours, torch_cls)
    assert repr(ours) == repr(ref)
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), f"{name}: initialisation differs from torch.nn"
    # load_state_dict both ways, strict
    other = torch_cls(**SHAPES, **extra)
    other.load_state_dict(ours.state_dict())
    ours.load_state_dict(torch_cls(**SHAPES, **extra).state_dict())
    ours.reset_parameters()
    assert all(p.abs().max() <= 7 ** -0.5 for p in ours.parameters())


@pytest.mark.parametrize("ours_cls, torch_cls, extra", CLASSES, ids=CLASS_IDS)
def test_from_torch_shares_parameters(ours_cls, torch_cls, extra):
    ref = torch_cls(**SHAPES, **extra).double().eval()
    ours = rnn.from_torch(ref)
    assert type(ours) is ours_cls and not ours.training
    assert repr(ours) == repr(ref)
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert a is b, f"{name} is not shared"
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    assert rel_err(ours(x)[0], ref(x)[0]) <= TOL[torch.float64]
    with torch.no_grad():
        ref.weight_hh_l0.mul_(2)  # a change to the original shows in the twin
    assert rel_err(ours(x)[0], ref(x)[0]) <= TOL[torch.float64]


def test_from_torch_rejects_other_modules():
    with pytest.raises(TypeError, match="from_torch"):
        rnn.from_torch(torch.nn.Linear(2, 2))


@pytest.mark.interpreter
@pytest.mark.parametrize("proj", [0, 2])
def test_backward_launches_are_recorded(proj):
    """A backward through the fused layers adds each layer's backward launch to last_path, last
    layer first; a forward alone records none."""
    model = rnn.LSTM(4, 6, num_layers=2, proj_size=proj)
    out, _ = model(torch.randn(3, 2, 4))
    assert [l.kernel for l in model.last_path.launches] == ["rnn_fwd_kernel"] * 2
    assert model.last_path.backward_launches == []
    out.sum().backward()
    assert [l.kernel for l in model.last_path.backward_launches] == ["rnn_bwd_kernel"] * 2


@pytest.mark.interpreter
def test_backend_selection(monkeypatch):
    model = rnn.GRU(4, 6, num_layers=2)
    x = torch.randn(3, 2, 4)
    model(x)
    assert model.last_path.backend == "triton" and len(model.last_path.launches) == 2
    monkeypatch.setenv("RNN_BACKEND", "reference")
    model(x)
    assert model.last_path.backend == "reference" and model.last_path.launches == []
    monkeypatch.setenv("RNN_BACKEND", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU tensor without the interpreter: torch.nn's own
    model(x)
    assert model.last_path.backend == "native" and model.last_path.launches == []


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_dropout_in_training(mode, monkeypatch):
    """Inter-layer dropout in training: masks come from torch's generator, so a seed reproduces a
    run and another seed changes it."""
    torch.manual_seed(0)
    _, ours = make_pair(mode, 5, 9, num_layers=3, dropout=0.5, bidirectional=True)
    ours.train()
    x = torch.randn(4, 3, 5, dtype=torch.float64)

    def run(backend, seed):
        monkeypatch.setenv("RNN_BACKEND", backend)
        torch.manual_seed(seed)
        return ours(x)[0]

    a, b = run("triton", 1), run("triton", 1)
    assert torch.equal(a, b)
    assert not torch.equal(a, run("triton", 2))
    no_dropout = ours.eval()(x)[0]
    ours.train()
    assert rel_err(a, no_dropout) > 1e-3, "dropout had no effect"



@pytest.mark.interpreter
def test_dropout_gradients_match_reference(monkeypatch):
    """Gradients with dropout in training: kernels (backend=triton) against the reference path
    with the same seed, hence the same masks."""
    torch.manual_seed(0)
    _, model = make_pair("LSTM", 5, 8, num_layers=2, dropout=0.5)
    model.train()

    class Switch(torch.nn.Module):
        """A copy of ``model`` run under a fixed backend and seed."""

        def __init__(self, backend):
            super().__init__()
            self.inner, self.backend = copy.deepcopy(model), backend

        def forward(self, x, hx=None):
            monkeypatch.setenv("RNN_BACKEND", self.backend)
            torch.manual_seed(11)
            return self.inner(x, hx)

    x = torch.randn(4, 3, 5, dtype=torch.float64)
    ref, ours = Switch("reference"), Switch("triton")
    compare_modules(ref, ours, lambda: (lambda leaf: (leaf, leaf))(x.clone().requires_grad_()), tol=TOL[torch.float64])
    assert ours.inner.last_path.backend == "triton" and ref.inner.last_path.backend == "reference"


def test_native_on_cpu_without_interpreter_matches_torch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    ref, ours = make_pair("GRU", 3, 5, num_layers=2, bidirectional=True)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    compare_modules(ref, ours, lambda: (lambda leaf: (leaf, leaf))(x.clone().requires_grad_()), tol=TOL[torch.float64])
    assert ours.last_path.backend == "native"


def test_zero_batch():
    ref, ours = make_pair("LSTM", 3, 5, bidirectional=True)
    x = torch.randn(4, 0, 3, dtype=torch.float64)
    out, (h, c) = ours(x)
    assert out.shape == ref(x)[0].shape == (4, 0, 10) and h.shape == c.shape == (2, 0, 5)


@pytest.mark.interpreter
@pytest.mark.parametrize("ours_cls, torch_cls, extra", CLASSES, ids=CLASS_IDS)
def test_autocast_runs_float16_like_cudnn(ours_cls, torch_cls, extra, monkeypatch):
    """CUDA autocast's path (casting to float16, autocast off inside) through the interpreter:
    CPU autocast stands in for CUDA's, so a bfloat16 op leaking into the layers would show."""
    monkeypatch.setattr(rnn.modules, "cuda_autocast", lambda x: True)
    ours = ours_cls(**SHAPES, **extra).train()
    ours.dropout = 0.0  # the float64 twin cannot draw the same masks
    ref = torch_cls(**SHAPES, **extra, dtype=torch.float64)
    ref.dropout = 0.0
    check_autocast(ref, ours, "cpu")
    assert ours.last_path.backend == "triton"

"""torch.func and TorchScript over the modules (issue 11): what works matches torch.nn, what
cannot work fails loudly at the call that asks for it.

torch.func: grad of functional_call, jacrev, vmap (over inputs, over stacked parameters, and
composed with grad) run through the fused kernels; a gradient of a gradient and forward mode
raise. TorchScript: torch.jit.trace records torch.nn's length-generic op; torch.jit.script
refuses and names what works.
"""
import warnings

import pytest
import torch
from torch.func import functional_call, grad, jacfwd, jacrev, vmap

import rnn
from helpers import BACKENDS, TOL, make_pair, rel_err, use_backend

MODES = {"LSTM": ("LSTM", {}), "LSTM-proj": ("LSTM", {"proj_size": 2}), "GRU": ("GRU", {}),
         "RNN-tanh": ("RNN_TANH", {})}
T, B, I, H = 3, 2, 3, 4


def _pair(mode, **kwargs):
    cell, extra = MODES[mode]
    torch.manual_seed(0)
    return make_pair(cell, I, H, num_layers=2, bidirectional=True, **extra, **kwargs)


def _params(module):
    return {k: v.detach() for k, v in module.named_parameters()}


def _loss(module):
    return lambda params, x: functional_call(module, params, (x,))[0].pow(2).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=list(MODES))
def test_grad_of_functional_call(mode, backend, monkeypatch):
    ref, ours = _pair(mode)
    device = use_backend(backend, monkeypatch, ours)
    x = torch.randn(T, B, I, dtype=torch.float64)
    d_ref = grad(_loss(ref), argnums=(0, 1))(_params(ref), x)
    d_ours = grad(_loss(ours), argnums=(0, 1))(_params(ours), x.to(device))
    assert rel_err(d_ours[1], d_ref[1]) <= TOL[torch.float64]
    for name in d_ref[0]:
        assert rel_err(d_ours[0][name], d_ref[0][name]) <= TOL[torch.float64], name
    assert ours.last_path.backend == ("reference" if backend == "reference" else "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=list(MODES))
def test_jacrev(mode, backend, monkeypatch):
    """jacrev vmaps the backward over the rows of the Jacobian (one backward per row: a small
    layer keeps that quick under the interpreter)."""
    cell, extra = MODES[mode]
    torch.manual_seed(0)
    ref, ours = make_pair(cell, I, 3, bidirectional=True, **extra)
    device = use_backend(backend, monkeypatch, ours)
    x = torch.randn(2, 1, I, dtype=torch.float64)
    assert rel_err(jacrev(lambda x: ours(x)[0])(x.to(device)), jacrev(lambda x: ref(x)[0])(x)) <= TOL[torch.float64]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=list(MODES))
def test_vmap(mode, backend, monkeypatch):
    """torch.nn's RNNs have no batching rule; ours run each mapped slice in turn. Checked
    against a loop of torch.nn calls: over inputs, over stacked parameters (an ensemble), and
    composed with grad both ways."""
    ref, ours = _pair(mode)
    device = use_backend(backend, monkeypatch, ours)
    xs = torch.randn(2, T, B, I, dtype=torch.float64)
    xs_ours = xs.to(device)
    loop = torch.stack([ref(x)[0] for x in xs])
    assert rel_err(vmap(lambda x: ours(x)[0])(xs_ours), loop) <= TOL[torch.float64]

    scales = torch.tensor([1.0, -0.5], dtype=torch.float64)
    stacked = {k: v * scales.view(2, *[1] * v.dim()) for k, v in _params(ref).items()}
    loop = torch.stack([functional_call(ref, {k: v[i] for k, v in stacked.items()}, (xs[0],))[0] for i in range(2)])
    stacked = {k: v.to(device) for k, v in stacked.items()}
    assert rel_err(vmap(lambda p: functional_call(ours, p, (xs_ours[0],))[0])(stacked), loop) <= TOL[torch.float64]

    per_sample = vmap(grad(_loss(ours), argnums=1), in_dims=(None, 0))(_params(ours), xs_ours)
    loop = torch.stack([grad(_loss(ref), argnums=1)(_params(ref), x) for x in xs])
    assert rel_err(per_sample, loop) <= TOL[torch.float64]

    total = grad(lambda p: vmap(lambda x: _loss(ours)(p, x))(xs_ours).sum())(_params(ours))
    loop = grad(lambda p: sum(_loss(ref)(p, x) for x in xs))(_params(ref))
    assert all(rel_err(total[k], loop[k]) <= TOL[torch.float64] for k in loop)


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", MODES, ids=list(MODES))
def test_higher_order_and_forward_mode_are_refused(mode, monkeypatch):
    """The fused backward has no derivative of its own: a gradient of a gradient raises rather
    than returning zeros for the kernels' part; forward mode raises too. The reference path
    (the way out the messages name) computes them."""
    monkeypatch.setenv("RNN_BACKEND", "triton")
    ref, ours = _pair(mode)
    x = torch.randn(T, B, I, dtype=torch.float64)

    def second(module):
        return grad(lambda x: grad(_loss(module), argnums=1)(_params(module), x).pow(2).sum())(x)

    with pytest.raises(RuntimeError, match="double backward"):
        second(ours)
    with pytest.raises(NotImplementedError, match="forward-mode"):
        jacfwd(lambda x: ours(x)[0])(x)
    monkeypatch.setenv("RNN_BACKEND", "reference")
    assert rel_err(second(ours), second(ref)) <= 1e-9
    assert rel_err(jacfwd(lambda x: ours(x)[0])(x), jacfwd(lambda x: ref(x)[0])(x)) <= TOL[torch.float64]


@pytest.mark.parametrize("backend", BACKENDS[:2])
@pytest.mark.parametrize("mode", ["LSTM-proj", "GRU"])
def test_jit_trace_records_a_length_generic_op(mode, backend, monkeypatch):
    """A traced module runs any sequence length and batch, equal to torch.nn (never truncated to
    the traced length), and says what it records."""
    monkeypatch.setenv("RNN_BACKEND", backend)
    ref, ours = _pair(mode, batch_first=True)
    with pytest.warns(UserWarning, match="records torch.nn"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*(deprecated|Python boolean).*")
        traced = torch.jit.trace(ours, torch.randn(2, T, I, dtype=torch.float64))
    for shape in ((2, T, I), (3, 3 * T, I)):
        x = torch.randn(shape, dtype=torch.float64)
        for a, b in zip(traced(x), ref(x)):
            for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                assert u.shape == v.shape and rel_err(u, v) <= TOL[torch.float64]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_jit_script_refuses_and_names_what_works():
    ours = rnn.GRU(I, H)
    model = torch.nn.Sequential(torch.nn.Linear(I, I), ours)
    with pytest.raises(RuntimeError, match="torch.compile.*torch.jit.trace.*rnn.to_torch"):
        torch.jit.script(model)
    assert model[1] is ours, "scripting swapped a module of the caller's model"
    twin = rnn.to_torch(ours)
    assert type(twin) is torch.nn.GRU and all(a is b for a, b in zip(twin.parameters(), ours.parameters()))
    torch.jit.script(torch.nn.Sequential(torch.nn.Linear(I, I), twin))

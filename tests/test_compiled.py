"""torch.compile and torch.export of models that hold rnn's modules (CPU: the kernels through the
interpreter, and torch's native path without it)."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing
from torch.nn.utils.rnn import pack_padded_sequence

import rnn
from rnn import ops

ROOT = Path(__file__).resolve().parents[1]


class Tagger(torch.nn.Module):
    """What users compile: an RNN between two layers of their own, states used too."""

    def __init__(self, cell=rnn.LSTM, **kwargs):
        super().__init__()
        self.embed = torch.nn.Linear(3, 4)
        self.rnn = cell(4, 6, batch_first=True, **kwargs)
        D = 2 if kwargs.get("bidirectional") else 1
        self.head = torch.nn.Linear(D * (kwargs.get("proj_size") or 6), 2)

    def forward(self, x):
        out, state = self.rnn(torch.tanh(self.embed(x)))
        h_n = state[0] if isinstance(state, tuple) else state
        return self.head(out) + h_n[-1].sum(-1, keepdim=True)[:, None]


def _fresh_counter(backend="aot_eager"):
    torch._dynamo.reset()
    return torch._dynamo.testing.CompileCounterWithBackend(backend)


def _layer_nodes(graph) -> int:
    return sum(1 for n in graph.graph.nodes if n.op == "call_function" and "rnn.layer_fwd" in str(n.target))


def _grads(model, x):
    return [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]


def _step(model, x):
    """Forward and backward of a loss from the outputs; returns (output, gradients)."""
    for p in model.parameters():
        p.grad = None
    x = x.detach().requires_grad_()
    out = model(x)
    (out.square().mean() + out[:, -1].sum()).backward()
    return out.detach(), _grads(model, x)


def _assert_same(a, b, tol=1e-12):
    for u, v in zip(a, b):
        assert (u - v).norm() <= tol * max(v.norm(), 1), (u - v).norm()


@pytest.mark.interpreter
def test_compile_fullgraph_one_node_per_layer_and_dynamic_length():
    """rnn.compile(fullgraph=True): forward and backward equal eager; each layer is one
    rnn::layer_fwd node; new lengths recompile once (then T is dynamic), never per length."""
    torch.manual_seed(0)
    model = Tagger(num_layers=2, bidirectional=True).double()
    twin = copy.deepcopy(model)
    twin.rnn = rnn.to_torch(twin.rnn)  # the same model on torch.nn.LSTM
    counter = _fresh_counter()
    compiled = rnn.compile(model, backend=counter, fullgraph=True)
    for T in (3, 5, 8, 2):
        x = torch.randn(2, T, 3, dtype=torch.float64)
        got, want, torch_nn = _step(compiled, x), _step(model, x), _step(twin, x)
        _assert_same([got[0]] + got[1], [want[0]] + want[1])
        _assert_same([got[0]] + got[1], [torch_nn[0]] + torch_nn[1], tol=1e-10)
    assert counter.frame_count <= 2
    assert [_layer_nodes(g) for g in counter.graphs] == [2] * counter.frame_count
    assert torch._dynamo.config.allow_rnn is False  # only during the calls


@pytest.mark.interpreter
def test_compile_inductor_matches_eager():
    torch.manual_seed(1)
    model = Tagger(rnn.GRU, num_layers=2).double()
    compiled = rnn.compile(model, fullgraph=True)  # inductor
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    got, want = _step(compiled, x), _step(model, x)
    _assert_same([got[0]] + got[1], [want[0]] + want[1])


@pytest.mark.interpreter
def test_compile_packed_and_torch_nn_rnns_in_the_same_model():
    """A PackedSequence through a compiled model, and a plain torch.nn.LSTM beside ours (on a
    padded tensor: torch's own packed LSTM does not compile): under the flag Dynamo traces it
    into aten.lstm instead of breaking the graph."""
    torch.manual_seed(2)

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ours = rnn.GRU(3, 5, bidirectional=True)
            self.theirs = torch.nn.LSTM(5, 4)

        def forward(self, packed):
            out, h = self.ours(packed)
            return self.theirs(h)[0].sum() + out.data.square().sum()

    model = Mixed().double()
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([4, 2, 3]), enforce_sorted=False)
    counter = _fresh_counter()
    compiled = rnn.compile(model, backend=counter, fullgraph=True)
    got = compiled(packed)
    got.backward()
    got_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = model(packed)
    want.backward()
    assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item())
    _assert_same(got_grads, [p.grad for p in model.parameters()])
    assert counter.frame_count == 1 and _layer_nodes(counter.graphs[0]) == 1


@pytest.mark.interpreter
def test_no_kernel_runs_while_tracing(monkeypatch):
    """Tracing uses the ops' fake implementations: the kernels (and their compilation and
    tuning) run only when the compiled model runs."""
    seen = []
    real = ops._forward

    def spy(*args, **kwargs):
        seen.append(torch.compiler.is_compiling())
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "_forward", spy)
    model = Tagger()
    compiled = rnn.compile(model, backend=_fresh_counter(), fullgraph=True)
    compiled(torch.randn(2, 3, 3))
    assert seen == [False]


def test_compile_on_the_native_cpu_path(monkeypatch):
    """Without the interpreter a compiled model runs the op's native CPU implementation
    (torch.nn's), forward and backward."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(3)
    model = Tagger(proj_size=2).double()
    counter = _fresh_counter()
    compiled = rnn.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got, want = _step(compiled, x), _step(model, x)
    assert model.rnn.last_path.backend == "native"
    _assert_same([got[0]] + got[1], [want[0]] + want[1])
    assert _layer_nodes(counter.graphs[0]) == 1


def test_importing_never_changes_dynamo_settings():
    code = ("import torch, torch._dynamo.config as c; before = c.get_config_copy(); import rnn; "
            "m = rnn.LSTM(2, 3); m(torch.randn(2, 1, 2)); "
            "assert c.get_config_copy() == before and c.allow_rnn is False; print('unchanged')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "unchanged" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_records_torch_nn_portable_graph(strict):
    """torch.export gives torch.nn's graph (aten.lstm), which runs anywhere without our ops, and
    equals both our model and torch.nn's twin on new inputs."""
    torch.manual_seed(4)
    model = Tagger(num_layers=2, bidirectional=True).eval()
    x = torch.randn(2, 5, 3)
    program = torch.export.export(model, (x,), strict=strict)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.lstm.input" in targets and not any("rnn." in t for t in targets)
    twin = Tagger(num_layers=2, bidirectional=True).eval()
    twin.load_state_dict(model.state_dict())
    twin.rnn = rnn.to_torch(twin.rnn)
    twin_targets = {str(n.target) for n in torch.export.export(twin, (x,), strict=strict).graph.nodes
                    if n.op == "call_function"}
    assert targets == twin_targets
    x2 = torch.randn(2, 5, 3)
    with torch.no_grad():
        assert torch.allclose(program.module()(x2), model(x2), rtol=1e-5, atol=1e-6)
        assert torch.allclose(program.module()(x2), twin(x2), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("cell", [rnn.LSTM, rnn.GRU, rnn.RNN], ids=["LSTM", "GRU", "RNN"])
def test_onnx_export_runs_in_onnxruntime(cell, dynamo):
    """torch.onnx.export, both exporters, records torch.nn's op, which ONNX maps to its own RNN
    operators: the file runs in onnxruntime, without torch or our kernels, and equals our model.
    The TorchScript exporter's file takes any sequence length; torch.export (under the dynamo
    exporter) specializes the length for torch.nn's twin as well, so that file keeps its own."""
    import io

    import onnxruntime

    torch.manual_seed(5)
    model = Tagger(cell, num_layers=2, bidirectional=True).eval()
    x = torch.randn(2, 5, 3)
    if dynamo:
        data = torch.onnx.export(model, (x,), dynamo=True).model_proto.SerializeToString()
    else:
        buffer = io.BytesIO()
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["x"], dynamic_axes={"x": {1: "time"}})
        data = buffer.getvalue()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    for steps in (5,) if dynamo else (5, 9):
        x_new = torch.randn(2, steps, 3)
        with torch.no_grad():
            expected = model(x_new)
        (got,) = session.run(None, {session.get_inputs()[0].name: x_new.numpy()})
        assert torch.allclose(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-6), steps

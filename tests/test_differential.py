"""Property-based differential suite: rnn.RNN/LSTM/GRU against torch.nn, in float64.

Hypothesis draws a configuration (cell, layers, directions, batch_first, bias, proj_size, dropout in
train or eval mode; padded, packed or unbatched input; hx absent, a tensor, a tuple or a list; which
leaves need gradients) and a way of consuming the outputs: a loss through a chain of views and ops
(whose backward hands the modules expanded and strided gradients), or torch.autograd.grad or
torch.func.vjp (of a functional_call) with non-contiguous grad_outputs. torch.nn's module and
ours run with the same weights and the same seed before each forward; outputs, states, every
gradient (a frozen parameter's None included) and the global RNG state after forward and after
backward must agree.

CI runs a fixed, derandomized number of examples per test (about 2 minutes with ``-n auto`` on two
cores). ``--diff-examples N`` (tests/conftest.py) runs N examples in each test instead; hypothesis's
own ``--hypothesis-seed S`` turns derandomizing off, for a new, reproducible stream of examples:

    python3 -m pytest tests/test_differential.py --diff-examples 2000 -n auto
    python3 -m pytest tests/test_differential.py --diff-examples 2000 --hypothesis-seed 7 -n auto

A failure prints the shrunk ``Case`` and a snippet that reruns it with ``check``.
"""
import dataclasses
import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from helpers import TOL, make_pair, rel_err

MODES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU")

# Examples per test in CI, calibrated so that the file takes about 2 minutes on 2 cores under
# -n auto (measured: about 45 s per triton test, 5-10 s per reference test). The interpreter's cost
# per example differs by cell, so the triton counts do too.
REFERENCE_EXAMPLES = 250
TRITON_EXAMPLES = {"RNN_TANH": 80, "RNN_RELU": 80, "LSTM": 45, "GRU": 55}
GPU_EXAMPLES = 25  # not calibrated: no GPU where this was written

TOLERANCE = TOL[torch.float64]


@dataclass(frozen=True, repr=False)
class Term:
    """One consumed tensor. target: "output" (a PackedSequence's .data when packed), "padded"
    (pad_packed_sequence of a packed output), "h_n" or "c_n". Loss mode: ``ops``, a chain applied
    before a final .sum(). Grad and vjp modes: ``grad``, the layout of its non-contiguous
    grad_output."""

    target: str
    ops: tuple = ()
    grad: tuple = ()

    def __repr__(self):
        return _repr(self, always=("target",))


@dataclass(frozen=True, repr=False)
class Case:
    """One drawn configuration; its repr (non-default fields only) evaluates back to it."""

    mode: str
    layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    bias: bool = True
    proj: int = 0
    dropout: float = 0.0
    train: bool = False
    T: int = 1
    B: int = 1  # 1 for unbatched input
    I: int = 1
    H: int = 1
    input: str = "padded"  # "padded", "packed" or "unbatched"
    lengths: tuple = ()  # packed: one per sequence, in batch order, T among them
    enforce_sorted: bool = True
    hx: str = "none"  # "none", "tensor" (RNN/GRU), "tuple" or "list" (LSTM)
    hx_grad: bool = False
    input_grad: bool = True
    frozen: tuple = ()  # parameter names with requires_grad=False
    consume: str = "loss"  # "loss" (backward of a scalar), "grad" (autograd.grad), "vjp" (torch.func.vjp)
    terms: tuple = (Term("output", ops=(("sum",),)),)
    seed: int = 0

    def __repr__(self):
        return _repr(self, always=("mode", "seed"))

    @property
    def D(self):
        return 2 if self.bidirectional else 1


def _repr(obj, always):
    parts = [f"{f.name}={getattr(obj, f.name)!r}" for f in dataclasses.fields(obj)
             if f.name in always or getattr(obj, f.name) != f.default]
    return f"{type(obj).__name__}({', '.join(parts)})"


def param_names(mode, layers, bidirectional, bias, proj):
    """torch.nn's parameter names, in its order."""
    per = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if bias else []) + (["weight_hr"] if proj else [])
    return tuple(f"{w}_l{layer}{suffix}" for layer in range(layers)
                 for suffix in ("", "_reverse")[:2 if bidirectional else 1] for w in per)


def target_shapes(case: Case) -> dict:
    """Shape of every consumable tensor of ``case``."""
    features, h_out, LD = case.D * (case.proj or case.H), case.proj or case.H, case.layers * case.D
    time_major = (case.B, case.T) if case.batch_first else (case.T, case.B)
    if case.input == "unbatched":
        shapes = {"output": (case.T, features), "h_n": (LD, h_out), "c_n": (LD, case.H)}
    else:
        shapes = {"output": (*time_major, features), "h_n": (LD, case.B, h_out), "c_n": (LD, case.B, case.H)}
    if case.input == "packed":
        shapes["output"] = (sum(case.lengths), features)
        shapes["padded"] = (*time_major, features)
    return shapes


# ---------------------------------------------------------------------------------------------
# Consumption: ops of a loss chain and layouts of grad_outputs.

def apply_op(t, op, weight):
    """One op of a loss chain; ``weight(rows, cols)`` gives the fixed matrix of a matmul."""
    kind, *a = op
    if kind in ("sum", "mean"):
        return getattr(t, kind)(*a)
    if kind == "index":
        return t[(slice(None),) * a[0] + (a[1],)]
    if kind == "slice":
        return t[(slice(None),) * a[0] + (slice(a[1], None, a[2]),)]
    if kind == "permute":
        return t.permute(*a[0])
    if kind == "flatten":
        return t.reshape(-1)
    if kind == "reshape":
        return t.reshape(a[0])
    if kind == "transpose":
        return t.transpose(a[0], a[1]).contiguous()
    if kind == "matmul":
        m = t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1)
        return m @ weight(m.shape[1], a[0])
    if kind == "pow":
        return t.pow(2)
    if kind == "abs":
        return t.abs()
    raise ValueError(f"unknown op {op!r}")


def _meta_shape(shape, op):
    out = apply_op(torch.empty(shape, device="meta"), op, lambda r, c: torch.empty(r, c, device="meta"))
    return tuple(out.shape)


def _draw_op(draw, shape):
    n = len(shape)
    kinds = ["sum", "mean", "pow", "abs", "flatten", "matmul"]
    kinds += ["index", "slice", "reshape"] if n else []
    kinds += ["permute", "transpose"] if n >= 2 else []
    kind = draw(st.sampled_from(kinds))
    dim = st.integers(0, n - 1)
    if kind in ("sum", "mean"):
        d = draw(st.none() | dim) if n else None
        return (kind,) if d is None else (kind, d)
    if kind == "index":
        d = draw(dim)
        return ("index", d, draw(st.integers(0, shape[d] - 1)))
    if kind == "slice":
        d, step = draw(dim), draw(st.sampled_from([2, 3]))
        return ("slice", d, draw(st.integers(0, min(step, shape[d]) - 1)), step)
    if kind == "reshape":
        numel = 1
        for s in shape:
            numel *= s
        rows = draw(st.sampled_from([a for a in range(1, numel + 1) if numel % a == 0]))
        return ("reshape", (rows, numel // rows))
    if kind == "permute":
        return ("permute", tuple(draw(st.permutations(range(n)))))
    if kind == "transpose":
        d0, d1 = draw(st.lists(dim, min_size=2, max_size=2, unique=True))
        return ("transpose", d0, d1)
    if kind == "matmul":
        return ("matmul", draw(st.integers(1, 3)))
    return (kind,)


def _draw_ops(draw, shape):
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        ops.append(_draw_op(draw, shape))
        shape = _meta_shape(shape, ops[-1])
    return tuple(ops)


def _draw_layout(draw, shape):
    """A deliberately non-contiguous grad_output layout for a tensor of ``shape``."""
    n = len(shape)
    kind = draw(st.sampled_from(["expand", "permuted", "strided"]))
    if kind == "expand":  # dims of size 1 in the base, expanded (stride 0)
        return ("expand", tuple(sorted(draw(st.sets(st.integers(0, n - 1), min_size=1)))))
    if kind == "permuted":  # a permuted view of a contiguous tensor of the permuted shape
        return ("permuted", tuple(draw(st.permutations(range(n)))))
    return ("strided", draw(st.integers(0, n - 1)), draw(st.sampled_from([2, 3])))  # big[..., ::step, ...]


def grad_output(shape, layout, gen, device):
    """A grad_output of ``shape`` in ``layout``: the base drawn on the CPU from ``gen`` (the same
    values for both modules), the view taken on ``device`` (a copy would make it contiguous)."""
    kind, *a = layout
    if kind == "expand":
        base = torch.randn([1 if d in a[0] else s for d, s in enumerate(shape)], generator=gen, dtype=torch.float64)
        return base.to(device).expand(shape)
    if kind == "permuted":
        perm = a[0]
        base = torch.randn([shape[p] for p in perm], generator=gen, dtype=torch.float64).to(device)
        return base.permute([perm.index(d) for d in range(len(shape))])
    d, step = a
    big = torch.randn([s * step if i == d else s for i, s in enumerate(shape)], generator=gen, dtype=torch.float64)
    return big.to(device)[(slice(None),) * d + (slice(None, None, step),)]


# ---------------------------------------------------------------------------------------------
# The drawn case.

@st.composite
def cases(draw, mode, inert_dropout=False):
    """A Case of ``mode``; with inert_dropout, dropout never runs (p=0 or eval mode)."""
    layers = draw(st.integers(1, 3))
    bidirectional, batch_first, bias = draw(st.booleans()), draw(st.booleans()), not draw(st.booleans())
    T, I, H = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    proj = draw(st.just(0) | st.integers(1, H - 1)) if mode == "LSTM" and H > 1 else 0
    dropout = draw(st.sampled_from([0.0, 0.25, 0.5]))
    train = draw(st.booleans()) and not (inert_dropout and dropout)
    kind = draw(st.sampled_from(["padded", "packed", "unbatched"]))
    B = 1 if kind == "unbatched" else draw(st.integers(1, 4))
    lengths, enforce_sorted = (), True
    if kind == "packed":
        lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
        lengths[draw(st.integers(0, B - 1))] = T  # the longest is T
        enforce_sorted = draw(st.booleans())
        lengths = tuple(sorted(lengths, reverse=True) if enforce_sorted else lengths)
    hx = draw(st.sampled_from(["none", "tuple", "list"] if mode == "LSTM" else ["none", "tensor"]))
    hx_grad = hx != "none" and draw(st.booleans())
    input_grad = draw(st.booleans())
    names = param_names(mode, layers, bidirectional, bias, proj)
    how = draw(st.sampled_from(["none", "some", "all"]))
    frozen = () if how == "none" else names if how == "all" else \
        tuple(n for n in names if draw(st.booleans()))
    # torch.nn's packed path cannot run under torch.func (it reads the data pointer of batch_sizes).
    consume = draw(st.sampled_from(["loss", "grad"] + (["vjp"] if kind != "packed" else [])))
    case = Case(mode, layers, bidirectional, batch_first, bias, proj, dropout, train, T, B, I, H, kind, lengths,
                enforce_sorted, hx, hx_grad, input_grad, frozen, consume)
    shapes = target_shapes(case)
    targets = ["output", "h_n"] + (["c_n"] if mode == "LSTM" else []) + (["padded"] if kind == "packed" else [])
    chosen = draw(st.lists(st.sampled_from(targets), min_size=1, max_size=len(targets), unique=True))
    if consume == "loss":
        terms = tuple(Term(t, ops=_draw_ops(draw, shapes[t])) for t in chosen)
    else:
        terms = tuple(Term(t, grad=_draw_layout(draw, shapes[t])) for t in chosen)
    return dataclasses.replace(case, terms=terms, seed=draw(st.integers(0, 2 ** 16)))


# ---------------------------------------------------------------------------------------------
# One run and the comparison.

def build_modules(case: Case, device="cpu"):
    """torch.nn's module on the CPU and ours on ``device``, same weights, same frozen subset."""
    torch.manual_seed(case.seed)
    with warnings.catch_warnings():  # torch.nn warns of dropout with one layer: an allowed configuration
        warnings.filterwarnings("ignore", message="dropout option adds dropout after all but last")
        ref, ours = make_pair(case.mode, case.I, case.H, num_layers=case.layers, bidirectional=case.bidirectional,
                              batch_first=case.batch_first, bias=case.bias, dropout=case.dropout,
                              **({"proj_size": case.proj} if case.proj else {}))
    ours.to(device)
    for module in (ref, ours):
        module.train(case.train)
        for name in case.frozen:
            getattr(module, name).requires_grad_(False)
    return ref, ours


def run(module, case: Case, device="cpu"):
    """Forward and backward of one module as ``case`` says; returns what is compared."""
    gen = torch.Generator().manual_seed(case.seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(device)

    shape = (case.T, case.I) if case.input == "unbatched" else \
        (case.B, case.T, case.I) if case.batch_first else (case.T, case.B, case.I)
    leaves = {"input": randn(*shape).requires_grad_(case.input_grad)}
    if case.hx != "none":
        batch = () if case.input == "unbatched" else (case.B,)
        LD = case.layers * case.D
        leaves["h0"] = randn(LD, *batch, case.proj or case.H).requires_grad_(case.hx_grad)
        if case.mode == "LSTM":
            leaves["c0"] = randn(LD, *batch, case.H).requires_grad_(case.hx_grad)
    params = dict(module.named_parameters())
    leaves.update(params)

    def forward(swap):
        """The module on the case's input, with the leaves named in ``swap`` replaced (torch.func's
        primals); returns (output, h_n, c_n or None) and the consumable tensors by name."""
        x = swap.get("input", leaves["input"])
        inp = pack_padded_sequence(x, torch.tensor(case.lengths), batch_first=case.batch_first,
                                   enforce_sorted=case.enforce_sorted) if case.input == "packed" else x
        states = [swap.get(name, leaves[name]) for name in ("h0", "c0") if name in leaves]
        hx = None if case.hx == "none" else \
            {"tensor": states[0], "tuple": tuple(states), "list": list(states)}[case.hx]
        swapped = {name: t for name, t in swap.items() if name in params}
        torch.manual_seed(case.seed)  # the same dropout masks for both modules
        output, hidden = torch.func.functional_call(module, swapped, (inp, hx)) if swapped else module(inp, hx)
        hidden = hidden if isinstance(hidden, tuple) else (hidden, None)
        targets = {"output": output.data if isinstance(output, PackedSequence) else output,
                   "h_n": hidden[0], "c_n": hidden[1]}
        if isinstance(output, PackedSequence):
            targets["padded"] = pad_packed_sequence(output, batch_first=case.batch_first)[0]
        return (output, *hidden), targets

    (output, h_n, c_n), targets = forward({})
    result = {"output": output, "h_n": h_n, "c_n": c_n, "rng_forward": torch.get_rng_state(),
              "path": getattr(module, "last_path", None)}

    wanted = {name: t for name, t in leaves.items() if t.requires_grad}
    grads = dict.fromkeys(wanted)

    def cotangents(tensors):
        return [grad_output(t.shape, term.grad, torch.Generator().manual_seed(case.seed * 101 + 10 * i + 1), device)
                for i, (t, term) in enumerate(zip(tensors, case.terms))]

    if case.consume == "loss":
        loss = 0
        for i, term in enumerate(case.terms):
            t = targets[term.target]
            for j, op in enumerate(term.ops):
                mgen = torch.Generator().manual_seed(case.seed * 101 + 10 * i + j + 1)
                t = apply_op(t, op, lambda r, c: torch.randn(r, c, generator=mgen, dtype=torch.float64).to(device))
            loss = loss + t.sum()
        # A loss that reaches no leaf needing a gradient (frozen everything, or what torch.nn's
        # per-op CPU graph leaves unconnected) has nothing to differentiate.
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
        grads = {name: t.grad for name, t in wanted.items()}
    elif case.consume == "grad":
        outs = [targets[term.target] for term in case.terms]
        pairs = [(t, g) for t, g in zip(outs, cotangents(outs)) if t.requires_grad]
        if pairs and wanted:
            found = torch.autograd.grad([t for t, _ in pairs], list(wanted.values()), [g for _, g in pairs],
                                        allow_unused=True)
            grads = dict(zip(wanted, found))
    elif wanted:  # "vjp": torch.func over a functional_call, the wanted leaves as primals

        def consumed(*primals):
            return tuple(forward(dict(zip(wanted, primals)))[1][term.target] for term in case.terms)

        outs, vjp = torch.func.vjp(consumed, *[t.detach() for t in wanted.values()])
        grads = dict(zip(wanted, vjp(tuple(cotangents(outs)))))
    result["grads"] = grads
    result["frozen_grads"] = {name: p.grad for name, p in params.items() if not p.requires_grad}
    result["rng_backward"] = torch.get_rng_state()
    return result


def _err(ours, ref):
    """Relative error, or why none can be computed (a shape, a None)."""
    if ours is None or ref is None:
        return "ok" if ours is None and ref is None else f"ours {_what(ours)} vs torch.nn {_what(ref)}"
    if tuple(ours.shape) != tuple(ref.shape):
        return f"shape {tuple(ours.shape)} vs torch.nn {tuple(ref.shape)}"
    return rel_err(ours, ref)


def _what(t):
    return "None" if t is None else f"a {tuple(t.shape)} tensor"


def _bad(errors):
    return {k: v for k, v in errors.items() if v != "ok" and not (isinstance(v, float) and v <= TOLERANCE)}


def check(case: Case, backend: str = "reference", device: str = "cpu", rng: bool = True) -> None:
    """Runs ``case`` through torch.nn (CPU) and ours (``device``; RNN_BACKEND must select ``backend``)
    and fails at the first kind of difference. rng=False skips the RNG-state comparison (ours on
    another device than torch.nn)."""
    ref_module, our_module = build_modules(case, device)
    ref = run(ref_module, case)
    ours = run(our_module, case, device)
    assert ours["path"].backend == backend, f"ran {ours['path'].backend}, not {backend}"

    packed = isinstance(ref["output"], PackedSequence)
    assert isinstance(ours["output"], PackedSequence) == packed, f"output is a {type(ours['output']).__name__}"
    errors = {name: _err(ours[name], ref[name]) for name in ("h_n", "c_n")}
    errors["output"] = _err(ours["output"].data if packed else ours["output"],
                            ref["output"].data if packed else ref["output"])
    if packed:
        for name in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            a, b = getattr(ours["output"], name), getattr(ref["output"], name)
            same = (a is None and b is None) or (a is not None and b is not None and torch.equal(a.cpu(), b.cpu()))
            errors[name] = "ok" if same else f"ours {a} vs torch.nn {b}"
    bad = _bad(errors)
    assert not bad, f"forward: outputs differ from torch.nn's: {bad}"

    assert not rng or torch.equal(ours["rng_forward"], ref["rng_forward"]), \
        "forward: the global RNG state after ours differs from torch.nn's (dropout draws differently)"

    a, b = ours["frozen_grads"], ref["frozen_grads"]
    frozen = {name: f"ours {_what(a[name])}, torch.nn {_what(b[name])}" for name in b
              if a[name] is not None or b[name] is not None}
    assert not frozen, f"backward: frozen parameters got a gradient: {frozen}"

    # A leaf that needs a gradient but that the consumed outputs do not reach: torch.nn's CPU graph
    # (per-op) says None where one fused node (ours, or cuDNN) gives zeros; both mean "no gradient".
    errors = {}
    for name in ref["grads"].keys() | ours["grads"].keys():
        a, b = ours["grads"].get(name), ref["grads"].get(name)
        if (a is None) != (b is None) and not bool(((a if b is None else b) == 0).all()):
            errors[name] = f"ours {_what(a)} vs torch.nn {_what(b)} (not zero)"
    assert not errors, f"backward: a gradient is missing on one side: {errors}"

    errors = {name: _err(ours["grads"][name], ref["grads"][name]) for name in ref["grads"]
              if ours["grads"][name] is not None and ref["grads"][name] is not None}
    bad = _bad(errors)
    assert not bad, f"backward: gradients differ from torch.nn's: {bad}"

    assert not rng or torch.equal(ours["rng_backward"], ref["rng_backward"]), \
        "backward: the global RNG state after ours differs from torch.nn's"


# ---------------------------------------------------------------------------------------------
# The tests: one per backend and cell (so that -n auto spreads them).

def _snippet(case, backend, device):
    env = "RNN_BACKEND=" + repr(backend) + (", TRITON_INTERPRET='1'" if backend == "triton" and device == "cpu" else "")
    return ("Reproduce from the repository root:\n"
            f"import os, sys; os.environ.update({env}); sys.path.insert(0, 'tests')\n"
            "from test_differential import *\n"
            f"check({case!r}, backend={backend!r}, device={device!r}{', rng=False' if device != 'cpu' else ''})")


def _explore(config, strategy, examples, backend, device):
    seeded = config.getoption("--hypothesis-seed") is not None  # a user's seed only acts when not derandomized

    @settings(max_examples=config.getoption("--diff-examples") or examples, derandomize=not seeded,
              deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=strategy)
    def differential(case):
        note(_snippet(case, backend, device))
        check(case, backend, device, rng=device == "cpu")

    differential()


@pytest.mark.parametrize("mode", MODES)
def test_differential_reference(mode, monkeypatch, pytestconfig):
    monkeypatch.setenv("RNN_BACKEND", "reference")
    _explore(pytestconfig, cases(mode), REFERENCE_EXAMPLES, "reference", "cpu")


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", MODES)
def test_differential_triton(mode, monkeypatch, pytestconfig):
    monkeypatch.setenv("RNN_BACKEND", "triton")
    _explore(pytestconfig, cases(mode), TRITON_EXAMPLES[mode], "triton", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_differential_gpu(mode, monkeypatch, pytestconfig):
    """Ours on CUDA against torch.nn on the CPU. torch.nn on CUDA draws dropout masks inside cuDNN,
    so dropout is inert here and the RNG states are not compared."""
    monkeypatch.setenv("RNN_BACKEND", "triton")
    monkeypatch.setenv("RNN_AUTOTUNE", "0")  # every drawn shape would be tuned first
    _explore(pytestconfig, cases(mode, inert_dropout=True), GPU_EXAMPLES, "triton", "cuda")

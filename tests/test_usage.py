"""Parity where users stand (issue 11): the modules consumed as training code consumes torch.nn's.

Losses built from sums, means, indexing, strided slices and reshapes of out / h_n / c_n (whose
upstream gradients are expanded, strided or transposed); hx as a list; malformed packed input;
inter-layer dropout drawn from torch's generator exactly as torch.nn draws it. Every case runs on
the kernels (the interpreter on CPU) and on the reference path, against torch.nn in float64.
"""
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn
from helpers import BACKENDS, TOL, make_pair, rel_err, use_backend

CPU_BACKENDS = BACKENDS[:2]
MODES = {"LSTM": ("LSTM", {}), "LSTM-proj": ("LSTM", {"proj_size": 3}), "GRU": ("GRU", {}),
         "RNN-tanh": ("RNN_TANH", {}), "RNN-relu": ("RNN_RELU", {})}
T, B, I, H = 4, 3, 5, 6


def _flat(result):
    out, hidden = result
    out = out.data if isinstance(out, PackedSequence) else out
    return out, *(hidden if isinstance(hidden, tuple) else (hidden, None))


def _compare(ref, ours, make_input, hx, loss_fn, tol=TOL[torch.float64]):
    """Forward both modules on the same input (make_input(device) -> (input, leaf)) and hx, take
    loss_fn(out, h_n, c_n), backward; compare outputs, states and every gradient (None where
    torch.nn has None)."""
    grads = []
    for module in (ref, ours):
        module.zero_grad(set_to_none=True)
        device = next(module.parameters()).device
        x, leaf = make_input(device)
        state = None
        if hx is not None:
            state = type(hx)(h.to(device).requires_grad_() for h in hx) if isinstance(hx, (list, tuple)) \
                else hx.to(device).requires_grad_()
        outs = _flat(module(x, state))
        loss_fn(*outs).backward()
        states = list(state) if isinstance(state, (list, tuple)) else [state] if state is not None else []
        grads.append((outs, [leaf.grad] + [s.grad for s in states] + [p.grad for p in module.parameters()]))
    (ref_outs, ref_grads), (our_outs, our_grads) = grads
    for name, a, b in zip(("output", "h_n", "c_n"), our_outs, ref_outs):
        if b is not None:
            assert rel_err(a, b) <= tol, f"{name}: {rel_err(a, b):.3g}"
    for i, (a, b) in enumerate(zip(our_grads, ref_grads)):
        assert (a is None) == (b is None), f"gradient {i}: {a is None=} {b is None=}"
        if b is not None:
            assert rel_err(a, b) <= tol, f"gradient {i}: {rel_err(a, b):.3g}"


# Losses whose upstream gradients are not dense [T, B, F] / [L*D, B, H] tensors.
LOSSES = {
    "h_n.sum": lambda out, h, c: h.sum(),  # expanded, stride 0 everywhere
    "c_n.sum": lambda out, h, c: (c if c is not None else h).sum(),
    "h_n.permute.reshape@W": lambda out, h, c: (h.permute(1, 0, 2).reshape(h.shape[1], -1)
                                                @ torch.linspace(-1, 1, h.shape[0] * h.shape[2], dtype=h.dtype)
                                                ).pow(2).sum(),
    "h_n[-1].mean": lambda out, h, c: h[-1].mean(),
    "out[::2].sum+c_n[0]": lambda out, h, c: out[::2].sum() + (c if c is not None else h)[0, :, ::2].sum(),
    "out.mean(0)": lambda out, h, c: out.mean(0).pow(2).sum(),
    "out[-1]@h_n[-1]": lambda out, h, c: (out[-1][..., :h.shape[-1]] * h[-1]).sum(),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES, ids=list(MODES))
def test_losses_with_strided_upstream_gradients(mode, backend, monkeypatch):
    cell, extra = MODES[mode]
    torch.manual_seed(0)
    ref, ours = make_pair(cell, I, H, num_layers=2, bidirectional=True, **extra)
    use_backend(backend, monkeypatch, ours)
    x = torch.randn(T, B, I, dtype=torch.float64)
    L = 2 * 2
    h = torch.randn(L, B, extra.get("proj_size", H), dtype=torch.float64)
    hx = (h, torch.randn(L, B, H, dtype=torch.float64)) if cell == "LSTM" else h
    for name, loss in LOSSES.items():
        try:
            _compare(ref, ours, lambda device: (lambda leaf: (leaf, leaf))(x.to(device).requires_grad_()), hx, loss)
        except AssertionError as exc:
            raise AssertionError(f"loss {name}: {exc}") from None


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_grad_with_noncontiguous_grad_outputs(backend, monkeypatch):
    """torch.autograd.grad with grad_outputs that are expanded, transposed and sliced views."""
    torch.manual_seed(1)
    ref, ours = make_pair("LSTM", I, H, num_layers=2, bidirectional=True, batch_first=True)
    device = use_backend(backend, monkeypatch, ours)
    x = torch.randn(B, T, I, dtype=torch.float64)
    g_out = torch.randn(T, B, 2 * H, dtype=torch.float64).transpose(0, 1)  # [B, T, 2H], transposed
    g_h = torch.randn(1, 1, H, dtype=torch.float64).expand(4, B, H)
    g_c = torch.randn(4, B, 2 * H, dtype=torch.float64)[..., ::2]
    results = []
    for module, dev in ((ref, "cpu"), (ours, device)):
        leaf = x.to(dev).requires_grad_()
        out, (h, c) = module(leaf)
        # .to() of a view keeps its strides on the GPU too
        grad_outputs = tuple(g.to(dev) for g in (g_out, g_h, g_c))
        results.append(torch.autograd.grad((out, h, c), (leaf, *module.parameters()), grad_outputs))
    for a, b in zip(*results):
        assert rel_err(b, a) <= TOL[torch.float64]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", ["padded", "packed-unsorted"])
def test_lstm_hx_as_a_list(packed, backend, monkeypatch):
    """torch.nn's LSTM reads hx[0] and hx[1] of any sequence: a list [h0, c0] works as a tuple."""
    torch.manual_seed(2)
    ref, ours = make_pair("LSTM", I, H, bidirectional=True, proj_size=2)
    use_backend(backend, monkeypatch, ours)
    x = torch.randn(T, B, I, dtype=torch.float64)
    lengths = torch.tensor([2, T, 1])

    def make_input(device):
        leaf = x.to(device).requires_grad_()
        return (pack_padded_sequence(leaf, lengths, enforce_sorted=False) if packed != "padded" else leaf), leaf

    hx = [torch.randn(2, B, 2, dtype=torch.float64), torch.randn(2, B, H, dtype=torch.float64)]
    _compare(ref, ours, make_input, hx, lambda out, h, c: out.sum() + h.pow(2).sum() + c.sum())


@pytest.mark.parametrize("backend", CPU_BACKENDS)  # on CUDA torch.nn's cuDNN draws masks its own way
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("layout", ["padded", "packed-sorted", "packed-unsorted"])
@pytest.mark.parametrize("mode", ["LSTM", "LSTM-proj", "GRU", "RNN-relu"])
def test_dropout_is_torch_nn_dropout(mode, layout, batch_first, backend, monkeypatch):
    """Inter-layer dropout in training: with the same seed, the same masks as torch.nn (same
    outputs and gradients) and the global generator left in the same state afterwards."""
    monkeypatch.setenv("RNN_BACKEND", backend)
    cell, extra = MODES[mode]
    torch.manual_seed(3)
    ref, ours = make_pair(cell, I, H, num_layers=3, bidirectional=mode != "GRU", dropout=0.5,
                          batch_first=batch_first, **extra)
    ref.train(), ours.train()
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64)
    lengths = torch.tensor([T, 3, 1]) if layout == "packed-sorted" else torch.tensor([2, T, 1])
    results = []
    for module in (ref, ours):
        leaf = x.clone().requires_grad_()
        inp = leaf if layout == "padded" else pack_padded_sequence(leaf, lengths, batch_first=batch_first,
                                                                   enforce_sorted=layout == "packed-sorted")
        torch.manual_seed(11)
        outs = _flat(module(inp))
        rng_after_forward = torch.get_rng_state()
        sum(o.sum() for o in outs if o is not None).backward()
        results.append((outs, leaf.grad, [p.grad for p in module.parameters()], rng_after_forward,
                        torch.rand(3)))
    (ref_outs, ref_dx, ref_dw, ref_rng, ref_next), (our_outs, our_dx, our_dw, our_rng, our_next) = results
    assert torch.equal(our_rng, ref_rng), "dropout left torch's generator in another state than torch.nn"
    assert torch.equal(our_next, ref_next)
    for a, b in zip(our_outs, ref_outs):
        if b is not None:
            assert rel_err(a, b) <= TOL[torch.float64]
    assert rel_err(our_dx, ref_dx) <= TOL[torch.float64]
    assert all(rel_err(a, b) <= TOL[torch.float64] for a, b in zip(our_dw, ref_dw))
    assert ours.last_path.backend == backend


def test_batch_first_output_is_a_view_like_torch_nn():
    """torch.nn's batch-first output is a transposed view of a time-major tensor; so is ours."""
    ref, ours = make_pair("GRU", I, H, num_layers=2, batch_first=True)
    x = torch.randn(B, T, I, dtype=torch.float64)
    assert ours(x)[0].stride() == ref(x)[0].stride()


def _packs():
    data = torch.randn(5, I, dtype=torch.float64)
    perm = torch.tensor([1, 0])
    return {
        "rows-claimed-beyond-data": PackedSequence(data, torch.tensor([3, 2, 1])),
        "rows-left-over": PackedSequence(data, torch.tensor([2, 2])),
        "increasing": PackedSequence(data, torch.tensor([1, 2, 2])),
        "zero-size": PackedSequence(data, torch.tensor([3, 2, 0])),
        "int32-sizes": PackedSequence(data, torch.tensor([3, 2], dtype=torch.int32)),
        "float-sizes": PackedSequence(data, torch.tensor([3.0, 2.0])),
        "2d-sizes": PackedSequence(data, torch.tensor([[3, 2]])),
        "no-steps": PackedSequence(data[:0], torch.tensor([], dtype=torch.int64)),
        "index-out-of-range": PackedSequence(data, torch.tensor([2, 2, 1]), torch.tensor([0, 5]),
                                             torch.tensor([0, 1])),
        "indices-not-inverse": PackedSequence(data, torch.tensor([2, 2, 1]), torch.tensor([0, 1]), perm),
        "index-repeated": PackedSequence(data, torch.tensor([2, 2, 1]), torch.tensor([0, 0]), torch.tensor([0, 0])),
        "index-wrong-length": PackedSequence(data, torch.tensor([2, 2, 1]), torch.tensor([1, 0, 2]),
                                             torch.tensor([1, 0, 2])),
    }


# On a GPU, index tensors are checked by a device-side assert (test_gpu.py), which would end this
# process's CUDA context: only the host-checked cases run there.
MALFORMED = [pytest.param(case, b.values[0] if hasattr(b, "values") else b, marks=getattr(b, "marks", ()))
             for b in BACKENDS for case, pack in _packs().items()
             if getattr(b, "values", (b,))[0] != "cuda" or pack.sorted_indices is None]
MALFORMED += [pytest.param(case, "native") for case in _packs()]  # torch.nn's CPU path: checked before it runs


@pytest.mark.parametrize("case, backend", MALFORMED)
def test_malformed_packed_sequences_are_refused(case, backend, monkeypatch):
    """torch.nn runs several of these and reads past the data (the rest fail inside it, with
    whatever error its internals hit); ours refuses every one with a RuntimeError (what
    pack_padded_sequence raises for bad lengths) before any kernel sees it."""
    pack = _packs()[case]
    model = rnn.LSTM(I, H, bidirectional=True, dtype=torch.float64)
    device = use_backend(backend, monkeypatch, model)
    if device != "cpu":
        pack = PackedSequence(pack.data.to(device), pack.batch_sizes)
    with pytest.raises(RuntimeError, match="PackedSequence"):
        model(pack)
    assert model.last_path is None, "a layer ran on malformed input"

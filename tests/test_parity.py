"""Parity of rnn.RNN/LSTM/GRU with torch.nn: outputs, final states and every gradient.

Each case runs twice: through the Triton kernels (the interpreter on CPU, compiled on CUDA) and
through the reference path. Sizes are odd on purpose (H=17, B=3, I=5).
"""
from dataclasses import dataclass, replace

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from helpers import TOL, compare_modules, make_pair, rel_err

MODES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU")


@dataclass(frozen=True)
class Case:
    mode: str
    layers: int = 1
    bidirectional: bool = False
    batch_first: bool = False
    bias: bool = True
    proj: int = 0
    unbatched: bool = False
    packed: str = ""  # "", "sorted" or "unsorted"
    dropout: float = 0.0  # modules run in eval mode: dropout must be inert
    with_hx: bool = False
    T: int = 4
    B: int = 3
    H: int = 17
    I: int = 5

    @property
    def id(self) -> str:
        parts = [self.mode.replace("_", "-"), f"L{self.layers}", "bi" if self.bidirectional else "uni"]
        parts += [name for flag, name in ((self.batch_first, "bf"), (not self.bias, "nobias"),
                                           (self.unbatched, "unbatched"), (self.with_hx, "hx"),
                                           (self.dropout, "dropout-eval")) if flag]
        parts += [f"proj{self.proj}"] if self.proj else []
        parts += [f"packed-{self.packed}"] if self.packed else []
        return "-".join(parts + [f"T{self.T}", f"B{self.B}", f"H{self.H}"])


def _cases():
    cases = []
    for mode in MODES:
        base = Case(mode)
        cases += [
            base,
            replace(base, layers=2, bidirectional=True, with_hx=True),
            replace(base, layers=3, batch_first=True),
            replace(base, layers=2, bidirectional=True, bias=False, batch_first=True),
            replace(base, bidirectional=True, unbatched=True, with_hx=True),
            replace(base, unbatched=True, batch_first=True),
            replace(base, layers=2, bidirectional=True, packed="sorted"),
            replace(base, packed="unsorted", with_hx=True, batch_first=True, B=4),
            replace(base, layers=3, bidirectional=True, packed="unsorted", dropout=0.2, B=5, T=6),
            replace(base, layers=2, dropout=0.4, with_hx=True),
            replace(base, T=1, B=1, H=3, I=2, bidirectional=True),
        ]
    lstm = Case("LSTM", proj=5)
    cases += [lstm, replace(lstm, layers=2, bidirectional=True, with_hx=True),
              replace(lstm, packed="unsorted", bidirectional=True, B=4, with_hx=True),
              replace(lstm, layers=3, batch_first=True, bias=False, dropout=0.3, with_hx=True),
              replace(lstm, proj=1, T=1, unbatched=True, bidirectional=True, with_hx=True)]
    return cases


CASES = _cases()


def _lengths(case):
    """Lengths 1 and T always among them; for enforce_sorted=False the longest is not first."""
    lengths = torch.randint(1, case.T + 1, (case.B,))
    lengths[0], lengths[1] = 1, case.T
    return lengths.sort(descending=True).values if case.packed == "sorted" else lengths


def _run_case(case: Case, device, dtype, tol):
    torch.manual_seed(0)
    ref, ours = make_pair(case.mode, case.I, case.H, dtype=dtype, device=device, num_layers=case.layers,
                          bidirectional=case.bidirectional, batch_first=case.batch_first, bias=case.bias,
                          dropout=case.dropout, **({"proj_size": case.proj} if case.proj else {}))
    ref.eval(), ours.eval()
    shape = (case.B, case.T, case.I) if case.batch_first else (case.T, case.B, case.I)
    if case.unbatched:
        shape = (case.T, case.I)
    x = torch.randn(shape, dtype=dtype, device=device)
    lengths = _lengths(case) if case.packed else None

    def make_input():
        leaf = x.clone().requires_grad_(True)
        if lengths is None:
            return leaf, leaf
        packed = pack_padded_sequence(leaf, lengths, batch_first=case.batch_first,
                                      enforce_sorted=case.packed == "sorted")
        return packed, leaf

    hx = None
    if case.with_hx:
        D = 2 if case.bidirectional else 1
        batch = () if case.unbatched else (case.B,)
        h = torch.randn(case.layers * D, *batch, case.proj or case.H, dtype=dtype, device=device)
        hx = (h, torch.randn(case.layers * D, *batch, case.H, dtype=dtype, device=device)) \
            if case.mode == "LSTM" else h
    compare_modules(ref, ours, make_input, hx, tol=tol)
    return ours


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_parity_kernels(case, kernel_device, monkeypatch):
    monkeypatch.setenv("RNN_BACKEND", "triton")
    ours = _run_case(case, kernel_device, torch.float64, TOL[torch.float64])
    path = ours.last_path
    assert path.backend == "triton"
    assert len(path.launches) == case.layers


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_parity_reference(case, monkeypatch):
    monkeypatch.setenv("RNN_BACKEND", "reference")
    ours = _run_case(case, "cpu", torch.float64, TOL[torch.float64])
    assert ours.last_path.backend == "reference"


FP32_CASES = [Case("LSTM", layers=2, bidirectional=True, with_hx=True), Case("GRU", batch_first=True),
              Case("RNN_TANH", packed="unsorted", B=4), Case("LSTM", proj=6, bidirectional=True, with_hx=True)]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", FP32_CASES, ids=[c.id for c in FP32_CASES])
def test_parity_kernels_fp32(case, kernel_device, monkeypatch):
    """float32 against torch.nn's float32, both at full precision (conftest turns cuDNN's RNN tf32 off)."""
    monkeypatch.setenv("RNN_BACKEND", "triton")
    ours = _run_case(case, kernel_device, torch.float32, TOL[torch.float32])
    assert ours.last_path.backend == "triton"


@pytest.mark.interpreter
@pytest.mark.parametrize("needs", ["input-only", "weights-only"])
@pytest.mark.parametrize("mode, proj", [("LSTM", 0), ("LSTM", 4), ("GRU", 0), ("RNN_TANH", 0)],
                         ids=["LSTM", "LSTM-proj", "GRU", "RNN-tanh"])
def test_partial_gradients_and_strided_input(mode, proj, needs, kernel_device, monkeypatch):
    """Frozen weights (only the input needs a gradient), or an input that needs none (a first
    layer's data); the input a non-contiguous view, as a permute leaves it."""
    monkeypatch.setenv("RNN_BACKEND", "triton")
    torch.manual_seed(2)
    ref, ours = make_pair(mode, 5, 9, device=kernel_device, num_layers=2, bidirectional=True,
                          **({"proj_size": proj} if proj else {}))
    for p in (*ref.parameters(), *ours.parameters()):
        p.requires_grad_(needs == "weights-only")
    base = torch.randn(3, 5, 6, dtype=torch.float64, device=kernel_device)  # [B, I, T]
    results = []
    for module in (ref, ours):
        leaf = base.clone().requires_grad_(needs == "input-only")
        x = leaf.permute(2, 0, 1)  # [T, B, I], not contiguous
        assert not x.is_contiguous()
        out, hidden = module(x)
        outs = [out, *(hidden if isinstance(hidden, tuple) else (hidden,))]
        torch.manual_seed(3)
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
        results.append((outs, leaf.grad, [p.grad for p in module.parameters()]))
    (ref_outs, ref_dx, ref_dw), (our_outs, our_dx, our_dw) = results
    for a, b in zip(our_outs, ref_outs):
        assert rel_err(a, b) <= TOL[torch.float64]
    if needs == "input-only":
        assert rel_err(our_dx, ref_dx) <= TOL[torch.float64]
        assert all(g is None for g in our_dw)
    else:
        assert our_dx is None
        assert all(rel_err(a, b) <= TOL[torch.float64] for a, b in zip(our_dw, ref_dw))

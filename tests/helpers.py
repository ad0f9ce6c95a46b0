"""Shared test helpers: relative errors, tolerances, module pairs and full parity comparisons."""
import math

import pytest
import torch

import rnn
from kernels.backward import rnn_bwd
from kernels.cells import Cell
from kernels.configs import KernelConfig
from kernels.forward import rnn_fwd
from kernels.packing import Packing
from rnn.reference import layer_forward

CELL_IDS = [c.name for c in Cell]

# Partitions every kernel must compute right: name -> (sizes, config, runs persistently?). Under
# the interpreter several programs per group run stepwise only.
PARTITIONS = {
    # one program per (direction, batch tile): persistent
    "single-persistent": (dict(H=17), None, True),
    # three programs of 16 hidden units, H=40 (last one partly masked): stepwise
    "multi-stepwise": (dict(H=40), KernelConfig(hidden_block=16, batch_block=16, persistent=False), False),
    # two batch tiles of 16 rows (second one partly masked), one program each: persistent
    "batch-tiles": (dict(H=20, B=19), KernelConfig(hidden_block=32, batch_block=16), True),
    # both at once, stepwise
    "multi-both": (dict(H=33, B=18), KernelConfig(hidden_block=16, batch_block=16, persistent=False), False),
    # the reduction streamed in K chunks of 16 (several, the last partly masked), pipelined, one program
    "chunked-persistent": (dict(H=40), KernelConfig(hidden_block=64, batch_block=16, k_block=16, num_stages=3),
                           True),
    # K chunks with several programs and batch tiles, stepwise
    "chunked-multi": (dict(H=40, B=18), KernelConfig(hidden_block=16, batch_block=16, k_block=32, persistent=False),
                      False),
}

# Relative-norm tolerances per dtype (CONVENTIONS.md, item 10). fp32 under the interpreter is full
# precision; tf32 can only be exercised on a GPU.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    "tf32": 5e-3,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


# Where ours runs in the module-level tests: the kernels through the interpreter, the reference
# path, or (gpu tests) the compiled kernels on CUDA; torch.nn, the reference, stays on the CPU.
BACKENDS = [pytest.param("triton", marks=pytest.mark.interpreter), "reference",
            pytest.param("cuda", marks=pytest.mark.gpu)]


def use_backend(backend: str, monkeypatch, *modules) -> str:
    """Select ``backend`` (RNN_BACKEND; "native": torch.nn's CPU implementation, which CPU tensors
    run without the interpreter) and move ``modules`` to its device; returns the device."""
    if backend == "native":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("RNN_BACKEND", {"cuda": "triton", "native": "auto"}.get(backend, backend))
    device = "cuda" if backend == "cuda" else "cpu"
    for module in modules:
        module.to(device)
    return device


def rel_err(ours, ref) -> float:
    """||ours - ref|| / ||ref|| in float64; NaN or inf anywhere in ours is an infinite error."""
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    if not torch.isfinite(ours).all():
        return math.inf
    scale = ref.norm().item()
    diff = (ours - ref).norm().item()
    return diff / scale if scale > 0 else diff


def make_pair(mode: str, input_size: int, hidden_size: int, *, dtype=torch.float64, device="cpu", **kwargs):
    """A torch.nn module and our module with the same weights (ours via state_dict)."""
    cls_ref = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU}.get(mode, torch.nn.RNN)
    cls_ours = {"LSTM": rnn.LSTM, "GRU": rnn.GRU}.get(mode, rnn.RNN)
    if mode.startswith("RNN"):
        kwargs["nonlinearity"] = mode[4:].lower()
    ref = cls_ref(input_size, hidden_size, dtype=dtype, device=device, **kwargs)
    ours = cls_ours(input_size, hidden_size, dtype=dtype, device=device, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def flatten_output(result):
    """(output, hidden) -> list of tensors: output (data of a PackedSequence), h_n[, c_n]."""
    output, hidden = result
    if isinstance(output, torch.nn.utils.rnn.PackedSequence):
        output = output.data
    return [output, *(hidden if isinstance(hidden, tuple) else (hidden,))]


def compare_modules(ref, ours, make_input, hx=None, tol=1e-10, grads=True):
    """Run both modules on the same inputs; compare outputs, states and, with random upstream
    gradients on every output, the gradients of input, hx and every parameter."""
    errors = {}
    results = []
    for module in (ref, ours):
        module.zero_grad(set_to_none=True)
        x, leaf = make_input()
        state = None
        if hx is not None:
            state = tuple(h.detach().clone().requires_grad_(grads) for h in hx) if isinstance(hx, tuple) \
                else hx.detach().clone().requires_grad_(grads)
        outs = flatten_output(module(x, state))
        results.append((outs, leaf, state))
    (ref_outs, ref_leaf, ref_state), (our_outs, our_leaf, our_state) = results
    for name, a, b in zip(("output", "h_n", "c_n"), our_outs, ref_outs):
        errors[name] = rel_err(a, b)
    if grads:
        torch.manual_seed(1234)
        upstream = [torch.randn_like(o) for o in ref_outs]
        torch.autograd.backward(ref_outs, upstream)
        torch.autograd.backward(our_outs, upstream)
        errors["d_input"] = rel_err(our_leaf.grad, ref_leaf.grad)
        if hx is not None:
            for i, (a, b) in enumerate(zip(_tuple(our_state), _tuple(ref_state))):
                errors[f"d_hx{i}"] = rel_err(a.grad, b.grad)
        for (name, p_ref), (_, p_ours) in zip(ref.named_parameters(), ours.named_parameters()):
            errors[f"d_{name}"] = rel_err(p_ours.grad, p_ref.grad)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    return errors


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _weights(cell, I, H, D, bias, device):
    G = cell.gates
    bound = 1 / math.sqrt(H)

    def u(*shape):
        return (torch.rand(*shape, dtype=torch.float64, device=device) * 2 - 1) * bound

    return [(u(G * H, I), u(G * H, H), u(G * H) if bias else None, u(G * H) if bias else None, None)
            for _ in range(D)]


class Packer:
    """Per-sequence lengths (sorted longest first) as torch's packed layout: packs padded
    tensors like pack_padded_sequence, and carries the kernels' Packing."""

    def __init__(self, lengths, batch_first, device):
        self.lengths, self.batch_first = lengths, batch_first
        batch_sizes = torch.nn.utils.rnn.pack_padded_sequence(
            torch.zeros(int(lengths[0]), len(lengths), 1), lengths).batch_sizes
        self.packing = Packing.from_batch_sizes(batch_sizes, device)

    def pack(self, padded):
        return torch.nn.utils.rnn.pack_padded_sequence(padded, self.lengths.cpu(), batch_first=self.batch_first).data


def run_layer(cell, *, T=5, B=3, I=6, H=17, D=2, dtype=torch.float64, config=None, bias=True, h0=True,
              lengths=None, batch_first=False, device="cpu"):
    """Launch one layer on random inputs; return our results, the float64 reference and the launch.
    With lengths (longest first; the longest = T) the layer runs on packed data, and the
    reference's output is packed the same way."""
    cell = Cell(cell)
    weights = _weights(cell, I, H, D, bias, device)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64, device=device)
    h_0 = torch.randn(D, B, H, dtype=torch.float64, device=device) if h0 else None
    c_0 = torch.randn(D, B, H, dtype=torch.float64, device=device) if h0 and cell == Cell.LSTM else None
    ref = layer_forward(cell, x, h_0, c_0, lengths, weights, batch_first)
    packer = Packer(lengths, batch_first, device) if lengths is not None else None
    if packer is not None:
        x, ref = packer.pack(x), (packer.pack(ref[0]), *ref[1:])

    cast = (lambda t: t.to(dtype) if t is not None else None)
    out = torch.full_like(ref[0], math.nan, dtype=dtype)
    hn = torch.full_like(ref[1], math.nan, dtype=dtype)
    cn = torch.full_like(ref[1], math.nan, dtype=dtype) if cell == Cell.LSTM else None
    result = rnn_fwd(cell, cast(x), [tuple(cast(t) for t in w[:4]) for w in weights], cast(h_0), cast(c_0),
                     packer.packing if packer else None, batch_first, config, out=out, hn=hn, cn=cn)
    assert result[0] is out and result[1] is hn and result[2] is cn
    return result, ref


def assert_close(result, ref, tol):
    for name, ours, theirs in zip(("output", "h_n", "c_n"), result[:3], ref):
        if theirs is None:
            assert ours is None
            continue
        err = rel_err(ours, theirs)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


def run_backward(cell, *, T=4, B=3, I=5, H=17, D=2, dtype=torch.float64, config=None, lengths=None,
                 batch_first=False, h0=True, upstream=("out", "hn", "cn"), device="cpu"):
    """Fused forward (save=True) and backward on random inputs and upstream gradients; returns
    (ours: dict of gradients, reference: the same from torch autograd in float64, the backward result).
    With lengths (longest first; the longest = T) ours runs on packed data."""
    cell = Cell(cell)
    weights = _weights(cell, I, H, D, True, device)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64, device=device)
    h_0 = torch.randn(D, B, H, dtype=torch.float64, device=device) if h0 else None
    c_0 = torch.randn(D, B, H, dtype=torch.float64, device=device) if h0 and cell == Cell.LSTM else None
    leaves = {"x": x, "h0": h_0, "c0": c_0, "w_ih": [w[0] for w in weights], "w_hh": [w[1] for w in weights],
              "b_ih": [w[2] for w in weights], "b_hh": [w[3] for w in weights]}
    flat = [t for k in ("x", "h0", "c0") for t in [leaves[k]] if t is not None]
    flat += [t for k in ("w_ih", "w_hh", "b_ih", "b_hh") for t in leaves[k]]
    for t in flat:
        t.requires_grad_(True)
    out, hn, cn = layer_forward(cell, x, h_0, c_0, lengths, weights, batch_first)
    g_out = torch.randn_like(out) if "out" in upstream else None
    g_hn = torch.randn_like(hn) if "hn" in upstream else None
    g_cn = torch.randn_like(cn) if cn is not None and "cn" in upstream else None
    pairs = [(o, g) for o, g in ((out, g_out), (hn, g_hn), (cn, g_cn)) if g is not None]
    all_grads = torch.autograd.grad([o for o, _ in pairs], flat, [g for _, g in pairs], allow_unused=True)
    ref = dict(zip([k for k in ("x", "h0", "c0") if leaves[k] is not None], all_grads))
    grads = all_grads[len(ref):]
    ref["w_ih"] = torch.cat(grads[:D])
    ref["w_hh"] = torch.stack(grads[D:2 * D])
    ref["b_ih"] = torch.cat(grads[2 * D:3 * D])
    ref["b_hh"] = torch.cat(grads[3 * D:])

    packer = Packer(lengths, batch_first, device) if lengths is not None else None
    if packer is not None:  # ours runs on packed data: pack its inputs and the reference's dx
        x, g_out = packer.pack(x.detach()), packer.pack(g_out) if g_out is not None else None
        ref["x"] = packer.pack(ref["x"])
    cast = (lambda t: t.detach().to(dtype) if t is not None else None)
    directions = [tuple(cast(t) for t in w[:4]) for w in weights]
    packing = packer.packing if packer else None
    fwd = rnn_fwd(cell, cast(x), directions, cast(h_0), cast(c_0), packing, batch_first, config, save=True)
    GR = 4 if cell == Cell.GRU else cell.gates
    dg = torch.full((*((packing.rows,) if packing else (T, B)), D, GR, H), math.nan, dtype=dtype, device=device)
    dh0 = torch.full((D, B, H), math.nan, dtype=dtype, device=device)
    dc0 = torch.full((D, B, H), math.nan, dtype=dtype, device=device)
    res = rnn_bwd(cell, cast(x), directions, cast(h_0), cast(c_0), packing, fwd.out, fwd.saved,
                  cast(g_out), cast(g_hn), cast(g_cn), batch_first, config=config, dg=dg, dh0=dh0, dc0=dc0)
    assert torch.isfinite(dg).all(), "a gate gradient was never written"
    ours = {"x": res.dx, "w_ih": res.dw_ih, "w_hh": res.dw_hh, "b_ih": res.db_ih, "b_hh": res.db_hh}
    if h0:
        ours["h0"] = res.dh0
        if cell == Cell.LSTM:
            ours["c0"] = res.dc0
    return ours, ref, res


def assert_grads_close(ours, ref, tol):
    errors = {k: rel_err(ours[k], ref[k]) for k in ref}
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"


def check_autocast(ref, ours, device):
    """``ours`` (float32 parameters, float32 input) under CUDA autocast against ``ref`` (its
    torch.nn twin) in float64 with the float16-rounded weights and input that torch's cuDNN
    wrapper runs on: float16 outputs and states close to that, float32 parameter gradients close
    to its gradients."""
    torch.manual_seed(3)
    x = torch.randn(6, 4, ours.input_size, device=device)
    with torch.no_grad():
        ref.load_state_dict({k: v.half().double() for k, v in ours.state_dict().items()})
    x_ours = x.clone().requires_grad_()
    x_ref = x.half().double().requires_grad_()
    # bfloat16: torch.nn on CUDA runs float16 whatever autocast's dtype. (On the CPU the tests
    # stand CPU autocast in for CUDA's, to check that none of it leaks into the fused layers.)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        our_outs = flatten_output(ours(x_ours))
    ref_outs = flatten_output(ref(x_ref))
    assert [o.dtype for o in our_outs] == [torch.float16] * len(ref_outs)
    for a, b in zip(our_outs, ref_outs):
        assert rel_err(a, b) <= TOL[torch.float16]
    upstream = [torch.randn_like(o) for o in ref_outs]
    torch.autograd.backward(our_outs, [u.half() for u in upstream])
    torch.autograd.backward(ref_outs, upstream)
    assert x_ours.grad.dtype == torch.float32 and rel_err(x_ours.grad, x_ref.grad) <= 2e-2
    for (name, p_ours), (_, p_ref) in zip(ours.named_parameters(), ref.named_parameters()):
        assert p_ours.grad.dtype == torch.float32, name
        assert rel_err(p_ours.grad, p_ref.grad) <= 2e-2, name

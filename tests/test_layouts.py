"""Every tensor the launchers hand to a kernel, in any layout a caller can produce.

The kernels index with computed offsets, so each tensor must be dense or have its strides passed
(issue 11: an expanded gradient of h_n.sum() was read as if dense). Each argument of rnn_fwd and
rnn_bwd in turn is replaced by an equal-valued tensor in another layout (a stride-2 slice of a
tensor interleaved with NaN, a transposed storage, a stride-0 expansion), padded and packed, and
the results must equal those of the dense tensor (to rounding: torch's GEMMs may sum in another
order).
"""
import math

import pytest
import torch

from helpers import _weights, rel_err
from kernels.backward import rnn_bwd
from kernels.cells import Cell
from kernels.forward import rnn_fwd
from kernels.packing import Packing

pytestmark = pytest.mark.interpreter

# Default partitions: the launchers decide the layouts, and the kernels index every partition
# alike (tests/test_kernels.py covers the partitions).
T, B, I, H, D = 3, 4, 5, 6, 2


def layouts(t: torch.Tensor):
    """(name, tensor) pairs: views of other layouts whose values equal those of tensors that the
    dense run gets (the expanded one repeats t's first slice along dim 0)."""
    poisoned = torch.stack([t, torch.full_like(t, math.nan)], dim=-1)
    yield "sliced", poisoned[..., 0]  # stride 2 in every dimension's unit, NaN in between
    if t.dim() >= 2:
        yield "transposed", t.transpose(0, -1).contiguous().transpose(0, -1)
    yield "expanded", t[:1].expand_as(t)


# Packed: lengths 3, 2, 2, 1, so the data has 8 rows.
PACKED_BATCH_SIZES = torch.tensor([4, 3, 1])


def _packing(layout, device):
    return Packing.from_batch_sizes(PACKED_BATCH_SIZES, device) if layout == "packed" else None


WEIGHTS = ("w_ih", "w_hh", "b_ih", "b_hh")


def _forward_args(cell, device, packing=None):
    """x, h0, c0 and each direction's weights as "w_ih.0", "w_hh.1"..."""
    weights = _weights(cell, I, H, D, True, device)
    rows = (packing.rows,) if packing is not None else (T, B)
    args = dict(x=torch.randn(*rows, I, dtype=torch.float64, device=device),
                h0=torch.randn(D, B, H, dtype=torch.float64, device=device),
                c0=torch.randn(D, B, H, dtype=torch.float64, device=device) if cell == Cell.LSTM else None)
    args.update({f"{name}.{d}": w[i] for d, w in enumerate(weights) for i, name in enumerate(WEIGHTS)})
    return args


def _directions(args):
    return [tuple(args[f"{name}.{d}"] for name in WEIGHTS) for d in range(D)]


def _run_forward(cell, args, packing=None):
    return rnn_fwd(cell, args["x"], _directions(args), args["h0"], args["c0"], packing, False, save=True)


def _assert_equal(name, ours, dense):
    for i, (a, b) in enumerate(zip(ours, dense)):
        if isinstance(b, torch.Tensor):
            err = rel_err(a, b)
            assert err <= 1e-13, f"{name}: result {i} differs from the dense tensor's by {err:.3g}"


CELLS = pytest.mark.parametrize("cell", [Cell.LSTM, Cell.GRU, Cell.RNN_TANH], ids=["LSTM", "GRU", "RNN_TANH"])
SEQUENCES = pytest.mark.parametrize("sequences", ["padded", "packed"])


@SEQUENCES
@CELLS
def test_forward_takes_any_layout(cell, sequences, kernel_device):
    torch.manual_seed(0)
    packing = _packing(sequences, kernel_device)
    args = _forward_args(cell, kernel_device, packing)
    for name, value in args.items():
        if value is None:
            continue
        for layout, strided in layouts(value):
            dense = _run_forward(cell, dict(args, **{name: strided.contiguous()}), packing)
            ours = _run_forward(cell, dict(args, **{name: strided}), packing)
            _assert_equal(f"{name} {layout}", ours[:3] + (ours.saved,), dense[:3] + (dense.saved,))


@SEQUENCES
@CELLS
def test_backward_takes_any_layout(cell, sequences, kernel_device):
    """Upstream gradients above all (a sum's is expanded, a permute's transposed, a slice's
    strided), and every other tensor the backward launcher reads."""
    torch.manual_seed(1)
    packing = _packing(sequences, kernel_device)
    fwd_args = _forward_args(cell, kernel_device, packing)
    fwd = _run_forward(cell, fwd_args, packing)
    args = dict(fwd_args, out=fwd.out, saved=fwd.saved, d_out=torch.randn_like(fwd.out),
                d_hn=torch.randn_like(fwd.h_n), d_cn=torch.randn_like(fwd.h_n) if cell == Cell.LSTM else None)
    for d in range(D):  # the backward reads no bias
        del args[f"b_ih.{d}"], args[f"b_hh.{d}"]

    def run(a):
        weights = [(a[f"w_ih.{d}"], a[f"w_hh.{d}"], None, None) for d in range(D)]
        return rnn_bwd(cell, a["x"], weights, a["h0"], a["c0"], packing, a["out"], a["saved"], a["d_out"],
                       a["d_hn"], a["d_cn"], False)

    for name, value in args.items():
        if value is None:
            continue
        for layout, strided in layouts(value):
            dense = run(dict(args, **{name: strided.contiguous()}))
            ours = run(dict(args, **{name: strided}))
            _assert_equal(f"{name} {layout}", ours[:-1], dense[:-1])


def test_wrong_shapes_are_errors(kernel_device):
    """A state or gradient of the wrong shape is refused before any kernel reads it."""
    args = _forward_args(Cell.LSTM, kernel_device)
    with pytest.raises(ValueError, match="h0 must have shape"):
        _run_forward(Cell.LSTM, dict(args, h0=args["h0"][:, :1]))
    for name in WEIGHTS:
        with pytest.raises(ValueError, match=f"{name} must have shape"):
            _run_forward(Cell.LSTM, dict(args, **{f"{name}.1": args[f"{name}.1"][:-1]}))
    with pytest.raises(ValueError, match="every direction has b_hh or none"):
        _run_forward(Cell.LSTM, dict(args, **{"b_hh.1": None}))
    with pytest.raises(ValueError, match="one or two directions"):
        rnn_fwd(Cell.LSTM, args["x"], _directions(args) * 2, None, None, None, False)
    fwd = _run_forward(Cell.LSTM, args)
    weights = _directions(args)
    with pytest.raises(ValueError, match="d_hn must have shape"):
        rnn_bwd(Cell.LSTM, args["x"], weights, None, None, None, fwd.out, fwd.saved, None,
                torch.ones(1, 1, 1, dtype=torch.float64, device=kernel_device), None, False)
    with pytest.raises(ValueError, match="d_out must have the shape"):
        rnn_bwd(Cell.LSTM, args["x"], weights, None, None, None, fwd.out, fwd.saved, fwd.out[:1], None, None, False)

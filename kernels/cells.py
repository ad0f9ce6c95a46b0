"""Gate math of every cell, written once and shared by the forward and backward kernels.

Gate order follows torch.nn: LSTM (i, f, g, o), GRU (r, z, n), RNN a single gate.
"""
from enum import IntEnum

import triton
import triton.language as tl


class Cell(IntEnum):
    """Cell ids, named as torch.nn's ``mode`` strings."""

    RNN_TANH = 0
    RNN_RELU = 1
    LSTM = 2
    GRU = 3

    @property
    def gates(self) -> int:
        return {Cell.LSTM: 4, Cell.GRU: 3}.get(self, 1)


# The same ids for jit code, which may only read constexpr globals.
RNN_RELU = tl.constexpr(int(Cell.RNN_RELU))
LSTM = tl.constexpr(int(Cell.LSTM))
GRU = tl.constexpr(int(Cell.GRU))


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # exp of a non-positive argument never overflows; libdevice tanh fails under the interpreter.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def rnn_cell(pre, CELL: tl.constexpr):
    if CELL == RNN_RELU:
        return tl.maximum(pre, 0.0)
    else:
        return tanh(pre)


@triton.jit
def lstm_cell(i, f, g, o, c):
    """Pre-activations of the four gates and c_{t-1} -> (h_t, c_t)."""
    c_new = sigmoid(f) * c + sigmoid(i) * tanh(g)
    return sigmoid(o) * tanh(c_new), c_new


@triton.jit
def gru_cell(r_pre, z_pre, n_x, n_h, h):
    """r_pre, z_pre: full pre-activations; n_x = W_in x + b_in; n_h = W_hn h + b_hn (torch's form)."""
    r = sigmoid(r_pre)
    z = sigmoid(z_pre)
    n = tanh(n_x + r * n_h)
    return n + z * (h - n)

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
    """Pre-activations of the four gates and c_{t-1} -> (h_t, c_t, and the gate activations
    sigmoid(i), sigmoid(f), tanh(g), sigmoid(o) that backward needs)."""
    si = sigmoid(i)
    sf = sigmoid(f)
    tg = tanh(g)
    so = sigmoid(o)
    c_new = sf * c + si * tg
    return so * tanh(c_new), c_new, si, sf, tg, so


@triton.jit
def gru_cell(r_pre, z_pre, n_x, n_h, h):
    """r_pre, z_pre: full pre-activations; n_x = W_in x + b_in; n_h = W_hn h + b_hn (torch's form).
    Returns (h_t, r, z, n)."""
    r = sigmoid(r_pre)
    z = sigmoid(z_pre)
    n = tanh(n_x + r * n_h)
    return n + z * (h - n), r, z, n


# Backward: from dh (and dc) at step t and what the forward saved, the gradients of the gate
# pre-activations and of the state carried to step t-1 directly (not through W_hh).

@triton.jit
def rnn_cell_bwd(dh, h, CELL: tl.constexpr):
    """h: the step's output. Returns d(pre-activation)."""
    if CELL == RNN_RELU:
        return tl.where(h > 0, dh, 0.0)
    else:
        return dh * (1.0 - h * h)


@triton.jit
def lstm_cell_bwd(dh, dc, si, sf, tg, so, c, c_prev):
    """dc: the gradient of c_t from step t+1. Returns (d_i, d_f, d_g, d_o, dc_{t-1})."""
    tc = tanh(c)
    dc = dc + dh * so * (1.0 - tc * tc)
    d_o = dh * tc * so * (1.0 - so)
    d_i = dc * tg * si * (1.0 - si)
    d_f = dc * c_prev * sf * (1.0 - sf)
    d_g = dc * si * (1.0 - tg * tg)
    return d_i, d_f, d_g, d_o, dc * sf


@triton.jit
def gru_cell_bwd(dh, r, z, n, n_h, h_prev):
    """n_h: W_hn h_{t-1} + b_hn as the forward computed it. Returns (d_r, d_z, d_n, d_n_h, dh_{t-1}
    direct): d_n for the input projection, d_n_h = d_n * r for the recurrent one."""
    d_n = dh * (1.0 - z) * (1.0 - n * n)
    d_z = dh * (h_prev - n) * z * (1.0 - z)
    d_r = d_n * n_h * r * (1.0 - r)
    return d_r, d_z, d_n, d_n * r, dh * z

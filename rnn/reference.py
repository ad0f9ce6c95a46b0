"""Pure-PyTorch recurrence: the CPU path (RNN_BACKEND=reference, or CPU tensors without the
interpreter) and the oracle of the tests.

Every function follows torch.nn's equations and gate order exactly; torch autograd differentiates it.
"""
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from kernels.cells import Cell


def cell_step(cell: Cell, xw_t, h, c, w_hh, b_hh, w_hr):
    """One step from the input projection ``xw_t = x_t W_ih^T + b_ih``: returns (h_t, c_t)."""
    hw = F.linear(h, w_hh, b_hh)
    if cell == Cell.LSTM:
        i, f, g, o = (xw_t + hw).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            h = F.linear(h, w_hr)
        return h, c
    if cell == Cell.GRU:
        x_r, x_z, x_n = xw_t.chunk(3, dim=-1)
        h_r, h_z, h_n = hw.chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h, c
    pre = xw_t + hw
    return (torch.relu(pre) if cell == Cell.RNN_RELU else torch.tanh(pre)), c


def layer_forward(cell: Cell, x, h0, c0, lengths, weights, batch_first: bool = False):
    """One layer, every direction.

    x: [T, B, I] ([B, T, I] when batch_first); h0: [D, B, H_out] or None (zeros);
    c0: [D, B, H] or None (LSTM); lengths: [B] integer tensor or None: past its length a sequence
    keeps its state and outputs zeros, and the reverse direction starts at its own last step.
    weights: one tuple (w_ih, w_hh, b_ih, b_hh, w_hr) per direction, absent ones None.
    Returns (out [T, B, D*H_out] (batch_first: [B, T, ...]), h_n [D, B, H_out], c_n [D, B, H] or None).
    """
    if batch_first:
        x = x.transpose(0, 1)
    T, B = x.shape[:2]
    outs, h_ns, c_ns = [], [], []
    if lengths is not None:
        lengths = lengths.to(x.device)
    for d, (w_ih, w_hh, b_ih, b_hh, w_hr) in enumerate(weights):
        H = w_hh.shape[0] // cell.gates
        H_out = H if w_hr is None else w_hr.shape[0]
        h = h0[d] if h0 is not None else x.new_zeros(B, H_out)
        c = None
        if cell == Cell.LSTM:
            c = c0[d] if c0 is not None else x.new_zeros(B, H)
        xw = F.linear(x, w_ih, b_ih)
        ys = [None] * T
        for t in (range(T) if d == 0 else range(T - 1, -1, -1)):
            h_new, c_new = cell_step(cell, xw[t], h, c, w_hh, b_hh, w_hr)
            if lengths is None:
                h, c, ys[t] = h_new, c_new, h_new
            else:
                active = (t < lengths).unsqueeze(1)
                h = torch.where(active, h_new, h)
                if c is not None:
                    c = torch.where(active, c_new, c)
                ys[t] = torch.where(active, h_new, torch.zeros_like(h_new))
        outs.append(torch.stack(ys))
        h_ns.append(h)
        c_ns.append(c)
    out = torch.cat(outs, dim=-1)
    if batch_first:
        out = out.transpose(0, 1)
    c_n = torch.stack(c_ns) if cell == Cell.LSTM else None
    return out, torch.stack(h_ns), c_n


def layer(cell: Cell, x, batch_sizes, states, weights):
    """One layer, time-major: x [T, B, I], or packed data [N, I] with its batch_sizes (padded for
    the loop, packed again after). states: (h0, c0). Returns (out, h_n, c_n or None)."""
    if batch_sizes is None:
        return layer_forward(cell, x, *states, None, weights)
    padded, lengths = pad_packed_sequence(PackedSequence(x, batch_sizes))
    out, h_n, c_n = layer_forward(cell, padded, *states, lengths, weights)
    return pack_padded_sequence(out, lengths).data, h_n, c_n

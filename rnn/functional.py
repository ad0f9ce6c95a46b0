"""Stacking, directions, inter-layer dropout, packed sequences and hx handling over one per-layer
implementation: the fused Triton layer (an autograd.Function) or the pure-PyTorch reference.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from kernels import env
from kernels.cells import Cell
from kernels.backward import rnn_bwd
from kernels.forward import SUPPORTED_DTYPES, LaunchInfo, rnn_fwd
from kernels.packing import Packing
from rnn import reference


@dataclass
class ForwardPath:
    """Which implementation ran a forward, and each fused launch (one per layer); after a
    backward through it, also the backward's launches (last layer first)."""

    backend: str  # "triton" or "reference"
    launches: list[LaunchInfo] = field(default_factory=list)
    reason: str = ""  # why the reference ran where kernels were possible
    backward_launches: list[LaunchInfo] = field(default_factory=list)


def _stack_weights(cell: Cell, weights):
    """Per-direction (w_ih, w_hh, b_ih, b_hh) -> the launcher's stacked tensors.

    b_hh folds into the input projection's bias, except GRU's b_hn, which torch multiplies by r.
    """
    w_ih = torch.cat([w[0] for w in weights])
    w_hh = torch.stack([w[1] for w in weights])
    if weights[0][2] is None:
        return w_ih, w_hh, None, None
    b_ih = torch.stack([w[2] for w in weights])
    b_hh = torch.stack([w[3] for w in weights])
    b_hn = None
    if cell == Cell.GRU:
        H = w_hh.shape[2]
        b_hn = b_hh[:, 2 * H:].contiguous()
        b_hh = torch.cat([b_hh[:, :2 * H], torch.zeros_like(b_hn)], dim=1)
    return w_ih, w_hh, (b_ih + b_hh).reshape(-1), b_hn


class FusedRNNLayer(torch.autograd.Function):
    """One layer, both directions, through the fused kernels: rnn_fwd forward (keeping the gate
    activations when a gradient will be needed), rnn_bwd backward."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # backward then runs under forward's autocast state
    def forward(ctx, cell, packing, batch_first, path, save, x, h0, c0, *flat):
        w_ih, w_hh, bias, b_hn = _stack_weights(cell, _group(flat, True, False))
        h0 = h0.contiguous() if h0 is not None else None
        c0 = c0.contiguous() if c0 is not None else None
        result = rnn_fwd(cell, x, w_ih, w_hh.contiguous(), bias, b_hn, h0, c0, packing, batch_first, save=save)
        path.launches.append(result.info)
        if save:
            ctx.cell, ctx.packing, ctx.batch_first, ctx.path = cell, packing, batch_first, path
            ctx.has_bias = flat[2] is not None
            ctx.save_for_backward(x, h0, c0, result.out, result.saved, *flat)
            ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros made
        return result.out, result.h_n, result.c_n

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, d_out, d_hn, d_cn):
        if torch.is_grad_enabled():  # create_graph=True: the kernels' own backward has no derivative
            raise RuntimeError("double backward (create_graph=True) through rnn's fused kernels is not "
                               "supported; run with RNN_BACKEND=reference for higher-order gradients")
        x, h0, c0, out, saved, *flat = ctx.saved_tensors
        weights = _group(flat, True, False)
        w_ih, w_hh, _, _ = _stack_weights(ctx.cell, weights)
        needs = ctx.needs_input_grad
        g = rnn_bwd(ctx.cell, x, w_ih, w_hh.contiguous(), h0, c0, ctx.packing, out, saved, d_out, d_hn, d_cn,
                    ctx.batch_first, need_dx=needs[5])
        ctx.path.backward_launches.append(g.info)
        GH = w_hh.shape[1]
        grads = []
        for d in range(len(weights)):
            rows = slice(d * GH, (d + 1) * GH)
            grads += [g.dw_ih[rows], g.dw_hh[d]]
            grads += [g.db_ih[rows], g.db_hh[rows]] if ctx.has_bias else [None, None]
        return (None, None, None, None, None, g.dx, g.dh0 if h0 is not None else None,
                g.dc0 if c0 is not None else None, *grads)


class FusedLSTMProjLayer(torch.autograd.Function):
    """One LSTM layer with proj_size, both directions, through the fused kernels.

    With m_t = o * tanh(c_t) and h_t = W_hr m_t, the recurrent term h_{t-1} W_hh^T equals
    m_{t-1} (W_hh W_hr)^T: the kernels run a plain LSTM on m with the effective weight W_hh W_hr
    (one barrier per step, where projecting inside the step would need a second), h0's term
    h0 W_hh^T folded into each direction's first step. The outputs h are one GEMM over all steps;
    backward maps the kernels' gradients back onto W_hh, W_hr and h0.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, packing, batch_first, path, save, x, h0, c0, *flat):
        groups = _group(flat, True, True)
        w_ih, w_hh, bias, _ = _stack_weights(Cell.LSTM, [g[:4] for g in groups])  # w_hh [D, 4H, P]
        w_hr = torch.stack([g[4] for g in groups])  # [D, P, H]
        first = torch.bmm(h0, w_hh.transpose(1, 2)) if h0 is not None else None
        c0 = c0.contiguous() if c0 is not None else None
        result = rnn_fwd(Cell.LSTM, x, w_ih, torch.bmm(w_hh, w_hr), bias, None, None, c0, packing, batch_first,
                         save=save, first_step=first)
        path.launches.append(result.info)
        m, m_n = result.out, result.h_n
        out = _project(m, w_hr)
        h_n = torch.bmm(m_n, w_hr.transpose(1, 2))
        if save:
            ctx.packing, ctx.batch_first, ctx.has_bias = packing, batch_first, flat[2] is not None
            ctx.path = path
            ctx.save_for_backward(x, h0, c0, m, m_n, result.saved, *flat)
            ctx.set_materialize_grads(False)
        return out, h_n, result.c_n

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, d_out, d_hn, d_cn):
        if torch.is_grad_enabled():
            raise RuntimeError("double backward (create_graph=True) through rnn's fused kernels is not "
                               "supported; run with RNN_BACKEND=reference for higher-order gradients")
        x, h0, c0, m, m_n, saved, *flat = ctx.saved_tensors
        groups = _group(flat, True, True)
        w_ih, w_hh, _, _ = _stack_weights(Cell.LSTM, [g[:4] for g in groups])
        w_hr = torch.stack([g[4] for g in groups])
        D, P, H = w_hr.shape
        # The gradient reaching m through the projection of the outputs and of h_n.
        d_m = _project(d_out, w_hr.transpose(1, 2)) if d_out is not None else None
        d_mn = torch.bmm(d_hn, w_hr) if d_hn is not None else None
        g = rnn_bwd(Cell.LSTM, x, w_ih, torch.bmm(w_hh, w_hr), None, c0, ctx.packing, m, saved, d_m, d_mn, d_cn,
                    ctx.batch_first, need_dx=ctx.needs_input_grad[4])
        ctx.path.backward_launches.append(g.info)
        d_w_eff = g.dw_hh  # [D, 4H, H]
        d_w_hh = torch.bmm(d_w_eff, w_hr.transpose(1, 2))
        d_w_hr = torch.bmm(w_hh.transpose(1, 2), d_w_eff)
        if d_out is not None:
            d_w_hr += torch.einsum("...dp,...dh->dph", _by_direction(d_out, D), _by_direction(m, D))
        if d_hn is not None:
            d_w_hr += torch.bmm(d_hn.transpose(1, 2), m_n)
        d_h0 = None
        if h0 is not None:
            # h0 entered through each direction's first step: h0 W_hh^T.
            d_first = _first_steps(g.dg, ctx.packing, h0.shape[1])  # [D, B, 4H]
            d_h0 = torch.bmm(d_first, w_hh)
            d_w_hh += torch.bmm(d_first.transpose(1, 2), h0)
        grads = []
        rows = w_hh.shape[1]
        for d in range(D):
            grads += [g.dw_ih[d * rows:(d + 1) * rows], d_w_hh[d]]
            grads += [g.db_ih[d * rows:(d + 1) * rows], g.db_hh[d * rows:(d + 1) * rows]] if ctx.has_bias else [None, None]
            grads.append(d_w_hr[d])
        return (None, None, None, None, g.dx, d_h0, g.dc0 if c0 is not None else None, *grads)


def _by_direction(seq, D):
    """[..., D*F] -> [..., D, F]."""
    return seq.reshape(*seq.shape[:-1], D, seq.shape[-1] // D)


def _project(seq, w):
    """Each direction's slice of seq [..., D*F] times w[d]^T ([D, E, F]): [..., D*E]."""
    out = torch.einsum("...df,def->...de", _by_direction(seq, w.shape[0]), w)
    return out.reshape(*out.shape[:-2], -1)


def _first_steps(dg, packing, B):
    """Gate gradients at each direction's first step, [D, B, 4H], from dg ([T, B, D, 4, H], or
    packed [N, D, 4, H]): time 0 forward; in reverse each sequence's last time (T-1 unless packed)."""
    D = dg.shape[-3]
    if packing is not None:
        first = [dg[:B, 0]]  # every sequence has a row at time 0, in order
        if D == 2:
            seqs = torch.arange(B, device=dg.device)
            first.append(dg[packing.row(packing.lengths.long() - 1, seqs), 1])
    else:
        first = [dg[0, :, 0]] + ([dg[-1, :, 1]] if D == 2 else [])
    return torch.stack(first).reshape(D, B, -1)


def _group(flat, has_bias: bool, has_proj: bool):
    """Flat weights of one layer (torch.nn's order) -> one (w_ih, w_hh, b_ih, b_hh, w_hr) per direction."""
    n = 2 + 2 * has_bias + has_proj
    groups = []
    for i in range(0, len(flat), n):
        w = list(flat[i:i + n])
        b_ih, b_hh = (w[2], w[3]) if has_bias else (None, None)
        groups.append((w[0], w[1], b_ih, b_hh, w[-1] if has_proj else None))
    return groups


def choose_backend(x: torch.Tensor) -> ForwardPath:
    """RNN_BACKEND=auto runs the kernels on CUDA tensors, and on CPU tensors under the Triton
    interpreter; =triton insists on them (an error where they cannot run); =reference never."""
    choice = env.backend()
    if choice == "reference":
        return ForwardPath("reference", reason="RNN_BACKEND=reference")
    runnable = x.is_cuda or env.interpreting()
    if not runnable:
        if choice == "triton":
            raise RuntimeError(f"RNN_BACKEND=triton needs a CUDA tensor or TRITON_INTERPRET=1, "
                               f"got a tensor on {x.device}")
        return ForwardPath("reference", reason=f"no Triton backend for {x.device} tensors")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the fused kernels support {', '.join(map(str, SUPPORTED_DTYPES))}, got {x.dtype}")
    return ForwardPath("triton")


def rnn(cell: Cell, input, hx, flat_weights, *, num_layers: int, bidirectional: bool, batch_first: bool,
        dropout: float, training: bool, has_bias: bool, proj_size: int = 0):
    """The whole stack. input: a tensor ([T, B, I], or [B, T, I] when batch_first) or a
    PackedSequence whose batch order hx already follows (sorted). hx: h0 [L*D, B, H_out] or None,
    and for LSTM a pair (h0, c0) or None. Returns (output, h_n, c_n or None, ForwardPath); output
    is a PackedSequence when input is one (the kernels work on its packed data throughout; the
    reference pads it).
    """
    D = 2 if bidirectional else 1
    packed = isinstance(input, PackedSequence)
    h0, c0 = (hx if hx is not None else (None, None)) if cell == Cell.LSTM else (hx, None)
    path = choose_backend(input.data if packed else input)
    x, lengths, packing = input, None, None
    if packed and path.backend == "triton":
        # The kernels read and write torch's packed layout directly: real tokens only.
        x, packing = input.data, Packing.from_batch_sizes(input.batch_sizes, input.data.device)
    elif packed:
        x, lengths = pad_packed_sequence(PackedSequence(input.data, input.batch_sizes), batch_first=batch_first)

    per_direction = 2 + 2 * has_bias + (proj_size > 0)
    per_layer = per_direction * D
    h_ns, c_ns = [], []
    for layer in range(num_layers):
        flat = flat_weights[layer * per_layer:(layer + 1) * per_layer]
        states = [s[layer * D:(layer + 1) * D] if s is not None else None for s in (h0, c0)]
        if path.backend == "triton":
            # The fused layers take a fixed number of tensors per direction; absent biases are None.
            flat = [t for w in _group(flat, has_bias, proj_size > 0) for t in (w if proj_size else w[:4])]
            save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *states, *flat))
            args = (packing, batch_first, path, save, x, *states, *flat)
            x, h_n, c_n = FusedLSTMProjLayer.apply(*args) if proj_size else FusedRNNLayer.apply(cell, *args)
        else:
            x, h_n, c_n = reference.layer_forward(cell, x, *states, lengths, _group(flat, has_bias, proj_size > 0),
                                                  batch_first)
        h_ns.append(h_n)
        c_ns.append(c_n)
        if dropout and training and layer < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
    h_n = torch.cat(h_ns)
    c_n = torch.cat(c_ns) if cell == Cell.LSTM else None
    if packed:
        data = x if packing is not None else pack_padded_sequence(x, lengths, batch_first=batch_first).data
        x = PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
    return x, h_n, c_n, path


"""Stacking, directions, inter-layer dropout, packed sequences and hx handling over one per-layer
implementation: the fused Triton layer (an autograd.Function) or the pure-PyTorch reference.
"""
import functools
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


class _FusedFunction(torch.autograd.Function):
    """Common ground of the fused layers' autograd Functions.

    forward takes no ctx and setup_context saves (the form torch.func needs): intermediates that
    backward needs are returned as extra outputs, marked non-differentiable. Under vmap (and so
    jacrev, which vmaps the backward) each mapped slice runs on its own, one after another.
    """

    @classmethod
    def vmap(cls, info, in_dims, *args):
        slices = []
        for i in range(info.batch_size):
            sliced = [a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)]
            slices.append(cls.apply(*sliced))
        outs = [None if r[0] is None else torch.stack(list(r)) for r in zip(*slices)]
        return tuple(outs), tuple(None if o is None else 0 for o in outs)

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError("forward-mode AD (jvp, jacfwd, hessian) through rnn's fused kernels is not "
                                  "supported: use reverse mode (grad, vjp, jacrev), or RNN_BACKEND=reference")


class _FirstOrderBackward(_FusedFunction):
    """Runs a fused layer's backward, ``compute(*tensors)``, as a node of its own, so that
    differentiating the gradients (create_graph=True, torch.func.grad of a grad, hessians)
    fails loudly instead of silently treating the kernels' gradients as constants."""

    @staticmethod
    def forward(compute, *tensors):
        return compute(*tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("double backward (a gradient of a gradient) through rnn's fused kernels is not "
                           "supported; run with RNN_BACKEND=reference for higher-order gradients")


def _no_autocast(x):
    """The kernels and the GEMMs around them run in the layer's own dtype: the modules decide
    autocast's casts (as torch.nn's cuDNN path does) before calling in."""
    return torch.autocast(x.device.type, enabled=False)


class FusedRNNLayer(_FusedFunction):
    """One layer, both directions, through the fused kernels: rnn_fwd forward (keeping the gate
    activations when a gradient will be needed), rnn_bwd backward. Time-major ([T, B, I] in any
    strides, or packed data) in and out."""

    @staticmethod
    def forward(cell, packing, path, save, x, h0, c0, *flat):
        with _no_autocast(x):
            w_ih, w_hh, bias, b_hn = _stack_weights(cell, _group(flat, True, False))
            result = rnn_fwd(cell, x, w_ih, w_hh, bias, b_hn, h0, c0, packing, False, save=save)
        path.launches.append(result.info)
        return result.out, result.h_n, result.c_n, result.saved

    @staticmethod
    def setup_context(ctx, inputs, output):
        cell, packing, path, save, x, h0, c0, *flat = inputs
        out, _, _, saved = output
        if saved is not None:
            ctx.mark_non_differentiable(saved)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros made
        if save:
            ctx.cell, ctx.packing, ctx.path, ctx.has_bias = cell, packing, path, flat[2] is not None
            ctx.save_for_backward(x, h0, c0, out, saved, *flat)

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn, _d_saved):
        grads = _FirstOrderBackward.apply(functools.partial(_layer_grads, ctx.cell, ctx.packing, ctx.path,
                                                            ctx.has_bias, ctx.needs_input_grad[4]),
                                          *ctx.saved_tensors, d_out, d_hn, d_cn)
        return (None, None, None, None, *grads)


def _layer_grads(cell, packing, path, has_bias, need_dx, x, h0, c0, out, saved, *rest):
    """FusedRNNLayer's gradients: (dx, dh0, dc0, then each direction's weights in torch.nn's order)."""
    *flat, d_out, d_hn, d_cn = rest
    weights = _group(flat, True, False)
    with _no_autocast(x):
        w_ih, w_hh, _, _ = _stack_weights(cell, weights)
        g = rnn_bwd(cell, x, w_ih, w_hh, h0, c0, packing, out, saved, d_out, d_hn, d_cn, False, need_dx=need_dx)
    path.backward_launches.append(g.info)
    GH = w_hh.shape[1]
    grads = []
    for d in range(len(weights)):
        rows = slice(d * GH, (d + 1) * GH)
        grads += [g.dw_ih[rows], g.dw_hh[d]]
        grads += [g.db_ih[rows], g.db_hh[rows]] if has_bias else [None, None]
    return (g.dx, g.dh0 if h0 is not None else None, g.dc0 if c0 is not None else None, *grads)


class FusedLSTMProjLayer(_FusedFunction):
    """One LSTM layer with proj_size, both directions, through the fused kernels.

    With m_t = o * tanh(c_t) and h_t = W_hr m_t, the recurrent term h_{t-1} W_hh^T equals
    m_{t-1} (W_hh W_hr)^T: the kernels run a plain LSTM on m with the effective weight W_hh W_hr
    (one barrier per step, where projecting inside the step would need a second), h0's term
    h0 W_hh^T folded into each direction's first step. The outputs h are one GEMM over all steps;
    backward maps the kernels' gradients back onto W_hh, W_hr and h0.
    """

    @staticmethod
    def forward(packing, path, save, x, h0, c0, *flat):
        with _no_autocast(x):
            groups = _group(flat, True, True)
            w_ih, w_hh, bias, _ = _stack_weights(Cell.LSTM, [g[:4] for g in groups])  # w_hh [D, 4H, P]
            w_hr = torch.stack([g[4] for g in groups])  # [D, P, H]
            first = torch.bmm(h0, w_hh.transpose(1, 2)) if h0 is not None else None
            result = rnn_fwd(Cell.LSTM, x, w_ih, torch.bmm(w_hh, w_hr), bias, None, None, c0, packing, False,
                             save=save, first_step=first)
            m, m_n = result.out, result.h_n
            out = _project(m, w_hr)
            h_n = torch.bmm(m_n, w_hr.transpose(1, 2))
        path.launches.append(result.info)
        return out, h_n, result.c_n, m, m_n, result.saved

    @staticmethod
    def setup_context(ctx, inputs, output):
        packing, path, save, x, h0, c0, *flat = inputs
        _, _, _, m, m_n, saved = output
        ctx.mark_non_differentiable(*(t for t in (m, m_n, saved) if t is not None))
        ctx.set_materialize_grads(False)
        if save:
            ctx.packing, ctx.path, ctx.has_bias = packing, path, flat[2] is not None
            ctx.save_for_backward(x, h0, c0, m, m_n, saved, *flat)

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn, _d_m, _d_mn, _d_saved):
        grads = _FirstOrderBackward.apply(functools.partial(_proj_layer_grads, ctx.packing, ctx.path, ctx.has_bias,
                                                            ctx.needs_input_grad[3]),
                                          *ctx.saved_tensors, d_out, d_hn, d_cn)
        return (None, None, None, *grads)


def _proj_layer_grads(packing, path, has_bias, need_dx, x, h0, c0, m, m_n, saved, *rest):
    """FusedLSTMProjLayer's gradients: (dx, dh0, dc0, then each direction's weights in torch.nn's order)."""
    *flat, d_out, d_hn, d_cn = rest
    with _no_autocast(x):
        groups = _group(flat, True, True)
        w_ih, w_hh, _, _ = _stack_weights(Cell.LSTM, [g[:4] for g in groups])
        w_hr = torch.stack([g[4] for g in groups])
        D, P, H = w_hr.shape
        # The gradient reaching m through the projection of the outputs and of h_n.
        d_m = _project(d_out, w_hr.transpose(1, 2)) if d_out is not None else None
        d_mn = torch.bmm(d_hn, w_hr) if d_hn is not None else None
        g = rnn_bwd(Cell.LSTM, x, w_ih, torch.bmm(w_hh, w_hr), None, c0, packing, m, saved, d_m, d_mn, d_cn,
                    False, need_dx=need_dx)
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
            d_first = _first_steps(g.dg, packing, h0.shape[1])  # [D, B, 4H]
            d_h0 = torch.bmm(d_first, w_hh)
            d_w_hh += torch.bmm(d_first.transpose(1, 2), h0)
    path.backward_launches.append(g.info)
    grads = []
    rows = w_hh.shape[1]
    for d in range(D):
        grads += [g.dw_ih[d * rows:(d + 1) * rows], d_w_hh[d]]
        grads += [g.db_ih[d * rows:(d + 1) * rows], g.db_hh[d * rows:(d + 1) * rows]] if has_bias else [None, None]
        grads.append(d_w_hr[d])
    return (g.dx, d_h0, g.dc0 if c0 is not None else None, *grads)


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
    is a PackedSequence when input is one (both paths work on its packed data between layers).

    Layers run time-major, as torch.nn's do, so that inter-layer dropout sees the tensor torch.nn's
    sees (each layer's [T, B, D*H] output, or the packed data) and draws the same masks from the
    same generator state; a batch-first output is a transposed view, as torch.nn's is.
    """
    D = 2 if bidirectional else 1
    packed = isinstance(input, PackedSequence)
    h0, c0 = (hx if hx is not None else (None, None)) if cell == Cell.LSTM else (hx, None)
    path = choose_backend(input.data if packed else input)
    packing = None
    if packed:
        x = input.data
        if path.backend == "triton":  # the kernels read and write torch's packed layout: real tokens only
            packing = Packing.from_batch_sizes(input.batch_sizes, x.device)
    else:
        x = input.transpose(0, 1) if batch_first else input

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
            args = (packing, path, save, x, *states, *flat)
            x, h_n, c_n, *_ = FusedLSTMProjLayer.apply(*args) if proj_size else FusedRNNLayer.apply(cell, *args)
        else:
            x, h_n, c_n = _reference_layer(cell, x, input.batch_sizes if packed else None, states,
                                           _group(flat, has_bias, proj_size > 0))
        h_ns.append(h_n)
        c_ns.append(c_n)
        if dropout and training and layer < num_layers - 1:
            # torch.nn's layers hand dropout a dense tensor; its masks follow memory order.
            x = F.dropout(x.contiguous(), dropout, training=True)
    h_n = torch.cat(h_ns)
    c_n = torch.cat(c_ns) if cell == Cell.LSTM else None
    if packed:
        x = PackedSequence(x, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
    elif batch_first:
        x = x.transpose(0, 1)
    return x, h_n, c_n, path


def _reference_layer(cell, x, batch_sizes, states, weights):
    """One layer on the reference path, time-major: x [T, B, I], or packed data [N, I] with its
    batch_sizes (padded for the reference loop, packed again after)."""
    if batch_sizes is None:
        return reference.layer_forward(cell, x, *states, None, weights)
    padded, lengths = pad_packed_sequence(PackedSequence(x, batch_sizes))
    out, h_n, c_n = reference.layer_forward(cell, padded, *states, lengths, weights)
    return pack_padded_sequence(out, lengths).data, h_n, c_n

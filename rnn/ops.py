"""One recurrent layer (every direction) as PyTorch operators: ``rnn::layer_fwd`` and ``rnn::layer_bwd``.

Both are ``torch.library`` custom ops. On CUDA they run the fused Triton kernels; on the CPU the
same kernels through the interpreter when TRITON_INTERPRET=1, the reference loop when
RNN_BACKEND=reference, else torch's own native RNN (``layer_backend``). The caller passes that
choice as the ``backend`` argument, so it is part of a traced graph (and of the keys of torch's
compile caches) and output shapes depend on the arguments only. The fake implementations give
shapes only, so torch.compile, AOTAutograd and export trace a layer as one node for any sequence
length.

One autograd formula, two wirings (torch 2.13):
- ``register_autograd`` on ``layer_fwd``: what Dynamo, AOTAutograd and CUDA-graph trees see when a
  compiled model calls the op (rnn.functional calls it directly while compiling);
- ``FusedLayer``, an autograd.Function with the same setup_context and backward whose forward and
  backward call the same ops: what eager calls use, because torch.func (grad, vmap, jacrev) cannot
  run a custom op's registered autograd ("must override the setup_context staticmethod").
"""
import functools
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import Tensor

from kernels import env
from kernels.backward import rnn_bwd
from kernels.cells import Cell
from kernels.forward import rnn_fwd
from kernels.packing import Packing
from rnn import reference


# --- which implementation runs the ops -------------------------------------------------------

LAYER_BACKENDS = ("triton", "native", "reference")


def layer_backend(device: torch.device, choice: str | None = None) -> str:
    """Which implementation a layer on ``device`` runs: ``reference`` with RNN_BACKEND=reference
    (rnn.functional runs it as a pure-PyTorch loop, not through the ops), else ``triton`` on CUDA
    and under the interpreter, else ``native`` (torch.nn's own CPU implementation). ``choice``:
    RNN_BACKEND's value, where the caller has read it already."""
    if (choice or env.backend()) == "reference":
        return "reference"
    if device.type == "cuda":
        return "triton"
    return "triton" if env.interpreting() else "native"


# Where the running eager call records each launch (a ForwardPath's list), None elsewhere.
_record_to: list | None = None


class recording:
    """Collect the LaunchInfo of every fused launch inside the block into ``launches``."""

    def __init__(self, launches: list):
        self.launches = launches

    def __enter__(self):
        global _record_to
        self.saved, _record_to = _record_to, self.launches

    def __exit__(self, *exc):
        global _record_to
        _record_to = self.saved


def _record(info):
    if _record_to is not None:
        _record_to.append(info)


# --- weights in the kernels' layout ----------------------------------------------------------

def group_weights(flat, has_bias: bool, has_proj: bool):
    """Flat weights of one layer (torch.nn's order) -> one (w_ih, w_hh, b_ih, b_hh, w_hr) per direction."""
    n = 2 + 2 * has_bias + has_proj
    groups = []
    for i in range(0, len(flat), n):
        w = list(flat[i:i + n])
        b_ih, b_hh = (w[2], w[3]) if has_bias else (None, None)
        groups.append((w[0], w[1], b_ih, b_hh, w[-1] if has_proj else None))
    return groups


def _stacked(tensors):
    """One tensor per direction -> [D, ...] (a view for one direction)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


# --- packed batches --------------------------------------------------------------------------

_packings: OrderedDict = OrderedDict()
_PACKINGS_KEPT = 64


def packing_for(batch_sizes: Tensor, device: torch.device) -> Packing:
    """The kernels' view of a packed batch, built once per (batch sizes, device) and kept: later
    calls, and CUDA-graph captures after a first call, copy nothing from the host."""
    key = (tuple(batch_sizes.tolist()), device)
    packing = _packings.get(key)
    if packing is None:
        packing = Packing.from_batch_sizes(batch_sizes, device)
        _packings[key] = packing
        if len(_packings) > _PACKINGS_KEPT:
            _packings.popitem(last=False)
    else:
        _packings.move_to_end(key)
    return packing


def check_batch_sizes(batch_sizes, rows: int | None, values: bool = True):
    """What the kernels trust about a packed batch's sizes: a 1-D int64 CPU tensor and, with
    ``values``, positive, non-increasing sizes adding up to the data's ``rows`` (None: not known)."""
    if not isinstance(batch_sizes, Tensor) or batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64 \
            or batch_sizes.device.type != "cpu":
        what = (f"a {batch_sizes.dim()}-D {batch_sizes.dtype} tensor on {batch_sizes.device}"
                if isinstance(batch_sizes, Tensor) else type(batch_sizes).__name__)
        raise RuntimeError(f"PackedSequence: batch_sizes must be a 1-D int64 tensor on the CPU, got {what}")
    if not values:
        return
    if len(batch_sizes) == 0 or batch_sizes.min() <= 0 or (batch_sizes[1:] > batch_sizes[:-1]).any():
        raise RuntimeError(f"PackedSequence: batch_sizes must be positive and non-increasing (one entry per time "
                           f"step, as pack_padded_sequence makes them), got {batch_sizes.tolist()}")
    total = int(batch_sizes.sum())
    if rows is not None and total != rows:
        raise RuntimeError(f"PackedSequence: batch_sizes add up to {total} rows but data has {rows}")


# --- the fused layer -------------------------------------------------------------------------

def _fused_forward(cell: Cell, x, h0, c0, groups, packing, save):
    """(out, h_n, c_n, saved, info) of a layer without projection through rnn_fwd, which takes the
    parameters as they are: nothing is stacked, concatenated or cached (a cache keyed on version
    counters would miss in-place writes through ``.data``)."""
    result = rnn_fwd(cell, x, [g[:4] for g in groups], h0, c0, packing, False, save=save)
    return result.out, result.h_n, result.c_n, result.saved, result.info


def _fused_proj_forward(x, h0, c0, groups, packing, save):
    """One LSTM layer with proj_size, both directions, through the fused kernels: (out, h_n, c_n,
    m, m_n, saved, info).

    With m_t = o * tanh(c_t) and h_t = W_hr m_t, the recurrent term h_{t-1} W_hh^T equals
    m_{t-1} (W_hh W_hr)^T: the kernels run a plain LSTM on m with the effective weight W_hh W_hr
    (one barrier per step, where projecting inside the step would need a second), h0's term
    h0 W_hh^T folded into each direction's first step. The outputs h are one GEMM over all steps;
    backward maps the kernels' gradients back onto W_hh, W_hr and h0.
    """
    w_hh = _stacked([g[1] for g in groups])  # [D, 4H, P]
    w_hr = _stacked([g[4] for g in groups])  # [D, P, H]
    first = torch.bmm(h0, w_hh.transpose(1, 2)) if h0 is not None else None
    w_eff = torch.bmm(w_hh, w_hr)
    weights = [(g[0], w_eff[d], g[2], g[3]) for d, g in enumerate(groups)]
    result = rnn_fwd(Cell.LSTM, x, weights, None, c0, packing, False, save=save, first_step=first)
    m, m_n = result.out, result.h_n
    out = _project(m, w_hr)
    h_n = torch.bmm(m_n, w_hr.transpose(1, 2))
    return out, h_n, result.c_n, m, m_n, result.saved, result.info


def _fused_grads(cell: Cell, x, h0, c0, groups, packing, out, saved, d_out, d_hn, d_cn, need_dx):
    """Gradients of a layer without projection: (dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, None), info
    (weight gradients stacked by direction)."""
    g = rnn_bwd(cell, x, [g[:4] for g in groups], h0, c0, packing, out, saved, d_out, d_hn, d_cn, False,
                need_dx=need_dx)
    has_bias = groups[0][2] is not None
    return (g.dx, g.dh0 if h0 is not None else None, g.dc0 if c0 is not None else None, g.dw_ih, g.dw_hh,
            g.db_ih if has_bias else None, g.db_hh if has_bias else None, None), g.info


def _fused_proj_grads(x, h0, c0, groups, packing, m, m_n, saved, d_out, d_hn, d_cn, need_dx):
    """Gradients of an LSTM layer with proj_size (see _fused_proj_forward), stacked as in _fused_grads,
    with d_w_hr [D, P, H] last."""
    w_hh = _stacked([g[1] for g in groups])
    w_hr = _stacked([g[4] for g in groups])
    D, P, H = w_hr.shape
    # The gradient reaching m through the projection of the outputs and of h_n.
    d_m = _project(d_out, w_hr.transpose(1, 2)) if d_out is not None else None
    d_mn = torch.bmm(d_hn, w_hr) if d_hn is not None else None
    w_eff = torch.bmm(w_hh, w_hr)
    g = rnn_bwd(Cell.LSTM, x, [(grp[0], w_eff[d]) + grp[2:4] for d, grp in enumerate(groups)], None, c0, packing,
                m, saved, d_m, d_mn, d_cn, False, need_dx=need_dx)
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
    has_bias = groups[0][2] is not None
    return (g.dx, d_h0, g.dc0 if c0 is not None else None, g.dw_ih, d_w_hh, g.db_ih if has_bias else None,
            g.db_hh if has_bias else None, d_w_hr), g.info


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


# --- the CPU's other implementations ---------------------------------------------------------

_NATIVE = {Cell.LSTM: torch._VF.lstm, Cell.GRU: torch._VF.gru, Cell.RNN_TANH: torch._VF.rnn_tanh,
           Cell.RNN_RELU: torch._VF.rnn_relu}


def _eager_layer(backend: str, cell: Cell, x, h0, c0, groups, batch_sizes):
    """(out, h_n, c_n or None) of one layer by torch's native RNN or the reference loop,
    differentiable by autograd (the ops' backward on these backends recomputes through it)."""
    if backend == "reference":
        return reference.layer(cell, x, batch_sizes, (h0, c0), groups)
    D = len(groups)
    H = groups[0][1].shape[1] if groups[0][4] is None else groups[0][4].shape[1]
    H_out = groups[0][4].shape[0] if groups[0][4] is not None else H
    B = int(batch_sizes[0]) if batch_sizes is not None else x.shape[1]
    h0 = h0 if h0 is not None else x.new_zeros(D, B, H_out)
    hx = (h0, c0 if c0 is not None else x.new_zeros(D, B, H)) if cell == Cell.LSTM else h0
    params = [w for g in groups for w in g if w is not None]
    has_bias = groups[0][2] is not None
    if batch_sizes is not None:
        result = _NATIVE[cell](x, batch_sizes, hx, params, has_bias, 1, 0.0, False, D == 2)
    else:
        result = _NATIVE[cell](x, hx, params, has_bias, 1, 0.0, False, D == 2, False)
    return (result[0], result[1], result[2] if cell == Cell.LSTM else None)


def _eager_grads(backend, cell, x, h0, c0, groups, batch_sizes, d_out, d_hn, d_cn, need_dx):
    """The gradients of _eager_layer, recomputing it under autograd."""
    flat = [w for g in groups for w in g]
    with _autograd_dispatch(), torch.enable_grad():
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, h0, c0, *flat)]
        x_, h0_, c0_, *flat_ = leaves
        outs = _eager_layer(backend, cell, x_, h0_, c0_, group_weights(flat_, True, True), batch_sizes)
        pairs = [(o, g) for o, g in zip(outs, (d_out, d_hn, d_cn)) if o is not None and g is not None]
        wanted = [t for t in leaves if t is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True) \
            if pairs else [None] * len(wanted)
    it = iter(grads)
    full = [next(it) if t is not None else None for t in leaves]
    full = [torch.zeros_like(t) if g is None and t is not None else g for t, g in zip(leaves, full)]
    dx, dh0, dc0, *dflat = full
    if not need_dx:
        dx = None
    per = [dflat[5 * d:5 * d + 5] for d in range(len(groups))]  # each direction's 5 slots
    stacked = [torch.cat([p[0] for p in per]), torch.stack([p[1] for p in per])]
    stacked += [torch.cat([p[i] for p in per]) if groups[0][i] is not None else None for i in (2, 3)]
    stacked.append(torch.stack([p[4] for p in per]) if groups[0][4] is not None else None)
    return (dx, dh0, dc0, *stacked)


def _autograd_dispatch():
    """Autograd back on inside an op's implementation: a compiled backward calls layer_bwd with
    the autograd dispatch keys excluded, where enable_grad alone records nothing."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                torch._C.DispatchKey.AutogradNestedTensor):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


# --- the operators ---------------------------------------------------------------------------

def _none_if_empty(t: Tensor | None) -> Tensor | None:
    """The ops return a 1-D empty tensor where a result is absent (custom ops cannot return None)."""
    return None if t is None or (t.dim() == 1 and t.shape[0] == 0) else t


def layer_fwd_impl(x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], weights: Sequence[Tensor],
                   batch_sizes: Optional[Tensor], cell: int, has_bias: bool, proj: bool, save: bool, backend: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One layer, every direction, time-major ([T, B, I] in any strides, or packed data [N, I]
    with its batch_sizes). weights: torch.nn's flat weights of the layer, per direction w_ih,
    w_hh, then b_ih, b_hh when ``has_bias``, then w_hr when ``proj``. save: keep what the fused backward needs. backend: one of
    LAYER_BACKENDS (``layer_backend``'s choice for the device).

    Returns (out, h_n, c_n, saved, m, m_n); c_n only for LSTM, saved (the gate activations) only
    on the fused path when saving, m and m_n (the unprojected hidden states) only on the fused
    path with a projection; absent ones are empty 1-D tensors.
    """
    cell = Cell(cell)
    groups = group_weights(weights, has_bias, proj)
    if batch_sizes is not None:
        check_batch_sizes(batch_sizes, x.shape[0])
    _check_backend(backend)
    with _no_autocast(x):
        out, h_n, c_n, saved, m, m_n = _forward(backend, cell, x, h0, c0, groups, batch_sizes, proj, save)
    return tuple(t if t is not None else x.new_empty(0) for t in (out, h_n, c_n, saved, m, m_n))


def _check_backend(backend: str):
    if backend not in LAYER_BACKENDS:
        raise ValueError(f"rnn::layer ops: backend must be one of {LAYER_BACKENDS}, got {backend!r}")


def _no_autocast(x):
    """The kernels and the GEMMs around them run in the layer's own dtype: the modules decide
    autocast's casts (as torch.nn's cuDNN path does) before calling in."""
    return torch.autocast(x.device.type, enabled=False)


def _forward(backend, cell, x, h0, c0, groups, batch_sizes, proj, save):
    saved = m = m_n = None
    if backend == "triton":
        packing = packing_for(batch_sizes, x.device) if batch_sizes is not None else None
        if proj:
            out, h_n, c_n, m, m_n, saved, info = _fused_proj_forward(x, h0, c0, groups, packing, save)
        else:
            out, h_n, c_n, saved, info = _fused_forward(cell, x, h0, c0, groups, packing, save)
        _record(info)
    else:
        with torch.no_grad():
            out, h_n, c_n = _eager_layer(backend, cell, x, h0, c0, groups, batch_sizes)
    return out, h_n, c_n, saved, m, m_n


layer_fwd = torch.library.custom_op("rnn::layer_fwd", layer_fwd_impl, mutates_args=())


@layer_fwd.register_fake
def _layer_fwd_fake(x, h0, c0, weights, batch_sizes, cell, has_bias, proj, save, backend):
    cell = Cell(cell)
    groups = group_weights(weights, has_bias, proj)
    D, G = len(groups), cell.gates
    H = groups[0][1].shape[0] // G
    H_out = groups[0][4].shape[0] if proj else H
    if batch_sizes is None:
        seq = (x.shape[0], x.shape[1])
        B = x.shape[1]
    else:
        seq = (x.shape[0],)
        # The batch is batch_sizes[0], a value: known from a given state, else data-dependent.
        B = h0.shape[1] if h0 is not None else c0.shape[1] if c0 is not None \
            else torch.library.get_ctx().new_dynamic_size()
    fused = backend == "triton"
    out = x.new_empty(*seq, D * H_out)
    h_n = x.new_empty(D, B, H_out)
    c_n = x.new_empty(D, B, H) if cell == Cell.LSTM else x.new_empty(0)
    saved = x.new_empty(*seq, D, G + 1, H) if fused and save and cell in (Cell.LSTM, Cell.GRU) else x.new_empty(0)
    m, m_n = (x.new_empty(*seq, D * H), x.new_empty(D, B, H)) if fused and proj else (x.new_empty(0), x.new_empty(0))
    return out, h_n, c_n, saved, m, m_n


def layer_bwd_impl(x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], weights: Sequence[Tensor],
                   batch_sizes: Optional[Tensor], hidden: Tensor, saved: Tensor, hidden_n: Tensor,
                   d_out: Optional[Tensor], d_hn: Optional[Tensor], d_cn: Optional[Tensor], cell: int,
                   has_bias: bool, proj: bool, need_dx: bool, backend: str) -> list[Tensor]:
    """Gradients of layer_fwd: [dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr], the weights'
    with directions stacked (dw_ih [D*G*H, I], dw_hh [D, G*H, H_out], db_* [D*G*H], dw_hr
    [D, P, H]: one tensor each, so no two results alias), absent ones (no h0, no bias, no
    projection, dx not needed) empty 1-D tensors. hidden, saved, hidden_n: layer_fwd's
    out (m with a projection), saved and m_n; d_out, d_hn, d_cn: the upstream gradients (any may
    be None)."""
    cell = Cell(cell)
    groups = group_weights(weights, has_bias, proj)
    _check_backend(backend)
    with _no_autocast(x):
        grads = _backward(backend, cell, x, h0, c0, groups, batch_sizes, hidden, saved, hidden_n,
                          d_out, d_hn, d_cn, proj, need_dx)
    return [t.contiguous() if t is not None else x.new_empty(0) for t in grads]


def _backward(backend, cell, x, h0, c0, groups, batch_sizes, hidden, saved, hidden_n, d_out, d_hn, d_cn, proj,
              need_dx):
    if backend == "triton":
        packing = packing_for(batch_sizes, x.device) if batch_sizes is not None else None
        saved = _none_if_empty(saved)
        if proj:
            grads, info = _fused_proj_grads(x, h0, c0, groups, packing, hidden, hidden_n, saved, d_out, d_hn, d_cn,
                                            need_dx)
        else:
            grads, info = _fused_grads(cell, x, h0, c0, groups, packing, hidden, saved, d_out, d_hn, d_cn, need_dx)
        _record(info)
        return grads
    return _eager_grads(backend, cell, x, h0, c0, groups, batch_sizes, d_out, d_hn, d_cn, need_dx)


layer_bwd = torch.library.custom_op("rnn::layer_bwd", layer_bwd_impl, mutates_args=())


@layer_bwd.register_fake
def _layer_bwd_fake(x, h0, c0, weights, batch_sizes, hidden, saved, hidden_n, d_out, d_hn, d_cn, cell, has_bias,
                    proj, need_dx, backend):
    groups = group_weights(weights, has_bias, proj)
    D = len(groups)
    w_ih, w_hh, b_ih, _, w_hr = groups[0]

    def like(shape, present=True):  # a fresh tensor each: real results never alias
        return x.new_empty(shape) if present else x.new_empty(0)

    return [like(x.shape, need_dx), like(h0.shape if h0 is not None else 0, h0 is not None),
            like(c0.shape if c0 is not None else 0, c0 is not None), like((D * w_ih.shape[0], w_ih.shape[1])),
            like((D, *w_hh.shape)), like(D * w_ih.shape[0], b_ih is not None), like(D * w_ih.shape[0], b_ih is not None),
            like((D, *w_hr.shape) if w_hr is not None else 0, w_hr is not None)]


def _no_double_backward(ctx, *grads):
    raise RuntimeError("double backward (a gradient of a gradient) through rnn's fused kernels is not "
                       "supported; run with RNN_BACKEND=reference for higher-order gradients")


layer_bwd.register_autograd(_no_double_backward)


# --- autograd, shared by both wirings ---------------------------------------------------------

def _save(ctx, x, h0, c0, weights, batch_sizes, cell, has_bias, proj, backend, output, need_dx):
    out, _, _, saved, m, m_n = output
    ctx.mark_non_differentiable(saved, m, m_n)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros made
    ctx.cell, ctx.has_bias, ctx.proj, ctx.backend, ctx.need_dx = cell, has_bias, proj, backend, need_dx
    ctx.save_for_backward(x, h0, c0, batch_sizes, m if proj else out, saved, m_n, *weights)


def _backward_args(ctx, d_out, d_hn, d_cn):
    x, h0, c0, batch_sizes, hidden, saved, hidden_n, *weights = ctx.saved_tensors
    if ctx.cell != Cell.LSTM:
        d_cn = None  # c_n is a placeholder
    return (x, h0, c0, weights, batch_sizes, hidden, saved, hidden_n, d_out, d_hn, d_cn, ctx.cell, ctx.has_bias,
            ctx.proj, ctx.need_dx, ctx.backend)


def _gradients(grads, weights, has_bias: bool, proj: bool):
    """layer_bwd's list -> (dx, dh0, dc0, [a gradient per tensor of ``weights``]), None for the
    absent states; each direction's weight gradients are views of the stacked ones."""
    dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = (_none_if_empty(g) for g in grads)
    groups = group_weights(weights, has_bias, proj)
    rows = dw_hh.shape[1]
    dweights = []
    for d, group in enumerate(groups):
        part = slice(d * rows, (d + 1) * rows)
        dweights += [dw_ih[part], dw_hh[d]]
        if has_bias:
            dweights += [db_ih[part], db_hh[part]]
        if proj:
            dweights.append(dw_hr[d])
    return dx, dh0, dc0, dweights


def _op_setup_context(ctx, inputs, output):
    x, h0, c0, weights, batch_sizes, cell, has_bias, proj, save, backend = inputs
    _save(ctx, x, h0, c0, weights, batch_sizes, cell, has_bias, proj, backend, output, x.requires_grad)


def _op_backward(ctx, d_out, d_hn, d_cn, _d_saved, _d_m, _d_mn):
    args = _backward_args(ctx, d_out, d_hn, d_cn)
    dx, dh0, dc0, dweights = _gradients(torch.ops.rnn.layer_bwd(*args), args[3], ctx.has_bias, ctx.proj)
    return dx, dh0, dc0, dweights, None, None, None, None, None, None


layer_fwd.register_autograd(_op_backward, setup_context=_op_setup_context)


class _FusedFunction(torch.autograd.Function):
    """Common ground of the eager autograd Functions.

    forward takes no ctx and setup_context saves (the form torch.func needs). Under vmap (and so
    jacrev, which vmaps the backward) each mapped slice runs on its own, one after another.
    """

    @classmethod
    def apply(cls, *args):
        # Function.apply binds default arguments through inspect.signature on every call of a
        # setup_context-style Function (a fifth of our host time per layer); these forwards take
        # every argument positionally, so outside torch.func the C++ apply is called directly.
        if torch._C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*torch._functorch.utils.unwrap_dead_wrappers(args))

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
    """Runs ``compute(*tensors)`` (a layer's backward) as a node of its own, so that
    differentiating the gradients (create_graph=True, torch.func.grad of a grad, hessians) fails
    loudly instead of silently treating the kernels' gradients as constants."""

    @staticmethod
    def forward(compute, *tensors):
        return compute(*tensors)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        _no_double_backward(ctx)


class FusedLayer(_FusedFunction):
    """Eager wiring of layer_fwd / layer_bwd (see the module's docstring); records each launch in
    ``path`` (a ForwardPath)."""

    @staticmethod
    def forward(x, h0, c0, batch_sizes, cell, has_bias, proj, save, path, *weights):
        return _call_forward(path, x, h0, c0, weights, batch_sizes, cell, has_bias, proj, save)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, h0, c0, batch_sizes, cell, has_bias, proj, save, path, *weights = inputs
        if save:
            _save(ctx, x, h0, c0, weights, batch_sizes, cell, has_bias, proj, path.backend, output,
                  ctx.needs_input_grad[0])
            ctx.path = path
        else:
            ctx.mark_non_differentiable(*output[3:])

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn, _d_saved, _d_m, _d_mn):
        args = _backward_args(ctx, d_out, d_hn, d_cn)
        x, h0, c0, weights, batch_sizes, hidden, saved, hidden_n, *rest = args
        compute = functools.partial(_call_backward, ctx.path, rest[3:])
        grads = _FirstOrderBackward.apply(compute, x, h0, c0, batch_sizes, hidden, saved, hidden_n, *rest[:3],
                                          *weights)
        dx, dh0, dc0, dweights = _gradients(grads, weights, ctx.has_bias, ctx.proj)
        return (dx, dh0, dc0, None, None, None, None, None, None, *dweights)


def layer_inference(x, h0, c0, batch_sizes, cell: int, has_bias: bool, proj: bool, path, weights):
    """FusedLayer's forward for a layer that saves nothing (no gradient will be asked of it):
    without the autograd Function, whose apply costs about 30 us of host time per layer (measured
    on the CPU), unless a torch.func transform is active (FusedLayer holds its vmap rule)."""
    if torch._C._are_functorch_transforms_active():
        return FusedLayer.apply(x, h0, c0, batch_sizes, cell, has_bias, proj, False, path, *weights)
    return _call_forward(path, x, h0, c0, weights, batch_sizes, cell, has_bias, proj, False)


def _call_forward(path, x, h0, c0, weights, batch_sizes, cell, has_bias, proj, save):
    fwd = layer_fwd_impl if _direct(x) else torch.ops.rnn.layer_fwd
    with recording(path.launches):
        return fwd(x, h0, c0, list(weights), batch_sizes, cell, has_bias, proj, save, path.backend)


def _call_backward(path, flags, x, h0, c0, batch_sizes, hidden, saved, hidden_n, d_out, d_hn, d_cn,
                   *weights):
    bwd = layer_bwd_impl if _direct(x) else torch.ops.rnn.layer_bwd
    with recording(path.backward_launches):
        return tuple(bwd(x, h0, c0, list(weights), batch_sizes, hidden, saved, hidden_n, d_out, d_hn, d_cn, *flags))


def _direct(x: Tensor) -> bool:
    """Whether an eager call may run the op's implementation without the dispatcher: the custom
    op's Python dispatch costs about as much host time as the rest of a layer's call (90 us of
    ~210 measured on the CPU). Under a dispatch mode (FakeTensorMode, FlopCounterMode, ...) or with
    a tensor subclass, the op is called, so the mode sees rnn::layer_fwd and its fake."""
    return type(x) is Tensor and torch._C._len_torch_dispatch_stack() == 0 \
        and not torch._C._is_torch_function_mode_enabled()

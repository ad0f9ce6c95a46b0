"""Persistent backward (BPTT) kernel of one recurrent layer (both directions), its launcher, and
the weight-gradient GEMMs after the loop."""
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels import env
from kernels.barrier import grid_sync, group_counter, watch
from kernels.cells import GRU, LSTM, Cell, gru_cell_bwd, lstm_cell_bwd, rnn_cell_bwd
from kernels.configs import (KernelConfig, backward_piece_rows, backward_piece_split, backward_reduction,
                             candidate_backward_configs, cdiv, check_stages, default_backward_config, is_resident,
                             k_block)
from kernels.packing import Packing
from kernels.forward import (TUNE_STEPS, LaunchInfo, _choose_persistent, _residency_key, _sm_count,
                             autotune_cache, barrier_counters, check_weights, dense, fp32_precision, given_output,
                             layer_key, layout_strides, max_registers, may_tune, on_input_device, rnn_fwd,
                             run_persistent, seq_offsets, split_rows, tile_steps, time_candidates)


@triton.jit
def _load_start(init_ptr, buf_ptr, offs, mask, t0, HAS_INIT: tl.constexpr, ACC: tl.constexpr):
    """A carried gradient at the start of a launch: the caller's (or zero) on the first step,
    else what the previous launch left in the buffer."""
    value = tl.load(buf_ptr + offs, mask=mask & (t0 != 0), other=0.0).to(ACC)
    if HAS_INIT:
        value += tl.load(init_ptr + offs, mask=mask & (t0 == 0), other=0.0).to(ACC)
    return value


@triton.jit
def _resident_columns(w_dir, units, unit_ok, H, G: tl.constexpr, PK: tl.constexpr, SPLIT: tl.constexpr,
                      KW: tl.constexpr, UPCAST: tl.constexpr):
    """This program's columns of W_hh, kept on-chip for every step: a tuple of G * SPLIT pieces,
    gate by gate, SPLIT pieces of H (padded) each, a piece's PK rows as [KW, PK // KW, HB] (see
    _recurrent_grad)."""
    rows = split_rows(PK, KW)
    pieces = ()
    for j in tl.static_range(G * SPLIT):
        r = (j % SPLIT) * PK + rows
        w = tl.load(w_dir + ((j // SPLIT) * H + r)[:, :, None] * H + units[None, None, :],
                    mask=(r < H)[:, :, None] & unit_ok[None, None, :], other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
        pieces = pieces + (w,)
    return pieces


@triton.jit
def _recurrent_grad(src, pieces, w_dir, units, unit_ok, g_rows, row_ok, KG, H, G: tl.constexpr, BB: tl.constexpr,
                    HB: tl.constexpr, PK: tl.constexpr, SPLIT: tl.constexpr, KW: tl.constexpr, BK: tl.constexpr,
                    KB: tl.constexpr, STAGES: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    ACC: tl.constexpr):
    """dgates_{t+1} [BB, G*H] (every program's, from ``src``) times this program's columns of
    W_hh [G*H, HB]: the gradient reaching h_t through the recurrence. Resident (KB == BK): one dot
    per on-chip piece, so that only a [BB, PK] piece of the gradients is live at a time (the whole
    [BB, G*H] tile at once spilled, sm_90 compiles); else K chunks of the stacked gates, streamed.
    A piece's rows are split KW ways, one batched dot: Triton lays a batched dot's warps along its
    batch, so each warp reduces its own rows, summed across warps once at the end. A [BB, HB]
    dot would have every warp compute the whole tile (warps [8, 1] over one 16-row MMA tile)."""
    acc = tl.zeros([BB, HB], ACC)
    if KB == BK:
        rows = split_rows(PK, KW)
        part = tl.zeros([KW, BB, HB], ACC)
        for j in tl.static_range(G * SPLIT):
            r = (j % SPLIT) * PK + rows
            g = tl.load(src + g_rows[None, :, :] + (j // SPLIT) * H + r[:, None, :],
                        mask=row_ok[None, :, None] & (r < H)[:, None, :], other=0.0, cache_modifier=".cg")
            part = tl.dot(g.to(pieces[j].dtype), pieces[j], part, input_precision=PRECISION, out_dtype=ACC)
        acc = tl.sum(part, axis=0)
    else:
        rows = split_rows(KB, KW)
        part = tl.zeros([KW, BB, HB], ACC)
        for k0 in tl.range(0, KG, KB, num_stages=STAGES):
            kk = k0 + rows
            wc = tl.load(w_dir + kk[:, :, None] * H + units[None, None, :],
                         mask=(kk < KG)[:, :, None] & unit_ok[None, None, :], other=0.0)
            if UPCAST:
                wc = wc.to(tl.float32)
            g = tl.load(src + g_rows[None, :, :] + kk[:, None, :], mask=row_ok[None, :, None] & (kk < KG)[:, None, :],
                        other=0.0, cache_modifier=".cg")
            part = tl.dot(g.to(wc.dtype), wc, part, input_precision=PRECISION, out_dtype=ACC)
        acc = tl.sum(part, axis=0)
    return acc


@triton.jit
def _saved_offsets(off_ptr, t, rows64, B, D: tl.constexpr, d, G: tl.constexpr, H, PACKED: tl.constexpr):
    """Offsets [BB, 1] of direction d's saved activations of each sequence at time t."""
    return seq_offsets(off_ptr, t, rows64, B * D * (G + 1) * H, D * (G + 1) * H, PACKED)[:, None] + d * (G + 1) * H


@triton.jit
def _saved(sv_ptr, slot, H, mask, ACC: tl.constexpr):
    return tl.load(sv_ptr + slot * H, mask=mask, other=0.0).to(ACC)


@triton.jit
def _step_loads(saved_ptr, out_ptr, dout_ptr, h0_ptr, c0_ptr, off_ptr, t, ok, rows64, row_ok, unit_ok, units, state,
                lengths, T, B, H, d, stride_ot, stride_ob, stride_dt, stride_db, CELL: tl.constexpr, G: tl.constexpr,
                D: tl.constexpr, HAS_H0: tl.constexpr, HAS_C0: tl.constexpr, HAS_DOUT: tl.constexpr,
                PACKED: tl.constexpr, ACC: tl.constexpr):
    """Everything step t reads that does not depend on the exchange, as [BB, HB] tiles: dout,
    the saved activations (LSTM i f g o c; GRU r z n n_h; RNN its output h) and the state before
    (LSTM c_{t-1}, GRU h_{t-1}; h0/c0 at a sequence's first step). ``ok``: whether step t runs
    at all (a step past the launch's last loads nothing); t is clamped so that even the address
    stays inside the sequence."""
    t = tl.minimum(tl.maximum(t, 0), T - 1)
    active = row_ok & (t < lengths) & ok
    act2 = active[:, None] & unit_ok[None, :]
    last = lengths - 1
    first = ((d == 0) & (t == 0)) | ((d == 1) & (t == last))
    prev_mask = act2 & ~first[:, None]
    t_prev = tl.minimum(tl.maximum(t - 1 + 2 * d, 0), T - 1)  # clamped: only read where not first
    zero = tl.zeros(act2.shape, ACC)
    dout = zero
    if HAS_DOUT:
        dout = tl.load(dout_ptr + seq_offsets(off_ptr, t, rows64, stride_dt, stride_db, PACKED)[:, None] + d * H
                       + units[None, :], mask=act2, other=0.0).to(ACC)
    l0 = zero
    l1 = zero
    l2 = zero
    l3 = zero
    l4 = zero
    prev = zero
    if G > 1:  # LSTM and GRU: their four saved activations
        sv = saved_ptr + _saved_offsets(off_ptr, t, rows64, B, D, d, G, H, PACKED) + units[None, :]
        l0 = _saved(sv, 0, H, act2, ACC)
        l1 = _saved(sv, 1, H, act2, ACC)
        l2 = _saved(sv, 2, H, act2, ACC)
        l3 = _saved(sv, 3, H, act2, ACC)
    if CELL == LSTM:
        l4 = _saved(sv, 4, H, act2, ACC)
        prev = _saved(saved_ptr + _saved_offsets(off_ptr, t_prev, rows64, B, D, d, G, H, PACKED) + units[None, :], 4,
                      H, prev_mask, ACC)
        if HAS_C0:
            prev += tl.load(c0_ptr + state, mask=act2 & first[:, None], other=0.0).to(ACC)
    elif CELL == GRU:
        prev = tl.load(out_ptr + seq_offsets(off_ptr, t_prev, rows64, stride_ot, stride_ob, PACKED)[:, None] + d * H
                       + units[None, :], mask=prev_mask, other=0.0).to(ACC)
        if HAS_H0:
            prev += tl.load(h0_ptr + state, mask=act2 & first[:, None], other=0.0).to(ACC)
    else:
        l0 = tl.load(out_ptr + seq_offsets(off_ptr, t, rows64, stride_ot, stride_ob, PACKED)[:, None] + d * H
                     + units[None, :], mask=act2, other=0.0).to(ACC)
    return dout, l0, l1, l2, l3, l4, prev


@triton.jit
def _put(dg_ptr, xb_ptr, dg_slot, xb_slot, H, value, active, mask, PACKED: tl.constexpr, SHARE: tl.constexpr):
    """One gate's gradient (zero where a sequence has ended) into the sequence of gate gradients
    (input dtype; packed data has no row for an ended sequence) and, when SHARE, into this
    step's exchange row for the recurrent product (zeros included)."""
    value = tl.where(active, value, 0.0)
    tl.store(dg_ptr + dg_slot * H, value.to(dg_ptr.dtype.element_ty), mask=active if PACKED else mask)
    if SHARE:
        tl.store(xb_ptr + xb_slot * H, value.to(xb_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T", "t0", "t1", "finish"])
def rnn_bwd_kernel(
    saved_ptr,  # [T, B, D, G+1, H] (packed [N, ...]): LSTM i f g o (activated) c; GRU r z n n_h
    out_ptr,  # [T, B, D*H] (or [B, T, D*H], or packed [N, D*H]): the forward's outputs
    h0_ptr, c0_ptr,  # [D, B, H]
    len_ptr,  # [B] int32 sequence lengths (PACKED)
    off_ptr,  # [T] int64 first packed row of each time (PACKED)
    w_hh_ptr,  # [G*H, H]: the forward direction's
    w_hh_rev_ptr,  # the reverse direction's (D == 2)
    dout_ptr,  # like out: gradient of the outputs
    dhn_ptr, dcn_ptr,  # [D, B, H]: gradients of h_n, c_n
    dg_ptr,  # out [T, B, D, GR, H] (packed [N, ...]): gate pre-activation gradients (GR: G; GRU 4: r z n n_h)
    dh0_ptr, dc0_ptr,  # out [D, B, H]
    xbuf_ptr,  # [2, D, B, G*H] input dtype (what the dot consumes), zeroed: recurrent gate gradients exchanged
    dhbuf_ptr, dcbuf_ptr,  # [D, B, H] accumulator dtype: carried gradients between stepwise launches
    sync_ptr,  # int32 barrier counters (barrier.group_counter), zeroed
    flag_ptr,  # [1] int32, host memory: set where a program gave up waiting at the barrier (barrier.Watch)
    T, B, H, patience, t0, t1,  # this launch runs backward steps [t0, t1) of T (step s is time T-1-s forward);
    # patience: barrier.grid_sync's
    finish,  # 1: then (every step's gates published) the gradients of h0 and c0
    stride_ot, stride_ob, stride_dt, stride_db,
    CELL: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    HB: tl.constexpr, BB: tl.constexpr, PK: tl.constexpr, SPLIT: tl.constexpr, KW: tl.constexpr, BK: tl.constexpr,
    KB: tl.constexpr, STAGES: tl.constexpr, HAS_H0: tl.constexpr, HAS_C0: tl.constexpr, PACKED: tl.constexpr,
    HAS_DOUT: tl.constexpr, HAS_DHN: tl.constexpr, HAS_DCN: tl.constexpr,
    SYNC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (hidden blocks, batch tiles, directions). Program (p, b, d) owns hidden units
    [p*HB, (p+1)*HB) of direction d and holds their columns of W_hh on-chip (G*SPLIT pieces of
    [PK, HB]), or streams them in K chunks of the stacked gates when KB < BK; the rows of a piece or
    chunk are split KW ways among the warps. Each step it adds the recurrent gradient
    dgates_{t+1} W_hh[:, units], computes its units' gate gradients, and publishes them for the
    next step behind the barrier.
    What a step reads besides the exchange (_step_loads) is loaded during the step before, ahead
    of the barrier, so that only the exchange remains on the step's critical path.
    """
    ACC: tl.constexpr = dhbuf_ptr.dtype.element_ty
    GR: tl.constexpr = 4 if CELL == GRU else G
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    d = tl.program_id(2)
    n_prog = tl.num_programs(0)
    KG = G * H

    units = pid_h * HB + tl.arange(0, HB)
    rows = pid_b * BB + tl.arange(0, BB)
    unit_ok = units < H
    row_ok = rows < B
    own_mask = row_ok[:, None] & unit_ok[None, :]
    rows64 = rows.to(tl.int64)
    w_dir = w_hh_ptr
    if D == 2:
        if d == 1:
            w_dir = w_hh_rev_ptr
    state = d * B * H + rows[:, None] * H + units[None, :]
    g_rows = (d * B + rows[:, None]) * KG  # this tile's rows of an exchange slot
    slot = D * B * KG

    if KB == BK:
        pieces = _resident_columns(w_dir, units, unit_ok, H, G, PK, SPLIT, KW, UPCAST)
    else:
        pieces = (tl.zeros([1, 1], tl.float32),)  # streamed in chunks instead
    # Backward step s is forward time T-1-s (time s in reverse): the forward direction meets the
    # idle end of packed time first.
    s_lo, s_hi, lengths = tile_steps(len_ptr, rows, row_ok, T, 1 - d, PACKED)
    s_start = tl.maximum(t0, s_lo)
    s_end = tl.minimum(t1, s_hi)

    dh_carry = _load_start(dhn_ptr, dhbuf_ptr, state, own_mask, s_start - s_lo, HAS_DHN, ACC)
    dc = tl.zeros([BB, HB], ACC)
    if CELL == LSTM:
        dc = _load_start(dcn_ptr, dcbuf_ptr, state, own_mask, s_start - s_lo, HAS_DCN, ACC)

    t = T - 1 - s_start + d * (2 * s_start - T + 1)
    dout, l0, l1, l2, l3, l4, prev = _step_loads(
        saved_ptr, out_ptr, dout_ptr, h0_ptr, c0_ptr, off_ptr, t, s_start < s_end, rows64, row_ok, unit_ok,
        units, state, lengths, T, B, H, d, stride_ot, stride_ob, stride_dt, stride_db, CELL, G, D, HAS_H0, HAS_C0,
        HAS_DOUT, PACKED, ACC)
    for s in range(s_start, s_end):
        t = T - 1 - s + d * (2 * s - T + 1)  # forward time of this step: the reverse direction's is s
        # The exchange slot of step s-1 (zeros before this tile's first step).
        dh = dh_carry + dout + _recurrent_grad(xbuf_ptr + ((s + 1) % 2) * slot, pieces, w_dir, units, unit_ok,
                                               g_rows, row_ok, KG, H, G, BB, HB, PK, SPLIT, KW, BK, KB, STAGES, UPCAST,
                                               PRECISION, ACC)
        active = row_ok & (t < lengths)
        act2 = active[:, None] & unit_ok[None, :]
        dg = dg_ptr + (seq_offsets(off_ptr, t, rows64, B * D * GR * H, D * GR * H, PACKED)[:, None] + d * GR * H
                       + units[None, :])
        xb = xbuf_ptr + (s % 2) * slot + g_rows + units[None, :]
        if CELL == LSTM:
            d_i, d_f, d_g, d_o, dc_prev = lstm_cell_bwd(dh, dc, l0, l1, l2, l3, l4, prev)
            # Past its length a sequence only carries its state: gradients pass through unchanged.
            dc = tl.where(act2, dc_prev, dc)
            dh_carry = tl.where(act2, 0.0, dh)
            _put(dg, xb, 0, 0, H, d_i, act2, own_mask, PACKED, True)
            _put(dg, xb, 1, 1, H, d_f, act2, own_mask, PACKED, True)
            _put(dg, xb, 2, 2, H, d_g, act2, own_mask, PACKED, True)
            _put(dg, xb, 3, 3, H, d_o, act2, own_mask, PACKED, True)
        elif CELL == GRU:
            d_r, d_z, d_n, d_nh, dh_direct = gru_cell_bwd(dh, l0, l1, l2, l3, prev)
            dh_carry = tl.where(act2, dh_direct, dh)
            _put(dg, xb, 0, 0, H, d_r, act2, own_mask, PACKED, True)
            _put(dg, xb, 1, 1, H, d_z, act2, own_mask, PACKED, True)
            _put(dg, xb, 2, 0, H, d_n, act2, own_mask, PACKED, False)  # the input projection's n
            _put(dg, xb, 3, 2, H, d_nh, act2, own_mask, PACKED, True)  # the recurrence's n: d_n * r
        else:
            dh_carry = tl.where(act2, 0.0, dh)
            _put(dg, xb, 0, 0, H, rnn_cell_bwd(dh, l0, CELL), act2, own_mask, PACKED, True)
        dout, l0, l1, l2, l3, l4, prev = _step_loads(
            saved_ptr, out_ptr, dout_ptr, h0_ptr, c0_ptr, off_ptr, t - 1 + 2 * d, s + 1 < s_end, rows64, row_ok,
            unit_ok, units, state, lengths, T, B, H, d, stride_ot, stride_ob, stride_dt, stride_db, CELL, G, D, HAS_H0,
            HAS_C0, HAS_DOUT, PACKED, ACC)
        if SYNC:
            patience = grid_sync(group_counter(sync_ptr, d, pid_b), n_prog * (s - s_start + 1), patience, flag_ptr)
        else:
            tl.debug_barrier()

    if finish != 0:
        if KB == BK:
            # Loaded again: the loop's on-chip tiles used here were read into registers before
            # the loop and held through every step, which spilled (sm_90 compiles).
            pieces = _resident_columns(w_dir, units, unit_ok, H, G, PK, SPLIT, KW, UPCAST)
        # The tile's last step's gates (slot of step s_hi - 1) reach h0 through W_hh as well.
        dh0 = dh_carry + _recurrent_grad(xbuf_ptr + ((s_hi + 1) % 2) * slot, pieces, w_dir, units, unit_ok,
                                         g_rows, row_ok, KG, H, G, BB, HB, PK, SPLIT, KW, BK, KB, STAGES, UPCAST,
                                         PRECISION, ACC)
        tl.store(dh0_ptr + state, dh0.to(dh0_ptr.dtype.element_ty), mask=own_mask)
        if CELL == LSTM:
            tl.store(dc0_ptr + state, dc.to(dc0_ptr.dtype.element_ty), mask=own_mask)
    else:
        # A launch that ran no step leaves the carried gradients alone.
        ran = own_mask & (s_start < s_end)
        tl.store(dhbuf_ptr + state, dh_carry, mask=ran)
        if CELL == LSTM:
            tl.store(dcbuf_ptr + state, dc, mask=ran)


class BackwardResult(NamedTuple):
    dg: torch.Tensor  # [T, B, D, G', H]: gate pre-activation gradients (GRU: r, z, n, n of the recurrence)
    dx: torch.Tensor | None  # like x
    dh0: torch.Tensor  # [D, B, H]
    dc0: torch.Tensor | None  # [D, B, H], LSTM only
    dw_ih: torch.Tensor  # [D*G*H, I], directions stacked as w_ih
    dw_hh: torch.Tensor  # [D, G*H, H]
    db_ih: torch.Tensor  # [D*G*H]
    db_hh: torch.Tensor  # [D*G*H]
    info: LaunchInfo


@on_input_device
def rnn_bwd(cell: Cell, x, weights, h0, c0, packing: Packing | None, out, saved, d_out, d_hn, d_cn,
            batch_first: bool, need_dx: bool = True, config: KernelConfig | None = None, dg=None, dh0=None,
            dc0=None, tuning: dict | None = None) -> BackwardResult:
    """Gradients of one layer (every direction) from the forward's inputs (weights per direction
    as rnn_fwd takes them; only w_ih and w_hh are read), outputs and saved activations
    (rnn_fwd(save=True)) and the gradients of out, h_n and c_n (any may be None).
    With ``packing``, x, out, d_out and the gate gradients are in the packed layout, as in rnn_fwd.
    Weight gradients come stacked by direction (dw_ih [D*G*H, I], dw_hh [D, G*H, H]).

    The reverse-time loop runs in rnn_bwd_kernel (persistent where co-resident, else a launch per
    step); dx and every weight gradient then come from GEMMs over all timesteps at once. Biases:
    db_ih is the gradient of b_ih; db_hh of b_hh (for GRU its n part is the gradient of b_hn).
    dg, dh0, dc0: optional preallocated outputs ([T, B, D, G', H] or [N, D, G', H] gate gradients,
    [D, B, H]); tests poison them.
    tuning: a dict (tune_backward's): tune this shape now, whatever the cache holds, and fill it
    with the key, the winner, each candidate's ms per step and the default.
    """
    cell = Cell(cell)
    D, H = check_weights("rnn_bwd", cell, weights, x.shape[-1])
    G = cell.gates
    GH = G * H
    GR = 4 if cell == Cell.GRU else G
    if packing is not None:
        T, B = packing.steps, packing.batch
        seqs = (packing.rows,)
    else:
        T, B = (x.shape[1], x.shape[0]) if batch_first else (x.shape[0], x.shape[1])
        seqs = (T, B)
    interpreting = env.interpreting()
    if x.device.type != "cuda" and not interpreting:
        raise RuntimeError("rnn_bwd: Triton kernels need a CUDA tensor or TRITON_INTERPRET=1")
    if cell in (Cell.LSTM, Cell.GRU) and saved is None:
        raise ValueError("rnn_bwd: LSTM and GRU need the activations saved by rnn_fwd(save=True)")
    device, dtype = x.device, x.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    dg = given_output("dg", dg, torch.empty(*seqs, D, GR, H, dtype=dtype, device=device))
    dh0 = given_output("dh0", dh0, torch.empty(D, B, H, dtype=dtype, device=device))
    dc0 = given_output("dc0", dc0, torch.empty(D, B, H, dtype=dtype, device=device)) if cell == Cell.LSTM else None
    # Upstream gradients come in any layout (a sum's is expanded, a permute's transposed): the
    # kernel takes the time and batch strides of out and d_out and indexes everything else densely.
    if d_out is not None and tuple(d_out.shape) != tuple(out.shape):
        raise ValueError(f"d_out must have the shape of out, {list(out.shape)}, got {list(d_out.shape)}")
    out, d_out = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (out, d_out))
    d_hn, d_cn = dense("d_hn", d_hn, (D, B, H)), dense("d_cn", d_cn, (D, B, H))
    w_ih = [w[0] for w in weights]
    w_hh = [w[1].contiguous() for w in weights]  # the kernel indexes them densely
    h0, c0 = dense("h0", h0, (D, B, H)), dense("c0", c0, (D, B, H))
    if saved is not None:
        saved = dense("saved", saved, (*seqs, D, G + 1, H))
    lengths, offsets = (packing.lengths, packing.offsets) if packing is not None else (None, None)
    strides = layout_strides(out, packing, batch_first)
    strides += (0, 0) if d_out is None else layout_strides(d_out, packing, batch_first)
    precision = fp32_precision(x)

    def launch(cfg: KernelConfig, steps: int | None = None, compile_only: bool = False) -> LaunchInfo:
        """The reverse-time loop with partition cfg: every step and then the gradients of h0 and
        c0, or (tuning) only the first ``steps`` steps; ``compile_only``: compile what the
        persistent launch would run, and run nothing."""
        n_h = cdiv(H, cfg.hidden_block)
        grid = (n_h, cdiv(B, cfg.batch_block), D)
        # Gate gradients are exchanged in the input dtype, the one the recurrent dot consumes:
        # half the traffic of fp32 for 16-bit inputs, the same results.
        xbuf = torch.zeros(2, D, B, G * H, dtype=dtype, device=device)
        dhbuf = torch.empty(D, B, H, dtype=acc, device=device)
        dcbuf = torch.empty_like(dhbuf) if cell == Cell.LSTM else dhbuf
        sync = barrier_counters(grid, device)
        flag, patience = watch.arm("rnn_bwd_kernel", grid, cfg, device)
        dummy = xbuf
        args = tuple(t if t is not None else dummy for t in (
            saved, out, h0, c0, lengths, offsets, w_hh[0], w_hh[-1], d_out, d_hn, d_cn, dg, dh0, dc0, xbuf, dhbuf,
            dcbuf, sync, flag))
        args += (T, B, H, patience)
        meta = backward_meta(cell, D, H, cfg, elt_size=dtype.itemsize, has_h0=h0 is not None,
                             has_c0=c0 is not None, packed=packing is not None, has_dout=d_out is not None,
                             has_dhn=d_hn is not None, has_dcn=d_cn is not None,
                             upcast=interpreting and dtype == torch.bfloat16, precision=precision)
        t1, finish = (T, 1) if steps is None else (steps, 0)
        whole = (*args, 0, t1, finish, *strides)  # the persistent launch's arguments
        if compile_only:
            rnn_bwd_kernel.warmup(*whole, SYNC=n_h > 1, launch_cooperative_grid=n_h > 1, grid=grid, **meta)
            return LaunchInfo("rnn_bwd_kernel", cfg, grid, True)
        persistent = _choose_persistent(rnn_bwd_kernel, cfg, grid, whole, meta, device, interpreting)

        def stepwise():
            # One launch per step; a last one, after every program published the first step's
            # gates, for the gradients of h0 and c0.
            for s in range(t1):
                rnn_bwd_kernel[grid](*args, s, s + 1, 0, *strides, SYNC=False, **meta)
            if finish:
                rnn_bwd_kernel[grid](*args, T, T, 1, *strides, SYNC=False, **meta)

        if persistent:
            persistent = run_persistent(
                _residency_key(rnn_bwd_kernel, grid, args, meta, device), stepwise,
                lambda: rnn_bwd_kernel[grid](*whole, SYNC=n_h > 1, launch_cooperative_grid=n_h > 1, **meta))
        else:
            stepwise()
        if device.type != "cuda":  # the interpreter ran it already: report a barrier that gave up now
            watch.check()
        return LaunchInfo("rnn_bwd_kernel", cfg, grid, persistent)

    if B > 0:
        info = launch(config or _tuned_or_default(cell, T, B, D, w_hh[0], precision, packing, launch, tuning))
    else:
        cfg = config or default_backward_config(H, B, G, w_hh[0].element_size(), interpreting, D, _sm_count(device),
                                                packing is not None)
        info = LaunchInfo("rnn_bwd_kernel", cfg, (cdiv(H, cfg.hidden_block), 0, D), False)
        dg.zero_()
        dh0.zero_()
        if dc0 is not None:
            dc0.zero_()

    # Everything else is one GEMM (or one reduction) over all timesteps (all real tokens).
    rows = dg.shape[0] * (1 if packing is not None else B)
    dg_rows = dg.reshape(rows, D, GR, H)
    gates_in = dg_rows[:, :, :G].reshape(rows, D * G * H)  # GRU: r, z and n of the input projection
    gates_rec = dg_rows[:, :, [0, 1, 3]] if cell == Cell.GRU else dg_rows  # GRU: the recurrence's n is d_n * r
    x_rows = x if packing is not None else (x.transpose(0, 1) if batch_first else x)
    x_rows = x_rows.reshape(rows, -1)
    dw_ih = gates_in.t() @ x_rows
    db_ih = gates_in.sum(0)
    dx = None
    if need_dx:
        # One GEMM per direction (no concatenated copy of W_ih), summed.
        dx = gates_in[:, :GH] @ w_ih[0]
        if D == 2:
            dx = dx.addmm_(gates_in[:, GH:], w_ih[1])
        if packing is None:
            dx = dx.view(T, B, -1)
            dx = dx.transpose(0, 1) if batch_first else dx
    h_prev = _previous_states(out, h0, packing, batch_first, D, H)  # [D, rows, H]
    rec = gates_rec.reshape(rows, D, G * H).transpose(0, 1)  # [D, rows, G*H]
    dw_hh = torch.bmm(rec.transpose(1, 2), h_prev)
    db_hh = gates_rec.reshape(rows, D * G * H).sum(0)
    return BackwardResult(dg, dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, info)


def _tuned_or_default(cell: Cell, T: int, B: int, D: int, w_hh, precision: str, packing, launch,
                      tuning: dict | None = None) -> KernelConfig:
    """The cached winner of this shape's backward (w_hh: one direction's); on a miss, tune it now
    with ``launch(cfg, steps)`` on the real gradients (where forward.may_tune) or take the
    heuristic default. A packed batch takes its padded shape's winner unless that keeps W_hh
    resident where the packed default streams it: the packed kernel spills those
    (default_backward_config), and the winner was timed without packing. With ``tuning`` (a
    dict), tune now whatever the cache holds and report into it."""
    H = w_hh.shape[1]
    device = w_hh.device
    default = default_backward_config(H, B, cell.gates, w_hh.element_size(), env.interpreting(), D,
                                      _sm_count(device), packing is not None)
    if tuning is None and not may_tune(device, B):
        return default
    key = layer_key("rnn_bwd", cell, H, B, w_hh.dtype, precision, D, device)
    if tuning is None:
        cfg = autotune_cache().get(key)
        if packing is not None:
            full_k = backward_reduction(H, cell.gates)
            resident_past_default = cfg is not None and is_resident(cfg, full_k) and not is_resident(default, full_k)
            return default if cfg is None or resident_past_default else cfg
        if cfg is not None:
            return cfg
    steps = min(T, TUNE_STEPS)
    candidates = candidate_backward_configs(H, B, cell.gates, w_hh.element_size(), D, _sm_count(device))
    cfg, timings = time_candidates(key, candidates, lambda c: launch(c, steps), steps, device,
                                   compile=lambda c: launch(c, steps, compile_only=True))
    if tuning is not None:
        tuning.update(key=key, winner=cfg, timings=timings, default=default)
    return cfg


@on_input_device
def tune_backward(cell: Cell, x, weights, batch_first: bool = False):
    """Tune one layer shape's backward now (whatever the cache holds) on these inputs (weights as
    rnn_fwd takes them) and random upstream gradients, and cache the winner: what the first
    training step of the shape does, for scripts.autotune's sweep.

    Returns (tuning key, winner, {candidate name: ms per step}, the heuristic default).
    """
    if x.device.type != "cuda":
        raise RuntimeError("tune_backward times kernels on a GPU: it needs CUDA tensors")
    forward = rnn_fwd(cell, x, weights, None, None, None, batch_first, save=True)
    tuning = {}
    rnn_bwd(cell, x, weights, None, None, None, forward.out, forward.saved, torch.randn_like(forward.out), None,
            None, batch_first, need_dx=False, tuning=tuning)
    return tuning["key"], tuning["winner"], tuning["timings"], tuning["default"]


@functools.lru_cache(maxsize=4096)  # pure; on every launch's host path
def backward_meta(cell: Cell, D: int, H: int, cfg: KernelConfig, *, elt_size: int, has_h0: bool, has_c0: bool,
                  packed: bool, has_dout: bool, has_dhn: bool, has_dcn: bool, upcast: bool, precision: str) -> dict:
    """The constexprs and launch options of rnn_bwd_kernel (all but SYNC); elt_size: bytes of an
    element of the input dtype."""
    cell = Cell(cell)
    if cfg.hidden_block < 16:
        raise ValueError(f"rnn_bwd: hidden_block must be at least 16 (one dot tile), got {cfg.hidden_block}")
    full_k = backward_reduction(H, cell.gates)
    check_stages(cfg, full_k)
    piece = backward_piece_rows(H, cfg.batch_block, elt_size)
    chunk = min(cfg.k_block or full_k, full_k)
    return dict(CELL=int(cell), G=cell.gates, D=D, HB=cfg.hidden_block, BB=cfg.batch_block, PK=piece,
                SPLIT=k_block(H) // piece, KW=backward_piece_split(piece if chunk == full_k else chunk, cfg.num_warps),
                BK=full_k, KB=chunk, STAGES=cfg.num_stages,
                HAS_H0=has_h0, HAS_C0=has_c0, PACKED=packed, HAS_DOUT=has_dout, HAS_DHN=has_dhn, HAS_DCN=has_dcn,
                UPCAST=upcast, PRECISION=precision,
                # Left to itself ptxas often caps this kernel at 128 registers and spills.
                num_warps=cfg.num_warps, maxnreg=max_registers(cfg.num_warps),
                # No software pipelining of the time loop (the K loop has STAGES): it could hoist
                # the next step's loads above the barrier.
                num_stages=1)


def _previous_states(out, h0, packing, batch_first, D, H):
    """h_{t-1} of every step, per direction, [D, rows, H] in the gate gradients' row order: the
    forward's output one step back in each direction's own order, h0 at a sequence's first step
    (for the reverse direction of a packed batch, its own last time)."""
    if packing is not None:
        t, b = packing.time_of_row, packing.seq_of_row
        o = out.view(-1, D, H)
        start = h0 if h0 is not None else out.new_zeros(D, packing.batch, H)
        prev = torch.empty(D, len(t), H, dtype=out.dtype, device=out.device)
        prev[0] = torch.where((t == 0)[:, None], start[0][b], o[packing.row(torch.clamp(t - 1, min=0), b), 0])
        if D == 2:
            last = (t == packing.lengths.long()[b] - 1)[:, None]
            nxt = packing.row(torch.clamp(t + 1, max=packing.steps - 1), b)
            prev[1] = torch.where(last, start[1][b], o[torch.where(last[:, 0], 0, nxt), 1])
        return prev
    o = out.transpose(0, 1) if batch_first else out
    T, B = o.shape[:2]
    o = o.reshape(T, B, D, H)
    start = h0 if h0 is not None else out.new_zeros(D, B, H)
    prev = torch.empty(D, T, B, H, dtype=out.dtype, device=out.device)
    prev[0, 0] = start[0]
    prev[0, 1:] = o[:-1, :, 0]
    if D == 2:
        prev[1, T - 1] = start[1]
        prev[1, :-1] = o[1:, :, 1]
    return prev.view(D, T * B, H)

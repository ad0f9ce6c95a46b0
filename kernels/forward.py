"""Persistent forward kernel of one recurrent layer (both directions), its launcher and the
autotuner that picks its partition."""
import functools
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels import env
from kernels.barrier import COUNTER_STRIDE, grid_sync, group_counter, watch
from kernels.cells import GRU, LSTM, Cell, gru_cell, lstm_cell, rnn_cell
from kernels.packing import Packing
from kernels.tuning import compile_in_parallel
from kernels.configs import (H100_SMS, MIN_TILE, AutotuneCache, KernelConfig, candidate_configs, cdiv, check_split,
                             check_stages, default_forward_config, describe, k_block, tuning_key)


@triton.jit
def _load_state(init_ptr, buf_ptr, offs, mask, step, HAS_INIT: tl.constexpr, DT: tl.constexpr):
    """State before ``step`` in dtype DT: the caller's initial state at step 0 (zeros without
    one), else the buffer that the previous step (or launch) wrote."""
    value = tl.load(buf_ptr + offs, mask=mask & (step != 0), other=0.0, cache_modifier=".cg").to(DT)
    if HAS_INIT:
        value += tl.load(init_ptr + offs, mask=mask & (step == 0), other=0.0).to(DT)
    return value


@triton.jit
def _gate_weight(w_ptr, gate, H, offs, mask, UPCAST: tl.constexpr):
    """One gate's [K, HB] slice of W_hh^T; bf16 is upcast where the interpreter cannot dot it."""
    w = tl.load(w_ptr + gate * H * H + offs, mask=mask, other=0.0)
    if UPCAST:
        w = w.to(tl.float32)
    return w


@triton.jit
def split_rows(N: tl.constexpr, KW: tl.constexpr):
    """Rows 0..N-1 of a reduction as [KW, N // KW], one part per warp: the batch of a batched
    dot, which Triton lays over the warps, so each warp reduces its own part."""
    return tl.arange(0, KW)[:, None] * (N // KW) + tl.arange(0, N // KW)[None, :]


@triton.jit
def _w_offsets(kk, col_off, col_ok, H, KW: tl.constexpr):
    """Offsets and mask of W_hh^T's rows kk by columns col_off: [K, N], or [KW, K // KW, N] for
    rows split among the warps (kk [KW, K // KW])."""
    if KW > 1:
        return col_off[None, None, :] + kk[:, :, None], (kk < H)[:, :, None] & col_ok[None, None, :]
    else:
        return col_off[None, :] + kk[:, None], (kk < H)[:, None] & col_ok[None, :]


@triton.jit
def _weights(w_dir, unit0, kk, H, G: tl.constexpr, HB: tl.constexpr, FUSED: tl.constexpr,
             UPCAST: tl.constexpr, KW: tl.constexpr):
    """This program's rows of W_hh^T for reduction indices kk (split KW ways: see _preacts).

    FUSED: one [K, 4*HB] tile, column c holding gate c % 4 of unit unit0 + c // 4 (GRU's missing
    fourth gate is a zero column), returned four times. Otherwise one [K, HB] tile per gate.
    """
    if FUSED:
        cols = tl.arange(0, 4 * HB)
        gate = cols % 4
        unit = unit0 + cols // 4
        offs, mask = _w_offsets(kk, (gate * H + unit) * H, (gate < G) & (unit < H), H, KW)
        w = tl.load(w_dir + offs, mask=mask, other=0.0)
        if UPCAST:
            w = w.to(tl.float32)
        return w, w, w, w
    else:
        units = unit0 + tl.arange(0, HB)
        offs, mask = _w_offsets(kk, units * H, units < H, H, KW)
        w0 = _gate_weight(w_dir, 0, H, offs, mask, UPCAST)
        w1 = w0
        w2 = w0
        w3 = w0
        if G >= 3:
            w1 = _gate_weight(w_dir, 1, H, offs, mask, UPCAST)
            w2 = _gate_weight(w_dir, 2, H, offs, mask, UPCAST)
        if G == 4:
            w3 = _gate_weight(w_dir, 3, H, offs, mask, UPCAST)
        return w0, w1, w2, w3


@triton.jit
def _dot(h, w, PRECISION: tl.constexpr, ACC: tl.constexpr, KW: tl.constexpr):
    """h times w; split KW ways (h [KW, BB, K // KW], w [KW, K // KW, N]), a batched dot whose
    parts are summed across the warps."""
    acc = tl.dot(h.to(w.dtype), w, input_precision=PRECISION, out_dtype=ACC)
    if KW > 1:
        acc = tl.sum(acc, axis=0)
    return acc


@triton.jit
def _preacts(h, w0, w1, w2, w3, G: tl.constexpr, HB: tl.constexpr, BB: tl.constexpr, FUSED: tl.constexpr,
             PRECISION: tl.constexpr, ACC: tl.constexpr, KW: tl.constexpr):
    """h [BB, K] times this program's weights: the recurrent pre-activation of each gate, [BB, HB].
    KW > 1: the reduction split KW ways (h [KW, BB, K // KW]): Triton lays a batched dot's warps
    along its batch, so each warp reduces its own rows, a shorter chain of dependent MMAs, at the
    cost of a sum across warps (a tuning candidate, KernelConfig.split_k)."""
    if FUSED:
        acc = _dot(h, w0, PRECISION, ACC, KW)
        # Columns are (unit, gate) with the gate fastest: peel the gate off in two halvings.
        even, odd = tl.split(tl.reshape(acc, [BB, HB, 2, 2]))
        a0, a2 = tl.split(even)
        a1, a3 = tl.split(odd)
        return a0, a1, a2, a3
    else:
        a0 = _dot(h, w0, PRECISION, ACC, KW)
        a1 = a0
        a2 = a0
        a3 = a0
        if G >= 3:
            a1 = _dot(h, w1, PRECISION, ACC, KW)
            a2 = _dot(h, w2, PRECISION, ACC, KW)
        if G == 4:
            a3 = _dot(h, w3, PRECISION, ACC, KW)
        return a0, a1, a2, a3


@triton.jit
def _step_inputs(xw_dir, off_ptr, t, rows64, units, mask, stride_xt, stride_xb, T, H, G: tl.constexpr,
                 PACKED: tl.constexpr):
    """Step t's input projection of this program's units, one [BB, HB] block per gate, in the input
    dtype. Loaded a step ahead, before the barrier: it does not depend on h, so its latency leaves
    the step's critical path. The step after a launch's last is masked off (``mask``); its time is
    clamped so that even its address stays inside the sequence."""
    t = tl.minimum(tl.maximum(t, 0), T - 1)
    x_ptr = xw_dir + seq_offsets(off_ptr, t, rows64, stride_xt, stride_xb, PACKED)[:, None] + units[None, :]
    x0 = tl.load(x_ptr, mask=mask, other=0.0)
    x1 = x0
    x2 = x0
    x3 = x0
    if G >= 3:
        x1 = tl.load(x_ptr + H, mask=mask, other=0.0)
        x2 = tl.load(x_ptr + 2 * H, mask=mask, other=0.0)
    if G == 4:
        x3 = tl.load(x_ptr + 3 * H, mask=mask, other=0.0)
    return x0, x1, x2, x3


@triton.jit
def _gate_bias(b_ptr, gate, H, mask, HAS_BHH: tl.constexpr, ACC: tl.constexpr):
    """One gate's b_hh ([1, HB]), loaded each step (L1-resident): held across the time loop it
    would cost registers that some defaults do not have (GRU fp16 H=64 spilled, sm_90 compile)."""
    if HAS_BHH:
        return tl.load(b_ptr + gate * H, mask=mask, other=0.0).to(ACC)
    else:
        return tl.zeros(b_ptr.shape, ACC)


@triton.jit
def _save(ptr, slot, H, value, mask):
    tl.store(ptr + slot * H, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def seq_offsets(off_ptr, t, rows64, stride_t, stride_b, PACKED: tl.constexpr):
    """Element offset of each sequence's vector at time t: packed data keeps sequence b of time t
    in row offsets[t] + b; a padded tensor at t * stride_t + b * stride_b."""
    if PACKED:
        return (tl.load(off_ptr + t) + rows64) * stride_b
    else:
        return t.to(tl.int64) * stride_t + rows64 * stride_b


@triton.jit
def tile_steps(len_ptr, rows, row_ok, T, first_lo, PACKED: tl.constexpr):
    """The steps [lo, hi) in which any sequence of this batch tile is active, and the lengths.
    Packed sequences are only active for t < length; first_lo: whether the walk meets the short
    end of the time axis first (so the idle steps come first)."""
    if PACKED:
        lengths = tl.load(len_ptr + rows, mask=row_ok, other=0)
        idle = T - tl.max(lengths, axis=0)
    else:
        lengths = tl.zeros([rows.shape[0]], tl.int32) + T
        idle = T * 0
    lo = idle * first_lo
    return lo, lo + T - idle, lengths


@triton.jit(do_not_specialize=["T", "t0", "t1"])
def rnn_fwd_kernel(
    xw_ptr,  # [T, B, G*H] (or [B, T, ...], or packed [N, ...]): x @ W_ih^T + b_ih, the forward direction's
    w_hh_ptr,  # [G*H, H]
    b_hh_ptr,  # [G*H] (HAS_BHH)
    xw_rev_ptr,  # the reverse direction's xw, w_hh and b_hh (D == 2), laid out as the forward's
    w_hh_rev_ptr,
    b_hh_rev_ptr,
    h0_ptr,  # [D, B, H]
    c0_ptr,  # [D, B, H], LSTM only
    len_ptr,  # [B] int32 sequence lengths (PACKED)
    off_ptr,  # [T] int64 first packed row of each time (PACKED)
    out_ptr,  # [T, B, D*H] (or [B, T, D*H], or packed [N, D*H])
    hn_ptr,  # [D, B, H]
    cn_ptr,  # [D, B, H], LSTM only
    hbuf_ptr,  # [2, D, B, H] input dtype (what the dot consumes): ping-pong exchange of h between programs
    state_ptr,  # [S, D, B, H] accumulator dtype: own h (and LSTM's c) carried between stepwise launches
    sync_ptr,  # int32 barrier counters, one per direction and batch tile (barrier.group_counter), zeroed
    flag_ptr,  # [1] int32, host memory: set where a program gave up waiting at the barrier (barrier.Watch)
    act_ptr,  # [T, B, D, S, H] (packed: [N, D, S, H]) input dtype: what backward needs (SAVE only)
    T, B, H, patience, t0, t1,  # this launch runs steps [t0, t1) of T; patience: barrier.grid_sync's
    stride_xt, stride_xb, stride_ot, stride_ob,  # packed: the row strides in stride_xb, stride_ob
    CELL: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    HB: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr, STAGES: tl.constexpr,
    FUSED: tl.constexpr, HAS_H0: tl.constexpr, HAS_C0: tl.constexpr, PACKED: tl.constexpr, HAS_BHH: tl.constexpr,
    SYNC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, SAVE: tl.constexpr, KW: tl.constexpr,
):
    """Grid (hidden blocks, batch tiles, directions). Program (p, b, d) owns hidden units
    [p*HB, (p+1)*HB) of direction d, all gates, for batch rows [b*BB, (b+1)*BB).

    KB == BK: the program's rows of W_hh stay on-chip for every step and h_{t-1} is read whole.
    KB < BK: the reduction over H runs in chunks of KB, W_hh and h streamed from L2 each step
    (for slices too large to keep on-chip), STAGES chunks in flight. FUSED: all gates in one dot
    (see _weights).
    PACKED: inputs and outputs in torch's packed layout; a sequence past its length keeps its
    state, and a batch tile skips the steps in which all its sequences are idle.
    SAVE (training): per step, LSTM saves sigmoid(i), sigmoid(f), tanh(g), sigmoid(o) and c_t;
    GRU r, z, n and W_hn h_{t-1} + b_hn; an RNN saves nothing (its output is all backward needs).
    Each direction has its own pointers, so the caller stacks or concatenates no weight, and b_hh
    is added here (GRU's b_hn must be: torch multiplies it by r), not folded into xw on the host.
    """
    ACC: tl.constexpr = state_ptr.dtype.element_ty
    RESIDENT: tl.constexpr = KB == BK
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    d = tl.program_id(2)
    n_prog = tl.num_programs(0)

    unit0 = pid_h * HB
    units = unit0 + tl.arange(0, HB)
    rows = pid_b * BB + tl.arange(0, BB)
    unit_ok = units < H
    row_ok = rows < B
    own_mask = row_ok[:, None] & unit_ok[None, :]
    xw_dir = xw_ptr
    w_dir = w_hh_ptr
    bhh_dir = b_hh_ptr
    if D == 2:
        if d == 1:
            xw_dir = xw_rev_ptr
            w_dir = w_hh_rev_ptr
            bhh_dir = b_hh_rev_ptr
    state_rows = d * B * H + rows[:, None] * H
    slot = D * B * H
    ks = tl.arange(0, KB)
    # The reverse direction meets the idle end of packed time first.
    s_lo, s_hi, lengths = tile_steps(len_ptr, rows, row_ok, T, d, PACKED)
    s_start = tl.maximum(t0, s_lo)
    s_end = tl.minimum(t1, s_hi)

    if RESIDENT:
        if KW > 1:  # the reduction's rows split among the warps (_preacts)
            kr = split_rows(BK, KW)
            full_offs = state_rows[None, :, :] + kr[:, None, :]
            full_mask = row_ok[None, :, None] & (kr < H)[:, None, :]
        else:
            kr = ks
            full_offs = state_rows + ks[None, :]
            full_mask = row_ok[:, None] & (ks < H)[None, :]
        w0, w1, w2, w3 = _weights(w_dir, unit0, kr, H, G, HB, FUSED, UPCAST, KW)
        h_full = _load_state(h0_ptr, hbuf_ptr + (s_start % 2) * slot, full_offs, full_mask, s_start - s_lo, HAS_H0,
                             w0.dtype)
    b_ptr = bhh_dir + units[None, :]  # b_hh of each gate (GRU's third is b_hn)
    b_mask = unit_ok[None, :]

    # Own h in full precision (GRU's update reads it), carried apart from the exchanged copy.
    h_own = _load_state(h0_ptr, state_ptr, state_rows + units[None, :], own_mask, s_start - s_lo, HAS_H0, ACC)
    c = tl.zeros([BB, HB], ACC)
    if CELL == LSTM:
        c = _load_state(c0_ptr, state_ptr + slot, state_rows + units[None, :], own_mask, s_start - s_lo, HAS_C0,
                        ACC)

    rows64 = rows.to(tl.int64)
    t = s_start + d * (T - 1 - 2 * s_start)  # the reverse direction walks time backwards
    # Each step's input projection is loaded during the step before (the first one here).
    x0, x1, x2, x3 = _step_inputs(xw_dir, off_ptr, t, rows64, units, own_mask & (t < lengths)[:, None]
                                  & (s_start < s_end), stride_xt, stride_xb, T, H, G, PACKED)
    for s in range(s_start, s_end):
        t = s + d * (T - 1 - 2 * s)
        # Recurrent pre-activations h_{t-1} W_hh^T of this program's units, one per gate.
        if RESIDENT:
            a0, a1, a2, a3 = _preacts(h_full, w0, w1, w2, w3, G, HB, BB, FUSED, PRECISION, ACC, KW)
        else:
            a0 = tl.zeros([BB, HB], ACC)
            a1 = a0
            a2 = a0
            a3 = a0
            src = hbuf_ptr + (s % 2) * slot
            for k0 in tl.range(0, BK, KB, num_stages=STAGES):
                kk = k0 + ks
                h_chunk = _load_state(h0_ptr, src, state_rows + kk[None, :], row_ok[:, None] & (kk < H)[None, :],
                                      s - s_lo, HAS_H0, hbuf_ptr.dtype.element_ty)
                v0, v1, v2, v3 = _weights(w_dir, unit0, kk, H, G, HB, FUSED, UPCAST, 1)
                p0, p1, p2, p3 = _preacts(h_chunk, v0, v1, v2, v3, G, HB, BB, FUSED, PRECISION, ACC, 1)
                a0 += p0
                a1 += p1
                a2 += p2
                a3 += p3

        active = (t < lengths)[:, None]
        io_mask = own_mask & active  # packed data has no row for an ended sequence
        a0 += _gate_bias(b_ptr, 0, H, b_mask, HAS_BHH, ACC)
        if G >= 3:
            a1 += _gate_bias(b_ptr, 1, H, b_mask, HAS_BHH, ACC)
            a2 += _gate_bias(b_ptr, 2, H, b_mask, HAS_BHH, ACC)
        if G == 4:
            a3 += _gate_bias(b_ptr, 3, H, b_mask, HAS_BHH, ACC)
        if CELL == LSTM:
            h_new, c_new, si, sf, tg, so = lstm_cell(a0 + x0.to(ACC), a1 + x1.to(ACC), a2 + x2.to(ACC),
                                                     a3 + x3.to(ACC), c)
        elif CELL == GRU:
            n_h = a2
            h_new, r, z, n = gru_cell(a0 + x0.to(ACC), a1 + x1.to(ACC), x2.to(ACC), n_h, h_own)
            c_new = c
        else:
            h_new = rnn_cell(a0 + x0.to(ACC), CELL)
            c_new = c
        y = h_new
        if PACKED:
            # Past its length a sequence keeps its state (and has no output row).
            h_new = tl.where(active, h_new, h_own)
            c_new = tl.where(active, c_new, c)
        if SAVE:
            a_ptr = act_ptr + seq_offsets(off_ptr, t, rows64, B * D * (G + 1) * H, D * (G + 1) * H, PACKED)[:, None] \
                + d * (G + 1) * H + units[None, :]
            if CELL == LSTM:
                _save(a_ptr, 0, H, si, io_mask)
                _save(a_ptr, 1, H, sf, io_mask)
                _save(a_ptr, 2, H, tg, io_mask)
                _save(a_ptr, 3, H, so, io_mask)
                _save(a_ptr, 4, H, c_new, io_mask)
            elif CELL == GRU:
                _save(a_ptr, 0, H, r, io_mask)
                _save(a_ptr, 1, H, z, io_mask)
                _save(a_ptr, 2, H, n, io_mask)
                _save(a_ptr, 3, H, n_h, io_mask)
        tl.store(out_ptr + seq_offsets(off_ptr, t, rows64, stride_ot, stride_ob, PACKED)[:, None] + d * H
                 + units[None, :], y.to(out_ptr.dtype.element_ty), mask=io_mask)
        nxt = hbuf_ptr + ((s + 1) % 2) * slot
        tl.store(nxt + state_rows + units[None, :], h_new.to(hbuf_ptr.dtype.element_ty), mask=own_mask)
        t_next = t + 1 - 2 * d
        x0, x1, x2, x3 = _step_inputs(xw_dir, off_ptr, t_next, rows64, units,
                                      own_mask & (t_next < lengths)[:, None] & (s + 1 < s_end), stride_xt, stride_xb,
                                      T, H, G, PACKED)
        if SYNC:
            patience = grid_sync(group_counter(sync_ptr, d, pid_b), n_prog * (s - s_start + 1), patience, flag_ptr)
        else:
            tl.debug_barrier()
        if RESIDENT:
            h_full = tl.load(nxt + full_offs, mask=full_mask, other=0.0,
                             cache_modifier=".cg").to(w0.dtype)
        h_own = h_new
        c = c_new

    # A launch that ran no step (a stepwise launch outside this tile's active steps) leaves the
    # state alone.
    final_mask = own_mask & (s_start < s_end)
    tl.store(hn_ptr + state_rows + units[None, :], h_own.to(hn_ptr.dtype.element_ty), mask=final_mask)
    if not SYNC:  # a later launch goes on from here
        tl.store(state_ptr + state_rows + units[None, :], h_own, mask=final_mask)
    if CELL == LSTM:
        tl.store(cn_ptr + state_rows + units[None, :], c.to(cn_ptr.dtype.element_ty), mask=final_mask)
        if not SYNC:
            tl.store(state_ptr + slot + state_rows + units[None, :], c, mask=final_mask)


@dataclass(frozen=True)
class LaunchInfo:
    """What a launcher ran: the partition, the grid and whether it was one persistent launch."""

    kernel: str
    config: KernelConfig
    grid: tuple
    persistent: bool


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# (device, grid, constexprs, dtypes) -> whether the grid is co-resident.
_residency_cache: dict = {}


def _co_resident(compiled, n_programs: int, device: torch.device) -> bool:
    """Whether n_programs of this compiled kernel fit on the device at once.

    Programs per SM follow from registers (allocated per warp in units of 256), shared memory and
    threads; a persistent grid that does not fit would deadlock at its first barrier.
    """
    compiled._init_handles()
    props = torch.cuda.get_device_properties(device)
    warps = compiled.metadata.num_warps
    regs_per_warp = -(-max(compiled.n_regs, 1) * 32 // 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * warps)
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
    per_sm = min(by_regs, by_threads, 32)
    shared = compiled.metadata.shared
    if shared:
        smem_per_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
        per_sm = min(per_sm, smem_per_sm // (shared + 1024))  # 1 KB per block is reserved by CUDA
    return n_programs <= per_sm * props.multi_processor_count


class ForwardResult(NamedTuple):
    out: torch.Tensor  # [T, B, D*H] ([B, T, D*H] when batch_first; [N, D*H] when packed)
    h_n: torch.Tensor  # [D, B, H]
    c_n: torch.Tensor | None  # [D, B, H], LSTM only
    info: "LaunchInfo"
    saved: torch.Tensor | None  # [T, B, D, G+1, H] ([N, D, G+1, H] packed), input dtype (save=True, LSTM/GRU)


def on_input_device(launcher):
    """Run ``launcher(cell, x, ...)`` with x's GPU as the current device: Triton launches on the
    current device, which need not hold the tensors (a model on cuda:1, say)."""
    @functools.wraps(launcher)
    def guarded(cell, x, *args, **kwargs):
        if not x.is_cuda:
            return launcher(cell, x, *args, **kwargs)
        with torch.cuda.device(x.device):
            return launcher(cell, x, *args, **kwargs)
    return guarded


@on_input_device
def rnn_fwd(cell: Cell, x: torch.Tensor, weights, h0, c0, packing: Packing | None, batch_first: bool,
            config: KernelConfig | None = None, out=None, hn=None, cn=None, save: bool = False,
            first_step=None) -> ForwardResult:
    """Run one layer, every direction in one launch (or one launch per step).

    x: [T, B, I] ([B, T, I] when batch_first), or with ``packing`` the data of a PackedSequence
    [N, I] (then in and out stay packed, and the input projection covers real tokens only);
    weights: one (w_ih [G*H, I], w_hh [G*H, H], b_ih [G*H] or None, b_hh [G*H] or None) per
    direction, torch.nn's parameters as they are (nothing is stacked or copied);
    h0, c0: [D, B, H] or None (zeros).
    config: the partition; None takes the tuned one (autotuning on first use of a shape on CUDA,
    unless RNN_AUTOTUNE=0) or the heuristic default.
    out, hn, cn: optional preallocated outputs (tests poison them).
    save: also keep what the fused backward needs (training); inference keeps nothing.
    first_step: [D, B, G*H] or None, added to each direction's input projection at its first step
        (LSTM with proj_size runs on m = o * tanh(c) and folds h0 W_hh^T in here).
    """
    layer = _Layer(cell, x, weights, h0, c0, packing, batch_first, first_step)
    out = given_output("out", out, layer.empty_out(), strided=True)
    hn = given_output("hn", hn, torch.empty(layer.D, layer.B, layer.H, dtype=x.dtype, device=x.device))
    if layer.cell == Cell.LSTM:
        cn = given_output("cn", cn, torch.empty_like(hn))
    saved = None
    if save and layer.cell in (Cell.LSTM, Cell.GRU):
        rows = (packing.rows,) if packing is not None else (layer.T, layer.B)
        saved = torch.empty(*rows, layer.D, layer.cell.gates + 1, layer.H, dtype=x.dtype, device=x.device)
    cfg = config or _tuned_or_default(layer)
    info = layer.launch(cfg, out, hn, cn, saved=saved)
    return ForwardResult(out, hn, cn if layer.cell == Cell.LSTM else None, info, saved)


def check_weights(name: str, cell: Cell, weights, input_size: int):
    """The launchers' per-direction weights -> (D, H) after checking every shape: one or two
    directions, each (w_ih [G*H, I], w_hh [G*H, H], b_ih [G*H] or None, b_hh [G*H] or None)."""
    if len(weights) not in (1, 2):
        raise ValueError(f"{name}: weights must hold one or two directions, got {len(weights)}")
    G = Cell(cell).gates
    GH, H = weights[0][1].shape if weights[0][1].dim() == 2 else (None, None)
    if H is None or GH != G * H:
        raise ValueError(f"{name}: w_hh must have shape [{G}*H, H], got {list(weights[0][1].shape)}")
    shapes = ((GH, input_size), (GH, H), (GH,), (GH,))
    for d, w in enumerate(weights):
        for what, t, shape in zip(("w_ih", "w_hh", "b_ih", "b_hh"), w[:4], shapes):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name}: {what} must have shape {list(shape)} (direction {d}), got "
                                 f"{list(t.shape)}")
    return len(weights), H


def given_output(name: str, given: torch.Tensor | None, fresh: torch.Tensor, strided: bool = False) -> torch.Tensor:
    """A caller's preallocated output (tests poison them) if it has the shape, dtype and dense
    layout of ``fresh`` (any layout if ``strided``: the kernel takes its strides), else a clear
    error; ``fresh`` when none was given."""
    if given is None:
        return fresh
    if given.shape != fresh.shape or given.dtype != fresh.dtype or (given.stride() != fresh.stride() and not strided):
        raise ValueError(f"{name} must be a dense {fresh.dtype} tensor of shape {list(fresh.shape)}, got "
                         f"{given.dtype} {list(given.shape)} with strides {given.stride()}")
    return given


def dense(name: str, t: torch.Tensor | None, shape: tuple) -> torch.Tensor | None:
    """``t`` as a contiguous tensor of ``shape`` (None stays None): what a kernel that indexes it
    with computed offsets needs. A wrong shape is an error, never an out-of-bounds read."""
    if t is None:
        return None
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    return t.contiguous()


def input_projection(x: torch.Tensor, w_ih: torch.Tensor, bias) -> torch.Tensor:
    """x @ w_ih^T + bias over every row of x ([..., I] -> [..., F]), one GEMM (the bias in its
    epilogue), computed in x's memory order: a [T, B, I] view of a batch-first tensor gets a
    [T, B, F] view of a batch-first result instead of a copy of x (the kernels take the strides)."""
    if x.dim() == 3 and not x.is_contiguous() and x.transpose(0, 1).is_contiguous():
        return input_projection(x.transpose(0, 1), w_ih, bias).transpose(0, 1)
    x2d = x.reshape(-1, x.shape[-1])
    xw = torch.addmm(bias, x2d, w_ih.t()) if bias is not None else torch.mm(x2d, w_ih.t())
    return xw.view(*x.shape[:-1], w_ih.shape[0])


def layout_strides(seq: torch.Tensor, packing: Packing | None, batch_first: bool) -> tuple:
    """(time stride, sequence stride) of a padded [T, B, F] / [B, T, F] tensor; for packed data
    [N, F] (0, row stride)."""
    if seq.stride(-1) != 1 and seq.shape[-1] > 1:
        raise ValueError(f"a sequence tensor must be dense in its last dimension, got strides {seq.stride()}")
    if packing is not None:
        return 0, seq.stride(0)
    return (seq.stride(1), seq.stride(0)) if batch_first else (seq.stride(0), seq.stride(1))


class _Layer:
    """One layer's inputs with the input projection done: what every launch of it shares."""

    def __init__(self, cell, x, weights, h0, c0, packing, batch_first, first_step=None):
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"rnn_fwd: unsupported dtype {x.dtype}")
        self.cell = Cell(cell)
        self.D, self.H = check_weights("rnn_fwd", self.cell, weights, x.shape[-1])
        self.interpreting = env.interpreting()
        if x.device.type != "cuda" and not self.interpreting:
            raise RuntimeError("rnn_fwd: Triton kernels need a CUDA tensor or TRITON_INTERPRET=1")
        if packing is not None:
            self.T, self.B = packing.steps, packing.batch
        else:
            self.T, self.B = (x.shape[1], x.shape[0]) if batch_first else (x.shape[0], x.shape[1])
        self.packing, self.batch_first, self.device, self.dtype = packing, batch_first, x.device, x.dtype
        # The kernel indexes these as dense row-major tensors: any strides a caller hands in
        # (an expanded h0, a sliced weight) are made dense here (parameters already are: no copy).
        self.w_hh = [w[1].contiguous() for w in weights]
        self.b_hh = [w[3].contiguous() if w[3] is not None else None for w in weights]
        if (self.b_hh[0] is None) != (self.b_hh[-1] is None):
            raise ValueError("rnn_fwd: either every direction has b_hh or none has")
        self.h0 = dense("h0", h0, (self.D, self.B, self.H))
        self.c0 = dense("c0", c0, (self.D, self.B, self.H))
        # One GEMM per direction, each into its own buffer with b_ih in the epilogue.
        self.xw = [input_projection(x, w[0], w[2]) for w in weights]
        if first_step is not None:
            self._add_first_step(first_step)
        self.precision = fp32_precision(x)

    def _add_first_step(self, first_step):
        """Add first_step[d] ([B, G*H]) to direction d's input projection at its first step: time
        0 forward; in reverse each sequence's last time (T-1 unless packed)."""
        if self.packing is not None:
            self.xw[0][:self.B] += first_step[0]  # every sequence has a row at time 0, in order
            if self.D == 2:
                last = self.packing.lengths.long() - 1
                self.xw[1][self.packing.row(last, torch.arange(self.B, device=self.device))] += first_step[1]
            return
        xw = [t.transpose(0, 1) if self.batch_first else t for t in self.xw]  # [T, B, G*H] views
        xw[0][0] += first_step[0]
        if self.D == 2:
            xw[1][self.T - 1] += first_step[1]

    def empty_out(self, steps=None):
        if self.packing is not None:
            return torch.empty(self.packing.rows, self.D * self.H, dtype=self.dtype, device=self.device)
        T = self.T if steps is None else steps
        shape = (self.B, T) if self.batch_first else (T, self.B)
        return torch.empty(*shape, self.D * self.H, dtype=self.dtype, device=self.device)

    def default_config(self) -> KernelConfig:
        return default_forward_config(self.H, self.B, self.cell.gates, self.w_hh[0].element_size(),
                                      self.interpreting, self.D, _sm_count(self.device))

    def launch(self, cfg: KernelConfig, out, hn, cn, steps=None, saved=None, compile_only=False) -> LaunchInfo:
        """Run the first ``steps`` timesteps (all by default; padded inputs only) with partition
        ``cfg``; fill ``saved`` for backward when given. ``compile_only``: compile what its
        persistent launch would run, and run nothing (tuning compiles its candidates this way)."""
        T, B, H, D = (self.T if steps is None else steps), self.B, self.H, self.D
        xw = self.xw if steps is None else [t[:, :steps] if self.batch_first else t[:steps] for t in self.xw]
        packing = self.packing
        meta = kernel_meta(self.cell, D, H, cfg, has_h0=self.h0 is not None, has_c0=self.c0 is not None,
                           packed=packing is not None, has_bhh=self.b_hh[0] is not None,
                           upcast=self.interpreting and self.dtype == torch.bfloat16, precision=self.precision,
                           save=saved is not None)
        n_h = cdiv(H, cfg.hidden_block)
        grid = (n_h, cdiv(B, cfg.batch_block), D)
        if B == 0:
            return LaunchInfo("rnn_fwd_kernel", cfg, grid, False)
        acc = torch.float64 if self.dtype == torch.float64 else torch.float32
        # h is exchanged in the input dtype, the one the recurrent dot consumes: half the traffic
        # of fp32 for 16-bit inputs, the same results.
        hbuf = torch.empty(2, D, B, H, dtype=self.dtype, device=self.device)
        is_lstm = self.cell == Cell.LSTM
        state = torch.empty(2 if is_lstm else 1, D, B, H, dtype=acc, device=self.device)
        sync = barrier_counters(grid, self.device)
        flag, patience = watch.arm("rnn_fwd_kernel", grid, cfg, self.device)
        # Unused pointers get a valid tensor; their loads are compiled out by the constexpr flags.
        dummy = hbuf
        lengths, offsets = (packing.lengths, packing.offsets) if packing is not None else (None, None)
        # The reverse direction's pointers repeat the forward's where there is none.
        args = tuple(t if t is not None else dummy for t in (
            xw[0], self.w_hh[0], self.b_hh[0], xw[-1], self.w_hh[-1], self.b_hh[-1], self.h0, self.c0, lengths,
            offsets, out, hn, cn if is_lstm else None, hbuf, state, sync, flag, saved))
        args += (T, B, H, patience)
        strides = layout_strides(xw[0], packing, self.batch_first) + layout_strides(out, packing, self.batch_first)
        whole = (*args, 0, T, *strides)  # the persistent launch's arguments: every step
        if compile_only:
            rnn_fwd_kernel.warmup(*whole, SYNC=n_h > 1, launch_cooperative_grid=n_h > 1, grid=grid, **meta)
            return LaunchInfo("rnn_fwd_kernel", cfg, grid, True)
        persistent = _choose_persistent(rnn_fwd_kernel, cfg, grid, whole, meta, self.device, self.interpreting)

        def stepwise():
            for s in range(T):
                rnn_fwd_kernel[grid](*args, s, s + 1, *strides, SYNC=False, **meta)

        if persistent:
            persistent = run_persistent(
                _residency_key(rnn_fwd_kernel, grid, args, meta, self.device), stepwise,
                lambda: rnn_fwd_kernel[grid](*whole, SYNC=n_h > 1, launch_cooperative_grid=n_h > 1, **meta))
        else:
            stepwise()
        if self.device.type != "cuda":  # the interpreter ran it already: report a barrier that gave up now
            watch.check()
        return LaunchInfo("rnn_fwd_kernel", cfg, grid, persistent)


def cudnn_rnn_tf32() -> bool:
    """Whether torch.nn's cuDNN RNN runs float32 in TF32: torch.backends.cudnn.rnn.fp32_precision,
    where 'none' inherits cuDNN's and then the generic setting (the legacy
    torch.backends.cudnn.allow_tf32 sets them; on by default), not the matmul flag."""
    levels = (getattr(torch.backends.cudnn, "rnn", None), torch.backends.cudnn, torch.backends)
    for level in levels:
        value = getattr(level, "fp32_precision", None)
        if value is None:  # a torch before the fp32_precision settings
            return bool(torch.backends.cudnn.allow_tf32)
        if value in ("tf32", "ieee"):
            return value == "tf32"
    return False


def fp32_precision(x: torch.Tensor) -> str:
    """The recurrent matmuls' precision: float32 on CUDA uses TF32 exactly when torch.nn's cuDNN
    RNN does, so results and speed compare like for like; else full precision."""
    return "tf32" if x.dtype == torch.float32 and x.is_cuda and cudnn_rnn_tf32() else "ieee"


def barrier_counters(grid: tuple, device: torch.device) -> torch.Tensor:
    """One int32 counter per (direction, batch tile), each on its own 128-byte line, zeroed: the
    grid barrier's (a memset inside the launch's own work, so a CUDA graph replays it). With one
    program per group no barrier runs and nothing reads them: no memset."""
    n = grid[1] * grid[2] * COUNTER_STRIDE.value
    if grid[0] == 1:
        return torch.empty(n, dtype=torch.int32, device=device)
    return torch.zeros(n, dtype=torch.int32, device=device)


_caches: dict = {}


def autotune_cache() -> AutotuneCache:
    """The on-disk cache of tuned configs (its path from RNN_CACHE_DIR)."""
    path = os.path.join(env.cache_dir(), "autotune.json")
    if path not in _caches:
        _caches[path] = AutotuneCache(path)
    return _caches[path]


def layer_key(kernel: str, cell: Cell, H: int, B: int, dtype: torch.dtype, precision: str, D: int,
              device: torch.device) -> str:
    """The tuning key of one layer shape on this GPU and Triton."""
    name = str(dtype).removeprefix("torch.") + ("-tf32" if precision == "tf32" else "")
    return tuning_key(kernel, Cell(cell).name, H, B, name, D, _device_name(device), triton.__version__)


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _tuning_key(layer: _Layer) -> str:
    return layer_key("rnn_fwd", layer.cell, layer.H, layer.B, layer.dtype, layer.precision, layer.D, layer.device)


def may_tune(device: torch.device, batch: int) -> bool:
    """Tuning runs on CUDA only, with RNN_AUTOTUNE on, and not while a CUDA graph is being
    captured (it synchronises)."""
    return device.type == "cuda" and batch > 0 and env.autotune_enabled() \
        and not torch.cuda.is_current_stream_capturing()


def _tuned_or_default(layer: _Layer) -> KernelConfig:
    """The cached winner for this shape; on a miss, tune now (where may_tune) or take the
    heuristic default."""
    if not may_tune(layer.device, layer.B):
        return layer.default_config()
    key = _tuning_key(layer)
    cfg = autotune_cache().get(key)
    if cfg is None:
        if layer.packing is not None:  # a packed batch runs as tuned for its padded shape
            return layer.default_config()
        cfg, _ = _tune(layer, key)
    return cfg


TUNE_STEPS = 64  # timesteps each candidate runs while tuning; the time per step is what counts


@on_input_device
def tune_forward(cell: Cell, x, weights, batch_first: bool = False):
    """Tune one layer shape now (whatever the cache holds) on these inputs (weights as rnn_fwd
    takes them), and cache the winner.

    Returns (tuning key, winner, {candidate name: ms per step}, the heuristic default).
    """
    layer = _Layer(cell, x, weights, None, None, None, batch_first)
    if layer.device.type != "cuda":
        raise RuntimeError("tune_forward times kernels on a GPU: it needs CUDA tensors")
    key = _tuning_key(layer)
    winner, timings = _tune(layer, key)
    return key, winner, timings, layer.default_config()


def _tune(layer: _Layer, key: str, repeats: int = 3):
    """Time every candidate on the layer's own inputs, cache and return the fastest, with each
    candidate's milliseconds per step (inf where it failed to compile or launch)."""
    steps = min(layer.T, TUNE_STEPS)
    out = layer.empty_out(steps)
    hn = torch.empty(layer.D, layer.B, layer.H, dtype=layer.dtype, device=layer.device)
    cn = torch.empty_like(hn)
    candidates = candidate_configs(layer.H, layer.B, layer.cell.gates, layer.w_hh[0].element_size(), layer.D,
                                   _sm_count(layer.device))
    return time_candidates(key, candidates, lambda cfg: layer.launch(cfg, out, hn, cn, steps), steps,
                           layer.device, repeats,
                           compile=lambda cfg: layer.launch(cfg, out, hn, cn, steps, compile_only=True))


PROGRESS_AFTER_S = 2.0  # tuning that takes longer prints one progress line


def time_candidates(key: str, candidates: list, run, steps: int, device: torch.device, repeats: int = 3,
                    compile=None):
    """Time run(cfg) (``steps`` timesteps) for each candidate; cache the fastest under ``key`` and
    return it with each candidate's milliseconds per step (inf where it failed to compile or
    launch). candidates[0], the default, wins if every one fails. ``compile(cfg)``, given,
    compiles a candidate without running it: all are compiled in parallel first (in worker
    processes where they run: kernels.tuning)."""
    if compile is not None:
        compile_in_parallel(compile, candidates, device)
    timings = {}
    best, best_ms = candidates[0], math.inf
    start, told = time.perf_counter(), False
    for i, cfg in enumerate(candidates):
        if not told and time.perf_counter() - start > PROGRESS_AFTER_S:
            # One line, so that a first call that takes a while says why (and only once).
            print(f"fused-rnn: tuning {key.split('|code=')[0]}: {len(candidates)} candidates, {i} done; the "
                  f"winner is cached in {autotune_cache().path} (RNN_AUTOTUNE=0 skips tuning)", file=sys.stderr,
                  flush=True)
            told = True
        try:
            run(cfg)  # compiles; also the warm-up
            ms = _time_ms(lambda: run(cfg), repeats, device) / steps
            watch.check()  # synchronised: a barrier that gave up fails this candidate, not the next
        # A candidate this device cannot compile or run. Triton's errors (OutOfResources,
        # PTXASError, CompilationError) derive from TritonError, not RuntimeError.
        except (triton.errors.TritonError, ValueError, RuntimeError) as exc:
            broken = _broken_context(device)
            if broken is not None:
                # Every later candidate would fail too and the default be cached as the winner.
                reason = str(broken).splitlines()[0] if str(broken) else type(broken).__name__
                raise RuntimeError(f"tuning {key.split('|code=')[0]}: candidate {describe(cfg)} left the CUDA "
                                   f"context unusable ({reason}); "
                                   f"nothing was cached. Rerun with RNN_AUTOTUNE=0 to use the default config, "
                                   f"and please report the candidate.") from exc
            ms = math.inf
        timings[describe(cfg)] = ms
        if ms < best_ms:
            best, best_ms = cfg, ms
    autotune_cache().put(key, best, {k: v for k, v in timings.items() if math.isfinite(v)})
    return best, timings


def _broken_context(device: torch.device):
    """The error a synchronisation raises where a CUDA error has left the context unusable (an
    illegal address, a device-side assert: sticky, every later call fails); None where it works."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
    except Exception as exc:  # torch raises RuntimeError (AcceleratorError in recent versions)
        return exc
    return None


def _time_ms(run, repeats: int, device: torch.device) -> float:
    """Milliseconds per call of run(): CUDA events on a GPU, the wall clock elsewhere (where only
    the tests tune, through the interpreter)."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        return (time.perf_counter() - start) * 1e3 / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else H100_SMS


@functools.lru_cache(maxsize=4096)  # a pure function of its arguments, on every launch's host path
def kernel_meta(cell: Cell, D: int, H: int, cfg: KernelConfig, *, has_h0: bool, has_c0: bool, packed: bool,
                has_bhh: bool, upcast: bool, precision: str, save: bool = False) -> dict:
    """The constexprs and launch options of rnn_fwd_kernel for one layer and config (all but
    SYNC, which depends on the launch mode)."""
    cell = Cell(cell)
    fused = cfg.fused_gates and cell.gates > 1  # one gate has nothing to fuse
    if (4 if fused else 1) * cfg.hidden_block < MIN_TILE:
        raise ValueError(f"hidden_block={cfg.hidden_block} makes a dot narrower than {MIN_TILE} columns"
                         + ("" if fused else "; use at least 16, or fused_gates for LSTM/GRU"))
    check_stages(cfg, k_block(H))
    check_split(cfg, k_block(H))
    return dict(CELL=int(cell), G=cell.gates, D=D, HB=cfg.hidden_block, BB=cfg.batch_block, BK=k_block(H),
                KB=min(cfg.k_block or k_block(H), k_block(H)), STAGES=cfg.num_stages, FUSED=fused, HAS_H0=has_h0,
                HAS_C0=has_c0, PACKED=packed, HAS_BHH=has_bhh, UPCAST=upcast, PRECISION=precision, SAVE=save,
                KW=cfg.split_k,
                num_warps=cfg.num_warps,
                # Left to itself ptxas tends to cap itself at 128 registers and spill: streaming
                # W_hh, and (since b_hh is added in the kernel) resident LSTM fp32 H=256 and GRU
                # bf16 H=64 defaults (sm_90 compiles). Given the one-program-per-SM budget none does.
                maxnreg=max_registers(cfg.num_warps),
                # No software pipelining of the time loop (the K loop has STAGES): it could hoist
                # the next step's h load above the barrier.
                num_stages=1)


def max_registers(num_warps: int) -> int:
    """All the registers a thread may have with one program per SM (what persistent grids assume)."""
    return min(255, 65536 // (32 * num_warps))


def _residency_key(kernel, grid, args, meta, device) -> tuple:
    # Registers and shared memory depend on the constexprs and dtypes, not on T or B's value.
    return (kernel, device.index, grid, tuple(sorted(meta.items())), args[0].dtype, args[1].dtype)


_warned_refusal = []


def run_persistent(key, stepwise, persistent) -> bool:
    """Run ``persistent()`` (a cooperative launch). Where the driver refuses it (its residency limits
    differ from our estimate, e.g. under MPS or with other work resident), warn once, remember the
    grid as not co-resident (residency ``key``) and run ``stepwise()`` (a launch per step) instead:
    never an error for the user. Returns whether the launch was persistent."""
    try:
        persistent()
        return True
    except RuntimeError as exc:  # Triton reports the driver's refusal as a RuntimeError
        if "cooperative" not in str(exc).lower():
            raise
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    _residency_cache[key] = False
    if not _warned_refusal:
        _warned_refusal.append(reason)
        warnings.warn(f"the driver refused a persistent (cooperative) launch ({reason}); running that grid with "
                      f"one launch per step instead, which is slower", RuntimeWarning, stacklevel=3)
    stepwise()
    return False


def _choose_persistent(kernel, cfg, grid, args, meta, device, interpreting) -> bool:
    """Whether to run ``kernel`` as one persistent launch with positional ``args``. Its residency
    is read from the compile of exactly those arguments (Triton specialises integers equal to 1
    or divisible by 16), which the launch then reuses: one compile, not two."""
    single = grid[0] == 1  # one program per group needs no grid barrier
    if interpreting:
        # The interpreter runs programs one after another: a barrier between them would deadlock.
        if cfg.persistent and not single:
            raise ValueError("a persistent launch with several programs per group cannot run under "
                             "the Triton interpreter; use persistent=False or one hidden block")
        return single if cfg.persistent is None else cfg.persistent
    if cfg.persistent is False:
        return False
    n_programs = grid[0] * grid[1] * grid[2]
    key = _residency_key(kernel, grid, args, meta, device)
    fits = _residency_cache.get(key)
    if fits is None:
        fits = single
        if not single:
            compiled = kernel.warmup(*args, SYNC=True, launch_cooperative_grid=True, grid=grid, **meta)
            fits = _co_resident(compiled, n_programs, device)
        _residency_cache[key] = fits
    if cfg.persistent and not fits:
        raise ValueError(f"a persistent launch of {n_programs} programs is not co-resident on "
                         f"{torch.cuda.get_device_name(device)}; use persistent=False or None")
    return fits

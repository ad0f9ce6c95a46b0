"""Persistent forward kernel of one recurrent layer (both directions) and its launcher."""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels import env
from kernels.barrier import grid_sync
from kernels.cells import GRU, LSTM, Cell, gru_cell, lstm_cell, rnn_cell
from kernels.configs import ForwardConfig, default_forward_config, k_block


@triton.jit
def _load_state(init_ptr, buf_ptr, offs, mask, step, HAS_INIT: tl.constexpr, ACC: tl.constexpr):
    """State before ``step``: the caller's initial state at step 0 (zeros without one), else the
    state buffer that the previous step (or launch) wrote."""
    value = tl.load(buf_ptr + offs, mask=mask & (step != 0), other=0.0, cache_modifier=".cg").to(ACC)
    if HAS_INIT:
        value += tl.load(init_ptr + offs, mask=mask & (step == 0), other=0.0).to(ACC)
    return value


@triton.jit
def _gate_weight(w_ptr, gate, H, offs, mask, UPCAST: tl.constexpr):
    """One gate's [K, HB] slice of W_hh^T; bf16 is upcast where the interpreter cannot dot it."""
    w = tl.load(w_ptr + gate * H * H + offs, mask=mask, other=0.0)
    if UPCAST:
        w = w.to(tl.float32)
    return w


@triton.jit
def _gate_input(x_ptr, gate, H, mask, ACC: tl.constexpr):
    return tl.load(x_ptr + gate * H, mask=mask, other=0.0).to(ACC)


@triton.jit
def _dot(h, w, PRECISION: tl.constexpr, ACC: tl.constexpr):
    return tl.dot(h.to(w.dtype), w, input_precision=PRECISION, out_dtype=ACC)


@triton.jit(do_not_specialize=["T", "t0", "t1"])
def rnn_fwd_kernel(
    xw_ptr,  # [T, B, D*G*H] (or [B, T, ...]): x @ W_ih^T + biases, b_hn left out for GRU
    w_hh_ptr,  # [D, G*H, H]
    b_hn_ptr,  # [D, H], GRU only
    h0_ptr,  # [D, B, H]
    c0_ptr,  # [D, B, H], LSTM only
    len_ptr,  # [B] int32 sequence lengths
    out_ptr,  # [T, B, D*H] (or [B, T, D*H])
    hn_ptr,  # [D, B, H]
    cn_ptr,  # [D, B, H], LSTM only
    hbuf_ptr,  # [2, D, B, H] accumulator dtype: ping-pong exchange of h between programs
    cbuf_ptr,  # [D, B, H] accumulator dtype: c carried between stepwise launches
    sync_ptr,  # [D * batch tiles] int32 barrier counters, zero at launch
    T, B, H, t0, t1,  # this launch runs steps [t0, t1) of T
    stride_xt, stride_xb, stride_ot, stride_ob,
    CELL: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
    HB: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr, KB: tl.constexpr,
    HAS_H0: tl.constexpr, HAS_C0: tl.constexpr, HAS_LEN: tl.constexpr, HAS_BHN: tl.constexpr,
    SYNC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (hidden blocks, batch tiles, directions). Program (p, b, d) owns hidden units
    [p*HB, (p+1)*HB) of direction d, all gates, for batch rows [b*BB, (b+1)*BB).

    KB == BK: the program's rows of W_hh stay on-chip for every step and h_{t-1} is read whole.
    KB < BK: the reduction over H runs in chunks of KB, W_hh and h streamed from L2 each step
    (for slices too large to keep on-chip).
    """
    ACC: tl.constexpr = hbuf_ptr.dtype.element_ty
    RESIDENT: tl.constexpr = KB == BK
    pid_h = tl.program_id(0)
    pid_b = tl.program_id(1)
    d = tl.program_id(2)
    n_prog = tl.num_programs(0)

    units = pid_h * HB + tl.arange(0, HB)
    rows = pid_b * BB + tl.arange(0, BB)
    unit_ok = units < H
    row_ok = rows < B
    own_mask = row_ok[:, None] & unit_ok[None, :]
    w_dir = w_hh_ptr + d * G * H * H
    state_rows = d * B * H + rows[:, None] * H
    slot = D * B * H

    ks = tl.arange(0, KB)
    # Weights of the first K chunk, transposed to [KB, HB]; when resident, all of them.
    w_offs = units[None, :] * H + ks[:, None]
    w_mask = (ks < H)[:, None] & unit_ok[None, :]
    full_mask = row_ok[:, None] & (ks < H)[None, :]
    w0 = _gate_weight(w_dir, 0, H, w_offs, w_mask, UPCAST)
    w1 = w0
    w2 = w0
    w3 = w0
    if RESIDENT:
        if G >= 3:
            w1 = _gate_weight(w_dir, 1, H, w_offs, w_mask, UPCAST)
            w2 = _gate_weight(w_dir, 2, H, w_offs, w_mask, UPCAST)
        if G == 4:
            w3 = _gate_weight(w_dir, 3, H, w_offs, w_mask, UPCAST)
        h_full = _load_state(h0_ptr, hbuf_ptr + (t0 % 2) * slot, state_rows + ks[None, :], full_mask, t0,
                             HAS_H0, ACC)
    b_hn = tl.zeros([HB], ACC)
    if HAS_BHN:
        b_hn = tl.load(b_hn_ptr + d * H + units, mask=unit_ok, other=0.0).to(ACC)
    if HAS_LEN:
        lengths = tl.load(len_ptr + rows, mask=row_ok, other=0)

    h_own = _load_state(h0_ptr, hbuf_ptr + (t0 % 2) * slot, state_rows + units[None, :], own_mask, t0,
                        HAS_H0, ACC)
    c = tl.zeros([BB, HB], ACC)
    if CELL == LSTM:
        c = _load_state(c0_ptr, cbuf_ptr, state_rows + units[None, :], own_mask, t0, HAS_C0, ACC)

    rows64 = rows.to(tl.int64)
    for s in range(t0, t1):
        t = s + d * (T - 1 - 2 * s)  # the reverse direction walks time backwards
        # Recurrent pre-activations h_{t-1} W_hh^T of this program's units, one per gate.
        if RESIDENT:
            a0 = _dot(h_full, w0, PRECISION, ACC)
            a1 = a0
            a2 = a0
            a3 = a0
            if G >= 3:
                a1 = _dot(h_full, w1, PRECISION, ACC)
                a2 = _dot(h_full, w2, PRECISION, ACC)
            if G == 4:
                a3 = _dot(h_full, w3, PRECISION, ACC)
        else:
            a0 = tl.zeros([BB, HB], ACC)
            a1 = a0
            a2 = a0
            a3 = a0
            src = hbuf_ptr + (s % 2) * slot
            for k0 in range(0, BK, KB):
                kk = k0 + ks
                h_chunk = _load_state(h0_ptr, src, state_rows + kk[None, :], row_ok[:, None] & (kk < H)[None, :],
                                      s, HAS_H0, ACC)
                chunk_offs = w_offs + k0
                chunk_mask = (kk < H)[:, None] & unit_ok[None, :]
                a0 += _dot(h_chunk, _gate_weight(w_dir, 0, H, chunk_offs, chunk_mask, UPCAST), PRECISION, ACC)
                if G >= 3:
                    a1 += _dot(h_chunk, _gate_weight(w_dir, 1, H, chunk_offs, chunk_mask, UPCAST), PRECISION, ACC)
                    a2 += _dot(h_chunk, _gate_weight(w_dir, 2, H, chunk_offs, chunk_mask, UPCAST), PRECISION, ACC)
                if G == 4:
                    a3 += _dot(h_chunk, _gate_weight(w_dir, 3, H, chunk_offs, chunk_mask, UPCAST), PRECISION, ACC)

        x_ptr = xw_ptr + t.to(tl.int64) * stride_xt + rows64[:, None] * stride_xb + d * G * H + units[None, :]
        if CELL == LSTM:
            h_new, c_new = lstm_cell(a0 + _gate_input(x_ptr, 0, H, own_mask, ACC),
                                     a1 + _gate_input(x_ptr, 1, H, own_mask, ACC),
                                     a2 + _gate_input(x_ptr, 2, H, own_mask, ACC),
                                     a3 + _gate_input(x_ptr, 3, H, own_mask, ACC), c)
        elif CELL == GRU:
            h_new = gru_cell(a0 + _gate_input(x_ptr, 0, H, own_mask, ACC),
                             a1 + _gate_input(x_ptr, 1, H, own_mask, ACC),
                             _gate_input(x_ptr, 2, H, own_mask, ACC), a2 + b_hn[None, :], h_own)
            c_new = c
        else:
            h_new = rnn_cell(a0 + _gate_input(x_ptr, 0, H, own_mask, ACC), CELL)
            c_new = c
        y = h_new
        if HAS_LEN:
            # Past its length a sequence keeps its state and outputs zeros, as torch's padded output.
            active = (t < lengths)[:, None]
            h_new = tl.where(active, h_new, h_own)
            c_new = tl.where(active, c_new, c)
            y = tl.where(active, y, 0.0)
        tl.store(out_ptr + t.to(tl.int64) * stride_ot + rows64[:, None] * stride_ob + d * H + units[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=own_mask)
        nxt = hbuf_ptr + ((s + 1) % 2) * slot
        tl.store(nxt + state_rows + units[None, :], h_new, mask=own_mask)
        if SYNC:
            grid_sync(sync_ptr + d * tl.num_programs(1) + pid_b, n_prog * (s - t0 + 1))
        else:
            tl.debug_barrier()
        if RESIDENT:
            h_full = tl.load(nxt + state_rows + ks[None, :], mask=full_mask, other=0.0, cache_modifier=".cg")
        h_own = h_new
        c = c_new

    tl.store(hn_ptr + state_rows + units[None, :], h_own.to(hn_ptr.dtype.element_ty), mask=own_mask)
    if CELL == LSTM:
        tl.store(cn_ptr + state_rows + units[None, :], c.to(cn_ptr.dtype.element_ty), mask=own_mask)
        tl.store(cbuf_ptr + state_rows + units[None, :], c, mask=own_mask)


@dataclass(frozen=True)
class LaunchInfo:
    """What a launcher ran: the partition, the grid and whether it was one persistent launch."""

    kernel: str
    config: ForwardConfig
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


def rnn_fwd(cell: Cell, x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, bias, b_hn, h0, c0,
            lengths, batch_first: bool, config: ForwardConfig | None = None, out=None, hn=None, cn=None):
    """Run one layer, every direction in one launch (or one launch per step).

    x: [T, B, I] ([B, T, I] when batch_first); w_ih: [D*G*H, I] (directions stacked);
    w_hh: [D, G*H, H]; bias: [D*G*H] or None (b_ih + b_hh, except GRU's b_hn); b_hn: [D, H] or None;
    h0, c0: [D, B, H] or None (zeros); lengths: [B] int32 on x's device or None.
    out, hn, cn: optional preallocated outputs (tests poison them).
    Returns (out [T, B, D*H] or [B, T, D*H], h_n [D, B, H], c_n [D, B, H] or None, LaunchInfo).
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"rnn_fwd: unsupported dtype {x.dtype}")
    D, GH, H = w_hh.shape
    cell = Cell(cell)
    G = cell.gates
    if GH != G * H:
        raise ValueError(f"rnn_fwd: w_hh must have shape [D, {G}*H, H], got {list(w_hh.shape)}")
    T, B = (x.shape[1], x.shape[0]) if batch_first else (x.shape[0], x.shape[1])
    interpreting = env.interpreting()
    if x.device.type != "cuda" and not interpreting:
        raise RuntimeError("rnn_fwd: Triton kernels need a CUDA tensor or TRITON_INTERPRET=1")

    x2d = x.reshape(-1, x.shape[-1])
    xw = torch.addmm(bias, x2d, w_ih.t()) if bias is not None else x2d @ w_ih.t()
    xw = xw.view(x.shape[0], x.shape[1], D * G * H)
    if out is None:
        out = torch.empty(x.shape[0], x.shape[1], D * H, dtype=x.dtype, device=x.device)
    if hn is None:
        hn = torch.empty(D, B, H, dtype=x.dtype, device=x.device)
    is_lstm = cell == Cell.LSTM
    if is_lstm and cn is None:
        cn = torch.empty(D, B, H, dtype=x.dtype, device=x.device)

    cfg = config or default_forward_config(H, B, G, w_hh.element_size(), interpreting)
    n_h = triton.cdiv(H, cfg.hidden_block)
    grid = (n_h, triton.cdiv(B, cfg.batch_block), D)
    if B == 0:
        return out, hn, cn, LaunchInfo("rnn_fwd_kernel", cfg, grid, False)

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    hbuf = torch.empty(2, D, B, H, dtype=acc, device=x.device)
    cbuf = torch.empty(D, B, H, dtype=acc, device=x.device) if is_lstm else hbuf
    sync = torch.zeros(grid[1] * D, dtype=torch.int32, device=x.device)
    # Unused pointers get a valid tensor; their loads are compiled out by the HAS_* flags.
    dummy = hbuf
    precision = "tf32" if (x.dtype == torch.float32 and x.is_cuda
                           and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    args = (xw, w_hh, b_hn if b_hn is not None else dummy, h0 if h0 is not None else dummy,
            c0 if c0 is not None else dummy, lengths if lengths is not None else dummy,
            out, hn, cn if is_lstm else dummy, hbuf, cbuf, sync, T, B, H)
    strides = (xw.stride(1), xw.stride(0)) if batch_first else (xw.stride(0), xw.stride(1))
    strides += (out.stride(1), out.stride(0)) if batch_first else (out.stride(0), out.stride(1))
    meta = dict(CELL=int(cell), G=G, D=D, HB=cfg.hidden_block, BB=cfg.batch_block, BK=k_block(H),
                KB=min(cfg.k_block or k_block(H), k_block(H)),
                HAS_H0=h0 is not None, HAS_C0=c0 is not None, HAS_LEN=lengths is not None,
                HAS_BHN=b_hn is not None, UPCAST=interpreting and x.dtype == torch.bfloat16,
                PRECISION=precision, num_warps=cfg.num_warps,
                # No software pipelining: it could hoist the next step's h load above the barrier.
                num_stages=1)

    persistent = _choose_persistent(cfg, grid, args, strides, meta, x.device, interpreting)
    if persistent:
        rnn_fwd_kernel[grid](*args, 0, T, *strides, SYNC=n_h > 1, launch_cooperative_grid=n_h > 1, **meta)
    else:
        for s in range(T):
            rnn_fwd_kernel[grid](*args, s, s + 1, *strides, SYNC=False, **meta)
    return out, hn, (cn if is_lstm else None), LaunchInfo("rnn_fwd_kernel", cfg, grid, persistent)


def _choose_persistent(cfg, grid, args, strides, meta, device, interpreting) -> bool:
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
    # Registers and shared memory depend on the constexprs and dtypes, not on T or B's value.
    key = (device.index, grid, tuple(sorted(meta.items())), args[0].dtype, args[1].dtype)
    fits = _residency_cache.get(key)
    if fits is None:
        fits = single
        if not single:
            compiled = rnn_fwd_kernel.warmup(*args, 0, 1, *strides, SYNC=True, launch_cooperative_grid=True,
                                             grid=grid, **meta)
            fits = _co_resident(compiled, n_programs, device)
        _residency_cache[key] = fits
    if cfg.persistent and not fits:
        raise ValueError(f"a persistent launch of {n_programs} programs is not co-resident on "
                         f"{torch.cuda.get_device_name(device)}; use persistent=False or None")
    return fits

"""Stacking, directions, inter-layer dropout, packed sequences and hx handling over one per-layer
implementation: the fused layer (the rnn::layer_fwd op, rnn/ops.py) or the pure-PyTorch reference.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from kernels import env
from kernels.cells import Cell
from kernels.forward import SUPPORTED_DTYPES, LaunchInfo
from rnn import reference
from rnn.ops import FusedLayer, group_weights, layer_backend, layer_inference


@dataclass
class ForwardPath:
    """Which implementation ran a forward, and each fused launch (one per layer); after a
    backward through it, also the backward's launches (last layer first)."""

    backend: str  # "triton", "reference" or "native" (torch.nn's own CPU implementation)
    launches: list[LaunchInfo] = field(default_factory=list)
    reason: str = ""  # why the kernels did not run (reference or native)
    backward_launches: list[LaunchInfo] = field(default_factory=list)


_NATIVE_REASON = "no Triton backend for CPU tensors without TRITON_INTERPRET=1: torch.nn's own implementation ran"


def choose_backend(x: torch.Tensor) -> ForwardPath:
    """RNN_BACKEND=auto runs the kernels on CUDA tensors and on CPU tensors under the Triton
    interpreter, and torch.nn's own implementation ("native") on other CPU tensors; =triton
    insists on the kernels (an error where they cannot run); =reference runs the pure-PyTorch loop."""
    choice = env.backend()
    backend = layer_backend(x.device, choice)
    if backend == "reference":
        return ForwardPath("reference", reason="RNN_BACKEND=reference")
    if backend == "native":
        if choice == "triton":
            raise RuntimeError(f"RNN_BACKEND=triton needs a CUDA tensor or TRITON_INTERPRET=1, "
                               f"got a tensor on {x.device}")
        return ForwardPath("native", reason=_NATIVE_REASON)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the fused kernels support {', '.join(map(str, SUPPORTED_DTYPES))}, got {x.dtype}")
    return ForwardPath("triton")


def rnn(cell: Cell, input, hx, flat_weights, *, num_layers: int, bidirectional: bool, batch_first: bool,
        dropout: float, training: bool, has_bias: bool, proj_size: int = 0, path: ForwardPath | None = None):
    """The whole stack. input: a tensor ([T, B, I], or [B, T, I] when batch_first) or a
    PackedSequence whose batch order hx already follows (sorted). hx: h0 [L*D, B, H_out] or None,
    and for LSTM a pair (h0, c0) or None. Returns (output, h_n, c_n or None, ForwardPath); output
    is a PackedSequence when input is one (both paths work on its packed data between layers).

    Layers run time-major, as torch.nn's do, so that inter-layer dropout sees the tensor torch.nn's
    sees (each layer's [T, B, D*H] output, or the packed data) and draws the same masks from the
    same generator state; a batch-first output is a transposed view, as torch.nn's is.
    path: the backend to run (default: choose_backend's); "native" runs the layers through the
    ops' native CPU implementation.
    """
    D = 2 if bidirectional else 1
    packed = isinstance(input, PackedSequence)
    h0, c0 = (hx if hx is not None else (None, None)) if cell == Cell.LSTM else (hx, None)
    path = path or choose_backend(input.data if packed else input)
    batch_sizes = input.batch_sizes if packed else None
    # Packed: the layers read and write torch's packed layout (real tokens only).
    x = input.data if packed else (input.transpose(0, 1) if batch_first else input)
    compiling = torch.compiler.is_compiling()

    per_direction = 2 + 2 * has_bias + (proj_size > 0)
    per_layer = per_direction * D
    h_ns, c_ns = [], []
    for layer in range(num_layers):
        flat = flat_weights[layer * per_layer:(layer + 1) * per_layer]
        states = [s[layer * D:(layer + 1) * D] if s is not None else None for s in (h0, c0)]
        if path.backend == "reference":
            x, h_n, c_n = reference.layer(cell, x, batch_sizes, states, group_weights(flat, has_bias, proj_size > 0))
        else:
            save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *states, *flat))
            if compiling:  # the op's registered autograd: one graph node (see rnn/ops.py)
                x, h_n, c_n, *_ = torch.ops.rnn.layer_fwd(x, *states, flat, batch_sizes, int(cell), has_bias,
                                                          proj_size > 0, save, path.backend)
            elif save:
                x, h_n, c_n, *_ = FusedLayer.apply(x, *states, batch_sizes, int(cell), has_bias, proj_size > 0, save,
                                                   path, *flat)
            else:
                x, h_n, c_n, *_ = layer_inference(x, *states, batch_sizes, int(cell), has_bias, proj_size > 0, path,
                                                  flat)
        h_ns.append(h_n)
        c_ns.append(c_n)
        if dropout and training and layer < num_layers - 1:
            # torch.nn's layers hand dropout a dense tensor; its masks follow memory order.
            x = F.dropout(x.contiguous(), dropout, training=True)
    h_n = torch.cat(h_ns) if num_layers > 1 else h_ns[0]
    c_n = (torch.cat(c_ns) if num_layers > 1 else c_ns[0]) if cell == Cell.LSTM else None
    if packed:
        x = PackedSequence(x, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
    elif batch_first:
        x = x.transpose(0, 1)
    return x, h_n, c_n, path


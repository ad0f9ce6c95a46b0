"""The ``flashrnn`` registry entry: the FlashRNN package (PyPI ``flashrnn``), the best published
peer, on torch.nn's weights.

FlashRNN is functional: ``flashrnn(Wx, R, b, function=..., backend=...)`` runs one unidirectional
layer on precomputed input projections ``Wx`` [B, T, G, heads, H], a recurrent matrix ``R``
[G, heads, H_out, H_in] and a bias ``b`` [G_b, heads, H], and returns every step's states
[S, B, T, heads, H] (h first). With one head it computes torch.nn's cells exactly:

- LSTM (``lstm``) and RNN_TANH (``elman``): gates in torch.nn's order; ``b`` is b_ih + b_hh.
- GRU (``gru``): ``Wx`` holds r, z, n of W_ih x (no bias); ``R`` holds W_hn, W_hr, W_hz (n first);
  ``b`` holds b_hn, b_ir + b_hr, b_iz + b_hz, b_in, so that h' = z h + (1 - z) tanh(W_in x + b_in
  + r (W_hn h + b_hn)).

A stacked or bidirectional module runs as a user would write it: one call per layer and
direction, the reverse direction on the time-flipped sequence. Its pure-PyTorch ``vanilla``
backend runs on the CPU, where tests check this mapping against torch.nn; the measured entry runs
on CUDA the fastest of its compiled backends that runs the case (profiling.impls.build_flashrnn).
"""
import importlib.util

import torch

from profiling.cases import Case

FUNCTIONS = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "elman"}  # FlashRNN has no ReLU RNN
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
               torch.float64: "float64"}


def unavailable() -> str | None:
    """Why the entry cannot run here, or None."""
    if importlib.util.find_spec("flashrnn") is None:
        return "flashrnn is not installed (pip install flashrnn)"
    return None


def supports(case: Case) -> bool:
    return case.cell in FUNCTIONS and not case.proj_size and not case.packed


def backends(case: Case) -> list[str]:
    """Its compiled backends that may run the case, in the order tried: the fused CUDA kernel,
    the alternating CUDA one, and (LSTM with one head of at most 64 units) the fused Triton one.
    Its cuda_fused runs GRU as cuda, so GRU tries cuda alone."""
    names = ["cuda"] if case.cell == "GRU" else ["cuda_fused", "cuda"]
    if case.cell == "LSTM" and case.hidden_size <= 64:
        names.append("triton_fused")
    return names


def layer_arguments(cell: str, x: torch.Tensor, w_ih, w_hh, b_ih, b_hh):
    """(Wx, R, b) of one layer and direction for x [T, B, I] (time-major), one head."""
    H = w_hh.shape[1]
    G = w_hh.shape[0] // H
    T, B = x.shape[:2]
    wx = (x.transpose(0, 1) @ w_ih.t()).view(B, T, G, 1, H)  # [B, T, G*H]: batch-major, as FlashRNN takes it
    if b_ih is None:
        b_ih = b_hh = w_hh.new_zeros(G * H)
    if cell == "GRU":
        r, z, n = w_hh.view(3, H, H)
        recurrent = torch.stack((n, r, z)).view(3, 1, H, H)
        bi, bh = b_ih.view(3, H), b_hh.view(3, H)
        bias = torch.stack((bh[2], bi[0] + bh[0], bi[1] + bh[1], bi[2])).view(4, 1, H)
    else:
        recurrent = w_hh.view(G, 1, H, H)
        bias = (b_ih + b_hh).view(G, 1, H)
    return wx, recurrent, bias


class FlashRNNStack(torch.nn.Module):
    """torch.nn's module (its parameters, layers and directions) run through flashrnn(); returns
    (output [T, B, D*H], None) for a time-major input."""

    def __init__(self, module: torch.nn.RNNBase, cell: str, backend: str):
        super().__init__()
        if cell not in FUNCTIONS or module.proj_size or module.batch_first:
            raise ValueError(f"FlashRNNStack runs time-major LSTM, GRU and RNN_TANH without projection, "
                             f"got {cell}")
        from flashrnn import flashrnn
        self.flashrnn = flashrnn
        self.module, self.cell, self.backend = module, cell, backend

    def forward(self, x):
        m = self.module
        T, B = x.shape[:2]
        dtype = DTYPE_NAMES[x.dtype]
        for layer in range(m.num_layers):
            outs = []
            for suffix in ("", "_reverse")[:2 if m.bidirectional else 1]:
                params = [getattr(m, f"{name}_l{layer}{suffix}", None)
                          for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                seq = x if not suffix else x.flip(0)
                wx, recurrent, bias = layer_arguments(self.cell, seq, *params)
                states, _ = self.flashrnn(wx, recurrent, bias, function=FUNCTIONS[self.cell], backend=self.backend,
                                          dtype=dtype)
                y = states[0].reshape(B, T, m.hidden_size).transpose(0, 1)  # h of every step, time-major
                outs.append(y if not suffix else y.flip(0))
            x = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        return x, None

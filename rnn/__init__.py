"""Drop-in replacements for torch.nn.RNN, LSTM and GRU on fused persistent Triton kernels."""
from rnn.compiling import compile
from rnn.functional import ForwardPath
from rnn.modules import GRU, LSTM, RNN, from_torch, to_torch

__all__ = ["RNN", "LSTM", "GRU", "from_torch", "to_torch", "compile", "ForwardPath"]

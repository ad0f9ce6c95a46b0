"""Drop-in rnn.RNN / rnn.LSTM / rnn.GRU.

Each subclasses its torch.nn twin, so the constructor, its checks, parameter names, initialisation,
state_dict, repr and isinstance are torch's own. forward validates as torch.nn does (same exception
types and messages) and hands the stack to rnn.functional.
"""
import contextlib

import torch
from torch.nn.utils.rnn import PackedSequence

from kernels.cells import Cell
from rnn import functional


class _FusedRNNBase:
    """forward for all three cells; mixed in before the torch.nn class."""

    #: How the last forward ran (rnn.functional.ForwardPath): backend and each fused launch.
    last_path = None

    def _cell(self) -> Cell:
        return Cell[self.mode]

    def forward(self, input, hx=None):
        self._update_flat_weights()
        cell = self._cell()
        is_lstm = cell == Cell.LSTM
        D = 2 if self.bidirectional else 1
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            is_batched = True
            if hx is not None:
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            data, batch_sizes, sorted_indices, unsorted_indices = input, None, None, None
            if input.dim() not in (2, 3):
                name = "RNN" if cell in (Cell.RNN_TANH, Cell.RNN_RELU) else cell.name
                tail = "D tensor instead" if name == "RNN" else "D instead"
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}{tail}")
            is_batched = input.dim() == 3
            if not is_batched:
                data = input = input.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                hx = _batch_hidden(hx, is_batched, is_lstm)
        if hx is not None:
            self.check_forward_args(data, hx, batch_sizes)
        else:
            # torch.nn builds zeros here; the kernels start from zeros without reading any.
            self.check_input(data, batch_sizes)
        _check_devices_and_dtypes(data, self._flat_weights[0], hx)
        if not packed and data.size(1 if self.batch_first else 0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        weights = self._flat_weights
        amp = contextlib.nullcontext()
        if cuda_autocast(data):
            input, hx, weights = (_half(input), _half(hx), [_half(w) for w in weights])
            amp = torch.autocast(data.device.type, enabled=False)  # every op below runs in float16
        with amp:
            output, h_n, c_n, path = functional.rnn(
                cell, input, hx, weights, num_layers=self.num_layers, bidirectional=self.bidirectional,
                batch_first=self.batch_first, dropout=self.dropout, training=self.training, has_bias=self.bias,
                proj_size=getattr(self, "proj_size", 0))
        self.last_path = path
        hidden = (h_n, c_n) if is_lstm else h_n
        if packed:
            return output, self.permute_hidden(hidden, unsorted_indices)
        if not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
            hidden = (h_n.squeeze(1), c_n.squeeze(1)) if is_lstm else h_n.squeeze(1)
        return output, hidden


def cuda_autocast(x: torch.Tensor) -> bool:
    """Whether torch.nn would run this input under CUDA autocast. There its cuDNN wrapper casts
    input, hx and weights to float16, whatever autocast's dtype: so do we, for the same outputs."""
    return x.is_cuda and torch.is_autocast_enabled("cuda")


def _half(value):
    """float16 copy (through autograd) of a tensor, a state pair or a PackedSequence; float64 and
    non-float tensors stay as they are, as under torch's autocast."""
    if value is None:
        return None
    if isinstance(value, tuple) and not isinstance(value, PackedSequence):
        return tuple(_half(v) for v in value)
    data = value.data if isinstance(value, PackedSequence) else value
    if not data.is_floating_point() or data.dtype == torch.float64:
        return value
    return value.to(torch.float16)


def _batch_hidden(hx, is_batched: bool, is_lstm: bool):
    """torch.nn's rank checks of hx, and the batch dimension added for unbatched input."""
    want = 3 if is_batched else 2
    kind = "batched 3-D" if is_batched else "unbatched 2-D"
    if is_lstm:
        if hx[0].dim() != want or hx[1].dim() != want:
            raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                               f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
        return hx if is_batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
    if hx.dim() != want:
        raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {hx.dim()}-D tensor")
    return hx if is_batched else hx.unsqueeze(1)


def _check_devices_and_dtypes(x, weight, hx):
    """What torch.nn's kernels reject: tensors on other devices, and states of another dtype."""
    if x.device != weight.device:
        raise RuntimeError(f"Input and parameter tensors are not at the same device, found input tensor "
                           f"at {x.device} and parameter tensor at {weight.device}")
    for state in (hx if isinstance(hx, tuple) else (hx,)):
        if state is None:
            continue
        if state.device != x.device:
            raise RuntimeError(f"Input and hidden tensors are not at the same device, found input tensor "
                               f"at {x.device} and hidden tensor at {state.device}")
        if state.dtype != x.dtype:
            raise RuntimeError(f"Expected hidden state of dtype {x.dtype} like the input, got {state.dtype}")


class RNN(_FusedRNNBase, torch.nn.RNN):
    """torch.nn.RNN on the fused kernels (tanh or relu)."""


class LSTM(_FusedRNNBase, torch.nn.LSTM):
    """torch.nn.LSTM on the fused kernels."""


class GRU(_FusedRNNBase, torch.nn.GRU):
    """torch.nn.GRU on the fused kernels."""


_OURS = {"RNN_TANH": RNN, "RNN_RELU": RNN, "LSTM": LSTM, "GRU": GRU}


def from_torch(module: torch.nn.RNNBase) -> torch.nn.RNNBase:
    """The rnn twin of a torch.nn.RNN/LSTM/GRU, **sharing** its parameters (no copy).

    The new module holds the very Parameter objects of ``module``: an optimizer built over the old
    module trains the new one, and changes to either show in both. Training mode is carried over.
    """
    if type(module) not in (torch.nn.RNN, torch.nn.LSTM, torch.nn.GRU):
        raise TypeError(f"from_torch expects a torch.nn.RNN, LSTM or GRU, got {type(module).__name__}")
    kwargs = dict(input_size=module.input_size, hidden_size=module.hidden_size, num_layers=module.num_layers,
                  bias=module.bias, batch_first=module.batch_first, dropout=module.dropout,
                  bidirectional=module.bidirectional)
    if module.mode == "LSTM":
        kwargs["proj_size"] = module.proj_size
    elif module.mode.startswith("RNN"):
        kwargs["nonlinearity"] = module.nonlinearity
    # Built on the meta device: the fresh parameters are never materialised, only replaced.
    ours = _OURS[module.mode](**kwargs, device="meta")
    for name in module._flat_weights_names:
        setattr(ours, name, getattr(module, name))
    ours._init_flat_weights()
    ours.train(module.training)
    return ours

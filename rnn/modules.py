"""Drop-in rnn.RNN / rnn.LSTM / rnn.GRU.

Each subclasses its torch.nn twin, so the constructor, its checks, parameter names, initialisation,
state_dict, repr and isinstance are torch's own. forward validates as torch.nn does (same exception
types and messages) and hands the stack to rnn.functional.
"""
import contextlib
import warnings

import torch
from torch.nn.utils.rnn import PackedSequence

from kernels.cells import Cell
from rnn import functional
from rnn.ops import check_batch_sizes


class _FusedRNNBase:
    """forward for all three cells; mixed in before the torch.nn class."""

    #: How the last forward ran (rnn.functional.ForwardPath): backend and each fused launch.
    last_path = None

    def _cell(self) -> Cell:
        return Cell[self.mode]

    def __prepare_scriptable__(self):
        """torch.jit.script calls this first. TorchScript cannot compile a forward that launches
        Triton kernels, and handing it the torch.nn twin would swap that twin into the caller's
        own model for good: refuse, naming what works."""
        name = type(self).__name__
        raise RuntimeError(f"torch.jit.script cannot compile rnn.{name} (its forward launches Triton kernels). "
                           f"Use torch.compile; or torch.jit.trace, which records torch.nn.{name}'s own op for any "
                           f"sequence length; or script the torch.nn twin, which shares the parameters: "
                           f"torch.jit.script(rnn.to_torch(module))")

    def forward(self, input, hx=None):
        if torch.jit.is_tracing():
            # A traced graph must not bake in this call's sequence length (our launches loop in
            # Python): torch.nn's forward records its one length-generic op instead.
            _warn_traced(self)
            return super().forward(input, hx)
        if torch.compiler.is_exporting():
            # An exported program must run anywhere (ONNX, ExecuTorch, a machine without our
            # ops): it records torch.nn's portable aten.lstm / aten.gru / aten.rnn_* instead.
            return super().forward(input, hx)
        compiling = torch.compiler.is_compiling()
        path = None
        if not compiling:
            path = functional.choose_backend(input.data if isinstance(input, PackedSequence) else input)
            if path.backend == "native":
                # CPU tensors without the interpreter: torch.nn's own implementation costs nothing
                # to swap in, and is exactly torch.nn's (results, errors and dropout); only a
                # malformed PackedSequence, which torch.nn would read past, is refused first.
                if isinstance(input, PackedSequence):
                    check_packed(*input)
                output = super().forward(input, hx)
                self.__dict__["last_path"] = path  # not a parameter: skips Module.__setattr__'s checks
                return output
        self._update_flat_weights()
        cell = self._cell()
        is_lstm = cell == Cell.LSTM
        given_hx = hx
        if hx is not None:
            # torch.nn reads an LSTM's hx[0] and hx[1] of any sequence (a list too); anything but
            # a tensor is an RNN's or GRU's AttributeError.
            hx = (hx[0], hx[1]) if is_lstm else _state(hx, cell)
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            check_packed(data, batch_sizes, sorted_indices, unsorted_indices)
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
        try:
            if hx is not None:
                self.check_forward_args(data, hx, batch_sizes)
            else:
                # torch.nn builds zeros here; the kernels start from zeros without reading any.
                self.check_input(data, batch_sizes)
        except ValueError as exc:
            if packed and is_lstm:  # torch.nn's packed LSTM finds a wrong dtype in its kernels
                raise RuntimeError(str(exc)) from None
            raise
        if is_lstm and given_hx is not None:
            _check_pair(given_hx)
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
                proj_size=getattr(self, "proj_size", 0), path=path)
        if not compiling:  # a compiled call's launches happen outside Python: last_path is eager calls'
            self.__dict__["last_path"] = path
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


def _check_pair(hx):
    """What torch.nn's LSTM kernel refuses after the shape checks: hx not a pair of states."""
    if not isinstance(hx, (tuple, list)):
        raise TypeError(f"LSTM: hx must be a tuple (h_0, c_0), got a {type(hx).__name__}")
    if len(hx) != 2:
        raise RuntimeError("lstm expects two hidden states")


def _state(hx, cell: Cell):
    """An RNN's or GRU's hx: one tensor (torch.nn fails on anything else with an AttributeError)."""
    if not isinstance(hx, torch.Tensor):
        raise AttributeError(f"{cell.name if cell == Cell.GRU else 'RNN'}: hx must be a Tensor, "
                             f"got a {type(hx).__name__}")
    return hx


def check_packed(data, batch_sizes, sorted_indices, unsorted_indices):
    """A PackedSequence that the kernels can trust: batch_sizes a 1-D int64 CPU tensor of positive,
    non-increasing sizes that add up to data's rows; the index tensors both absent or mutually
    inverse permutations of the batch. torch.nn runs malformed ones and reads past the data."""
    compiling = torch.compiler.is_compiling()
    # Values are data to a compiled graph: rnn::layer_fwd checks them when it runs.
    check_batch_sizes(batch_sizes, data.size(0) if data.dim() >= 1 else None, values=not compiling)
    if (sorted_indices is None) != (unsorted_indices is None):
        raise RuntimeError("PackedSequence: sorted_indices and unsorted_indices must both be given or both be None")
    if sorted_indices is None:
        return
    batch = len(sorted_indices) if compiling else int(batch_sizes[0])
    for name, idx in (("sorted_indices", sorted_indices), ("unsorted_indices", unsorted_indices)):
        if idx.dim() != 1 or idx.dtype != torch.int64 or len(idx) != batch:
            raise RuntimeError(f"PackedSequence: {name} must be a 1-D int64 tensor of the batch size {batch}, got "
                               f"a {idx.dim()}-D {idx.dtype} tensor of shape {list(idx.shape)}")
    # Values live on the data's device: checked there, without a host synchronisation on a GPU.
    # sorted_indices a permutation and unsorted_indices[sorted_indices] the identity make
    # unsorted_indices its inverse permutation (the clamp only keeps a bad index in range).
    seqs = torch.arange(batch, device=sorted_indices.device)
    inverse = (sorted_indices.sort().values == seqs).all() \
        & (unsorted_indices[sorted_indices.clamp(0, batch - 1)] == seqs).all()
    message = "PackedSequence: sorted_indices must be a permutation of the batch and unsorted_indices its inverse"
    if inverse.device.type == "cpu" and not compiling:
        if not inverse:
            raise RuntimeError(message)
    else:
        torch._assert_async(inverse, message)


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
_TORCH = {"RNN_TANH": torch.nn.RNN, "RNN_RELU": torch.nn.RNN, "LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU}


def from_torch(module: torch.nn.RNNBase) -> torch.nn.RNNBase:
    """The rnn twin of a torch.nn.RNN/LSTM/GRU, **sharing** its parameters (no copy).

    The new module holds the very Parameter objects of ``module``: an optimizer built over the old
    module trains the new one, and changes to either show in both. Training mode is carried over.
    """
    if type(module) not in (torch.nn.RNN, torch.nn.LSTM, torch.nn.GRU):
        raise TypeError(f"from_torch expects a torch.nn.RNN, LSTM or GRU, got {type(module).__name__}")
    return _twin(module, _OURS[module.mode])


def to_torch(module: torch.nn.RNNBase) -> torch.nn.RNNBase:
    """The torch.nn twin of an rnn.RNN/LSTM/GRU, sharing its parameters: from_torch's inverse."""
    if type(module) not in (RNN, LSTM, GRU):
        raise TypeError(f"to_torch expects an rnn.RNN, LSTM or GRU, got {type(module).__name__}")
    return _twin(module, _TORCH[module.mode])


def _twin(module: torch.nn.RNNBase, cls) -> torch.nn.RNNBase:
    kwargs = dict(input_size=module.input_size, hidden_size=module.hidden_size, num_layers=module.num_layers,
                  bias=module.bias, batch_first=module.batch_first, dropout=module.dropout,
                  bidirectional=module.bidirectional)
    if module.mode == "LSTM":
        kwargs["proj_size"] = module.proj_size
    elif module.mode.startswith("RNN"):
        kwargs["nonlinearity"] = module.nonlinearity
    # Built on the meta device: the fresh parameters are never materialised, only replaced.
    twin = cls(**kwargs, device="meta")
    for name in module._flat_weights_names:
        setattr(twin, name, getattr(module, name))
    twin._init_flat_weights()
    twin.train(module.training)
    return twin


def _warn_traced(module):
    name = type(module).__name__
    warnings.warn(f"torch.jit.trace of rnn.{name}: a traced graph cannot call the fused Triton kernels, so it "
                  f"records torch.nn.{name}'s own op (same parameters and results, for any sequence length; "
                  f"cuDNN's speed on a GPU)", stacklevel=3)

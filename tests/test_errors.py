"""Bad input raises what torch.nn raises: the same exception type and, where torch's message is
meaningful, the same message."""
import warnings

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn

T, B, I, H = 4, 3, 5, 6


def _modules(mode, **kwargs):
    torch_cls = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}[mode]
    ours_cls = {"LSTM": rnn.LSTM, "GRU": rnn.GRU, "RNN": rnn.RNN}[mode]
    torch.manual_seed(0)
    ref = torch_cls(I, H, **kwargs)
    ours = ours_cls(I, H, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _raised(fn):
    try:
        fn()
    except Exception as exc:  # the test compares whatever was raised
        return exc
    return None


def _state(mode, *shape, c_shape=None, dtype=torch.float32, device="cpu"):
    h = torch.randn(*shape, dtype=dtype, device=device)
    if mode == "LSTM":
        return h, torch.randn(*(c_shape or shape))
    return h


BAD_CALLS = {
    "input-1d": lambda m: (torch.randn(I), None),
    "input-4d": lambda m: (torch.randn(T, B, I, 1), None),
    "input-size": lambda m: (torch.randn(T, B, I + 1), None),
    "hx-hidden-size": lambda m: (torch.randn(T, B, I), _state(m, 1, B, H + 1)),
    "hx-batch": lambda m: (torch.randn(T, B, I), _state(m, 1, B + 1, H)),
    "hx-layers": lambda m: (torch.randn(T, B, I), _state(m, 2, B, H)),
    "hx-2d-for-batched": lambda m: (torch.randn(T, B, I), _state(m, B, H)),
    "hx-3d-for-unbatched": lambda m: (torch.randn(T, I), _state(m, 1, 1, H)),
    "cx-shape": lambda m: (torch.randn(T, B, I), _state(m, 1, B, H, c_shape=(1, B, H + 1))),
    "input-dtype": lambda m: (torch.randn(T, B, I, dtype=torch.float64), None),
    "empty-sequence": lambda m: (torch.randn(0, B, I), None),
    "packed-hx-batch": lambda m: (_packed(), _state(m, 1, B - 1, H)),
    "packed-hx-size": lambda m: (_packed(), _state(m, 1, B, H + 1)),
    "packed-hx-dtype": lambda m: (_packed(), _state(m, 1, B, H, dtype=torch.float64)),
    "packed-input-dtype": lambda m: (_packed(torch.float64), None),
    "packed-input-size": lambda m: (PackedSequence(torch.randn(7, I + 1), _packed().batch_sizes), None),
    "packed-3d-data": lambda m: (PackedSequence(torch.randn(7, 1, I), _packed().batch_sizes), None),
    "hx-tuple-for-one-state": lambda m: (torch.randn(T, B, I), (torch.randn(1, B, H),) * 2),
    "hx-list-for-one-state": lambda m: (torch.randn(T, B, I), [torch.randn(1, B, H)]),
    "lstm-hx-three": lambda m: (torch.randn(T, B, I), (torch.randn(1, B, H),) * 3),
    "lstm-hx-one": lambda m: (torch.randn(T, B, I), (torch.randn(1, B, H),)),
    "lstm-hx-list-of-one": lambda m: (torch.randn(T, B, I), [torch.randn(1, B, H)]),
    "lstm-hx-tensor": lambda m: (torch.randn(T, B, I), torch.randn(2, 1, B, H)),
    "lstm-hx-tensor-of-one": lambda m: (torch.randn(T, B, I), torch.randn(1, B, H)),
}


def _packed(dtype=torch.float32):
    return pack_padded_sequence(torch.randn(T, B, I, dtype=dtype), [4, 2, 1])


def _applies(mode, case):
    if case in ("cx-shape",) or case.startswith("lstm-"):
        return mode == "LSTM"
    return mode != "LSTM" or case not in ("hx-tuple-for-one-state", "hx-list-for-one-state")


CALL_CASES = [(mode, case) for mode in ("RNN", "LSTM", "GRU") for case in BAD_CALLS if _applies(mode, case)]

# Where torch.nn's message is its internals' (an indexing or broadcasting error deep inside, a
# matmul's dtype complaint), ours says what is wrong instead: only the type must match.
INTERNAL_MESSAGES = {("RNN", "packed-hx-batch"), ("LSTM", "packed-hx-batch"), ("GRU", "packed-hx-batch"),
                     ("LSTM", "packed-hx-size"), ("RNN", "packed-hx-dtype"), ("LSTM", "packed-hx-dtype"),
                     ("GRU", "packed-hx-dtype"), ("LSTM", "packed-input-dtype"), ("LSTM", "packed-input-size"),
                     ("LSTM", "packed-3d-data"), ("RNN", "hx-tuple-for-one-state"), ("GRU", "hx-tuple-for-one-state"),
                     ("RNN", "hx-list-for-one-state"), ("GRU", "hx-list-for-one-state"), ("LSTM", "lstm-hx-tensor")}


@pytest.mark.parametrize("mode, case", CALL_CASES, ids=[f"{m}-{c}" for m, c in CALL_CASES])
def test_same_error_as_torch(mode, case):
    ref, ours = _modules(mode)
    torch.manual_seed(1)
    x, hx = BAD_CALLS[case](mode)
    expected = _raised(lambda: ref(x, hx))
    got = _raised(lambda: ours(x, hx))
    assert expected is not None, "torch.nn accepted this input; the case is wrong"
    assert type(got) is type(expected), f"torch raised {expected!r}, we raised {got!r}"
    if (mode, case) not in INTERNAL_MESSAGES:
        assert str(got) == str(expected)


@pytest.mark.parametrize("mode", ["RNN", "LSTM", "GRU"])
def test_hidden_dtype_mismatch(mode):
    ref, ours = _modules(mode)
    x = torch.randn(T, B, I)
    hx = _state(mode, 1, B, H, dtype=torch.float64)
    assert isinstance(_raised(lambda: ref(x, hx)), RuntimeError)
    with pytest.raises(RuntimeError, match="dtype"):
        ours(x, hx)


@pytest.mark.parametrize("mode", ["RNN", "LSTM", "GRU"])
def test_device_mismatch(mode):
    """Input or hidden state on another device than the weights ('meta' stands in for a GPU)."""
    ref, ours = _modules(mode)
    x = torch.randn(T, B, I)
    for args in ((x.to("meta"), None), (x, _state(mode, 1, B, H, device="meta"))):
        expected = _raised(lambda: ref(*args))
        got = _raised(lambda: ours(*args))
        assert isinstance(expected, RuntimeError) and type(got) is RuntimeError
        assert str(got) == str(expected)


BAD_CONSTRUCTORS = {
    "dropout-above-1": ("LSTM", dict(dropout=1.5)),
    "dropout-negative": ("GRU", dict(dropout=-0.1)),
    "dropout-bool": ("RNN", dict(dropout=True)),
    "nonlinearity": ("RNN", dict(nonlinearity="sigmoid")),
    "proj-too-large": ("LSTM", dict(proj_size=H)),
    "proj-negative": ("LSTM", dict(proj_size=-1)),
    "proj-on-gru": ("GRU", dict(proj_size=2)),
    "hidden-zero": ("LSTM", dict(hidden_size=0)),
    "layers-zero": ("GRU", dict(num_layers=0)),
}


@pytest.mark.parametrize("case", BAD_CONSTRUCTORS, ids=list(BAD_CONSTRUCTORS))
def test_constructor_errors(case):
    mode, kwargs = BAD_CONSTRUCTORS[case]
    torch_cls = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}[mode]
    ours_cls = {"LSTM": rnn.LSTM, "GRU": rnn.GRU, "RNN": rnn.RNN}[mode]
    args = dict(input_size=I, hidden_size=H)
    args.update(kwargs)
    expected = _raised(lambda: torch_cls(**args))
    got = _raised(lambda: ours_cls(**args))
    assert expected is not None
    assert type(got) is type(expected) and str(got) == str(expected)


def test_dropout_warning_with_one_layer():
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        torch.nn.GRU(I, H, dropout=0.5)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        rnn.GRU(I, H, dropout=0.5)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs] != []


def test_backend_errors(monkeypatch):
    model = rnn.LSTM(I, H)
    x = torch.randn(T, B, I)
    monkeypatch.setenv("RNN_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="RNN_BACKEND"):
        model(x)
    monkeypatch.setenv("RNN_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        model(x)

"""torch.compile for models that hold rnn's modules (see ``compile``)."""
import functools

import torch


def compile(model, **compile_kwargs):
    """``torch.compile(model, **compile_kwargs)`` that lets Dynamo trace RNN modules while, and
    only while, the compiled model runs.

    Dynamo refuses to trace any instance of torch.nn.RNN / LSTM / GRU, and rnn's modules are such
    instances (isinstance parity), unless ``torch._dynamo.config.allow_rnn`` is True when it
    traces. The returned model sets the flag around each of its calls, so its first trace and any
    retrace (a new sequence length, once, then the length is dynamic) see it, and leaves the
    global setting as it was. Each layer of ours becomes one ``rnn::layer_fwd`` node of the graph
    (and ``rnn::layer_bwd`` in the backward graph), whatever the sequence length;
    ``fullgraph=True`` works.

    The flag also concerns plain torch.nn.RNN / LSTM / GRU in the same model: during these calls
    Dynamo traces them too, into torch's aten.lstm / gru / rnn ops inside the graph (cuDNN on a
    GPU), instead of breaking the graph around them (which fullgraph=True refuses).

    Users who prefer torch.compile itself set ``torch._dynamo.config.allow_rnn = True`` (or use
    ``torch._dynamo.config.patch(allow_rnn=True)`` around their calls); importing rnn never
    changes Dynamo's settings. Kernels are compiled, and autotuned, when the compiled model first
    runs a shape, never while Dynamo traces (the ops' fake implementations give shapes only).

    Returns the torch.compile'd module (its parameters, state_dict and ``_orig_mod`` as
    torch.compile's), or a function for a function.
    """
    compiled = torch.compile(model, **compile_kwargs)
    if isinstance(compiled, torch.nn.Module):
        compiled.forward = _allowing_rnn(compiled.forward)
        return compiled
    return _allowing_rnn(compiled)


def _allowing_rnn(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with torch._dynamo.config.patch(allow_rnn=True):
            return fn(*args, **kwargs)
    return call

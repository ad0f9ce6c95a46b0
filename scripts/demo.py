"""Parity demo: rnn.RNN/LSTM/GRU against torch.nn on random inputs.

Prints, per module, the largest relative error of output and final states and which backend ran.
On a machine without CUDA the Triton kernels run through the interpreter (small sizes).
Usage: python -m scripts.demo
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import rnn  # noqa: E402  (after TRITON_INTERPRET is set)

CASES = [
    ("RNN", torch.nn.RNN, rnn.RNN, dict(nonlinearity="tanh")),
    ("RNN relu", torch.nn.RNN, rnn.RNN, dict(nonlinearity="relu")),
    ("LSTM", torch.nn.LSTM, rnn.LSTM, {}),
    ("GRU", torch.nn.GRU, rnn.GRU, {}),
]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    cuda = torch.cuda.is_available()
    torch.backends.cudnn.allow_tf32 = False  # compare against torch.nn's full-precision float32
    device = "cuda" if cuda else "cpu"
    T, B, I, H = (256, 16, 256, 512) if cuda else (16, 4, 32, 48)
    where = torch.cuda.get_device_name() if cuda else "CPU (no CUDA: Triton interpreter, small sizes)"
    print(f"rnn vs torch.nn on {where}: T={T} B={B} I={I} H={H}, 2 layers, bidirectional, float32")
    worst = 0.0
    for name, ref_cls, our_cls, extra in CASES:
        torch.manual_seed(0)
        ref = ref_cls(I, H, num_layers=2, bidirectional=True, device=device, **extra).eval()
        ours = rnn.from_torch(ref)
        x = torch.randn(T, B, I, device=device)
        with torch.no_grad():
            ref_out, ref_hidden = ref(x)
            out, hidden = ours(x)
        pairs = [(out, ref_out)] + list(zip(hidden, ref_hidden) if isinstance(hidden, tuple)
                                         else [(hidden, ref_hidden)])
        err = max(rel_err(a, b) for a, b in pairs)
        worst = max(worst, err)
        path = ours.last_path
        mode = ", ".join(f"{'persistent' if l.persistent else 'stepwise'} grid {l.grid}" for l in path.launches)
        print(f"  {name:<9} max relative error {err:.2e}   backend: {path.backend}" + (f" ({mode})" if mode else ""))
    print(f"largest relative error: {worst:.2e}")
    return 0 if worst < 1e-3 else 1  # float32 against float32: anything larger is a bug


if __name__ == "__main__":
    sys.exit(main())

"""The host side of one eager inference call, measurable on any machine (no GPU needed).

    python -m scripts.host_path [--cells lstm,gru] [--layers 1] [--bidirectional] [--seq 16] [--batch 4] [--hidden 32]

Runs the fused path on CPU tensors (TRITON_INTERPRET=1) with the Triton launch stubbed out, and
reports per call: the aten ops that would each launch a GPU kernel (GEMM, memsets, copies of
weights...; views and allocations launch nothing), the Triton launches, and the host
microseconds of everything but the kernel (best of repeats). The GPU's own figures, host time
and launches against cuDNN, come from ``python -m profiling.bench --suite overhead``.
"""
import argparse
import os
import sys
import time
from collections import Counter

os.environ["TRITON_INTERPRET"] = "1"  # before kernels/ is imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import kernels.forward as forward  # noqa: E402
import rnn  # noqa: E402
from rnn import ops  # noqa: E402

# aten ops that launch nothing on a GPU: views, allocations and metadata. The interpreter's own
# copies of kernel arguments (set_, copy_) never happen on a GPU either; they are not counted
# because the stub never runs the interpreter.
NO_LAUNCH = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default", "aten.new_empty.default",
             "aten.view.default", "aten._unsafe_view.default", "aten.t.default", "aten.transpose.int",
             "aten.unsqueeze.default", "aten.slice.Tensor", "aten.select.int", "aten.alias.default",
             "aten.detach.default", "aten.as_strided.default", "aten.expand.default", "aten.reshape.default",
             "aten.split.Tensor", "aten.split_with_sizes.default"}


class _Count(TorchDispatchMode):
    """Counts aten ops, inside rnn::layer_fwd too."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("rnn.layer_fwd"):
            with self:
                return ops.layer_fwd_impl(*args, **(kwargs or {}))
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


class _StubKernel:
    """Stands in for rnn_fwd_kernel: counts launches, runs nothing."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
        return launch


def measure(cell: str, layers: int, bidirectional: bool, T: int, B: int, H: int, repeats: int = 7, calls: int = 300,
            bias: bool = True):
    """({launching aten op: count}, Triton launches, best host microseconds) of one inference call."""
    torch.manual_seed(0)
    model = getattr(rnn, cell)(H, H, num_layers=layers, bidirectional=bidirectional, bias=bias)
    x = torch.randn(T, B, H)
    real, stub = forward.rnn_fwd_kernel, _StubKernel()
    with torch.no_grad():
        model(x)  # first call: configs and caches
        forward.rnn_fwd_kernel = stub
        try:
            with _Count() as count:
                model(x)
            launches, stub.launches = stub.launches, 0
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(calls):
                    model(x)
                best = min(best, (time.perf_counter() - start) / calls * 1e6)
        finally:
            forward.rnn_fwd_kernel = real
    launching = {k.removeprefix("aten."): v for k, v in count.ops.items() if k not in NO_LAUNCH}
    return launching, launches, best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.host_path", description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="lstm,gru")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--hidden", type=int, default=32)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for cell in args.cells.upper().split(","):
        ops_, triton_launches, us = measure(cell, args.layers, args.bidirectional, args.seq, args.batch, args.hidden)
        kind = f"{cell} L{args.layers}{' bi' if args.bidirectional else ''} T{args.seq} B{args.batch} H{args.hidden}"
        print(f"{kind}: {sum(ops_.values())} launching aten ops + {triton_launches} Triton launches per call, "
              f"host {us:.0f} us per call without the kernel; {dict(ops_)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

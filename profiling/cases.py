"""Benchmark cases, named suites and the FLOP formula."""
import itertools
from dataclasses import dataclass, fields, replace

import torch

CELLS = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}
PASSES = ("fwd", "fwdbwd")
GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


@dataclass(frozen=True)
class Case:
    """One measurement: a module shape, a dtype and a pass.

    pass_ is ``fwd`` (inference, no grad) or ``fwdbwd`` (forward, then backward of the sum of
    the outputs). ``tf32`` is float32 with torch's tf32 matmul flag on.
    """

    cell: str
    T: int
    B: int
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    dtype: str = "bf16"
    pass_: str = "fwd"
    packed: bool = False  # a PackedSequence of lengths uniform in [T/4, T] (see lengths())

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.pass_ not in PASSES:
            raise ValueError(f"pass must be one of {PASSES}, got {self.pass_!r}")
        if self.proj_size and self.cell != "LSTM":
            raise ValueError("proj_size is only for LSTM")
        for name in ("T", "B", "input_size", "hidden_size", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def id(self) -> str:
        parts = [self.cell, f"T{self.T}", f"B{self.B}", f"I{self.input_size}", f"H{self.hidden_size}"]
        if self.num_layers > 1:
            parts.append(f"L{self.num_layers}")
        if self.bidirectional:
            parts.append("bi")
        if self.proj_size:
            parts.append(f"P{self.proj_size}")
        if self.packed:
            parts.append("packed")
        return "-".join(parts + [self.dtype, self.pass_])

    def lengths(self) -> torch.Tensor | None:
        """Per-sequence lengths of a packed case, uniform in [T/4, T] with the longest = T, the
        same for every run of the case; None when not packed."""
        if not self.packed:
            return None
        generator = torch.Generator().manual_seed(self.T * 1009 + self.B)
        lengths = torch.randint(max(1, self.T // 4), self.T + 1, (self.B,), generator=generator)
        lengths[0] = self.T
        return lengths

    @property
    def tokens(self) -> int:
        """Real (time, sequence) pairs: T*B, or the sum of the lengths when packed."""
        lengths = self.lengths()
        return self.T * self.B if lengths is None else int(lengths.sum())

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def columns(self) -> dict:
        """The case as CSV columns (``pass_`` is written ``pass``)."""
        return {("pass" if f.name == "pass_" else f.name): getattr(self, f.name) for f in fields(self)}


def matmul_flops(case: Case) -> int:
    """FLOPs of the matrix products (2 per multiply-add), the only work counted in TFLOP/s.

    Per layer, direction and token: the input projection 2*I_l*G*H, the recurrent product
    2*H_out*G*H and, with proj_size, the projection 2*H*P; I_l is the input size for layer 0 and
    D*H_out above it. Tokens are T*B (the real ones when packed). A backward pass costs twice its
    forward (the gradients of the inputs and of the weights), so fwdbwd counts three times.
    """
    G = GATES[case.cell]
    D = 2 if case.bidirectional else 1
    H = case.hidden_size
    H_out = case.proj_size or H
    per_token = 0
    for layer in range(case.num_layers):
        in_size = case.input_size if layer == 0 else D * H_out
        per_token += D * (2 * G * H * (in_size + H_out) + 2 * H * case.proj_size)
    forward = case.tokens * per_token
    return forward if case.pass_ == "fwd" else 3 * forward


def _grid(cells, dtypes, Ts, Bs, Hs, passes=("fwd",), layers=(1,), bidirectional=(False,)):
    return [Case(cell, T, B, H, H, num_layers=L, bidirectional=bi, dtype=dt, pass_=p)
            for cell, dt, T, B, H, p, L, bi in itertools.product(cells, dtypes, Ts, Bs, Hs, passes, layers,
                                                                  bidirectional)]


SUITES = {
    # About a dozen cases, under two minutes on an H100.
    "quick": (_grid(("LSTM", "GRU"), ("bf16",), (512,), (1, 16, 64), (256, 1024))
              + [Case("LSTM", 512, 16, 512, 512, dtype="fp16"),
                 Case("LSTM", 512, 16, 512, 512, dtype="bf16", pass_="fwdbwd")]),
    "latency": _grid(("LSTM", "GRU", "RNN_TANH"), ("bf16",), (512,), (1, 8, 16, 32, 64), (128, 256, 512, 1024)),
    "throughput": _grid(("LSTM", "GRU"), ("bf16",), (512,), (128, 256, 512), (512, 1024)),
    "stacked": _grid(("LSTM", "GRU"), ("bf16",), (256,), (16, 64), (256, 512), layers=(2, 4),
                     bidirectional=(False, True)),
    "training": _grid(("LSTM", "GRU"), ("bf16", "fp16"), (512,), (8, 16, 64), (256, 512, 1024), passes=("fwdbwd",)),
    # Variable-length batches against their padded twins, and LSTM projections.
    "packed": ([replace(c, packed=packed) for c in _grid(("LSTM",), ("bf16", "fp16"), (512,), (64,), (512,),
                                                         passes=PASSES, layers=(2,), bidirectional=(True,))
                for packed in (False, True)]
               + [Case("LSTM", 1024, 16, 1024, 1024, proj_size=256, dtype=dt) for dt in ("bf16", "fp16")]),
    # Where host time dominates: one small layer, one or a few steps. Its rows add host_us and launches.
    "overhead": _grid(("LSTM", "GRU"), ("bf16",), (1, 16), (1, 8), (128, 256)),
    # The shapes that decide the project (scripts/gpu_check.sh), in the order a time limit should
    # keep them: forward before training, B=16 before 64.
    "decide": [Case(cell, 512, B, H, H, dtype=dt, pass_=p) for p, B, cell, dt, H in itertools.product(
        ("fwd", "fwdbwd"), (16, 64), ("LSTM", "GRU"), ("bf16", "fp16"), (256, 512, 1024))],
    # Without CUDA: our reference path against torch.nn on the CPU, at small sizes.
    "cpu": (_grid(("LSTM", "GRU", "RNN_TANH"), ("fp32",), (32,), (1, 8), (32, 64))
            + [Case("LSTM", 32, 8, 32, 64, num_layers=2, bidirectional=True, dtype="fp32", pass_="fwdbwd"),
               Case("GRU", 32, 8, 32, 32, bidirectional=True, dtype="fp32", packed=True)]),
}
SUITES["all"] = list(dict.fromkeys(c for name in ("quick", "latency", "throughput", "stacked", "training", "packed")
                                   for c in SUITES[name]))

# Suites whose rows also carry host_us and launches (profiling.measure): small shapes, where what a
# call costs the host decides the time; elsewhere the extra measurements would only add run time.
HOST_SUITES = ("overhead",)
# Implementations a suite runs without --impls, where not every registry entry for the device;
# the graph and compiled entries show how much of the host cost each removes.
SUITE_IMPLS = {"overhead": ("ours", "ours_graph", "ours_compiled", "cudnn", "cudnn_graph", "torch_nn"),
               "decide": ("ours", "ours_graph", "cudnn", "cudnn_graph")}


def select(suite: str, cells=None, dtypes=None, hidden=None, batch=None, seq=None) -> list[Case]:
    """A named suite with its dimensions overridden: given values replace the suite's own
    (hidden and input size move together, as in every suite)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    cases = SUITES[suite]
    axes = [("cell", cells), ("dtype", dtypes), ("hidden_size", hidden), ("B", batch), ("T", seq)]
    for name, values in axes:
        if values:
            cases = [replace(c, **{name: v}, **({"input_size": v} if name == "hidden_size" else {}))
                     for c in dict.fromkeys(replace(c, **{name: values[0]}) for c in cases) for v in values]
    return list(dict.fromkeys(cases))

"""The implementations a user would pick, one registry entry each.

Every entry builds, for a case, a ``Runner``: a zero-argument ``step`` that does one timed pass and
the output of one pass for the error column. All entries of a case share the same weights (one
torch.nn module seeded the same way) and inputs.
"""
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnn
from kernels.configs import describe
from profiling import flashrnn_peer
from profiling.cases import Case
from profiling.measure import time_ms

TORCH_MODULES = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN_TANH": torch.nn.RNN, "RNN_RELU": torch.nn.RNN}
TORCH_CELLS = {"LSTM": torch.nn.LSTMCell, "GRU": torch.nn.GRUCell, "RNN_TANH": torch.nn.RNNCell,
               "RNN_RELU": torch.nn.RNNCell}


@dataclass
class Runner:
    step: Callable[[], object]
    output: Callable[[], torch.Tensor]  # the output sequence of one forward, no grad
    prepare: Callable[[], None] = lambda: None  # before a memory measurement (drops .grad)
    details: dict = field(default_factory=dict)  # e.g. our backend and kernel config
    memory_at_build: float | None = None  # MiB, for entries whose memory is taken when built


def torch_module(case: Case, device) -> torch.nn.RNNBase:
    """The shared weights: torch.nn's own module and initialisation, seeded per case."""
    torch.manual_seed(0)
    kwargs = dict(num_layers=case.num_layers, bidirectional=case.bidirectional, device=device,
                  dtype=case.torch_dtype)
    if case.proj_size:
        kwargs["proj_size"] = case.proj_size
    if case.cell.startswith("RNN"):
        kwargs["nonlinearity"] = case.cell[4:].lower()
    return TORCH_MODULES[case.cell](case.input_size, case.hidden_size, **kwargs)


def case_input(case: Case, device) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(case.T, case.B, case.input_size, device=device, dtype=case.torch_dtype)


def _runner_for(model, x, case: Case, forward=None) -> Runner:
    """Eager step of a module returning (output, state): no grad for fwd; for fwdbwd backward of
    the sum of the outputs. A packed case feeds a PackedSequence (packed inside the step, as a
    user's loop would) and measures its data. ``forward`` maps the input to the output alone
    (default: the model's first result), e.g. a compiled FirstOutput of the model."""
    lengths = case.lengths()
    if forward is None:
        def forward(inputs):
            return model(inputs)[0]
    if case.pass_ == "fwdbwd":
        x = x.detach().requires_grad_(True)

    def run():
        if lengths is None:
            return forward(x)
        return forward(pack_padded_sequence(x, lengths, enforce_sorted=False)).data

    if case.pass_ == "fwd":
        def step():
            with torch.no_grad():
                return run()
    else:
        def step():
            run().float().sum().backward()

    def output():
        with torch.no_grad():
            return run()

    def prepare():
        model.zero_grad(set_to_none=True)
        x.grad = None

    return Runner(step, output, prepare)


class FirstOutput(torch.nn.Module):
    """A module returning (output, state) reduced to its output: what ours_compiled compiles, so the
    compiled callable returns what the other runners time."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)[0]


def _describe_path(path) -> dict:
    """The backend, each launch's kernel partition and the launches themselves (kernels.forward.
    LaunchInfo) of an eager call's rnn.ForwardPath."""
    launches = [("fwd", l) for l in path.launches] + [("bwd", l) for l in reversed(path.backward_launches)]
    return {
        "launches": [l for _, l in launches],  # what the barrier floor is measured on
        "backend": path.backend,
        "config": "; ".join(f"{kind} {'persistent' if l.persistent else 'stepwise'} {describe(l.config)} "
                            f"grid{list(l.grid)}" for kind, l in launches) or path.reason,
    }


def _first_pass(runner: Runner, case: Case):
    """One pass as the case runs it (fwd: the output; fwdbwd: a whole step)."""
    if case.pass_ == "fwd":
        runner.output()
    else:
        runner.step()


def build_ours(case: Case, device) -> Runner:
    model = rnn.from_torch(torch_module(case, device))
    runner = _runner_for(model, case_input(case, device), case)
    # One pass to learn which path and launches it takes (and to tune what a first use tunes).
    _first_pass(runner, case)
    runner.details = _describe_path(model.last_path)
    return runner


def build_ours_graph(case: Case, device) -> Runner:
    """ours captured once in a CUDA graph and replayed, as cudnn_graph does with torch.nn."""
    return _graphed(build_ours(case, device))


def build_ours_compiled(case: Case, device) -> Runner:
    """ours inside rnn.compile (torch.compile's defaults: inductor). The first call traces,
    compiles and, for shapes not yet in the autotune cache, tunes: its seconds go to
    details["first_call_s"] (and the config column); the timed steps all come after it."""
    torch._dynamo.reset()  # each case compiles afresh: no earlier case's graphs, no recompile limit reached
    model = rnn.from_torch(torch_module(case, device))
    x = case_input(case, device)
    runner = _runner_for(model, x, case, forward=rnn.compile(FirstOutput(model)))
    first_call_s = seconds(runner.step, device)
    # Compiled calls leave no last_path: an eager pass of the same module names the kernels its ops run.
    _first_pass(_runner_for(model, x, case), case)
    details = _describe_path(model.last_path)
    model.zero_grad(set_to_none=True)
    runner.details = dict(details, first_call_s=first_call_s,
                          config=f"compiled, first call {first_call_s:.2f} s; {details['config']}")
    return runner


def seconds(work, device) -> float:
    """Wall-clock seconds of work() with the device's queue drained before and after: what a
    user waits (first calls: compiling, tuning, capturing)."""
    _sync(device)
    start = time.perf_counter()
    work()
    _sync(device)
    return time.perf_counter() - start


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def build_torch_nn(case: Case, device) -> Runner:
    return _runner_for(torch_module(case, device), case_input(case, device), case)


class CellLoop(torch.nn.Module):
    """A plain PyTorch loop of nn.LSTMCell / GRUCell / RNNCell over time, layers and directions,
    holding torch.nn's weights."""

    def __init__(self, module: torch.nn.RNNBase, cell: str):
        super().__init__()
        self.D = 2 if module.bidirectional else 1
        self.is_lstm = cell == "LSTM"
        cells = []
        for layer in range(module.num_layers):
            for suffix in ("", "_reverse")[:self.D]:
                kwargs = dict(bias=module.bias, device=module.weight_hh_l0.device, dtype=module.weight_hh_l0.dtype)
                if cell.startswith("RNN"):
                    kwargs["nonlinearity"] = module.nonlinearity
                c = TORCH_CELLS[cell](module.weight_ih_l0.shape[1] if layer == 0 else self.D * module.hidden_size,
                                      module.hidden_size, **kwargs)
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    if hasattr(module, f"{name}_l{layer}{suffix}"):
                        setattr(c, name, getattr(module, f"{name}_l{layer}{suffix}"))
                cells.append(c)
        self.cells = torch.nn.ModuleList(cells)

    def forward(self, x):
        T, B = x.shape[:2]
        for layer in range(len(self.cells) // self.D):
            outs = []
            for d in range(self.D):
                cell = self.cells[layer * self.D + d]
                state = None
                ys = [None] * T
                for t in (range(T) if d == 0 else range(T - 1, -1, -1)):
                    state = cell(x[t], state)
                    ys[t] = state[0] if self.is_lstm else state
                outs.append(torch.stack(ys))
            x = torch.cat(outs, dim=-1)
        return x, None


def build_torch_loop(case: Case, device) -> Runner:
    module = torch_module(case, device)
    return _runner_for(CellLoop(module, case.cell), case_input(case, device), case)


def build_compiled_loop(case: Case, device) -> Runner:
    """The cell loop under torch.compile(mode="reduce-overhead"): what a user gets by compiling a
    plain PyTorch loop (CUDA-graphed by inductor). The first call's seconds (tracing, compiling,
    capturing) go to details["first_call_s"] and the config column, apart from the timed steps."""
    torch._dynamo.reset()
    module = torch_module(case, device)
    x = case_input(case, device)
    compiled = torch.compile(FirstOutput(CellLoop(module, case.cell)), mode="reduce-overhead")
    runner = _runner_for(module, x, case, forward=compiled)
    first_call_s = seconds(runner.step, device)
    module.zero_grad(set_to_none=True)
    runner.details = dict(first_call_s=first_call_s, config=f"compiled, first call {first_call_s:.2f} s")
    return runner


def build_flashrnn(case: Case, device) -> Runner:
    """FlashRNN (profiling.flashrnn_peer) on the case's weights, with the fastest of its backends
    that runs the case: each is built, run once (its first call compiles its kernels) and timed
    briefly; the config column lists each one's us per step or why it did not run."""
    module = torch_module(case, device)
    x = case_input(case, device)
    best, best_ms, tried = None, math.inf, []
    for backend in flashrnn_peer.backends(case):
        stack = flashrnn_peer.FlashRNNStack(module, case.cell, backend)
        runner = _runner_for(module, x, case, forward=FirstOutput(stack))
        try:
            runner.output()
            ms = time_ms(runner.step, torch.device(device), warmup_ms=5, rep_ms=20)[0]
        except Exception as exc:  # a backend that cannot run this case (its size limits, say)
            tried.append(f"{backend}: {type(exc).__name__}")
            continue
        tried.append(f"{backend} {ms * 1e3 / case.T:.3g} us/step")
        if ms < best_ms:
            best, best_ms = (backend, runner), ms
    if best is None:
        raise RuntimeError(f"no flashrnn backend runs this case ({'; '.join(tried)})")
    backend, runner = best
    module.zero_grad(set_to_none=True)
    runner.details = dict(backend=f"flashrnn {backend}", config="; ".join(tried))
    return runner


def _graphed(eager: Runner) -> Runner:
    """eager's step captured once in a CUDA graph and replayed: what a careful user does to remove
    launch overhead. Its memory is the graph's pool, measured while capturing."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch's graph docs require
        for _ in range(3):
            eager.step()
    torch.cuda.current_stream().wait_stream(side)
    eager.prepare()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        eager.step()
    torch.cuda.synchronize()
    memory = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return Runner(graph.replay, eager.output, details=eager.details, memory_at_build=memory)


def build_cudnn_graph(case: Case, device) -> Runner:
    """torch.nn captured once in a CUDA graph and replayed."""
    return _graphed(_runner_for(torch_module(case, device), case_input(case, device), case))


@dataclass(frozen=True)
class Impl:
    build: Callable[[Case, torch.device], Runner]
    description: str
    devices: tuple  # device types it runs on
    supports: Callable[[Case], bool] = lambda case: True
    opt_in: bool = False  # runs only where --impls or the suite (cases.SUITE_IMPLS) names it
    unavailable: Callable[[], str | None] = lambda: None  # why it cannot run here (a package missing)


REGISTRY = {
    "ours": Impl(build_ours, "rnn.RNN/LSTM/GRU (fused Triton kernels on CUDA)", ("cuda", "cpu")),
    "ours_graph": Impl(build_ours_graph, "ours captured in a CUDA graph", ("cuda",),
                       supports=lambda case: not case.packed),
    # Compiling takes seconds per case (about a minute for a packed case on a CPU): only the
    # suites that are about it (overhead) or an explicit --impls run it.
    "ours_compiled": Impl(build_ours_compiled, "ours under rnn.compile (torch.compile, inductor)", ("cuda", "cpu"),
                          opt_in=True),
    "cudnn": Impl(build_torch_nn, "torch.nn eager (cuDNN)", ("cuda",)),
    "cudnn_graph": Impl(build_cudnn_graph, "torch.nn captured in a CUDA graph", ("cuda",),
                        supports=lambda case: not case.packed),
    "torch_nn": Impl(build_torch_nn, "torch.nn on the CPU", ("cpu",)),
    "torch_loop": Impl(build_torch_loop, "plain PyTorch nn.*Cell loop over time", ("cuda", "cpu"),
                       supports=lambda case: not case.proj_size and not case.packed),  # cells: no projection
    # Dynamo unrolls the loop over time: compiling takes seconds per case and grows with T, so it
    # runs where named (--impls) and only up to 64 steps.
    "compiled_loop": Impl(build_compiled_loop, "the cell loop under torch.compile(mode='reduce-overhead')",
                          ("cuda",), opt_in=True,
                          supports=lambda case: not case.proj_size and not case.packed and case.T <= 64),
    "flashrnn": Impl(build_flashrnn, "FlashRNN (pip flashrnn), its fastest backend for the case", ("cuda",),
                     supports=flashrnn_peer.supports, unavailable=flashrnn_peer.unavailable),
}

# What the error column and the speed-up ratios compare against, per device type.
BASELINE = {"cuda": "cudnn", "cpu": "torch_nn"}

"""The steps of scripts/gpu_check.sh that are not tests or benchmarks, each written as it runs.

    python -m scripts.gpu_probe env --out device.json       versions, device properties, provenance
    python -m scripts.gpu_probe barrier --out barrier.csv   the grid barrier: counts, refusal, bound, floor
    python -m scripts.gpu_probe sanitize                    a small multi-program persistent forward and
                                                            backward (run under compute-sanitizer)

On a machine without CUDA each step runs what the interpreter can (TRITON_INTERPRET=1, tiny
shapes) and says what it left out: gpu_check.sh --dry-run.
"""
import argparse
import csv
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from kernels import env

BARRIER_COLUMNS = ["check", "programs", "warps", "steps", "value", "unit", "ok", "note"]
FLOOR_PROGRAMS = (1, 2, 4, 8, 16, 32, 64, 128, 132)


def _device() -> torch.device:
    """The CPU under the interpreter (a dry run, GPU or not), else the GPU."""
    if env.interpreting():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_probe: no CUDA device; set TRITON_INTERPRET=1 for a dry run")
    return torch.device("cuda")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as exc:  # missing or broken: say which
        return f"missing ({type(exc).__name__})"


def environment(budget_s: float | None) -> dict:
    """Versions, the device's properties and the provenance of the checkout (a source manifest
    where the copy has no .git: profiling.record --adopt resolves its commit)."""
    from profiling import record, report

    device = _device()
    meta = report.run_metadata(device, "gpu_check")  # torch, Triton, cuDNN, the device's name
    info = record.provenance(meta, sys.argv[1:], program="scripts.gpu_probe", kind="gpu_check")
    info.update(numpy_version=_version("numpy"), pandas_version=_version("pandas"), interpreting=env.interpreting(),
                budget_s=budget_s, platform=platform.platform())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2 ** 30, 1),
                    **{name: getattr(props, name) for name in ("regs_per_multiprocessor",
                       "max_threads_per_multi_processor", "shared_memory_per_multiprocessor",
                       "shared_memory_per_block_optin", "L2_cache_size") if hasattr(props, name)})
    return info


class Rows:
    """barrier.csv, one row written (and flushed) as each check finishes."""

    def __init__(self, path: Path):
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, BARRIER_COLUMNS)
        self.writer.writeheader()
        self.failed = 0

    def add(self, check, programs, warps, steps, value, unit, ok, note=""):
        self.writer.writerow(dict(check=check, programs=programs, warps=warps, steps=steps, value=value, unit=unit,
                                  ok=ok, note=note))
        self.file.flush()
        self.failed += ok is False
        print(f"barrier {check}: programs={programs} value={value} {unit} ok={ok} {note}", flush=True)


def _max_co_resident(warps: int, device: torch.device) -> int:
    """The largest grid of the empty time loop that our residency estimate says is co-resident."""
    from kernels.barrier import PATIENCE, empty_steps_kernel
    from kernels.forward import _co_resident

    sync = torch.zeros(32, dtype=torch.int32, device=device)
    compiled = empty_steps_kernel.warmup(sync, sync, 8, PATIENCE, SYNC=True, num_warps=warps,
                                         launch_cooperative_grid=True, grid=(2, 1, 1))
    lo, hi = 1, 64 * torch.cuda.get_device_properties(device).multi_processor_count
    while lo < hi:  # the largest n with _co_resident(n)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _co_resident(compiled, mid, device) else (lo, mid - 1)
    return lo


def barrier(path: Path, warps: int = 4):
    """Every counter reaches programs x steps; the driver refuses a grid one program larger than
    our residency estimate and the launcher then runs it stepwise; a grid that can never meet
    gives up within seconds and raises; the floor (us per empty step) for 1..132 programs."""
    from kernels.barrier import empty_steps, watch

    device = _device()
    rows = Rows(path)
    cuda = device.type == "cuda"
    sizes = (2, 16, 132) if cuda else (1,)  # the interpreter runs one program per group only
    for programs in sizes:
        steps = 7
        try:
            counters = empty_steps((programs, 2, 2), warps, steps, device).tolist()
            if cuda:
                torch.cuda.synchronize()
                watch.check()
            expected = programs * steps if programs > 1 else 0  # one program: no barrier, no count
            rows.add("counters", programs, warps, steps, " ".join(map(str, counters)), "arrivals",
                     all(c == expected for c in counters), f"expected {expected} each")
        except Exception as exc:
            rows.add("counters", programs, warps, steps, "", "", False, f"{type(exc).__name__}: {exc}"[:300])

    if cuda:
        from kernels.forward import run_persistent
        from kernels.barrier import empty_steps_kernel
        try:
            n = _max_co_resident(warps, device) + 1
            sync = torch.zeros(32, dtype=torch.int32, device=device)
            flag, patience = watch.arm("empty_steps_kernel", (n, 1, 1), f"{warps} warps", device)
            stepwise = []
            persistent = run_persistent(
                ("gpu_probe", n), lambda: stepwise.append(1),
                lambda: empty_steps_kernel[(n, 1, 1)](sync, flag, 4, patience, SYNC=True, num_warps=warps,
                                                      launch_cooperative_grid=True))
            torch.cuda.synchronize()
            watch.check()
            rows.add("refused_one_too_many", n, warps, 4, int(not persistent), "refused", not persistent,
                     "the driver refused and the launcher ran it stepwise" if not persistent else
                     "the driver launched a grid our estimate says does not fit: the estimate is conservative")
        except Exception as exc:
            rows.add("refused_one_too_many", "", warps, 4, "", "", False, f"{type(exc).__name__}: {exc}"[:300])
    else:
        rows.add("refused_one_too_many", "", warps, "", "", "", "", "not measured: needs CUDA")

    programs = 4 if cuda else 2
    start = time.perf_counter()
    try:
        empty_steps((programs, 1, 1), warps, 3, device, behind=1 if cuda else 0)
        if cuda:
            torch.cuda.synchronize()
        watch.check()
        rows.add("gives_up", programs, warps, 3, "", "s", False, "a grid that cannot meet did not raise")
    except RuntimeError as exc:
        seconds = time.perf_counter() - start
        rows.add("gives_up", programs, warps, 3, f"{seconds:.3f}", "s", "gave up" in str(exc) and seconds < 60,
                 str(exc).split(" waited")[0][:200])

    if cuda:
        import triton.testing
        steps = 1024
        for programs in FLOOR_PROGRAMS:
            try:
                ms = triton.testing.do_bench(lambda: empty_steps((programs, 1, 1), warps, steps, device), warmup=5,
                                             rep=25, return_mode="median")
                watch.check()
                rows.add("floor", programs, warps, steps, f"{ms * 1e3 / steps:.3f}", "us_per_step", True,
                         "no barrier: one program" if programs == 1 else "")
            except Exception as exc:
                rows.add("floor", programs, warps, steps, "", "", False, f"{type(exc).__name__}: {exc}"[:300])
    else:
        rows.add("floor", "", warps, "", "", "", "", "not measured: needs CUDA")
    rows.file.close()
    return 1 if rows.failed else 0


def sanitize() -> int:
    """One small LSTM layer, both directions, four programs per group, persistent where a GPU
    runs it (the interpreter: stepwise), forward (training) and backward, against the float64
    reference: what compute-sanitizer watches for races and out-of-bounds accesses."""
    from kernels.backward import rnn_bwd
    from kernels.cells import Cell
    from kernels.configs import KernelConfig
    from kernels.forward import rnn_fwd
    from rnn.reference import layer_forward

    device = _device()
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    T, B, I, H, D = 6, 4, 8, 64, 2
    dtype = torch.float32
    weights = [tuple(torch.randn(*shape, device=device, dtype=dtype) / math.sqrt(H)
                     for shape in ((4 * H, I), (4 * H, H), (4 * H,), (4 * H,))) for _ in range(D)]
    x = torch.randn(T, B, I, device=device, dtype=dtype)
    h0, c0 = (torch.randn(D, B, H, device=device, dtype=dtype) for _ in range(2))
    config = KernelConfig(hidden_block=16, batch_block=16, persistent=cuda)
    fwd = rnn_fwd(Cell.LSTM, x, weights, h0, c0, None, False, config=config, save=True)
    d_out = torch.randn_like(fwd.out)
    grads = rnn_bwd(Cell.LSTM, x, weights, h0, c0, None, fwd.out, fwd.saved, d_out, None, None, False,
                    config=config)
    if cuda:
        torch.cuda.synchronize()
    from kernels.barrier import watch
    watch.check()
    out64, _, _ = layer_forward(Cell.LSTM, x.double().cpu(), h0.double().cpu(), c0.double().cpu(), None,
                                [(*(w.double().cpu() for w in ws), None) for ws in weights])
    err = ((fwd.out.double().cpu() - out64).norm() / out64.norm()).item()
    print(f"sanitize: LSTM T={T} B={B} H={H} D={D} grid {fwd.info.grid} persistent={fwd.info.persistent} "
          f"(backward persistent={grads.info.persistent}); forward error {err:.2e}; gradients finite: "
          f"{bool(torch.isfinite(grads.dx).all())}", flush=True)
    return 0 if err < 1e-4 and torch.isfinite(grads.dx).all() else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.gpu_probe", description=__doc__.splitlines()[0])
    p.add_argument("step", choices=("env", "barrier", "sanitize"))
    p.add_argument("--out", type=Path)
    p.add_argument("--budget", type=float, help="the run's budget in seconds (env: recorded)")
    args = p.parse_args(argv)
    if args.step == "env":
        info = environment(args.budget)
        args.out.write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
        print(" ".join(f"{k}={info.get(k)}" for k in ("device", "driver", "torch_version", "triton_version",
                                                      "cuda_version", "cudnn_version", "python_version", "git_commit",
                                                      "git_dirty")))
        return 0
    if args.step == "barrier":
        return barrier(args.out)
    return sanitize()


if __name__ == "__main__":
    sys.exit(main())

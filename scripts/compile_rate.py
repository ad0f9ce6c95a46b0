"""Compiles per second of one shape's tuning candidates: on threads against worker processes.

Compiles the forward candidates and then the backward's of one layer shape for an H100 (sm_90),
as first-use tuning does (kernel.warmup calls, through kernels.tuning), each mode in a fresh
process with a cold Triton cache: on N threads (Triton's asynchronous compile) or on N worker
processes (the rest, if any, on threads). Prints wall and CPU seconds and compiles per second per
mode, the workers' start-up (N processes importing what a worker imports), and an estimate for
a machine with more cores from the measured per-compile CPU time.

    python -m scripts.compile_rate [--cell LSTM] [--dtype bf16] [--hidden 1024] [--batch 16]
        [--directions 1] [--modes threads:1,threads:2,processes:2] [--cores 16] [--repeat 1]

Needs no GPU (a stand-in driver names the target). Must run without TRITON_INTERPRET. On a
shared machine, other load inflates wall times: compare CPU seconds too.
"""
import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

# What the tuner's launches leave out on a layer's first training step (no hx, no h_n gradient).
TUNING_FLAGS = {"fwd": {"has_h0": False, "has_c0": False},
                "bwd": {"has_h0": False, "has_c0": False, "has_dhn": False, "has_dcn": False}}
WORKER_IMPORTS = "import kernels.tuning, kernels.forward, kernels.backward"


def candidates(cell, dtype: str, H: int, B: int, D: int) -> dict:
    """The forward's and the backward's candidates of one shape on an H100, as the tuner lists them."""
    from kernels.configs import H100_SMS, candidate_backward_configs, candidate_configs
    from scripts.compile_check import ELEMENT_SIZE

    args = (H, B, cell.gates, ELEMENT_SIZE[dtype], D, H100_SMS)
    return {"fwd": candidate_configs(*args), "bwd": candidate_backward_configs(*args)}


def compiler(kernel: str, cell, dtype: str, H: int, B: int, D: int):
    """compile(cfg): kernel.warmup of the persistent launch that tuning compiles for cfg."""
    from kernels.configs import cdiv
    from scripts.compile_check import launch_arguments

    def compile(cfg):
        sync = cdiv(H, cfg.hidden_block) > 1  # one program per group needs no barrier
        fn, values, meta, launch = launch_arguments(cell, dtype, H, cfg, sync, D, TUNING_FLAGS[kernel], kernel, B)
        fn.warmup(*values.values(), grid=(1, 1, 1), **meta, **launch)

    return compile


def run_mode(mode: str, cell, dtype: str, H: int, B: int, D: int) -> dict:
    """Compile both passes' candidates in this process in ``mode`` (threads:N or processes:N)."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    from kernels import tuning

    from triton import knobs

    driver.set_active(tuning.TargetDriver(GPUTarget("cuda", 90, 32)))
    kind, count = mode.split(":")
    count = int(count)
    compiles = []  # (front end, whole compile) microseconds of each compile in this process

    def listener(*, times, cache_hit, **_):
        if not cache_hit:
            compiles.append((times.ir_initialization, times.total))

    knobs.compilation.listener = listener
    workers = tuning.Workers(count) if kind == "processes" else None
    result = {}
    for kernel, cfgs in candidates(cell, dtype, H, B, D).items():
        compile = compiler(kernel, cell, dtype, H, B, D)
        start, cpu = time.perf_counter(), cpu_seconds()
        left = tuning.compile_in_processes(compile, cfgs, workers) if workers else cfgs
        tuning.compile_on_threads(compile, left, count)
        # cpu: this process's threads and ptxas runs (a worker's CPU time is counted once it exits)
        result[kernel] = dict(n=len(cfgs), wall=time.perf_counter() - start, cpu=cpu_seconds() - cpu,
                              on_threads=len(left),
                              front_end=sum(c[0] for c in compiles) / max(1, sum(c[1] for c in compiles)))
        compiles.clear()
    if workers:
        workers.close()  # so that their CPU time counts below
    result["cpu"] = cpu_seconds()
    return result


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and its children that ended (ptxas, workers)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def startup(count: int) -> tuple:
    """(wall seconds, CPU seconds each) for ``count`` processes to start and import what a worker
    imports, all at once."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER_IMPORTS]) for _ in range(count)]
    if any(p.wait() for p in procs):
        raise RuntimeError("a worker's imports failed")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / count


def capacity(count: int) -> float:
    """Cores' worth of CPU this machine gives ``count`` CPU-bound processes at once now (on a
    shared or oversubscribed machine, fewer than ``count``): count x (one alone) / (all at once)."""
    def wall(n):
        start = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", "for i in range(10_000_000): pass"]) for _ in range(n)]
        for p in procs:
            p.wait()
        return time.perf_counter() - start

    return count * wall(1) / wall(count)


def measure(mode: str, argv: list) -> dict:
    """run_mode in a fresh process with a cold Triton cache."""
    cache = tempfile.mkdtemp(prefix="triton-cache-")
    try:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, "-m", "scripts.compile_rate", "--run", mode, *argv], env=env,
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out.splitlines()[-1])
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def estimate(results: dict, start: tuple, cores: int, free: float) -> list:
    """Lines estimating first-use compile time on ``cores`` cores, with their arithmetic, from a
    compile's CPU seconds on one thread (ptxas included; other load on the machine barely changes
    them) and the serial (GIL-held) fraction f of a compile on threads: from the speed-up of N
    threads over one (Amdahl, f = (N/s - 1)/(N - 1); other load blurs it) and, as a lower bound,
    the front end's share (Python building the IR, which holds the GIL throughout). ``free``: the
    cores' worth of CPU the threads had (capacity)."""
    serial = results["threads:1"]
    start_wall, start_cpu = start
    lines = [f"worker start-up: {start_cpu:.1f} CPU s a worker ({start_wall:.1f} s wall for one alone); on "
             f"{cores} cores each has its own: S = {start_cpu:.1f} s, once (backward reuses the workers)"]
    threaded = [(int(m.split(":")[1]), r) for m, r in results.items()
                if m.startswith("threads:") and m != "threads:1"]
    passes = {}  # way -> [fwd seconds, bwd seconds]
    for kernel in ("fwd", "bwd"):
        n, cpu, front = serial[kernel]["n"], serial[kernel]["cpu"], serial[kernel]["front_end"]
        c = cpu / n
        rounds = math.ceil(n / cores)
        lines.append(f"{kernel}: {n} compiles, c = {cpu:.1f} CPU s / {n} = {c:.2f} s each on one thread; "
                     f"the front end is {front:.0%} of a compile")
        lines.append(f"  processes: ceil({n}/{cores}) = {rounds} round(s) x {c:.2f} s = {rounds * c:.1f} s "
                     f"(perfectly balanced: {n} x {c:.2f} / {cores} = {n * c / cores:.1f} s)")
        passes.setdefault("processes", []).append(rounds * c)
        fractions = [("threads, f >= front end", f"f >= {front:.2f} (front end)", front)]
        for count, r in threaded:
            # Amdahl on the cores the machine gave (p, measured): s = 1 / (f + (1 - f) / p)
            p = min(count, free)
            if p < 1.2:
                continue  # too few cores to tell
            speedup = serial[kernel]["wall"] / r[kernel]["wall"]
            f = min(1.0, max(0.0, (p / speedup - 1) / (p - 1)))
            fractions.append((f"threads, f from {count} threads",
                              f"{speedup:.2f}x on {p:.2f} cores: f = ({p:.2f}/{speedup:.2f} - 1)/({p:.2f} - 1) = {f:.2f}",
                              f))
        for way, why, f in fractions:
            wall = n * c * (f + (1 - f) / cores)
            lines.append(f"  threads, {why}: {n} x {c:.2f} x ({f:.2f} + {1 - f:.2f}/{cores}) = {wall:.1f} s")
            passes.setdefault(way, []).append(wall)
    for way, (fwd, bwd) in passes.items():
        s = start_cpu if way == "processes" else 0.0
        plus = f"{s:.1f} + " if s else ""
        lines.append(f"{way} on {cores} cores: forward {plus}{fwd:.1f} = {s + fwd:.1f} s; forward + backward "
                     f"{plus}{fwd:.1f} + {bwd:.1f} = {s + fwd + bwd:.1f} s")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="LSTM", help="LSTM, GRU, RNN_TANH or RNN_RELU")
    parser.add_argument("--dtype", default="bf16", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--directions", type=int, default=1, choices=(1, 2))
    parser.add_argument("--modes", default="threads:1,threads:2,processes:2")
    parser.add_argument("--cores", type=int, default=16, help="the machine to estimate for")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each mode; the quickest counts")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # one mode, in this process (measure's child)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("compile_rate: unset TRITON_INTERPRET; it compiles real GPU code")
    from kernels.cells import Cell

    cell = Cell[args.cell.upper()]
    shape = (cell, args.dtype, args.hidden, args.batch, args.directions)
    if args.run:
        print(json.dumps(run_mode(args.run, *shape)))
        return 0
    shape_args = ["--cell", cell.name, "--dtype", args.dtype, "--hidden", str(args.hidden), "--batch",
                  str(args.batch), "--directions", str(args.directions)]
    cores = os.cpu_count() or 1
    free = capacity(cores)
    print(f"{cell.name} {args.dtype} H={args.hidden} B={args.batch} D={args.directions}, sm_90, cold cache; "
          f"{cores} cores here, load average {os.getloadavg()[0]:.1f}; {cores} CPU-bound processes get "
          f"{free:.2f} cores' worth")
    print(f"{'mode':<14} {'fwd s':>7} {'bwd s':>7} {'fwd/s':>7} {'fwd+bwd/s':>10} {'CPU s':>7} {'on threads':>10}")
    results = {}
    for mode in args.modes.split(","):
        # The quickest of --repeat runs: other load on the machine only ever adds time.
        runs = [measure(mode, shape_args) for _ in range(args.repeat)]
        r = results[mode] = min(runs, key=lambda r: r["fwd"]["wall"] + r["bwd"]["wall"])
        n = r["fwd"]["n"] + r["bwd"]["n"]
        wall = r["fwd"]["wall"] + r["bwd"]["wall"]
        print(f"{mode:<14} {r['fwd']['wall']:>7.1f} {r['bwd']['wall']:>7.1f} {r['fwd']['n'] / r['fwd']['wall']:>7.2f} "
              f"{n / wall:>10.2f} {r['cpu']:>7.1f} {r['fwd']['on_threads'] + r['bwd']['on_threads']:>10}")
    for count in sorted({int(m.split(":")[1]) for m in results if m.startswith("processes:")}):
        print("start-up: {} worker(s) importing at once: {:.1f} s wall, {:.1f} CPU s each".format(count, *startup(count)))
    free = min(free, capacity(cores))  # before and after: the threads had at most this
    print(f"{cores} CPU-bound processes get {free:.2f} cores' worth (the lesser of before and after)")
    if "threads:1" in results:
        print("\n".join(estimate(results, min((startup(1) for _ in range(args.repeat)), key=lambda s: s[1]),
                                  args.cores, free)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

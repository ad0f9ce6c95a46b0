"""The CSV schema, the run's metadata, the summary table and the plots.

CSV (long format, one row per case x implementation x metric), columns in this order:

| column | meaning |
| --- | --- |
| timestamp | start of the run, ISO 8601 UTC |
| git_commit | commit of the checkout that ran (``unknown`` outside git) |
| device | GPU name, or ``cpu`` |
| torch_version, triton_version, cudnn_version | versions that ran (cudnn empty without CUDA) |
| suite | the named suite |
| case_id | e.g. ``LSTM-T512-B16-I512-H512-bf16-fwd`` |
| impl | ours, ours_graph, ours_compiled, cudnn, cudnn_graph, torch_nn (CPU only), torch_loop, compiled_loop, flashrnn |
| cell, T, B, input_size, hidden_size, num_layers, bidirectional, proj_size, dtype, pass, packed | the case (packed: lengths uniform in [T/4, T]) |
| metric | time_ms, us_per_step, tokens_per_s, tflops, peak_mem_mib, rel_err, first_call_s, barrier_floor_us, floor_ratio; in the overhead suite also host_us, launches (see METRICS) |
| unit | the metric's unit |
| median, p20, p80 | the value: median and 20th/80th percentiles over timed repeats (memory, error, launches: one value in median) |
| backend, config | for ours (and ours_graph, ours_compiled): which path ran and each layer's kernel partition (forward; backward too in fwdbwd cases); ours_compiled's config starts with its first call's seconds (trace, compile, tuning) |
| status | ``ok``, or why the row has no value |

host_us: host microseconds from a call to its return, timed over batches of back-to-back calls
with the GPU synchronised only between batches, each batch short enough that the host never waits
for the GPU (profiling.measure.host_us); on the CPU the whole call. launches: kernels, memsets and
memcpys the GPU runs per call, counted by torch.profiler (CUPTI; a replayed CUDA graph counts the
kernels inside it); NaN on the CPU, with status ok. Only the suites in profiling.cases.HOST_SUITES
(overhead) write these two metrics.

barrier_floor_us: for entries running our kernels (ours, ours_graph, ours_compiled) on CUDA, the
microseconds per step of the empty time loop (only the grid barrier) on the grid and warps of each
of the call's persistent launches that have a barrier, summed; floor_ratio is us_per_step over it.
NaN on the CPU and where no launch has a barrier (one program per group).
"""
import datetime
import math
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from profiling.cases import Case, matmul_flops

METRICS = {
    "time_ms": "ms",
    "us_per_step": "us",
    "tokens_per_s": "tokens/s",  # real tokens (T*B, or the packed lengths' sum) per second
    "tflops": "TFLOP/s",  # profiling.cases.matmul_flops over the median time
    "peak_mem_mib": "MiB",  # above model and inputs; the pass column says inference (fwd) or training
    "rel_err": "1",  # ||output - baseline output|| / ||baseline output|| on the same inputs
    "host_us": "us",  # host time per call, call to return (HOST_SUITES only)
    "launches": "1/call",  # GPU kernels + memsets + memcpys per call; NaN on the CPU (HOST_SUITES only)
    "first_call_s": "s",  # building the implementation and its first result: compiling, tuning, capturing
    "barrier_floor_us": "us",  # the empty-barrier step of ours' grids (profiling.measure.barrier_floor_us)
    "floor_ratio": "1",  # us_per_step over barrier_floor_us: how many barrier floors a step costs
}
HOST_METRICS = ("host_us", "launches")
CASE_COLUMNS = ["cell", "T", "B", "input_size", "hidden_size", "num_layers", "bidirectional", "proj_size",
                "dtype", "pass", "packed"]
SCHEMA = (["timestamp", "git_commit", "device", "torch_version", "triton_version", "cudnn_version", "suite",
           "case_id", "impl"] + CASE_COLUMNS + ["metric", "unit", "median", "p20", "p80", "backend", "config",
                                                "status"])


def run_metadata(device: torch.device, suite: str) -> dict:
    import triton
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    cuda = device.type == "cuda"
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch_version": torch.__version__,
        "triton_version": triton.__version__,
        "cudnn_version": str(torch.backends.cudnn.version()) if cuda else "",
        "suite": suite,
    }


def metric_rows(meta: dict, case: Case, impl: str, times, memory: float, rel_err: float, details: dict,
                status: str = "ok", host=None, first_call_s: float = math.nan,
                floor_us: float = math.nan) -> list[dict]:
    """The rows of one (case, implementation); ``times`` is (median, p20, p80) in ms or None;
    ``floor_us``: the barrier floor of its launches (NaN where none was measured).
    ``host``, only in suites that measure it: ((median, p20, p80) host us per call, launches per
    call), NaN where not measured; the rows then include HOST_METRICS."""
    base = dict(meta, case_id=case.id, impl=impl, **case.columns(), backend=details.get("backend", ""),
                config=details.get("config", ""), status=status)
    nan3 = (math.nan, math.nan, math.nan)
    med, p20, p80 = times if times else nan3
    flops = matmul_flops(case)
    values = {
        "time_ms": (med, p20, p80),
        "us_per_step": tuple(t * 1e3 / case.T for t in (med, p20, p80)),
        # faster times give larger rates: the 20th percentile of a rate comes from the 80th of time
        "tokens_per_s": tuple(case.tokens / (t / 1e3) for t in (med, p80, p20)),
        "tflops": tuple(flops / (t / 1e3) / 1e12 for t in (med, p80, p20)),
        "peak_mem_mib": (memory, math.nan, math.nan),
        "rel_err": (rel_err, math.nan, math.nan),
        "first_call_s": (first_call_s, math.nan, math.nan),
        "barrier_floor_us": (floor_us, math.nan, math.nan),
        "floor_ratio": tuple(t * 1e3 / case.T / floor_us for t in (med, p20, p80)),
    }
    if host is not None:
        host_us, launches = host
        values["host_us"] = tuple(host_us)
        values["launches"] = (launches, math.nan, math.nan)
    return [dict(base, metric=m, unit=METRICS[m], median=v[0], p20=v[1], p80=v[2]) for m, v in values.items()]


def to_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=SCHEMA)


def summary(frame: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Per case: us per step of each implementation, ours' speed-up over the baseline (and over
    cudnn_graph where measured), ours' peak memory over the baseline's (and both in MiB), ours'
    error, first-call seconds and barrier-floor ratio; where the
    suite measures them, each implementation's host us and launches per call."""
    ok = frame[frame.status == "ok"]
    steps = ok[ok.metric == "us_per_step"].pivot_table(index="case_id", columns="impl", values="median", sort=False)
    memory = ok[ok.metric == "peak_mem_mib"].pivot_table(index="case_id", columns="impl", values="median",
                                                          sort=False, dropna=False)
    errors = ok[ok.metric == "rel_err"].pivot_table(index="case_id", columns="impl", values="median", sort=False)
    table = pd.DataFrame(index=steps.index)
    for impl in steps.columns:
        table[f"{impl} us/step"] = steps[impl]
    if "ours" in steps and baseline in steps:
        table[f"speedup vs {baseline}"] = steps[baseline] / steps["ours"]
    if "ours" in steps and "cudnn_graph" in steps:
        table["speedup vs cudnn_graph"] = steps["cudnn_graph"] / steps["ours"]
    if "ours" in memory and baseline in memory:
        table[f"memory vs {baseline}"] = memory["ours"] / memory[baseline]
        # Absolute peaks too: in training cases (pass fwdbwd) what a user's memory budget meets.
        table["ours MiB"], table[f"{baseline} MiB"] = memory["ours"], memory[baseline]
    if "ours" in errors:
        table["ours rel_err"] = errors["ours"]
    first = ok[ok.metric == "first_call_s"].pivot_table(index="case_id", columns="impl", values="median", sort=False)
    if "ours" in first:
        table["ours first call s"] = first["ours"]
    floors = ok[ok.metric == "floor_ratio"].pivot_table(index="case_id", columns="impl", values="median", sort=False)
    if "ours" in floors:
        table["ours floor x"] = floors["ours"]  # us per step in empty-barrier steps of the same grids
    for metric, label in (("host_us", "host us"), ("launches", "launches")):
        per_impl = ok[ok.metric == metric].pivot_table(index="case_id", columns="impl", values="median", sort=False)
        for impl in per_impl.columns:
            table[f"{impl} {label}"] = per_impl[impl]
    return table.dropna(axis=1, how="all")  # e.g. memory on the CPU, which keeps no statistics


def markdown(table: pd.DataFrame, title: str) -> str:
    """A Markdown table (no optional dependency)."""
    def fmt(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else (f"{v:.2e}" if abs(v) < 1e-2 and v != 0 else f"{v:.3g}")
        return str(v)

    header = ["case"] + list(table.columns)
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for case_id, row in table.iterrows():
        lines.append("| " + " | ".join([case_id] + [fmt(v) for v in row.tolist()]) + " |")
    return "\n".join(lines) + "\n"


def not_measured(frame: pd.DataFrame) -> str:
    """Markdown list of what has no value and why: one line per implementation whose every case
    failed for the same reason (e.g. needs CUDA), else one per case."""
    times = frame[frame.metric == "time_ms"]
    failed = times[times.status != "ok"]
    if not len(failed):
        return ""
    lines = []
    for impl, rows in failed.groupby("impl", sort=False):
        if len(rows) == (times.impl == impl).sum() and rows.status.nunique() == 1:
            lines.append(f"- {impl}: {rows.status.iloc[0]} (every case)\n")
        else:
            lines += [f"- {r.case_id} {impl}: {r.status}\n" for r in rows.itertuples()]
    return "\nNot measured:\n" + "".join(lines)


def plots(frame: pd.DataFrame, out_dir: Path, stem: str, baseline: str | None = None) -> list[Path]:
    """PNGs, one per (cell, dtype, pass, layers, directions, T, packed) group: us per step against
    batch (one per hidden size) and against hidden size (one per batch), one line per
    implementation, where the group has at least two of the swept value; and, given a
    ``baseline``, a heat map of ours' speed-up over it on the hidden size x batch grid (where the
    group has at least two of either). Empty when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return []
    data = frame[(frame.metric == "us_per_step") & (frame.status == "ok")]
    written = []
    group_keys = ["cell", "dtype", "pass", "num_layers", "bidirectional", "T", "packed"]
    for key, group in data.groupby(group_keys):
        cell, dtype, pass_, L, bi, T, packed = key
        label = f"{cell} L={L}{' bi' if bi else ''} T={T}{' packed' if packed else ''} {dtype} {pass_}"
        rest = f"L{L}{'-bi' if bi else ''}-T{T}{'-packed' if packed else ''}-{dtype}-{pass_}"  # of file names
        for swept, fixed, axis in (("B", "hidden_size", "batch"), ("hidden_size", "B", "hidden size")):
            for value, lines in group.groupby(fixed):
                if lines[swept].nunique() < 2:
                    continue
                fig, ax = plt.subplots(figsize=(5, 3.5))
                for impl, line in lines.groupby("impl"):
                    line = line.sort_values(swept)
                    ax.plot(line[swept], line["median"], marker="o", label=impl)
                short = "H" if fixed == "hidden_size" else "B"
                ax.set(xscale="log", yscale="log", xlabel=axis, ylabel="us per step", title=f"{label} {short}={value}")
                ticks = sorted(lines[swept].unique())
                ax.set_xticks(ticks, [str(t) for t in ticks])
                ax.minorticks_off()
                # Labelled 1-2-5 ticks: a range inside one decade would otherwise show no label.
                ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
                ax.legend()
                # The batch plots keep their earlier names; the hidden-size plots say "vs-H".
                path = out_dir / (f"{stem}-{cell}-H{value}-{rest}.png" if swept == "B"
                                  else f"{stem}-{cell}-vs-H-B{value}-{rest}.png")
                fig.tight_layout()
                fig.savefig(path, dpi=100)
                plt.close(fig)
                written.append(path)
        if baseline is None:
            continue
        times = group.pivot_table(index=["hidden_size", "B"], columns="impl", values="median")
        if "ours" not in times or baseline not in times or (group.hidden_size.nunique() < 2 and group.B.nunique() < 2):
            continue
        speedup = (times[baseline] / times["ours"]).unstack("B")  # rows: hidden size, columns: batch
        fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.9 * speedup.shape[1]), 1.5 + 0.6 * speedup.shape[0]))
        image = ax.imshow(speedup.values, cmap="RdYlGn", vmin=0, vmax=2, origin="lower", aspect="auto")
        ax.set_xticks(range(speedup.shape[1]), [str(b) for b in speedup.columns])
        ax.set_yticks(range(speedup.shape[0]), [str(h) for h in speedup.index])
        for (i, j), v in np.ndenumerate(speedup.values):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set(xlabel="batch", ylabel="hidden size")
        ax.set_title(f"ours' speed-up vs {baseline}\n{label}", fontsize=9)
        fig.colorbar(image, ax=ax)
        path = out_dir / f"{stem}-{cell}-speedup-{rest}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written

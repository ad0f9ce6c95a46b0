"""Measure rnn's modules against the alternatives a user would pick; write CSV, Markdown, plots.

    python -m profiling.bench [--suite NAME] [--out DIR] [--cells lstm,gru] [--dtypes bf16]
                              [--hidden 256,512] [--batch 1,8] [--seq 512] [--impls ours,cudnn]
                              [--device cpu] [--record]

Without --suite: ``quick`` on a machine with CUDA, ``cpu`` elsewhere. The ``cpu`` suite runs on
the CPU (ours on its CPU path against torch.nn on the CPU) and every row says device=cpu; the
other suites measure GPUs, or, with --device cpu, run their cases on the CPU the same way (e.g.
``--suite overhead --device cpu``). The ``overhead`` suite adds host time and GPU launches per
call. The CSV schema is documented in profiling/report.py. --record keeps the run in
benchmarks/results/ with its provenance (profiling/record.py) instead of --out.
"""
import argparse
import datetime
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from profiling import record, report
from profiling.cases import HOST_SUITES, SUITE_IMPLS, SUITES, select
from profiling.impls import BASELINE, REGISTRY, seconds
from profiling.measure import barrier_floor_us, host_us, launches_per_call, peak_memory_mib, time_ms


def _list(text, convert=str):
    return [convert(v.strip()) for v in text.split(",") if v.strip()] if text else None


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m profiling.bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=list(SUITES), help="default: quick with CUDA, cpu without")
    p.add_argument("--out", default="reports", help="output folder (default: reports/)")
    p.add_argument("--record", action="store_true",
                   help="keep the run in benchmarks/results/<date>-<device>-<suite>/ (git-tracked) instead of --out")
    p.add_argument("--results", default=str(record.RESULTS), help=argparse.SUPPRESS)  # tests record elsewhere
    p.add_argument("--cells", type=lambda s: _list(s.upper()), help="e.g. lstm,gru,rnn_tanh")
    p.add_argument("--dtypes", type=_list, help="e.g. bf16,fp16,fp32,tf32")
    p.add_argument("--hidden", type=lambda s: _list(s, int), help="hidden sizes (input size follows)")
    p.add_argument("--batch", type=lambda s: _list(s, int))
    p.add_argument("--seq", type=lambda s: _list(s, int), help="sequence lengths")
    p.add_argument("--impls", type=_list, help=f"subset of {', '.join(REGISTRY)} (default: the suite's; "
                                               f"ours_compiled only where named)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cpu for the cpu suite, cuda for the others")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="start no case after this many seconds; the cases measured by then are written "
                        "(and recorded), and the summary says how many were left")
    p.add_argument("--no-plots", action="store_true", help="write no PNG (they can be drawn later from the CSV)")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    return p.parse_args(argv)


@contextmanager
def _precision(dtype: str):
    """fp32 runs at full precision everywhere; tf32 lets both torch's matmuls and cuDNN use tf32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _rel_err(ours, ref) -> float:
    ours, ref = ours.detach().double(), ref.detach().double()
    if not torch.isfinite(ours).all():
        return math.inf
    return ((ours - ref).norm() / ref.norm()).item()


def _first_result(impl, case, device):
    """(runner, its first output, seconds from building it to that output: what a user waits)."""
    built = {}

    def work():
        built["runner"] = impl.build(case, device)
        built["output"] = built["runner"].output()

    elapsed = seconds(work, device)
    return built["runner"], built["output"], elapsed


def measure_case(case, impls, device, meta, warmup_ms, rep_ms, host=False) -> list[dict]:
    """The rows of every implementation on one case; ``host``: also host_us and launches."""
    rows = []
    unmeasured_host = ((math.nan,) * 3, math.nan) if host else None
    baseline_name = BASELINE[device.type]
    outputs = {}
    ordered = sorted(impls, key=lambda name: name != baseline_name)  # the baseline first: errors need it
    for name in ordered:
        impl = REGISTRY[name]
        if device.type not in impl.devices:
            rows += report.metric_rows(meta, case, name, None, math.nan, math.nan, {},
                                       status=f"not measured: needs {' or '.join(d.upper() for d in impl.devices)}",
                                       host=unmeasured_host)
            continue
        reason = impl.unavailable()
        if reason:
            rows += report.metric_rows(meta, case, name, None, math.nan, math.nan, {},
                                       status=f"not measured: {reason}", host=unmeasured_host)
            continue
        if not impl.supports(case):
            rows += report.metric_rows(meta, case, name, None, math.nan, math.nan, {}, status="unsupported",
                                       host=unmeasured_host)
            continue
        try:
            with _precision(case.dtype):
                runner, outputs[name], first_call_s = _first_result(impl, case, device)
                times = time_ms(runner.step, device, warmup_ms, rep_ms)
                memory = peak_memory_mib(runner, device)
                if host:
                    launches = launches_per_call(runner.step, device)
                    host_values = (host_us(runner.step, device, rep_ms, launches), launches)
                else:
                    host_values = None
                floor = barrier_floor_us(runner.details.get("launches", ()), case.T, device)
            ref = outputs.get(baseline_name)
            err = _rel_err(outputs[name], ref) if ref is not None else math.nan
            rows += report.metric_rows(meta, case, name, times, memory, err, runner.details, host=host_values,
                                       first_call_s=first_call_s, floor_us=floor)
        except Exception as exc:  # one failing implementation must not end the run
            status = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            rows += report.metric_rows(meta, case, name, None, math.nan, math.nan, {}, status=status,
                                       host=unmeasured_host)
        finally:
            runner = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    suite = args.suite or ("quick" if cuda else "cpu")
    device = torch.device(args.device or ("cpu" if suite == "cpu" else "cuda"))
    if device.type == "cuda" and not cuda:
        print(f"suite {suite!r} measures GPUs and this machine has no CUDA device; use --suite cpu "
              f"(or --device cpu to run its cases on the CPU)", file=sys.stderr)
        return 2
    cases = select(suite, args.cells, args.dtypes, args.hidden, args.batch, args.seq)
    unknown = set(args.impls or ()) - set(REGISTRY)
    if unknown:
        print(f"unknown implementations {sorted(unknown)}; choose from {', '.join(REGISTRY)}", file=sys.stderr)
        return 2
    defaults = SUITE_IMPLS.get(suite) or [name for name in REGISTRY if not REGISTRY[name].opt_in]
    # Entries that cannot run on this device still get rows, saying why (e.g. needs CUDA).
    impls = list(args.impls or defaults)
    if device.type == "cpu":
        print(f"No GPU figures: the {suite} suite times ours (its CPU path) against torch.nn on the CPU.")
    meta = report.run_metadata(device, suite)
    provenance = record.provenance(meta, list(sys.argv[1:] if argv is None else argv)) if args.record else None
    print(f"{len(cases)} cases x {len(impls)} implementations ({', '.join(impls)}) on {meta['device']}")

    if args.record:
        out_dir = record.run_dir(meta, Path(args.results))
        csv_path, md_path, stem = out_dir / record.CSV_NAME, out_dir / record.SUMMARY_NAME, record.PLOT_STEM
    else:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        stem = f"bench-{suite}-{stamp}"
        csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"

    def write(rows, measured, stopped=False) -> str:
        """The summary (and the record's meta.json) of the cases measured so far: a run cut short
        keeps everything it measured."""
        table = report.summary(report.to_frame(rows), BASELINE[device.type])
        md = report.markdown(table, f"{suite} on {meta['device']} (us per step; speed-up > 1: ours is faster)")
        md += report.not_measured(report.to_frame(rows))
        if stopped:
            md += (f"\nStopped at the time limit ({args.time_limit:.0f} s): {measured} of {len(cases)} cases "
                   f"measured.\n")
        elif measured < len(cases):
            md += f"\nIn progress: {measured} of {len(cases)} cases measured.\n"
        md_path.write_text(md)
        if args.record:
            record.write_meta(out_dir, dict(provenance, cases_measured=measured, cases_total=len(cases)))
        return md

    rows, start, measured, stopped = [], time.time(), 0, False
    for i, case in enumerate(cases, 1):
        elapsed = time.time() - start
        if args.time_limit is not None and i > 1 and elapsed > args.time_limit:  # at least one case
            print(f"time limit: {args.time_limit:.0f} s passed, {len(cases) - measured} cases left unmeasured")
            stopped = True
            break
        left = f", ~{elapsed / (i - 1) * (len(cases) - i + 1):.0f}s left" if i > 1 else ""
        print(f"[{i}/{len(cases)}] {case.id} ({elapsed:.0f}s elapsed{left})", flush=True)
        case_rows = measure_case(case, impls, device, meta, args.warmup_ms, args.rep_ms, host=suite in HOST_SUITES)
        # Each case's rows are appended as it finishes: a run killed later keeps them.
        report.to_frame(case_rows).to_csv(csv_path, mode="a", header=not rows, index=False)
        rows += case_rows
        measured += 1
        write(rows, measured)

    frame = report.to_frame(rows)
    if not rows:
        frame.to_csv(csv_path, index=False)
    md = write(rows, measured, stopped)
    pngs = [] if args.no_plots else report.plots(frame, out_dir, stem, BASELINE[device.type])
    print(f"\nwrote {csv_path}, {md_path}" + (f" and {len(pngs)} plots" if pngs else
                                            " (no plots: matplotlib missing or one batch size)"))
    if args.record:
        print(f"recorded in {out_dir}: commit it, then `python -m profiling.publish` updates README.md")
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Autotuning sweep: time every candidate partition of the forward kernel, and of the backward
kernel where asked, per shape; fill the autotune cache; write every candidate's time and the
winners to CSV; print a summary.

    python -m scripts.autotune --cells lstm,gru --hidden 256,512,1024 --batch 1,8,64 --dtype bf16
                               [--directions 1] [--passes fwd,bwd] [--out reports/]
    python -m scripts.autotune --suite training [--record] [--skip-cached] [--time-limit SECONDS]

--suite sweeps the shapes a profiling suite runs (cell, hidden size, batch, dtype, directions;
the backward too where the suite trains; LSTM projections tune on first use instead).
--record keeps the sweep in benchmarks/results/<date>-<device>-autotune-<suite>/ (autotune.csv,
summary.md, meta.json) instead of --out. --skip-cached leaves shapes the cache already holds, and
--time-limit starts no shape after that many seconds: together they let a sweep go on over
several calls of a lent GPU (scripts/gpu_check.sh --full).

Needs a CUDA device. The cache is the one the modules read (RNN_CACHE_DIR, default
~/.cache/fused-rnn/autotune.json), so later forwards and training steps of these shapes start tuned.
"""
import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.backward import tune_backward
from kernels.cells import Cell
from kernels.configs import describe
from kernels.forward import autotune_cache, layer_key, tune_forward

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}
PASSES = {"fwd": ("rnn_fwd", tune_forward), "bwd": ("rnn_bwd", tune_backward)}


@dataclass(frozen=True)
class Shape:
    cell: Cell
    hidden: int
    batch: int
    dtype: str
    directions: int
    seq: int
    kernel: str  # rnn_fwd or rnn_bwd


def _list(text, convert=str):
    return [convert(v.strip()) for v in text.split(",") if v.strip()]


def suite_shapes(suite: str) -> list[Shape]:
    """The layer shapes a profiling suite tunes on first use, each kernel once."""
    from profiling.cases import select
    shapes = {}
    for case in select(suite):
        if case.proj_size:
            continue
        kernels = ("rnn_fwd", "rnn_bwd") if case.pass_ == "fwdbwd" else ("rnn_fwd",)
        for kernel in kernels:
            shape = Shape(Cell[case.cell], case.hidden_size, case.B, case.dtype, 2 if case.bidirectional else 1,
                          0, kernel)
            shapes[shape] = max(shapes.get(shape, 0), case.T)
    return [Shape(**{**s.__dict__, "seq": T}) for s, T in shapes.items()]


def key_of(shape: Shape) -> str:
    return layer_key(shape.kernel, shape.cell, shape.hidden, shape.batch, DTYPES[shape.dtype],
                     "tf32" if shape.dtype == "tf32" else "ieee", shape.directions, torch.device("cuda"))


def tune_shape(shape: Shape):
    """Tune one shape on random inputs; returns (key, winner, {candidate: ms per step}, default)."""
    torch.manual_seed(0)
    device = "cuda"
    G, D, H = shape.cell.gates, shape.directions, shape.hidden
    bound = H ** -0.5

    def weight(*size):
        return (torch.rand(*size, device=device) * 2 - 1).mul_(bound).to(DTYPES[shape.dtype])

    weights = [(weight(G * H, H), weight(G * H, H), weight(G * H), weight(G * H)) for _ in range(D)]
    x = torch.randn(shape.seq, shape.batch, H, device=device, dtype=DTYPES[shape.dtype])
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = shape.dtype == "tf32"
    tune = tune_forward if shape.kernel == "rnn_fwd" else tune_backward
    return tune(shape.cell, x, weights)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m scripts.autotune", description=__doc__.splitlines()[0])
    p.add_argument("--suite", help="sweep the shapes of this profiling suite (instead of the grid below)")
    p.add_argument("--cells", default="lstm,gru", type=lambda s: _list(s.upper()))
    p.add_argument("--hidden", default="256,512,1024", type=lambda s: _list(s, int))
    p.add_argument("--batch", default="1,8,64", type=lambda s: _list(s, int))
    p.add_argument("--dtype", default="bf16", type=_list, help="one or more of " + ",".join(DTYPES))
    p.add_argument("--directions", default=1, type=int, choices=(1, 2))
    p.add_argument("--passes", default="fwd", type=_list, help="fwd, bwd or both (grid only; a suite says)")
    p.add_argument("--seq", default=256, type=int, help="timesteps of the inputs (tuning runs at most 64)")
    p.add_argument("--skip-cached", action="store_true", help="leave the shapes the cache already holds")
    p.add_argument("--time-limit", type=float, metavar="SECONDS", help="start no shape after this many seconds")
    p.add_argument("--record", action="store_true", help="keep the sweep in benchmarks/results/ instead of --out")
    p.add_argument("--results", help=argparse.SUPPRESS)  # tests record elsewhere
    p.add_argument("--out", default="reports")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = [p for p in args.passes if p not in PASSES] + [d for d in args.dtype if d not in DTYPES]
    if unknown:
        print(f"unknown passes or dtypes {unknown}: passes are {', '.join(PASSES)}, dtypes {', '.join(DTYPES)}",
              file=sys.stderr)
        return 2
    if args.suite:
        from profiling.cases import SUITES
        if args.suite not in SUITES:
            print(f"unknown suite {args.suite!r}; choose from {', '.join(SUITES)}", file=sys.stderr)
            return 2
        shapes = suite_shapes(args.suite)
    else:
        shapes = [Shape(Cell[c], H, B, dt, args.directions, args.seq, PASSES[p][0])
                  for p in args.passes for c in args.cells for dt in args.dtype for H in args.hidden
                  for B in args.batch]
    if not torch.cuda.is_available():
        print("scripts.autotune times kernels on a GPU, and this machine has no CUDA device", file=sys.stderr)
        return 2
    import pandas as pd
    from profiling import record, report

    label = f"autotune-{args.suite or 'grid'}"
    meta = report.run_metadata(torch.device("cuda"), label)
    provenance = record.provenance(meta, list(sys.argv[1:] if argv is None else argv), program="scripts.autotune",
                                   kind="autotune") if args.record else None
    rows, summary, start, skipped = [], [], time.time(), 0
    for i, shape in enumerate(shapes, 1):
        if args.time_limit is not None and time.time() - start > args.time_limit:
            print(f"time limit: {args.time_limit:.0f} s passed, {len(shapes) - i + 1} shapes left")
            break
        name = f"{shape.kernel} {shape.cell.name} H={shape.hidden} B={shape.batch} {shape.dtype} D={shape.directions}"
        if args.skip_cached and autotune_cache().get(key_of(shape)) is not None:
            skipped += 1
            print(f"[{i}/{len(shapes)}] {name}: cached", flush=True)
            continue
        print(f"[{i}/{len(shapes)}] {name} ({time.time() - start:.0f}s elapsed)", flush=True)
        key, winner, timings, default = tune_shape(shape)
        for candidate, ms in timings.items():
            rows.append(dict(kernel=shape.kernel, cell=shape.cell.name, hidden_size=shape.hidden, batch=shape.batch,
                             dtype=shape.dtype, directions=shape.directions, candidate=candidate,
                             us_per_step=ms * 1e3 if math.isfinite(ms) else math.nan,
                             winner=candidate == describe(winner), default=candidate == describe(default), key=key,
                             device=meta["device"]))
        summary.append((shape, describe(default), timings.get(describe(default), math.inf) * 1e3, describe(winner),
                        timings[describe(winner)] * 1e3))
    table = [f"{'kernel':<8}{'cell':<9}{'H':>6}{'B':>5} {'dtype':<5}{'D':>2} {'default':<28}{'us/step':>9}  "
             f"{'winner':<28}{'us/step':>9}"]
    table += [f"{s.kernel:<8}{s.cell.name:<9}{s.hidden:>6}{s.batch:>5} {s.dtype:<5}{s.directions:>2} {d_name:<28}"
              f"{d_us:>9.2f}  {w_name:<28}{w_us:>9.2f}" for s, d_name, d_us, w_name, w_us in summary]
    done = len(summary) + skipped
    note = f"{len(summary)} shapes tuned, {skipped} already cached, {len(shapes) - done} left (of {len(shapes)})"
    if args.record:
        out = record.run_dir(meta, Path(args.results) if args.results else record.RESULTS)
        path = out / "autotune.csv"
        (out / record.SUMMARY_NAME).write_text(f"## {label} on {meta['device']}\n\n{note}\n\n```\n"
                                               + "\n".join(table) + "\n```\n")
        record.write_meta(out, dict(provenance, shapes_tuned=len(summary), shapes_cached=skipped,
                                    shapes_total=len(shapes)))
    else:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"autotune-{meta['timestamp'][:19].replace(':', '').replace('-', '')}Z.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    print(f"\nwrote {path}; cache {autotune_cache().path}; {note}\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())

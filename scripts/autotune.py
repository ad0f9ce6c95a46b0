"""Autotuning sweep: time every candidate partition of the forward kernel per shape, fill the
autotune cache, write every candidate's time and the winners to CSV, print a summary.

    python -m scripts.autotune --cells lstm,gru --hidden 256,512,1024 --batch 1,8,64 --dtype bf16
                               [--directions 1] [--out reports/]

Needs a CUDA device. The cache is the one the modules read (RNN_CACHE_DIR, default
~/.cache/fused-rnn/autotune.json), so later forwards of these shapes start tuned.
"""
import argparse
import datetime
import math
import sys
from pathlib import Path

import torch

from kernels.cells import Cell
from kernels.configs import describe
from kernels.forward import autotune_cache, tune_forward

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _list(text, convert=str):
    return [convert(v.strip()) for v in text.split(",") if v.strip()]


def tune_shape(cell: Cell, H: int, B: int, dtype: str, directions: int, seq: int):
    """Tune one shape on random inputs; returns (key, winner, {candidate: ms per step}, default)."""
    torch.manual_seed(0)
    device = "cuda"
    G, D = cell.gates, directions
    bound = H ** -0.5

    def weight(*shape):
        return (torch.rand(*shape, device=device) * 2 - 1).mul_(bound).to(DTYPES[dtype])

    weights = [(weight(G * H, H), weight(G * H, H), weight(G * H), weight(G * H)) for _ in range(D)]
    x = torch.randn(seq, B, H, device=device, dtype=DTYPES[dtype])
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    return tune_forward(cell, x, weights)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.autotune", description=__doc__.splitlines()[0])
    p.add_argument("--cells", default="lstm,gru", type=lambda s: _list(s.upper()))
    p.add_argument("--hidden", default="256,512,1024", type=lambda s: _list(s, int))
    p.add_argument("--batch", default="1,8,64", type=lambda s: _list(s, int))
    p.add_argument("--dtype", default="bf16", type=_list, help="one or more of " + ",".join(DTYPES))
    p.add_argument("--directions", default=1, type=int, choices=(1, 2))
    p.add_argument("--seq", default=256, type=int, help="timesteps of the inputs (tuning runs at most 64)")
    p.add_argument("--out", default="reports")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("scripts.autotune times kernels on a GPU, and this machine has no CUDA device", file=sys.stderr)
        return 2
    import pandas as pd

    rows, summary = [], []
    shapes = [(Cell[c], H, B, dt) for c in args.cells for dt in args.dtype for H in args.hidden for B in args.batch]
    for i, (cell, H, B, dtype) in enumerate(shapes, 1):
        print(f"[{i}/{len(shapes)}] {cell.name} H={H} B={B} {dtype} D={args.directions}", flush=True)
        key, winner, timings, default = tune_shape(cell, H, B, dtype, args.directions, args.seq)
        for name, ms in timings.items():
            rows.append(dict(cell=cell.name, hidden_size=H, batch=B, dtype=dtype, directions=args.directions,
                             candidate=name, us_per_step=ms * 1e3 if math.isfinite(ms) else math.nan,
                             winner=name == describe(winner), default=name == describe(default), key=key,
                             device=torch.cuda.get_device_name()))
        summary.append((cell.name, H, B, dtype, describe(default), timings.get(describe(default), math.inf) * 1e3,
                        describe(winner), timings[describe(winner)] * 1e3))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"autotune-{stamp}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    print(f"\nwrote {path}; cache {autotune_cache().path}\n")
    print(f"{'cell':<9}{'H':>6}{'B':>5} {'dtype':<5} {'default':<28}{'us/step':>9}  {'winner':<28}{'us/step':>9}")
    for cell, H, B, dtype, d_name, d_us, w_name, w_us in summary:
        print(f"{cell:<9}{H:>6}{B:>5} {dtype:<5} {d_name:<28}{d_us:>9.2f}  {w_name:<28}{w_us:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train a small sequence model (embedding or linear input -> RNN/LSTM/GRU stack -> linear head) with
rnn.X or torch.nn.X on a task that needs no download (scripts/train_tasks.py).

    python -m scripts.train --task charlm --cell lstm --hidden 128 --steps 300 --lr 3e-3 --compare
    python -m scripts.train --task charlm [--text FILE] [--packed] --cell gru --layers 2 --dtype bf16
    torchrun --nproc_per_node=2 -m scripts.train --ddp --task adding --batch 64

Each run writes, under --out (default reports/train/): ``<stem>-<impl>.csv``, one row per step
(COLUMNS: step, loss, accuracy (NaN where the task has none), tokens_per_s, peak_mem_mib (NaN on
the CPU), impl, backend (ours: triton, reference or native; else torch.nn)); ``<stem>.png``, the
loss curves of this invocation's runs overlaid; ``<stem>.json``, what ran, on what, from which
commit. --save writes a checkpoint (model and optimizer state, step, arguments, RNG state); rnn.X
and torch.nn.X name their parameters alike, so a checkpoint of either --impl resumes under the other.

Both implementations start from the same weights (torch.nn's initialisation under --seed, loaded
into rnn.X) and see the same batches (drawn from their own generator per (seed, step)); dropout
draws from torch's generator, seeded alike. On CPU tensors rnn.X runs torch.nn's own implementation
unless RNN_BACKEND=reference (the pure-PyTorch loop) or TRITON_INTERPRET=1 (the kernels, slowly).

--ddp: DistributedDataParallel (gloo on the CPU, nccl on GPUs); each rank trains on its shard of
the global --batch. --fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) over the whole model.
--accum N splits each rank's shard into N micro-batches whose gradients add up before one
optimizer step (without a gradient exchange in between).
"""
import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnn
from scripts.train_tasks import TASKS, Task, make_task, step_generator

CELLS = {"rnn": (rnn.RNN, torch.nn.RNN), "lstm": (rnn.LSTM, torch.nn.LSTM), "gru": (rnn.GRU, torch.nn.GRU)}
IMPLS = ("ours", "torch")
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST = ("bf16", "fp16")  # parameters stay fp32; forward under torch.autocast
# backend: what ran the recurrence: for ours, rnn.functional's ForwardPath (triton, reference or
# native), for torch "torch.nn".
COLUMNS = ["step", "loss", "accuracy", "tokens_per_s", "peak_mem_mib", "impl", "backend"]
# What a checkpoint's model must share with the run that loads it (besides the task's signature).
ARCHITECTURE = ("task", "cell", "layers", "hidden", "bidirectional")


@dataclass(frozen=True)
class TrainConfig:
    task: str = "charlm"
    impl: str = "ours"
    cell: str = "lstm"
    layers: int = 1
    hidden: int = 128
    bidirectional: bool = False
    dropout: float = 0.0
    dtype: str = "fp32"
    seed: int = 0
    steps: int = 500
    batch: int = 32
    seq_len: int | None = None  # None: the task's default
    copy_len: int = 8
    text: str | None = None  # charlm: a UTF-8 text file; None: train_tasks.default_corpus()
    packed: bool = False
    lr: float = 1e-3
    clip: float = 1.0  # gradient norm clipping; 0: none
    accum: int = 1
    device: str | None = None  # None: cuda where available, else cpu
    ddp: bool = False
    fsdp: bool = False
    save: str | None = None
    load: str | None = None
    log_every: int = 0  # progress line every N steps; 0: about 20 per run
    quiet: bool = False


class SequenceModel(torch.nn.Module):
    """Encoder (embedding of symbols, or a linear layer over features) -> RNN stack -> linear head,
    read at every step, or (per_step False) from the last layer's final states, every direction."""

    def __init__(self, task: Task, rnn_class, hidden: int, layers: int, dropout: float, bidirectional: bool):
        super().__init__()
        self.encoder = (torch.nn.Embedding(task.vocab, hidden) if task.vocab
                        else torch.nn.Linear(task.features, hidden))
        self.rnn = rnn_class(hidden, hidden, layers, batch_first=True, dropout=dropout, bidirectional=bidirectional)
        self.directions = 2 if bidirectional else 1
        self.head = torch.nn.Linear(self.directions * hidden, task.outputs)
        self.per_step = task.per_step

    def forward(self, inputs, lengths=None):
        B, T = inputs.shape[:2]
        x = self.encoder(inputs)
        if lengths is not None:
            x = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        output, hidden = self.rnn(x)
        if not self.per_step:
            h_n = hidden[0] if isinstance(hidden, tuple) else hidden
            final = h_n[-self.directions:].transpose(0, 1).reshape(B, -1)
            return self.head(final).squeeze(-1)
        if lengths is not None:
            output, _ = pad_packed_sequence(output, batch_first=True, total_length=T)
        return self.head(output)


def as_config(value) -> TrainConfig:
    """A TrainConfig from itself, an argparse.Namespace or a dict (unknown keys ignored)."""
    if isinstance(value, TrainConfig):
        return value
    items = vars(value) if isinstance(value, argparse.Namespace) else dict(value)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in items.items() if k in names})


def _device(config: TrainConfig, rank: int = 0) -> torch.device:
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device} asked for, and this machine has no CUDA device")
        if device.index is None:  # one GPU per rank on each machine
            device = torch.device("cuda", rank % torch.cuda.device_count() if config.ddp or config.fsdp
                                  else torch.cuda.current_device())
    return device


def build_task(config: TrainConfig) -> Task:
    text = None
    if config.text is not None:
        if config.task != "charlm":
            raise ValueError(f"text: only charlm reads a text, got task {config.task!r}")
        text = Path(config.text).read_text(encoding="utf-8")
    return make_task(config.task, copy_len=config.copy_len, text=text, packed=config.packed)


def check(config: TrainConfig) -> tuple[Task, int]:
    """Refuses bad options, naming the argument; returns the task and the sequence length."""
    for name, choices in (("impl", IMPLS), ("cell", CELLS), ("dtype", DTYPES), ("task", TASKS)):
        if getattr(config, name) not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(config, name)!r}")
    for name in ("layers", "hidden", "steps", "batch", "accum"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")
    if not config.lr > 0:
        raise ValueError(f"lr must be positive, got {config.lr}")
    if config.clip < 0:
        raise ValueError(f"clip must be positive, or 0 for no clipping, got {config.clip}")
    if config.ddp and config.fsdp:
        raise ValueError("ddp and fsdp: choose one way of distributing the model")
    if config.batch % config.accum:  # the ranks' share is checked once their number is known (train)
        raise ValueError(f"batch: a global batch of {config.batch} does not split into {config.accum} micro-batches "
                         f"of equal size")
    task = build_task(config)
    if config.bidirectional and not task.allows_bidirectional:
        raise ValueError(f"bidirectional: task {task.name!r} predicts each next character, which a backward "
                         f"direction would already have read; train it with one direction")
    seq_len = config.seq_len or task.default_seq_len
    if seq_len < task.min_seq_len():
        raise ValueError(f"seq_len must be at least {task.min_seq_len()} for task {task.name!r}"
                         + (" (twice copy_len, plus the delimiter)" if task.name == "copy" else "")
                         + f", got {seq_len}")
    if task.max_seq_len() is not None and seq_len > task.max_seq_len():
        raise ValueError(f"seq_len must be at most {task.max_seq_len()} (the text's length less one), got {seq_len}")
    device = _device(dataclasses.replace(config, ddp=False, fsdp=False))
    if config.dtype in AUTOCAST and device.type != "cuda":
        raise ValueError(f"dtype {config.dtype}: mixed precision runs under CUDA autocast, and this run is on "
                         f"{device.type}; on the CPU use fp32 or fp64")
    return task, seq_len


def _process_group(config: TrainConfig, device_type: str) -> tuple[int, int]:
    """(rank, world size): joins the process group torchrun describes, unless one is up already."""
    if not (config.ddp or config.fsdp):
        return 0, 1
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        except ValueError as exc:
            flag = "--ddp" if config.ddp else "--fsdp"
            raise RuntimeError(f"{flag} joins a process group, and none is described here ({exc}); launch with "
                               f"torchrun --nproc_per_node=N -m scripts.train {flag} ...") from exc
    return dist.get_rank(), dist.get_world_size()


def initial_model(config: TrainConfig, task: Task) -> SequenceModel:
    """torch.nn's initialisation under the seed; for ours, the same weights loaded into rnn.X."""
    ours_class, torch_class = CELLS[config.cell]
    torch.manual_seed(config.seed)
    args = (config.hidden, config.layers, config.dropout, config.bidirectional)
    model = SequenceModel(task, torch_class, *args)
    if config.impl == "ours":
        twin = SequenceModel(task, ours_class, *args)
        twin.load_state_dict(model.state_dict())
        model = twin
    return model


def _rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kwargs)


def save_checkpoint(path, model, optimizer, scaler, step: int, config: TrainConfig, task: Task,
                    device: torch.device, rank: int):
    """Full (unsharded) state on the CPU, written by rank 0; every rank must call it (FSDP gathers)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_options(cpu_offload=True))
    if rank == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model_state, "optimizer": optimizer_state, "scaler": scaler.state_dict(), "step": step,
                    "args": asdict(config), "task": task.signature(), "rng": _rng_state(device)}, path)
    if dist.is_initialized():
        dist.barrier()


def read_checkpoint(path, config: TrainConfig, task: Task) -> dict:
    """What save_checkpoint wrote, once checked to fit this run (ValueError naming what differs)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for name in ARCHITECTURE:
        if checkpoint["args"][name] != getattr(config, name):
            raise ValueError(f"{name}: the checkpoint {path} was trained with {name}={checkpoint['args'][name]!r}, "
                             f"this run asks for {getattr(config, name)!r}")
    for key, value in task.signature().items():
        if checkpoint["task"].get(key) != value:
            raise ValueError(f"the checkpoint {path} was trained on another {task.name} task ({key} differs: "
                             + ("its text has another alphabet" if key == "alphabet" else
                                f"{checkpoint['task'].get(key)!r}, here {value!r}") + ")")
    step = checkpoint["step"]
    if step >= config.steps:
        raise ValueError(f"steps: the checkpoint {path} has trained {step} steps already; ask for more than that")
    return checkpoint


def load_checkpoint(path, model, optimizer, scaler, config: TrainConfig, task: Task, device: torch.device) -> int:
    """Loads a checkpoint into this run's model (any impl, wrapped or not) and optimizer, and
    restores torch's generator; returns the step it reached."""
    from torch.distributed.checkpoint.state_dict import set_state_dict
    checkpoint = read_checkpoint(path, config, task)
    step = checkpoint["step"]
    set_state_dict(model, optimizer, model_state_dict=checkpoint["model"], optim_state_dict=checkpoint["optimizer"],
                   options=_state_options())
    if scaler.is_enabled() and checkpoint["scaler"]:
        scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    if device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    return step


def _progress(steps: range, enabled: bool):
    """tqdm over the steps where installed (its bar carries the loss), else the plain range."""
    if not enabled:
        return steps, None
    try:
        from tqdm import tqdm
    except ImportError:
        return steps, None
    bar = tqdm(steps, unit="step", dynamic_ncols=True)
    return bar, bar


def train(config) -> pd.DataFrame:
    """Trains one model; returns one row per step (COLUMNS). config: a TrainConfig, an
    argparse.Namespace or a dict. With ddp or fsdp it joins (or creates, from torchrun's
    environment) the default process group, and leaves it up; the rows are the same on every rank
    (loss and accuracy of the global batch)."""
    config = as_config(config)
    task, seq_len = check(config)
    device_type = _device(dataclasses.replace(config, ddp=False, fsdp=False)).type
    rank, world = _process_group(config, device_type)
    device = _device(config, rank)
    if config.batch % (world * config.accum):
        raise ValueError(f"batch: a global batch of {config.batch} does not split into {world} ranks x "
                         f"{config.accum} micro-batches of equal size")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    param_dtype = torch.float64 if config.dtype == "fp64" else torch.float32
    amp_dtype = DTYPES[config.dtype] if config.dtype in AUTOCAST else None
    talk = rank == 0 and not config.quiet

    model = initial_model(config, task).to(device, param_dtype)
    torch.manual_seed(config.seed)  # dropout's generator: the same state for both impls
    core = model  # what holds the parameters under their own names
    if config.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.index is not None
                                                          else None)
    elif config.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        fully_shard(model, mesh=init_device_mesh(device.type, (world,)))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=config.dtype == "fp16")
    start = 0
    if config.load:
        start = load_checkpoint(config.load, core, optimizer, scaler, config, task, device)

    if talk:
        where = f" on {world} ranks ({'DDP' if config.ddp else 'FSDP2'})" if world > 1 else ""
        print(f"{config.impl}: {task.name} with {'rnn' if config.impl == 'ours' else 'torch.nn'}.{type_name(config)} "
              f"L={config.layers} H={config.hidden}{' bidirectional' if config.bidirectional else ''}, "
              f"T={seq_len} B={config.batch}, {config.dtype} on {device}{where}"
              + (f", from step {start} of {config.load}" if start else ""), flush=True)
    log_every = config.log_every or max(1, config.steps // 20)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    rows = []
    steps, bar = _progress(range(start + 1, config.steps + 1), talk)
    for step in steps:
        began = time.perf_counter()
        batch = task.batch(step_generator(config.seed, step), config.batch, seq_len)
        count = task.count(batch)  # the global batch's: shards' and micro-batches' sums add up to its mean
        shard = batch.shard(rank, world)
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, correct predictions
        optimizer.zero_grad(set_to_none=True)
        for i in range(config.accum):
            micro = shard.shard(i, config.accum).to(device, param_dtype)
            last = i == config.accum - 1
            sync = contextlib.nullcontext()
            if config.ddp and not last:
                sync = model.no_sync()
            elif config.fsdp:
                model.set_requires_gradient_sync(last)
            with sync:
                with amp():
                    prediction = model(micro.inputs, micro.lengths)
                loss_sum, correct = task.loss_terms(prediction, micro)
                # DDP and FSDP average gradients over ranks: times world, the global mean's gradient.
                scaler.scale(loss_sum * (world / count)).backward()
            totals[0] += loss_sum.detach()
            if correct is not None:
                totals[1] += correct
        if config.clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        scaler.step(optimizer)
        scaler.update()
        if world > 1:
            dist.all_reduce(totals)
        loss_total, correct_total = totals.tolist()  # waits for the step
        elapsed = time.perf_counter() - began
        row = {"step": step, "loss": loss_total / count,
               "accuracy": correct_total / count if task.has_accuracy else math.nan,
               "tokens_per_s": batch.tokens / elapsed,
               "peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan,
               "impl": config.impl, "backend": "torch.nn"}
        path = getattr(core.rnn, "last_path", None)
        if config.impl == "ours" and path is not None:
            row["backend"] = path.backend
            if talk and step == start + 1:
                print(f"ours runs on the {path.backend} backend" + (f" ({path.reason})" if path.reason else ""),
                      flush=True)
        rows.append(row)
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.3g}")
        elif talk and (step % log_every == 0 or step == config.steps):
            accuracy = f" acc {row['accuracy']:.3f}" if task.has_accuracy else ""
            print(f"{config.impl} step {step}/{config.steps} loss {row['loss']:.4f}{accuracy} "
                  f"{row['tokens_per_s']:,.0f} tok/s", flush=True)
    if config.save:
        save_checkpoint(config.save, core, optimizer, scaler, config.steps, config, task, device, rank)
        if talk:
            print(f"saved {config.save} (step {config.steps})", flush=True)
    return pd.DataFrame(rows, columns=COLUMNS)


def run_stem(config: TrainConfig, world: int = 1) -> str:
    """File names of a run's outputs: its settings, the impl left out (it names the CSV)."""
    parts = [config.task, config.cell, f"L{config.layers}", f"H{config.hidden}"]
    parts += ["bi"] * config.bidirectional + ["packed"] * config.packed + [config.dtype, f"seed{config.seed}"]
    if world > 1:
        parts.append(f"{'ddp' if config.ddp else 'fsdp'}{world}")
    return "-".join(parts)


def plot_losses(frames: dict, path: Path, title: str) -> Path | None:
    """One PNG, the runs' loss curves overlaid (torch.nn dashed, so an identical curve under ours
    stays visible); None where matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, frame in frames.items():
        ax.plot(frame["step"], frame["loss"], label=label, linestyle="--" if label.startswith("torch") else "-")
    if all((frame["loss"] > 0).all() for frame in frames.values()):
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def max_relative_difference(a: pd.Series, b: pd.Series) -> float:
    """max |a - b| / |b| over aligned steps."""
    a, b = a.to_numpy(), b.to_numpy()
    return float((abs(a - b) / abs(b)).max()) if len(b) else math.nan


def parse_args(argv=None) -> argparse.Namespace:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m scripts.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=TASKS, default=defaults.task, help="default: %(default)s")
    p.add_argument("--impl", choices=IMPLS, default=defaults.impl, help="rnn.X (ours, the default) or torch.nn.X")
    p.add_argument("--compare", action="store_true", help="train ours, then torch.nn, on the same seed and data")
    p.add_argument("--cell", choices=tuple(CELLS), default=defaults.cell, help="default: %(default)s")
    p.add_argument("--layers", type=int, default=defaults.layers, help="default: %(default)s")
    p.add_argument("--hidden", type=int, default=defaults.hidden, help="default: %(default)s")
    p.add_argument("--bidirectional", action="store_true", help="adding and copy only")
    p.add_argument("--dropout", type=float, default=defaults.dropout, help="between layers (default: %(default)s)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=defaults.dtype,
                   help="bf16/fp16: CUDA autocast (fp16 with a GradScaler); fp64: full float64 "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="default: %(default)s")
    p.add_argument("--steps", type=int, default=defaults.steps,
                   help="total, counting a loaded checkpoint's (default: %(default)s)")
    p.add_argument("--batch", type=int, default=defaults.batch,
                   help="global batch, all ranks together (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=None, help="default: the task's (adding 50, copy 30, charlm 64)")
    p.add_argument("--copy-len", type=int, default=defaults.copy_len,
                   help="copy: symbols to memorise (default: %(default)s)")
    p.add_argument("--text", default=None, help="charlm: a UTF-8 text file (default: a corpus generated in code)")
    p.add_argument("--packed", action="store_true", help="charlm: random lengths, fed as a PackedSequence")
    p.add_argument("--lr", type=float, default=defaults.lr, help="Adam's learning rate (default: %(default)s)")
    p.add_argument("--clip", type=float, default=defaults.clip,
                   help="gradient norm clipping, 0: none (default: %(default)s)")
    p.add_argument("--accum", type=int, default=defaults.accum,
                   help="micro-batches per optimizer step (default: %(default)s)")
    p.add_argument("--device", default=None, help="default: cuda where available, else cpu")
    p.add_argument("--ddp", action="store_true", help="DistributedDataParallel (launch with torchrun)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard (launch with torchrun)")
    p.add_argument("--out", default="reports/train", help="folder of the CSV, PNG and JSON (default: %(default)s)")
    p.add_argument("--record", action="store_true",
                   help="keep the run in benchmarks/results/<date>-<device>-train-<task>/ instead of --out (GPU runs "
                        "worth keeping: meta.json, summary.md, the CSVs and the plot)")
    p.add_argument("--results", help=argparse.SUPPRESS)  # tests record elsewhere
    p.add_argument("--save", metavar="CKPT", default=None, help="checkpoint written at the end")
    p.add_argument("--load", metavar="CKPT", default=None, help="checkpoint to resume from")
    p.add_argument("--log-every", type=int, default=defaults.log_every, help="0: about 20 lines a run")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    config = as_config(args)
    try:
        task, _ = check(config)
        if config.load:
            read_checkpoint(config.load, config, task)
        if args.compare and config.save:
            raise ValueError("save: --compare trains two models; save one run's at a time (without --compare)")
    except (ValueError, OSError) as exc:  # OSError: --text or --load unreadable
        print(f"python -m scripts.train: error: {exc}", file=sys.stderr)
        return 2
    impls = IMPLS if args.compare else (config.impl,)
    frames = {}
    for impl in impls:
        frames[impl] = train(dataclasses.replace(config, impl=impl))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank:
        return 0
    from profiling import record
    from profiling.report import run_metadata

    meta = record.provenance(run_metadata(_device(dataclasses.replace(config, ddp=False, fsdp=False)),
                                          f"train-{config.task}"), argv, program="scripts.train", kind="train")
    if args.record:
        out = record.run_dir(meta, Path(args.results) if args.results else record.RESULTS)
    else:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    stem = run_stem(config, world)
    written = []
    for impl, frame in frames.items():
        frame.to_csv(out / f"{stem}-{impl}.csv", index=False)
        written.append(out / f"{stem}-{impl}.csv")
    meta_path = out / (record.META_NAME if args.record else f"{stem}.json")
    meta_path.write_text(json.dumps(dict(meta, config=asdict(config), world_size=world, impls=list(frames)), indent=2,
                                    sort_keys=True) + "\n")
    written.append(meta_path)
    png = plot_losses({curve_label(impl, frame, config): frame for impl, frame in frames.items()}, out / f"{stem}.png",
                      f"{config.task}: {type_name(config)} L={config.layers} H={config.hidden} {config.dtype}")
    if png is None:
        print("no plot: matplotlib is not installed")
    else:
        written.append(png)
    lines = []
    for impl, frame in frames.items():
        if len(frame):
            last = frame.iloc[-1]
            accuracy = "" if math.isnan(last.accuracy) else f", accuracy {last.accuracy:.3f}"
            lines.append(f"{impl}: final loss {last.loss:.4f}{accuracy}, median {frame.tokens_per_s.median():,.0f} tok/s")
    if len(frames) == 2 and len(frames["ours"]):
        lines.append(f"max relative loss difference, ours vs torch.nn: "
                     f"{max_relative_difference(frames['ours'].loss, frames['torch'].loss):.3g}")
    print("\n".join(lines))
    if args.record:
        (out / record.SUMMARY_NAME).write_text(f"## {stem} on {meta['device']}\n\n" + "".join(
            f"- {line}\n" for line in lines))
        written.append(out / record.SUMMARY_NAME)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def type_name(config: TrainConfig) -> str:
    return CELLS[config.cell][1].__name__


def curve_label(impl: str, frame: pd.DataFrame, config: TrainConfig) -> str:
    """'torch.nn.GRU', or 'ours (rnn.GRU, reference)': the backend that ran ours."""
    if impl == "torch":
        return f"torch.nn.{type_name(config)}"
    return f"ours (rnn.{type_name(config)}" + (f", {frame.backend.iloc[0]})" if len(frame) else ")")


if __name__ == "__main__":
    sys.exit(main())

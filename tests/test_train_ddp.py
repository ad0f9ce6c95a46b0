"""scripts/train.py across processes: `torchrun --standalone --nproc_per_node=2 -m scripts.train`
on two gloo ranks of this CPU. DDP (with and without no_sync gradient accumulation) and FSDP2 end
with the parameters of one process training on the combined batch, and the distributed run's
checkpoint resumes in one process."""
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from scripts.train import TrainConfig, initial_model, train
from scripts.train_tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
PARITY = 1e-10  # float64; measured differences are ~1e-15


def torchrun(tmp_path: Path, config: TrainConfig, *flags: str) -> pd.DataFrame:
    """Trains `config` on two ranks through the command line; returns rank 0's CSV. The ranks
    inherit this process's environment (RNN_BACKEND, TRITON_INTERPRET)."""
    out = tmp_path / "out"
    args = ["--task", config.task, "--cell", config.cell, "--hidden", str(config.hidden), "--seq-len",
            str(config.seq_len), "--copy-len", str(config.copy_len), "--batch", str(config.batch), "--steps",
            str(config.steps), "--lr", str(config.lr), "--seed", str(config.seed), "--dtype", config.dtype,
            "--device", "cpu", "--out", str(out)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "scripts.train", *args, *flags]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    csvs = list(out.glob("*-ours.csv"))
    assert len(csvs) == 1, "rank 0 writes the one CSV"
    return pd.read_csv(csvs[0])


def relative_difference(state: dict, reference: dict, initial: dict) -> float:
    """max over parameters of ||state - reference|| / ||reference - initial||: measured against how
    far training moved each parameter, not against the parameter."""
    return max(float((state[k] - reference[k]).norm() / (reference[k] - initial[k]).norm()) for k in reference)


def initial_state(config: TrainConfig) -> dict:
    return initial_model(config, make_task(config.task, copy_len=config.copy_len)).double().state_dict()


def loss_difference(ours: pd.DataFrame, theirs: pd.DataFrame) -> float:
    assert list(ours.step) == list(theirs.step)
    return float(((ours.loss - theirs.loss).abs() / theirs.loss.abs()).max())


COPY = TrainConfig(task="copy", cell="lstm", hidden=8, seq_len=6, copy_len=2, batch=8, steps=4, lr=1e-2, seed=31,
                   dtype="fp64", device="cpu", quiet=True)


def test_ddp_accumulating_with_no_sync_matches_one_process_and_resumes_there(monkeypatch, tmp_path):
    monkeypatch.setenv("RNN_BACKEND", "reference")
    distributed_checkpoint = tmp_path / "ddp.pt"
    # Each rank: 4 of the 8 sequences, in 2 micro-batches of 2.
    curve = torchrun(tmp_path, COPY, "--ddp", "--accum", "2", "--save", str(distributed_checkpoint))
    single = train(replace(COPY, save=str(tmp_path / "single.pt")))
    assert (curve.backend == "reference").all()
    print(f"loss {loss_difference(curve, single):.3g}")
    assert loss_difference(curve, single) < PARITY
    distributed = torch.load(distributed_checkpoint, weights_only=True)
    one = torch.load(tmp_path / "single.pt", weights_only=True)
    assert distributed["model"].keys() == one["model"].keys()  # no "module." prefix
    difference = relative_difference(distributed["model"], one["model"], initial_state(COPY))
    print(f"parameters {difference:.3g}")
    assert difference < PARITY

    # The distributed checkpoint goes on in one process, under torch.nn, as an unbroken run does.
    resumed = train(replace(COPY, impl="torch", steps=6, load=str(distributed_checkpoint)))
    unbroken = train(replace(COPY, impl="torch", steps=6))
    assert list(resumed.step) == [5, 6]
    assert loss_difference(resumed, unbroken.iloc[4:].reset_index(drop=True)) < PARITY


def test_fsdp_matches_one_process_and_its_checkpoint_loads_there(monkeypatch, tmp_path):
    monkeypatch.setenv("RNN_BACKEND", "reference")
    config = replace(COPY, cell="gru", seed=32)
    checkpoint = tmp_path / "fsdp.pt"
    curve = torchrun(tmp_path, config, "--fsdp", "--save", str(checkpoint))
    single = train(replace(config, save=str(tmp_path / "single.pt")))
    print(f"loss {loss_difference(curve, single):.3g}")
    assert loss_difference(curve, single) < PARITY
    sharded = torch.load(checkpoint, weights_only=True)
    one = torch.load(tmp_path / "single.pt", weights_only=True)["model"]
    difference = relative_difference(sharded["model"], one, initial_state(config))
    print(f"parameters {difference:.3g}")
    assert difference < PARITY
    resumed = train(replace(config, steps=5, load=str(checkpoint)))
    unbroken = train(replace(config, steps=5))
    assert loss_difference(resumed, unbroken.iloc[4:].reset_index(drop=True)) < PARITY


@pytest.mark.interpreter
def test_ddp_through_the_kernels_matches_one_process(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the ranks run the kernels through the interpreter
    config = TrainConfig(task="adding", cell="lstm", hidden=8, seq_len=6, batch=4, steps=3, lr=1e-2, seed=33,
                         dtype="fp64", device="cpu", quiet=True)
    checkpoint = tmp_path / "ddp.pt"
    curve = torchrun(tmp_path, config, "--ddp", "--save", str(checkpoint))
    assert (curve.backend == "triton").all()
    single = train(replace(config, impl="torch", save=str(tmp_path / "single.pt")))  # torch.nn: the oracle
    print(f"loss {loss_difference(curve, single):.3g}")
    assert loss_difference(curve, single) < PARITY
    distributed = torch.load(checkpoint, weights_only=True)["model"]
    one = torch.load(tmp_path / "single.pt", weights_only=True)["model"]
    difference = relative_difference(distributed, one, initial_state(config))
    print(f"parameters {difference:.3g}")
    assert difference < PARITY

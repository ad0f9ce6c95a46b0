"""scripts/train.py in one process: ours and torch.nn train alike (same seed and data, the same loss
curve to float64 round-off), on the reference path and through the kernels; the tasks' data;
checkpoints that resume under the other implementation; the command line's files and errors.
Across processes: tests/test_train_ddp.py."""
import importlib.util
import json
import math
from dataclasses import replace

import pandas as pd
import pytest
import torch

from scripts import train as trainer
from scripts.train import COLUMNS, TrainConfig, train
from scripts.train_tasks import IGNORE, make_task, step_generator

PARITY = 1e-9  # float64: the curves differ by round-off only (measured: ~1e-16)


def max_relative_difference(ours: pd.DataFrame, theirs: pd.DataFrame) -> float:
    assert list(ours.step) == list(theirs.step)
    difference = ((ours.loss - theirs.loss).abs() / theirs.loss.abs()).max()
    return float("nan") if math.isnan(difference) else float(difference)


def both(**settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The curves of ours and torch.nn, in float64 on the CPU."""
    config = TrainConfig(dtype="fp64", device="cpu", quiet=True, **settings)
    return train(replace(config, impl="ours")), train(replace(config, impl="torch"))


REFERENCE_CASES = [
    pytest.param(dict(task="adding", cell="lstm", hidden=16, seq_len=12, batch=8, seed=1), id="LSTM-adding-L1-H16"),
    pytest.param(dict(task="copy", cell="gru", hidden=16, seq_len=11, copy_len=3, batch=8, seed=2),
                 id="GRU-copy-L1-H16"),
    pytest.param(dict(task="adding", cell="rnn", hidden=17, seq_len=9, batch=6, seed=3), id="RNN-adding-L1-H17"),
    pytest.param(dict(task="copy", cell="lstm", hidden=12, seq_len=9, copy_len=3, batch=6, layers=2,
                      bidirectional=True, dropout=0.3, seed=4), id="LSTM-copy-L2-bi-dropout-H12"),
    pytest.param(dict(task="charlm", cell="gru", hidden=16, seq_len=12, batch=6, packed=True, seed=5),
                 id="GRU-charlm-packed-L1-H16"),
]


@pytest.mark.parametrize("settings", REFERENCE_CASES)
def test_reference_path_follows_torch_nn_in_float64(monkeypatch, settings):
    monkeypatch.setenv("RNN_BACKEND", "reference")
    ours, theirs = both(steps=30, lr=1e-2, **settings)
    assert (ours.backend == "reference").all() and (theirs.backend == "torch.nn").all()
    difference = max_relative_difference(ours, theirs)
    print(f"max relative loss difference over 30 steps: {difference:.3g}")
    assert difference < PARITY
    if settings["task"] != "copy":  # copy sits at log(8) for hundreds of steps before it learns
        # The model learned: parity of a model that does not train would prove little.
        assert ours.loss.iloc[-5:].mean() < 0.9 * ours.loss.iloc[:5].mean()
    if settings.get("dropout"):
        # Dropout drew masks (the same for both, from torch's generator): without it the curve differs.
        plain = train(TrainConfig(dtype="fp64", device="cpu", quiet=True, impl="torch", steps=5, lr=1e-2,
                                  **{**settings, "dropout": 0.0}))
        assert max_relative_difference(plain, theirs.iloc[:5]) > 1e-6


INTERPRETER_CASES = [
    pytest.param(dict(task="adding", cell="lstm", hidden=8, seq_len=6, batch=4, seed=6), id="LSTM-adding-L1-H8"),
    pytest.param(dict(task="copy", cell="gru", hidden=8, seq_len=7, copy_len=2, batch=4, seed=7), id="GRU-copy-L1-H8"),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("settings", INTERPRETER_CASES)
def test_kernels_follow_torch_nn_in_float64(settings):
    ours, theirs = both(steps=5, lr=1e-2, **settings)
    assert (ours.backend == "triton").all()
    difference = max_relative_difference(ours, theirs)
    print(f"max relative loss difference over 5 steps: {difference:.3g}")
    assert difference < PARITY


def test_tasks_make_what_they_promise():
    g = step_generator(11, 3)
    adding = make_task("adding").batch(g, 5, 10)
    values, markers = adding.inputs[..., 0], adding.inputs[..., 1]
    assert (markers[:, :5].sum(1) == 1).all() and (markers[:, 5:].sum(1) == 1).all()
    assert torch.allclose(adding.targets, (values * markers).sum(1), rtol=0, atol=1e-15)

    copy = make_task("copy", copy_len=3).batch(g, 4, 10)
    assert (copy.inputs[:, 6] == 9).all() and (copy.inputs[:, 3:6] == 0).all() and (copy.inputs[:, 7:] == 0).all()
    assert torch.equal(copy.targets[:, 7:], copy.inputs[:, :3] - 1) and (copy.targets[:, :7] == IGNORE).all()
    assert make_task("copy", copy_len=3).count(copy) == 12

    task = make_task("charlm", text="abcdefghij" * 3, packed=True)
    lm = task.batch(g, 6, 8)
    lengths = lm.lengths
    assert lengths.min() >= 2 and lengths.max() <= 8 and lm.tokens == int(lengths.sum()) == task.count(lm)
    for row in range(6):
        n = int(lengths[row])
        assert torch.equal((lm.inputs[row, :n] + 1) % 10, lm.targets[row, :n])  # the next letter
        assert (lm.targets[row, n:] == IGNORE).all()


def test_batches_depend_on_seed_and_step_only():
    task = make_task("copy")
    first = task.batch(step_generator(4, 7), 6, 20)
    assert torch.equal(first.inputs, task.batch(step_generator(4, 7), 6, 20).inputs)
    assert not torch.equal(first.inputs, task.batch(step_generator(4, 8), 6, 20).inputs)
    assert not torch.equal(first.inputs, task.batch(step_generator(5, 7), 6, 20).inputs)


def test_shards_add_up_to_the_batch():
    batch = make_task("charlm", packed=True).batch(step_generator(0, 1), 12, 16)
    shards = [batch.shard(i, 3) for i in range(3)]
    assert torch.equal(torch.cat([s.inputs for s in shards]), batch.inputs)
    assert torch.equal(torch.cat([s.lengths for s in shards]), batch.lengths)
    assert sum(s.tokens for s in shards) == batch.tokens
    with pytest.raises(ValueError, match="5 equal shards"):
        batch.shard(0, 5)


def test_ours_and_torch_start_from_the_same_weights():
    config = TrainConfig(task="copy", cell="gru", hidden=9, layers=2, bidirectional=True, seed=13)
    task = make_task("copy")
    ours = trainer.initial_model(config, task)
    theirs = trainer.initial_model(replace(config, impl="torch"), task)
    assert type(ours.rnn).__module__.startswith("rnn") and type(theirs.rnn) is torch.nn.GRU
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("first,second", [("ours", "torch"), ("torch", "ours")])
def test_checkpoint_resumes_under_the_other_impl(monkeypatch, tmp_path, first, second):
    monkeypatch.setenv("RNN_BACKEND", "reference")
    # Dropout: a resumed run must also restore torch's generator to draw the same masks.
    settings = dict(task="copy", cell="lstm", hidden=10, seq_len=9, copy_len=3, batch=4, layers=2, dropout=0.25,
                    dtype="fp64", device="cpu", lr=1e-2, seed=21, quiet=True)
    whole = train(TrainConfig(impl=second, steps=12, **settings))
    checkpoint = tmp_path / "half.pt"
    train(TrainConfig(impl=first, steps=6, save=str(checkpoint), **settings))
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["step"] == 6 and saved["args"]["impl"] == first
    resumed = train(TrainConfig(impl=second, steps=12, load=str(checkpoint), **settings))
    assert list(resumed.step) == list(range(7, 13))
    assert max_relative_difference(resumed, whole.iloc[6:].reset_index(drop=True)) < PARITY


def test_checkpoint_of_another_model_is_refused(tmp_path):
    settings = dict(task="adding", hidden=6, seq_len=4, batch=2, device="cpu", quiet=True)
    checkpoint = tmp_path / "c.pt"
    train(TrainConfig(impl="torch", steps=1, save=str(checkpoint), **settings))
    with pytest.raises(ValueError, match="cell: the checkpoint .* cell='lstm'"):
        train(TrainConfig(impl="torch", steps=2, cell="gru", load=str(checkpoint), **settings))
    with pytest.raises(ValueError, match="steps: the checkpoint .* 1 steps already"):
        train(TrainConfig(impl="torch", steps=1, load=str(checkpoint), **settings))


def test_ours_learns_charlm(monkeypatch):
    monkeypatch.setenv("RNN_BACKEND", "reference")
    curve = train(TrainConfig(task="charlm", cell="gru", hidden=32, seq_len=16, batch=8, steps=40, lr=1e-2,
                              device="cpu", quiet=True, seed=8))
    # From log(alphabet) (uniform guessing) to a clearly better model of the text.
    assert curve.loss.iloc[0] > 3 and curve.loss.iloc[-5:].mean() < 2.6
    assert curve.accuracy.iloc[-5:].mean() > 0.25


def test_command_line_writes_csv_plot_and_metadata(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RNN_BACKEND", "reference")
    out = tmp_path / "train"
    assert trainer.main(["--task", "adding", "--cell", "gru", "--hidden", "8", "--seq-len", "5", "--batch", "4",
                         "--steps", "3", "--compare", "--device", "cpu", "--out", str(out), "--seed", "9"]) == 0
    stem = "adding-gru-L1-H8-fp32-seed9"
    frames = {impl: pd.read_csv(out / f"{stem}-{impl}.csv") for impl in ("ours", "torch")}
    for impl, frame in frames.items():
        assert list(frame.columns) == COLUMNS and list(frame.step) == [1, 2, 3] and (frame.impl == impl).all()
        assert frame.accuracy.isna().all() and frame.peak_mem_mib.isna().all() and (frame.tokens_per_s > 0).all()
    assert (frames["ours"].backend == "reference").all()
    # float32, reference loop against torch.nn: round-off of float32
    assert max_relative_difference(frames["ours"], frames["torch"]) < 1e-5
    meta = json.loads((out / f"{stem}.json").read_text())
    assert meta["kind"] == "train" and meta["command"].startswith("python -m scripts.train --task adding")
    assert meta["impls"] == ["ours", "torch"] and meta["config"]["hidden"] == 8
    if importlib.util.find_spec("matplotlib"):
        assert (out / f"{stem}.png").stat().st_size > 0
    else:
        assert "no plot" in capsys.readouterr().out


def test_record_keeps_the_run_where_publish_reads_records_and_leaves_it_out(monkeypatch, tmp_path):
    """--record writes a benchmarks/results-style folder (meta.json of kind train, summary.md, the
    CSVs); README's Performance section publishes bench runs only."""
    from profiling import publish, record

    monkeypatch.setenv("RNN_BACKEND", "reference")
    assert trainer.main(["--task", "adding", "--cell", "lstm", "--hidden", "8", "--seq-len", "5", "--batch", "4",
                         "--steps", "2", "--compare", "--device", "cpu", "--record", "--results", str(tmp_path)]) == 0
    (run,) = record.runs(tmp_path)
    assert run["kind"] == "train" and run["suite"] == "train-adding" and run["path"].name.endswith("-cpu-train-adding")
    assert "max relative loss difference" in (run["path"] / record.SUMMARY_NAME).read_text()
    assert len(list(run["path"].glob("*-ours.csv"))) == len(list(run["path"].glob("*-torch.csv"))) == 1
    assert publish.latest_gpu_runs(tmp_path) == {}


BAD_OPTIONS = [
    pytest.param(dict(task="charlm", bidirectional=True), "bidirectional: task 'charlm'", id="charlm-bidirectional"),
    pytest.param(dict(dtype="bf16", device="cpu"), "dtype bf16: .* CUDA", id="bf16-on-cpu"),
    pytest.param(dict(dtype="fp16", device="cpu"), "dtype fp16: .* CUDA", id="fp16-on-cpu"),
    pytest.param(dict(dtype="fp8"), "dtype must be one of", id="unknown-dtype"),
    pytest.param(dict(cell="lstmx"), "cell must be one of", id="unknown-cell"),
    pytest.param(dict(impl="cudnn"), "impl must be one of", id="unknown-impl"),
    pytest.param(dict(task="copy", copy_len=5, seq_len=10), "seq_len must be at least 11", id="copy-too-short"),
    pytest.param(dict(task="adding", packed=True), "packed: only charlm", id="packed-adding"),
    pytest.param(dict(task="copy", text="x.txt"), "text: only charlm", id="text-copy"),
    pytest.param(dict(batch=6, accum=4), "batch: a global batch of 6", id="batch-accum"),
    pytest.param(dict(dropout=1.0), "dropout must be in", id="dropout-1"),
    pytest.param(dict(layers=0), "layers must be at least 1", id="layers-0"),
    pytest.param(dict(ddp=True, fsdp=True), "ddp and fsdp", id="ddp-and-fsdp"),
]


@pytest.mark.parametrize("overrides,match", BAD_OPTIONS)
def test_bad_options_are_refused_by_name(overrides, match):
    settings = dict(task="adding", hidden=4, seq_len=4, batch=2, steps=1, device="cpu", quiet=True)
    with pytest.raises(ValueError, match=match):
        train(TrainConfig(**{**settings, **overrides}))


def test_command_line_errors_exit_2(capsys, tmp_path):
    assert trainer.main(["--task", "charlm", "--bidirectional", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "bidirectional" in capsys.readouterr().err
    assert trainer.main(["--compare", "--save", str(tmp_path / "c.pt"), "--device", "cpu"]) == 2
    assert "save: --compare" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_ddp_without_a_process_group_says_how_to_launch():
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node=N -m scripts.train --ddp"):
        train(TrainConfig(task="adding", hidden=4, seq_len=4, batch=2, steps=1, device="cpu", ddp=True, quiet=True))

"""Compiled kernels on CUDA: fp32, tf32, fp16 and bf16 against float64, persistent multi-program
grids with the grid barrier, K-chunked large H, and the stepwise fall-back for grids that cannot be
co-resident. Skipped where no CUDA device is."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rnn
from helpers import (TOL, assert_close, assert_grads_close, check_autocast, compare_modules, flatten_output, rel_err,
                     run_backward, run_layer)
from kernels.cells import Cell
from kernels.configs import KernelConfig

pytestmark = pytest.mark.gpu

DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODULES = {"RNN_TANH": (torch.nn.RNN, {"nonlinearity": "tanh"}), "RNN_RELU": (torch.nn.RNN, {"nonlinearity": "relu"}),
           "LSTM": (torch.nn.LSTM, {}), "GRU": (torch.nn.GRU, {}), "LSTM-proj": (torch.nn.LSTM, {"proj_size": 50})}


@pytest.fixture
def precision(request, monkeypatch):
    name = request.param
    # tf32: torch's matmuls (our input projection) and cuDNN's RNN (our recurrent matmuls) alike
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", name == "tf32")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", name == "tf32")
    return name


@pytest.mark.parametrize("precision", list(DTYPES), indirect=True)
@pytest.mark.parametrize("mode", list(MODULES))
def test_module_forward_per_dtype(mode, precision):
    """Our module in a low precision against torch.nn in float64 with the same (rounded) weights
    and inputs; torch.nn in the low precision is measured alongside for scale."""
    torch.manual_seed(0)
    dtype = DTYPES[precision]
    cls, extra = MODULES[mode]
    ref = cls(96, 200, num_layers=2, bidirectional=True, batch_first=True, **extra).to("cuda", dtype)
    ours = rnn.from_torch(copy.deepcopy(ref))
    x = torch.randn(12, 37, 96, device="cuda", dtype=dtype)
    with torch.no_grad():
        out, hidden = ours(x)
        ref64 = copy.deepcopy(ref).double()
        out64, hidden64 = ref64(x.double())
        out_torch, _ = ref(x)
    assert ours.last_path.backend == "triton"
    tol = TOL["tf32" if precision == "tf32" else dtype]
    err = rel_err(out, out64)
    print(f"{mode} {precision}: ours {err:.2e}, torch.nn {rel_err(out_torch, out64):.2e}")
    assert err <= tol
    for ours_state, ref_state in zip(hidden if isinstance(hidden, tuple) else (hidden,),
                                     hidden64 if isinstance(hidden64, tuple) else (hidden64,)):
        assert rel_err(ours_state, ref_state) <= tol


@pytest.mark.parametrize("mode", list(MODULES))
def test_module_gradients_fp32(mode, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # torch.nn's fp32 at full precision
    torch.manual_seed(0)
    cls, extra = MODULES[mode]
    ref = cls(24, 72, num_layers=2, bidirectional=True, device="cuda", **extra)
    ours = rnn.from_torch(copy.deepcopy(ref))
    x = torch.randn(9, 5, 24, device="cuda")
    compare_modules(ref, ours, lambda: (lambda leaf: (leaf, leaf))(x.clone().requires_grad_()), tol=1e-4)
    assert ours.last_path.backend == "triton"


@pytest.mark.parametrize("cell", list(Cell), ids=[c.name for c in Cell])
def test_persistent_multi_program(cell):
    """16 programs per group exchange h through the grid barrier; repeated runs must agree to the
    bit (a moving result is a race)."""
    results = []
    for _ in range(3):
        torch.manual_seed(3)
        result, ref = run_layer(cell, T=40, B=24, I=64, H=256, dtype=torch.float32, device="cuda",
                                config=KernelConfig(hidden_block=16, batch_block=16))
        assert result[3].persistent and result[3].grid == (16, 2, 2)
        assert_close(result, ref, TOL[torch.float32])
        results.append(result[0])
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", [Cell.LSTM, Cell.GRU], ids=["LSTM", "GRU"])
def test_large_hidden_default_config(cell, dtype):
    torch.manual_seed(4)
    result, ref = run_layer(cell, T=16, B=64, I=128, H=1024, dtype=dtype, device="cuda")
    assert_close(result, ref, TOL[dtype])


def test_odd_sizes_and_single_step():
    torch.manual_seed(5)
    for T, H, B in ((1, 200, 3), (7, 200, 1), (3, 17, 70)):
        result, ref = run_layer(Cell.LSTM, T=T, B=B, H=H, dtype=torch.float32, device="cuda",
                                lengths=torch.cat([torch.tensor([T]), torch.randint(1, T + 1, (B - 1,))]).sort(
                                    descending=True).values)
        assert_close(result, ref, TOL[torch.float32])


def test_grid_too_large_runs_stepwise():
    """32 batch tiles x 16 programs x 2 directions cannot all be resident on one GPU."""
    torch.manual_seed(6)
    config = KernelConfig(hidden_block=16, batch_block=16)
    result, ref = run_layer(Cell.GRU, T=6, B=512, I=32, H=256, dtype=torch.float32, device="cuda", config=config)
    assert not result[3].persistent
    assert_close(result, ref, TOL[torch.float32])
    with pytest.raises(ValueError, match="co-resident"):
        run_layer(Cell.GRU, T=6, B=512, I=32, H=256, dtype=torch.float32, device="cuda",
                  config=KernelConfig(hidden_block=16, batch_block=16, persistent=True))


SCALE_SHAPES = {  # (T, B, H): issue 4's corners; input size 64 keeps the reference quick
    "H2048-B4": (6, 4, 2048),
    "H1024-B64": (12, 64, 1024),
    "H512-B512": (4, 512, 512),
    "H2048-B512": (2, 512, 2048),
    "H200-B3-T1": (1, 3, 200),
}


@pytest.mark.parametrize("precision", list(DTYPES), indirect=True)
@pytest.mark.parametrize("shape", SCALE_SHAPES, ids=list(SCALE_SHAPES))
@pytest.mark.parametrize("cell", [Cell.LSTM, Cell.GRU, Cell.RNN_TANH], ids=["LSTM", "GRU", "RNN_TANH"])
def test_default_partitions_at_scale(cell, shape, precision, monkeypatch):
    """The heuristic default (no autotuning) at large H and B, both directions, every dtype."""
    monkeypatch.setenv("RNN_AUTOTUNE", "0")
    T, B, H = SCALE_SHAPES[shape]
    torch.manual_seed(8)
    dtype = DTYPES[precision]
    result, ref = run_layer(cell, T=T, B=B, I=64, H=H, D=2, dtype=dtype, device="cuda")
    assert_close(result, ref, TOL["tf32" if precision == "tf32" else dtype])


@pytest.mark.parametrize("cell", [Cell.LSTM, Cell.GRU, Cell.RNN_TANH], ids=["LSTM", "GRU", "RNN_TANH"])
def test_every_candidate_on_cuda(cell):
    """Every config of the autotuning space of two shapes runs and is right (persistent where
    co-resident, stepwise otherwise)."""
    from kernels.configs import candidate_configs
    for T, B, H in ((8, 8, 1024), (5, 100, 256)):
        for config in candidate_configs(H, B, cell.gates, 2, directions=2):
            torch.manual_seed(9)
            result, ref = run_layer(cell, T=T, B=B, I=32, H=H, D=2, dtype=torch.bfloat16, device="cuda",
                                    config=config)
            assert_close(result, ref, TOL[torch.bfloat16])


def test_autotune_fills_and_reuses_the_cache(monkeypatch, tmp_path):
    import json

    from kernels import forward
    monkeypatch.setenv("RNN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("RNN_AUTOTUNE", "1")
    torch.manual_seed(10)
    model = rnn.GRU(64, 256, bidirectional=True).to("cuda", torch.float16)
    x = torch.randn(40, 8, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        first = model(x)[0]
    entries = json.loads((tmp_path / "autotune.json").read_text())["entries"]
    assert len(entries) == 1
    (key, entry), = entries.items()
    assert "GRU" in key and "H=256" in key and entry["timings_ms_per_step"]
    monkeypatch.setattr(forward, "_tune", lambda *a, **k: pytest.fail("a cached shape was tuned again"))
    with torch.no_grad():
        again = model(x)[0]
    assert torch.equal(first, again)
    assert model.last_path.launches[0].config == forward.autotune_cache().get(key)


BACKWARD_TOL = {"fp32": 1e-4, "tf32": 1e-2, "fp16": 2e-2, "bf16": 8e-2}


def test_training_tunes_the_backward_too(monkeypatch, tmp_path):
    """A first training step of a shape tunes forward and backward and caches both; the
    gradients match torch.nn's."""
    import json

    monkeypatch.setenv("RNN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("RNN_AUTOTUNE", "1")
    torch.manual_seed(13)
    ref = torch.nn.LSTM(64, 256, device="cuda")
    ours = rnn.from_torch(copy.deepcopy(ref))
    x = torch.randn(40, 8, 64, device="cuda")
    compare_modules(ref, ours, lambda: (lambda leaf: (leaf, leaf))(x.clone().requires_grad_()), tol=1e-2)
    keys = json.loads((tmp_path / "autotune.json").read_text())["entries"]
    assert sorted(k.split("|")[0] for k in keys) == ["rnn_bwd", "rnn_fwd"]


@pytest.mark.parametrize("cell", [Cell.LSTM, Cell.GRU, Cell.RNN_TANH], ids=["LSTM", "GRU", "RNN_TANH"])
def test_every_backward_candidate_on_cuda(cell):
    """Every config of the backward's autotuning space of two shapes computes the gradients
    (persistent where co-resident, stepwise otherwise)."""
    from kernels.configs import candidate_backward_configs
    for T, B, H in ((8, 8, 1024), (5, 40, 256)):
        for config in candidate_backward_configs(H, B, cell.gates, 2, directions=2):
            torch.manual_seed(14)
            ours, ref, _ = run_backward(cell, T=T, B=B, I=32, H=H, dtype=torch.bfloat16, device="cuda",
                                        config=config)
            assert_grads_close(ours, ref, BACKWARD_TOL["bf16"])


@pytest.mark.parametrize("precision", list(DTYPES), indirect=True)
@pytest.mark.parametrize("cell", list(Cell), ids=[c.name for c in Cell])
def test_fused_backward_per_dtype(cell, precision):
    """The fused backward on CUDA against autograd through the float64 reference: default
    partition, a persistent multi-program one, and per-sequence lengths."""
    dtype = DTYPES[precision]
    for kwargs in (dict(T=20, B=16, H=256), dict(T=9, B=24, H=200, config=KernelConfig(16, 16)),
                   dict(T=7, B=5, H=96, lengths=torch.tensor([7, 6, 3, 2, 1]), batch_first=True)):
        torch.manual_seed(11)
        ours, ref, res = run_backward(cell, I=32, dtype=dtype, device="cuda", **kwargs)
        assert_grads_close(ours, ref, BACKWARD_TOL[precision])
        if "config" in kwargs:
            assert res.info.persistent


@pytest.mark.parametrize("cell", [Cell.LSTM, Cell.GRU], ids=["LSTM", "GRU"])
def test_fused_backward_at_scale(cell):
    torch.manual_seed(12)
    ours, ref, _ = run_backward(cell, T=6, B=64, I=64, H=1024, dtype=torch.bfloat16, device="cuda")
    assert_grads_close(ours, ref, BACKWARD_TOL["bf16"])


@pytest.mark.parametrize("mode", list(MODULES))
def test_autocast_matches_torch(mode):
    """Under CUDA autocast both torch.nn (cuDNN) and ours run float16: same dtypes, close values."""
    torch.manual_seed(5)
    cls, extra = MODULES[mode]
    ref = cls(48, 96, num_layers=2, bidirectional=True, device="cuda", **extra)
    ours = rnn.from_torch(copy.deepcopy(ref))
    check_autocast(copy.deepcopy(ref).double(), ours, "cuda")
    x = torch.randn(3, 5, 48, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        theirs, mine = flatten_output(ref(x)), flatten_output(ours(x))
    assert [t.dtype for t in mine] == [t.dtype for t in theirs]


_BAD_INDICES = """
import torch, rnn
from torch.nn.utils.rnn import PackedSequence
model = rnn.GRU(3, 4).cuda()
pack = PackedSequence(torch.randn(5, 3, device="cuda"), torch.tensor([2, 2, 1]),
                      torch.tensor([0, 1], device="cuda"), torch.tensor([1, 0], device="cuda"))
model(pack)
torch.cuda.synchronize()
print("no error")
"""


def test_inconsistent_packed_indices_fail_on_the_device():
    """Index tensors on the GPU are checked there (no host synchronisation in a forward): a
    device-side assert, which ends the CUDA context, so it runs in a child process."""
    result = subprocess.run([sys.executable, "-c", _BAD_INDICES], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "no error" not in result.stdout, result.stdout + result.stderr

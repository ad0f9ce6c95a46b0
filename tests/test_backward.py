"""The fused backward against torch autograd through the float64 reference: gate gradients,
dx, dh0, dc0 and every weight gradient, partition by partition; gradcheck; what training saves."""
import json

import pytest
import torch

import rnn
from helpers import CELL_IDS, PARTITIONS, TOL, assert_grads_close, rel_err, run_backward
from kernels.backward import rnn_bwd
from kernels.cells import Cell
from kernels.configs import (H100_SMS, KernelConfig, candidate_backward_configs, default_backward_config, describe,
                             k_block)
from kernels.forward import rnn_fwd
from rnn import functional, ops

pytestmark = pytest.mark.interpreter

@pytest.mark.parametrize("partition", PARTITIONS, ids=list(PARTITIONS))
@pytest.mark.parametrize("cell", list(Cell), ids=CELL_IDS)
def test_partitions(cell, partition, kernel_device):
    torch.manual_seed(1)
    sizes, config, persistent = PARTITIONS[partition]
    ours, ref, res = run_backward(cell, config=config, device=kernel_device, **sizes)
    assert_grads_close(ours, ref, TOL[torch.float64])
    assert res.info.persistent == persistent


@pytest.mark.parametrize("config", [None, KernelConfig(16, 16, persistent=False)], ids=["single", "multi"])
@pytest.mark.parametrize("cell", list(Cell), ids=CELL_IDS)
def test_packed_layouts_and_missing_gradients(cell, config, kernel_device):
    """Packed sequences (lengths 1 and T included), batch_first, no h0/c0, gradient only on the
    output, only on the final states."""
    torch.manual_seed(2)
    ours, ref, _ = run_backward(cell, T=5, B=4, H=18, lengths=torch.tensor([5, 4, 2, 1]), batch_first=True,
                                config=config, device=kernel_device)
    assert_grads_close(ours, ref, TOL[torch.float64])
    ours, ref, _ = run_backward(cell, T=3, H=18, h0=False, upstream=("out",), config=config, device=kernel_device)
    assert_grads_close(ours, ref, TOL[torch.float64])
    ours, ref, _ = run_backward(cell, T=3, H=18, upstream=("hn", "cn"), D=1, config=config, device=kernel_device)
    assert_grads_close(ours, ref, TOL[torch.float64])


def test_packed_tiles_skip_idle_steps(kernel_device):
    """Two batch tiles, the second of short sequences only, which skip their idle steps."""
    lengths = torch.tensor([6] * 16 + [3, 2, 1, 1])
    for cell, config in ((Cell.LSTM, KernelConfig(16, 16, persistent=False)), (Cell.GRU, KernelConfig(32, 16)),
                         (Cell.RNN_TANH, KernelConfig(16, 16, k_block=16, persistent=False))):
        torch.manual_seed(14)
        ours, ref, res = run_backward(cell, T=6, B=20, H=24, lengths=lengths, config=config, device=kernel_device)
        assert res.info.grid[1] == 2
        assert_grads_close(ours, ref, TOL[torch.float64])


@pytest.mark.parametrize("cell", list(Cell), ids=CELL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dtypes(cell, dtype, kernel_device):
    torch.manual_seed(3)
    ours, ref, _ = run_backward(cell, H=24, T=5, dtype=dtype, device=kernel_device)
    # Low precision saves activations and gate gradients in its own dtype: looser bounds.
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}[dtype]
    assert_grads_close(ours, ref, tol)


@pytest.mark.parametrize("mode", ["LSTM", "LSTM-proj", "GRU", "RNN_TANH", "RNN_RELU"])
def test_gradcheck_through_the_kernels(mode, monkeypatch):
    monkeypatch.setenv("RNN_BACKEND", "triton")
    proj = 2 if mode == "LSTM-proj" else 0
    mode = mode.removesuffix("-proj")
    cell = Cell[mode]
    torch.manual_seed(4)
    # One layer: its cost is two forwards per input tensor; stacked layers' gradients are compared
    # with torch.nn's in test_parity and test_usage.
    D, L, H, I = 2, 1, 5, 3
    module = {"LSTM": rnn.LSTM, "GRU": rnn.GRU}.get(mode, rnn.RNN)(
        I, H, num_layers=L, bidirectional=True, dtype=torch.float64,
        **({"nonlinearity": mode[4:].lower()} if mode.startswith("RNN") else {}),
        **({"proj_size": proj} if proj else {}))
    params = [p.detach().clone().requires_grad_() for p in module._flat_weights]
    x = torch.randn(3, 2, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(L * D, 2, proj or H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(L * D, 2, H, dtype=torch.float64, requires_grad=True)

    def fn(x, h0, c0, *params):
        hx = (h0, c0) if cell == Cell.LSTM else h0
        out, h_n, c_n, path = functional.rnn(cell, x, hx, list(params), num_layers=L, bidirectional=True,
                                             batch_first=False, dropout=0.0, training=False, has_bias=True,
                                             proj_size=proj)
        assert path.backend == "triton"
        return (out, h_n) + ((c_n,) if c_n is not None else ())

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params), fast_mode=True)


def test_inference_saves_nothing_and_training_saves_gates(monkeypatch):
    monkeypatch.setenv("RNN_BACKEND", "triton")
    calls = []
    real = ops.rnn_fwd

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result.saved)
        return result

    monkeypatch.setattr(ops, "rnn_fwd", spy)
    model = rnn.LSTM(4, 6, num_layers=2)
    x = torch.randn(5, 3, 4)
    with torch.no_grad():
        out, _ = model(x)
    assert calls == [None, None] and out.grad_fn is None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model(x)
    assert calls[2:] == [None, None], "nothing requires a gradient: nothing may be saved"
    for p in model.parameters():
        p.requires_grad_(True)
    out, _ = model(x)
    assert [tuple(s.shape) for s in calls[4:]] == [(5, 3, 1, 5, 6)] * 2  # [T, B, D, G+1, H]
    # the last layer's autograd node holds its saved activations
    assert any(t is not None and t.data_ptr() == calls[5].data_ptr() for t in out.grad_fn.saved_tensors)


@pytest.mark.parametrize("proj", [0, 2])
def test_double_backward_is_refused(proj, monkeypatch):
    """create_graph=True gives first-order gradients that refuse to be differentiated (a gradient
    penalty through the kernels fails loudly instead of missing their second-order part)."""
    monkeypatch.setenv("RNN_BACKEND", "triton")
    model = (rnn.LSTM(3, 4, proj_size=proj) if proj else rnn.GRU(3, 4)).double()
    x = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(model(x)[0].sum(), x, create_graph=True)
    (plain,) = torch.autograd.grad(model(x)[0].sum(), x)
    assert torch.equal(g, plain) and g.requires_grad
    with pytest.raises(RuntimeError, match="double backward"):
        g.pow(2).sum().backward()
    monkeypatch.setenv("RNN_BACKEND", "reference")  # the way out the message names works
    (g,) = torch.autograd.grad(model(x)[0].sum(), x, create_graph=True)
    g.sum().backward()


@pytest.fixture
def piece_rows(monkeypatch, request):
    """Resident backward columns of W_hh in pieces of request.param rows (fp64, 16-row tiles)."""
    from kernels import configs
    from kernels.backward import backward_meta

    monkeypatch.setattr(configs, "BACKWARD_GRADIENT_CHUNK_BYTES", 16 * request.param * 8)
    backward_meta.cache_clear()
    yield request.param
    backward_meta.cache_clear()


@pytest.mark.parametrize("cell", list(Cell), ids=CELL_IDS)
@pytest.mark.parametrize("H, piece_rows, warps, split", [(40, 16, 4, (4, 1)), (72, 64, 4, (2, 4)), (40, 64, 8, (1, 4))],
                         ids=["16-rows", "64-rows-4-ways", "64-rows-8-warps"], indirect=["piece_rows"])
def test_resident_columns_in_pieces(cell, H, piece_rows, warps, split, kernel_device):
    """A resident backward reduces against its on-chip columns of W_hh piece by piece, each
    piece's rows split among the warps (at most one part per warp, each part 16 rows or more).
    H=40 pads to 64 and H=72 to 128, so some pieces and parts are all padding; padding, the order
    of the pieces and the split must not change the gradients."""
    from kernels.backward import backward_meta

    config = KernelConfig(k_block(H), 16, num_warps=warps, persistent=False)
    meta = backward_meta(cell, 2, H, config, elt_size=8, has_h0=True, has_c0=True, packed=False, has_dout=True,
                         has_dhn=True, has_dcn=True, upcast=False, precision="ieee")
    assert (meta["PK"], meta["SPLIT"], meta["KW"], meta["KB"] == meta["BK"]) == (piece_rows, *split, True)
    torch.manual_seed(6)
    ours, ref, _ = run_backward(cell, T=3, B=5, H=H, config=config, device=kernel_device)
    assert_grads_close(ours, ref, TOL[torch.float64])


@pytest.mark.parametrize("cell", [Cell.LSTM, Cell.GRU, Cell.RNN_TANH], ids=["LSTM", "GRU", "RNN_TANH"])
def test_every_backward_candidate_of_a_shape(cell, kernel_device):
    """Each partition the backward's autotuner may pick for an H=40, B=20 bidirectional layer
    (16 or 32 units per program, the reduction over G*H whole or in chunks of 64) computes the
    gradients. Stepwise: the interpreter runs one program at a time."""
    configs = candidate_backward_configs(40, 20, cell.gates, 8, directions=2)
    partitions = dict.fromkeys(KernelConfig(c.hidden_block, c.batch_block, k_block=c.k_block, persistent=False)
                               for c in configs)
    assert {c.hidden_block for c in partitions} == {16, 32}
    assert (64 in {c.k_block for c in partitions}) == (cell.gates > 1)  # an RNN's G*H=64 is one chunk
    for config in partitions:
        torch.manual_seed(5)
        ours, ref, _ = run_backward(cell, T=3, B=20, H=40, I=8, config=config, device=kernel_device)
        assert_grads_close(ours, ref, TOL[torch.float64])


def test_backward_tuning_times_every_candidate_and_caches_the_winner(monkeypatch, tmp_path, kernel_device):
    """The backward's autotuner on the real gradients (made to run off CUDA; the wall clock stands
    in for CUDA events): every candidate timed, the fastest cached and used, the gradients right,
    and a second backward of the shape takes the cached winner without tuning."""
    from kernels import backward

    monkeypatch.setenv("RNN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(backward, "may_tune", lambda device, batch: True)
    monkeypatch.setattr(backward, "layer_key", lambda *args: "bwd-key")
    torch.manual_seed(4)
    ours, ref, res = run_backward(Cell.LSTM, T=3, B=3, H=20, device=kernel_device)
    assert_grads_close(ours, ref, TOL[torch.float64])
    entry = json.loads((tmp_path / "autotune.json").read_text())["entries"]["bwd-key"]
    timings = entry["timings_ms_per_step"]
    assert set(timings) == {describe(c) for c in candidate_backward_configs(20, 3, 4, 8, 2)}
    assert len(timings) > 2 and KernelConfig(**entry["config"]) == res.info.config
    assert describe(res.info.config) == min(timings, key=timings.get)
    monkeypatch.setattr(backward, "time_candidates", lambda *a, **k: pytest.fail("a cached shape was tuned again"))
    ours, ref, again = run_backward(Cell.LSTM, T=4, B=3, H=20, device=kernel_device)
    assert again.info.config == res.info.config
    assert_grads_close(ours, ref, TOL[torch.float64])


def test_packed_backward_takes_the_padded_winner_unless_resident(monkeypatch, tmp_path):
    """A packed batch runs as its padded shape was tuned, except a winner that keeps W_hh's
    columns on-chip: packed, those spill (sm_90 compiles), so the packed default streams."""
    from kernels import backward

    monkeypatch.setenv("RNN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(backward, "may_tune", lambda device, batch: True)
    monkeypatch.setattr(backward, "layer_key", lambda *args: "bwd-key")
    monkeypatch.setattr(backward, "time_candidates", lambda *a, **k: pytest.fail("a cached shape was tuned again"))
    monkeypatch.setattr(backward.env, "interpreting", lambda: False)  # the GPU's defaults
    H = 64  # G*H = 256 reduction rows: the packed default streams them in two chunks
    w_hh = torch.randn(4 * H, H)
    default = default_backward_config(H, 16, 4, 4, False, 1, H100_SMS, packed=True)
    assert default.k_block == 128 and default != default_backward_config(H, 16, 4, 4, False, 1, H100_SMS)

    def choice(cell, w, packing):
        return backward._tuned_or_default(cell, 5, 16, 1, w, "ieee", packing, None)

    resident = KernelConfig(16, 16, k_block=None, num_warps=8)
    streamed = KernelConfig(16, 16, k_block=64, num_warps=4, num_stages=3)
    assert default not in (resident, streamed)
    for winner, packed_choice in ((resident, default), (streamed, streamed)):
        backward.autotune_cache().put("bwd-key", winner)
        assert choice(Cell.LSTM, w_hh, None) == winner
        assert choice(Cell.LSTM, w_hh, object()) == packed_choice
    # Where the packed default keeps W_hh resident too (an RNN's 64 rows), the winner stands.
    backward.autotune_cache().put("bwd-key", resident)
    assert choice(Cell.RNN_TANH, torch.randn(H, H), object()) == resident


def test_backward_tuning_on_request(monkeypatch, tmp_path, kernel_device):
    """rnn_bwd(tuning=...) (tune_backward's path, for scripts.autotune) tunes where a backward
    otherwise would not, reports every candidate, caches and uses the winner; its gradients are
    the untuned backward's."""
    from kernels import backward

    monkeypatch.setenv("RNN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(backward, "may_tune", lambda device, batch: False)  # a plain backward takes the default
    monkeypatch.setattr(backward, "layer_key", lambda *args: "bwd-key")
    T, B, I, H = 3, 2, 4, 8
    torch.manual_seed(6)

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=kernel_device)

    weights = [(rand(3 * H, I), rand(3 * H, H), rand(3 * H), rand(3 * H))]
    x = rand(T, B, I)
    fwd = rnn_fwd(Cell.GRU, x, weights, None, None, None, False, save=True)
    d_out = torch.randn_like(fwd.out)
    plain = rnn_bwd(Cell.GRU, x, weights, None, None, None, fwd.out, fwd.saved, d_out, None, None, False)
    tuning = {}
    tuned = rnn_bwd(Cell.GRU, x, weights, None, None, None, fwd.out, fwd.saved, d_out, None, None, False,
                    tuning=tuning)
    assert tuning["key"] == "bwd-key" and plain.info.config == tuning["default"]
    assert set(tuning["timings"]) == {describe(c) for c in candidate_backward_configs(H, B, 3, 8, 1)}
    assert tuned.info.config == tuning["winner"] == backward.autotune_cache().get("bwd-key")
    for name in ("dx", "dw_ih", "dw_hh", "db_ih", "db_hh", "dh0"):
        assert rel_err(getattr(tuned, name), getattr(plain, name)) < 1e-12, name

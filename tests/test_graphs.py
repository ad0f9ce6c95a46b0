"""CUDA graphs: forward and whole training steps of models holding rnn's modules capture and
replay (by hand with torch.cuda.graph, and under torch.compile's reduce-overhead mode), replays
equal eager runs, and nothing in a forward or backward synchronises with the host after the
first call of a shape. GPU only."""
import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnn

pytestmark = pytest.mark.gpu

T, B, I, H = 16, 4, 32, 64


@pytest.fixture(autouse=True)
def _untuned(monkeypatch):
    # Eager and graphed runs must launch the same configs: the heuristic default, not a winner
    # that a timing race could make differ between them.
    monkeypatch.setenv("RNN_AUTOTUNE", "0")


def _model(cell="LSTM"):
    torch.manual_seed(0)
    return getattr(rnn, cell)(I, H, num_layers=2, bidirectional=True, dropout=0.0).cuda()


def _close(a, b, tol=1e-6):
    assert torch.isfinite(a).all()
    assert (a - b).norm() <= tol * b.norm(), ((a - b).norm() / b.norm()).item()


def _warm_up(step, n=3):
    """torch's recipe: warm up on a side stream before capturing (kernels compile, caches fill)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(n):
            step()
    torch.cuda.current_stream().wait_stream(side)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_graphed_forward_replays_eager(cell):
    model = _model(cell).eval()
    static_x = torch.randn(T, B, I, device="cuda")
    with torch.no_grad():
        _warm_up(lambda: model(static_x))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out, _ = model(static_x)
        for _ in range(3):  # each replay starts from fresh barrier counters (reset inside the graph)
            x = torch.randn(T, B, I, device="cuda")
            static_x.copy_(x)
            graph.replay()
            _close(static_out, model(x)[0])


def test_graphed_packed_forward_replays_eager():
    model = _model("GRU").eval()
    lengths = torch.tensor([16, 9, 12, 3])
    static_x = torch.randn(T, B, I, device="cuda")
    static_packed = pack_padded_sequence(static_x, lengths, enforce_sorted=False)
    with torch.no_grad():
        _warm_up(lambda: model(static_packed))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out, static_h = model(static_packed)
        x = torch.randn(T, B, I, device="cuda")
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        static_packed.data.copy_(packed.data)
        graph.replay()
        out, h = model(packed)
    _close(static_out.data, out.data)
    _close(static_h, h)


def test_graphed_training_step_matches_eager():
    """forward, backward and an optimizer step captured once and replayed on new batches train
    the model exactly as eager steps train its copy."""
    model = _model("LSTM")
    twin = copy.deepcopy(model)
    head = torch.nn.Linear(2 * H, 1).cuda()
    twin_head = copy.deepcopy(head)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1)
    twin_opt = torch.optim.SGD([*twin.parameters(), *twin_head.parameters()], lr=0.1)
    static_x, static_y = torch.randn(T, B, I, device="cuda"), torch.randn(T, B, 1, device="cuda")

    def step(m, h, o, x, y):
        o.zero_grad(set_to_none=False)
        loss = (h(m(x)[0]) - y).square().mean()
        loss.backward()
        o.step()
        return loss

    batches = [(torch.randn(T, B, I, device="cuda"), torch.randn(T, B, 1, device="cuda")) for _ in range(6)]
    # Warm-up steps on the first batches (the twin takes the same), then capture and replay.
    for x, y in batches[:3]:
        step(twin, twin_head, twin_opt, x, y)
    it = iter(batches[:3])

    def warm():
        x, y = next(it)
        static_x.copy_(x)
        static_y.copy_(y)
        step(model, head, opt, static_x, static_y)

    _warm_up(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model, head, opt, static_x, static_y)
    # Capturing ran no step: parameters are still those after the warm-up.
    for x, y in batches[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        loss = step(twin, twin_head, twin_opt, x, y)
        _close(static_loss, loss, 1e-5)
    for p, q in zip([*model.parameters(), *head.parameters()], [*twin.parameters(), *twin_head.parameters()]):
        _close(p, q, 1e-5)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_reduce_overhead_matches_eager(training):
    """rnn.compile(mode="reduce-overhead"): the compiled model runs in CUDA graphs (tuning and
    compiling happen in its warm-up runs, never while capturing) and equals eager."""
    model = _model("GRU")
    compiled = rnn.compile(model, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # warm-up, recording, then replays
        x = torch.randn(T, B, I, device="cuda", requires_grad=training)
        with torch.set_grad_enabled(training):
            got = compiled(x)[0]
            if training:
                got.square().sum().backward()
                got_grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
                model.zero_grad()
                x.grad = None
            got = got.detach().clone()
            want = model(x)[0]
            if training:
                want.square().sum().backward()
                for g, p in zip(got_grads, [*model.parameters(), x]):
                    _close(g, p.grad, 1e-5)
                model.zero_grad()
        _close(got, want.detach(), 1e-5)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_no_host_synchronisation_after_the_first_call(packed):
    """After a first call of a shape, forward and backward never wait for the GPU (the packed
    path's lengths are built on the host once and copied from pinned memory, its index checks
    are device-side asserts): torch's sync debug mode turns any synchronisation into an error."""
    model = _model("LSTM")
    x = torch.randn(T, B, I, device="cuda", requires_grad=True)
    # Packed once here: packing itself copies the CPU lengths' sort order to the GPU.
    given = pack_padded_sequence(x.detach(), torch.tensor([16, 9, 12, 3]), enforce_sorted=False)
    data = given.data.clone().requires_grad_()

    def run():
        inp = PackedSequence(data, given.batch_sizes, given.sorted_indices, given.unsorted_indices) if packed else x
        out, (h, c) = model(inp)
        ((out.data if packed else out).sum() + h.sum() + c.sum()).backward()

    run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()

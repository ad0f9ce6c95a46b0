"""The forward launcher and kernel against the float64 reference, partition by partition.

Outputs are poisoned with NaN before each launch, so an element the kernel never writes fails.
Under the interpreter several programs per group only run stepwise (a grid barrier between
programs that run one after another would deadlock); one program per group runs persistently.
"""
import pytest
import torch

from helpers import TOL, assert_close, run_layer
from kernels.cells import Cell
from kernels.configs import ForwardConfig

pytestmark = pytest.mark.interpreter


CELL_IDS = [c.name for c in Cell]

PARTITIONS = {
    # one program per (direction, batch tile): persistent
    "single-persistent": (dict(H=17), None, True),
    # three programs of 16 hidden units, H=40 (last one partly masked): stepwise
    "multi-stepwise": (dict(H=40), ForwardConfig(hidden_block=16, batch_block=16, persistent=False), False),
    # two batch tiles of 16 rows (second one partly masked), one program each: persistent
    "batch-tiles": (dict(H=20, B=19), ForwardConfig(hidden_block=32, batch_block=16), True),
    # both at once, stepwise
    "multi-both": (dict(H=33, B=18), ForwardConfig(hidden_block=16, batch_block=16, persistent=False), False),
    # W_hh streamed in K chunks of 16 (H=40: three chunks, the last partly masked), one program
    "chunked-persistent": (dict(H=40), ForwardConfig(hidden_block=64, batch_block=16, k_block=16), True),
    # K chunks with three programs, stepwise
    "chunked-multi": (dict(H=40), ForwardConfig(hidden_block=16, batch_block=16, k_block=32, persistent=False),
                      False),
}


@pytest.mark.parametrize("partition", PARTITIONS, ids=list(PARTITIONS))
@pytest.mark.parametrize("cell", list(Cell), ids=CELL_IDS)
def test_partitions(cell, partition, kernel_device):
    torch.manual_seed(1)
    sizes, config, persistent = PARTITIONS[partition]
    result, ref = run_layer(cell, config=config, device=kernel_device, **sizes)
    assert_close(result, ref, TOL[torch.float64])
    info = result[3]
    assert info.persistent == persistent
    H, B = sizes.get("H", 17), sizes.get("B", 3)
    assert info.grid == (-(-H // info.config.hidden_block), -(-B // info.config.batch_block), 2)


@pytest.mark.parametrize("chunked", [False, True], ids=["resident", "chunked"])
@pytest.mark.parametrize("cell", list(Cell), ids=CELL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dtypes(cell, dtype, chunked, kernel_device):
    torch.manual_seed(2)
    config = ForwardConfig(32, 16, k_block=16) if chunked else None
    result, ref = run_layer(cell, dtype=dtype, device=kernel_device, H=24, config=config)
    assert result[0].dtype == dtype and result[1].dtype == dtype
    # fp32 under the interpreter is full precision; on a GPU this test may see tf32 only if enabled.
    assert_close(result, ref, TOL[dtype])


@pytest.mark.parametrize("config", [None, ForwardConfig(16, 16, persistent=False),
                                    ForwardConfig(32, 16, k_block=16)], ids=["single", "multi", "chunked"])
@pytest.mark.parametrize("cell", list(Cell), ids=CELL_IDS)
def test_lengths_and_layouts(cell, config, kernel_device):
    """Per-sequence lengths (1 and T included), batch_first strides, no h0, no bias."""
    torch.manual_seed(3)
    lengths = torch.tensor([2, 6, 1, 5])
    result, ref = run_layer(cell, T=6, B=4, H=18, lengths=lengths, batch_first=True, h0=False, bias=False,
                            config=config, device=kernel_device)
    assert_close(result, ref, TOL[torch.float64])
    out = result[0]
    assert (out[2, 1:] == 0).all() and (out[0, 2:] == 0).all(), "outputs past a length must be zero"


def test_unidirectional_and_t1(kernel_device):
    torch.manual_seed(4)
    for T, D in ((1, 1), (1, 2), (3, 1)):
        result, ref = run_layer(Cell.LSTM, T=T, D=D, device=kernel_device,
                                config=ForwardConfig(16, 16, persistent=False))
        assert_close(result, ref, TOL[torch.float64])


def test_stepwise_equals_persistent(kernel_device):
    """One program per group may run either way; both must give the same bits."""
    torch.manual_seed(5)
    a, _ = run_layer(Cell.GRU, H=30, config=ForwardConfig(32, 16, persistent=True), device=kernel_device)
    torch.manual_seed(5)
    b, _ = run_layer(Cell.GRU, H=30, config=ForwardConfig(32, 16, persistent=False), device=kernel_device)
    assert a[3].persistent and not b[3].persistent
    for x, y in zip(a[:2], b[:2]):
        assert torch.equal(x, y)


def test_empty_batch(kernel_device):
    result, ref = run_layer(Cell.LSTM, B=0, device=kernel_device)
    assert result[0].shape == ref[0].shape == (5, 0, 34)


def test_persistent_multi_program_refused_by_interpreter():
    with pytest.raises(ValueError, match="interpreter"):
        run_layer(Cell.RNN_TANH, H=40, config=ForwardConfig(16, 16, persistent=True))


@pytest.mark.parametrize("kwargs", [dict(hidden_block=12, batch_block=16), dict(hidden_block=16, batch_block=8),
                                    dict(hidden_block=16, batch_block=16, num_warps=3),
                                    dict(hidden_block=16, batch_block=16, k_block=24)])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        ForwardConfig(**kwargs)

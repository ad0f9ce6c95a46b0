"""What one eager layer call launches (issue 12's lean path): the input projection's GEMM per
direction and the recurrent kernel, and nothing that copies, stacks or adds weights. Counted on
the host path with the kernel stubbed (scripts/host_path.py), so it runs without a GPU."""
import pytest

pytestmark = pytest.mark.interpreter


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_a_layer_call_launches_its_gemms_and_kernel_only(cell, bidirectional, bias):
    from scripts import host_path  # sets TRITON_INTERPRET: imported only where the interpreter runs anyway

    # H = 16 is one program per direction: no barrier, so no memset either.
    launching, launches, _ = host_path.measure(cell, 1, bidirectional, T=3, B=2, H=16, repeats=1, calls=1,
                                               bias=bias)
    gemm = "addmm.default" if bias else "mm.default"
    assert launching == {gemm: 2 if bidirectional else 1}
    assert launches == 1


def test_stacked_layers_add_only_the_state_concatenation():
    from scripts import host_path

    launching, launches, _ = host_path.measure("LSTM", 2, True, T=3, B=2, H=16, repeats=1, calls=1)
    assert launching == {"addmm.default": 4, "cat.default": 2}  # h_n and c_n of both layers
    assert launches == 2

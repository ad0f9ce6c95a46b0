"""Test set-up: without CUDA, Triton kernels run through the interpreter.

TRITON_INTERPRET must be set before any @triton.jit runs, i.e. before kernels/ is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels import env  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "interpreter" in item.keywords and not env.interpreting():
            item.add_marker(pytest.mark.skip(reason="kernels are compiled here: interpreter tests need "
                                                    "TRITON_INTERPRET=1"))


@pytest.fixture
def kernel_device():
    """Where the Triton kernels run in this session: CPU through the interpreter, else CUDA."""
    return "cpu" if env.interpreting() else "cuda"


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    monkeypatch.delenv("RNN_BACKEND", raising=False)


@pytest.fixture(autouse=True)
def _full_precision_fp32(monkeypatch):
    # float32 on CUDA follows cuDNN's RNN TF32 setting, on by default (kernels.forward.fp32_precision):
    # tests compare at full precision unless they turn it on (the tf32 cases).
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


# --- tests/test_differential.py: command-line option (nothing else of that file lives here) ---
def pytest_addoption(parser):
    parser.addoption("--diff-examples", type=int, default=None, metavar="N",
                     help="hypothesis examples per test in tests/test_differential.py (default: its "
                          "calibrated CI count)")
# --- end of tests/test_differential.py's block ---

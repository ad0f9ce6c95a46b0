"""The one place that reads environment variables (CONVENTIONS.md, item 6).

Values are read on every call, so tests can change them with ``monkeypatch``.
"""
import os

BACKENDS = ("auto", "triton", "reference")


def backend() -> str:
    """``RNN_BACKEND``: which path runs a forward (``auto`` when unset)."""
    value = os.environ.get("RNN_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"RNN_BACKEND must be one of {', '.join(BACKENDS)}, got {value!r}")
    return value


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def autotune_enabled() -> bool:
    """``RNN_AUTOTUNE``: time candidate configs on first use of a shape (default on); 0 keeps the
    heuristic default."""
    return os.environ.get("RNN_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


def cache_dir() -> str:
    """``RNN_CACHE_DIR``: where the autotune cache lives (default ~/.cache/fused-rnn)."""
    return os.environ.get("RNN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fused-rnn")

"""Partition heuristics, the autotuning space and the on-disk autotune cache."""
import json
import math
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
import triton

from kernels import env
from kernels.configs import (BACKWARD_GRADIENT_CHUNK_BYTES, FINGERPRINTED, RESIDENT_H_BYTES, RESIDENT_WEIGHT_BYTES,
                             STREAM_K, TUNED_SIZES, AutotuneCache, KernelConfig, backward_piece_rows,
                             backward_reduction, candidate_backward_configs, candidate_configs, code_fingerprint,
                             default_backward_config, default_forward_config, describe, k_block, tuning_key)
from kernels.forward import _Layer, _tuned_or_default, autotune_cache

SHAPES = [(H, B, gates, elt, D) for H, B in TUNED_SIZES for gates in (1, 3, 4) for elt in (2, 4) for D in (1, 2)]


@pytest.mark.parametrize("H, B, gates, elt, D", SHAPES[::7])
def test_defaults_and_candidates_are_valid(H, B, gates, elt, D):
    default = default_forward_config(H, B, gates, elt, False, D)
    candidates = candidate_configs(H, B, gates, elt, D)
    assert candidates[0] == default and len(set(candidates)) == len(candidates)
    for cfg in candidates:
        width = 4 if cfg.fused_gates and gates > 1 else 1
        assert width * cfg.hidden_block >= 16, cfg
        # The default's batch tile, or half of it (resident, twice the hidden block: as many programs)
        assert cfg.batch_block == default.batch_block or (
            2 * cfg.batch_block == default.batch_block and cfg.hidden_block == 2 * default.hidden_block
            and cfg.k_block is None), cfg
        if cfg.k_block is None:  # resident only within the compile-checked bounds
            slice_bytes = cfg.hidden_block * (4 if width == 4 else gates) * k_block(H) * elt
            assert slice_bytes <= RESIDENT_WEIGHT_BYTES and cfg.batch_block * k_block(H) * elt <= RESIDENT_H_BYTES
        assert not cfg.fused_gates or gates > 1
        assert cfg.num_stages == 1 or cfg.k_block is not None  # only a K-chunk loop pipelines
        if cfg.split_k > 1:  # resident, parts a dot tile deep, the accumulator within 128 B a thread
            assert cfg.k_block is None and k_block(H) // cfg.split_k >= 16, cfg
            acc = cfg.split_k * cfg.batch_block * width * cfg.hidden_block * (8 if elt == 8 else 4)
            assert acc <= 128 * 32 * cfg.num_warps, cfg
    streamed = any(c.k_block for c in candidates)
    assert any(c.num_stages > 1 for c in candidates) == streamed


@pytest.mark.parametrize("elt", [2, 4])
def test_forward_default_keeps_w_hh_on_chip_within_the_bounds(elt):
    """H=1024 LSTM at B=16 fits on-chip once compiled as launched (16-bit and fp32: the bounds are
    bytes); a 64-row tile of h at H=1024 does not, and streams W_hh; the whole-layer candidate
    is offered where it fits."""
    assert default_forward_config(1024, 16, 4, elt, False, 1).k_block is None
    assert default_forward_config(1024, 64, 4, elt, False, 1).k_block is not None
    assert any(c.hidden_block == 128 and c.k_block is None for c in candidate_configs(128, 16, 4, 2, 1))


@pytest.mark.parametrize("H, B, gates, elt, D", SHAPES[::7])
def test_backward_candidates_are_valid(H, B, gates, elt, D):
    from kernels.backward import backward_meta
    from kernels.cells import Cell

    cell = {1: Cell.RNN_TANH, 3: Cell.GRU, 4: Cell.LSTM}[gates]
    candidates = candidate_backward_configs(H, B, gates, elt, D)
    assert candidates[0] == default_backward_config(H, B, gates, elt, False, D)
    assert len(set(candidates)) == len(candidates)
    for cfg in candidates:  # each one launchable: backward_meta raises on a bad partition
        meta = backward_meta(cell, D, H, cfg, elt_size=elt, has_h0=True, has_c0=True, packed=False, has_dout=True,
                             has_dhn=True, has_dcn=True, upcast=False, precision="ieee")
        assert cfg.batch_block == candidates[0].batch_block
        if cfg.k_block is None and backward_reduction(H, gates) > STREAM_K:  # on-chip only within the bounds
            assert cfg.batch_block == 16 and cfg.num_warps == 8 and H % 16 == 0 and elt <= 4, cfg
            assert k_block(H) * elt <= 4096, cfg
            assert gates * cfg.hidden_block * k_block(H) * elt <= RESIDENT_WEIGHT_BYTES, cfg
        # Each gate's columns in pieces whose gradient tile is within the bound
        assert meta["PK"] * meta["SPLIT"] == k_block(H)
        assert meta["PK"] == 16 or cfg.batch_block * meta["PK"] * elt <= BACKWARD_GRADIENT_CHUNK_BYTES, cfg


@pytest.mark.parametrize("elt", [2, 4])
def test_backward_default_keeps_w_hh_on_chip_within_the_bounds(elt):
    """LSTM's columns of W_hh within the slice bound stay on-chip with 16-row batch tiles (bf16 up
    to H=1024, fp32 up to H=512, in pieces of 8 KiB of the gradient tile); past it, with 32-row
    tiles, H not a multiple of 16, fp64 or (by default) packed sequences, they stream."""
    largest = 1024 if elt == 2 else 512
    assert default_backward_config(largest, 16, 4, elt, False, 1).k_block is None
    assert default_backward_config(2 * largest, 16, 4, elt, False, 1).k_block is not None
    assert default_backward_config(largest, 64, 4, elt, False, 1).k_block is not None
    assert default_backward_config(largest, 1, 4, elt, False, 1).k_block is None
    assert default_backward_config(largest, 16, 4, elt, False, 1, packed=True).k_block is not None
    assert default_backward_config(200, 16, 4, elt, False, 1).k_block is not None  # rows not 16-byte aligned
    assert default_backward_config(64, 16, 4, 8, False, 1).k_block is not None  # fp64
    assert any(c.k_block is None for c in candidate_backward_configs(largest, 16, 4, elt, 1))
    assert not any(c.k_block is None for c in candidate_backward_configs(2 * largest, 16, 4, elt, 1))
    assert backward_piece_rows(largest, 16, elt) == 512 // elt  # 8 KiB of gradients


def test_pipelining_needs_a_streamed_reduction():
    from kernels.backward import backward_meta
    from kernels.cells import Cell
    from kernels.forward import kernel_meta

    flags = dict(has_h0=True, has_c0=True, packed=False, upcast=False, precision="ieee")
    streamed = KernelConfig(16, 16, k_block=32, fused_gates=True, num_stages=3)
    assert kernel_meta(Cell.LSTM, 1, 100, streamed, has_bhh=False, **flags)["STAGES"] == 3
    assert backward_meta(Cell.LSTM, 1, 100, streamed, elt_size=2, has_dout=True, has_dhn=True, has_dcn=True,
                         **flags)["STAGES"] == 3
    for resident in (KernelConfig(16, 16, fused_gates=True, num_stages=2),
                     KernelConfig(16, 16, k_block=128, fused_gates=True, num_stages=2)):  # 128 >= H padded
        with pytest.raises(ValueError, match="num_stages=2 pipelines the K-chunk loop"):
            kernel_meta(Cell.LSTM, 1, 100, resident, has_bhh=False, **flags)
    with pytest.raises(ValueError, match="num_stages=2 pipelines the K-chunk loop"):
        backward_meta(Cell.LSTM, 1, 100, KernelConfig(16, 16, num_stages=2), elt_size=2, has_dout=True, has_dhn=True,
                      has_dcn=True, **flags)
    with pytest.raises(ValueError, match="num_stages must be 1 to 4"):
        KernelConfig(16, 16, k_block=32, num_stages=0)


def test_split_reduction_needs_a_resident_w_hh_and_rows_enough():
    """split_k divides a resident forward reduction into parts of a dot tile or more: refused
    when W_hh streams or the parts would be shallower; offered as one candidate, the default's
    partition split among its warps."""
    from kernels.cells import Cell
    from kernels.forward import kernel_meta

    flags = dict(has_h0=True, has_c0=True, packed=False, upcast=False, precision="ieee", has_bhh=True)
    assert kernel_meta(Cell.LSTM, 1, 100, KernelConfig(16, 16, fused_gates=True, split_k=8), **flags)["KW"] == 8
    with pytest.raises(ValueError, match="split_k=2 .* this partition streams W_hh"):
        kernel_meta(Cell.LSTM, 1, 100, KernelConfig(16, 16, k_block=32, fused_gates=True, split_k=2), **flags)
    with pytest.raises(ValueError, match="split_k=16 .* too few rows"):
        kernel_meta(Cell.LSTM, 1, 100, KernelConfig(16, 16, fused_gates=True, split_k=16), **flags)
    with pytest.raises(ValueError, match="split_k must be a power of two"):
        KernelConfig(16, 16, split_k=3)
    default = default_forward_config(512, 16, 4, 2, False, 1)
    split = [c for c in candidate_configs(512, 16, 4, 2, 1) if c.split_k > 1]
    assert split == [KernelConfig(default.hidden_block, 16, fused_gates=True, num_warps=default.num_warps,
                                  split_k=default.num_warps)]
    assert describe(split[0]).endswith(f"-k{default.num_warps}")


def test_default_spreads_small_batches_over_the_sms():
    """Up to B=64 the default grid fits one program per SM of an H100 (so it runs persistently),
    and a small layer takes one program per group (no barrier)."""
    for H, B, gates, elt, D in SHAPES:
        if B > 64 or H > 1024:
            continue
        cfg = default_forward_config(H, B, gates, elt, False, D)
        programs = triton.cdiv(H, cfg.hidden_block) * triton.cdiv(B, cfg.batch_block) * D
        assert programs <= 132, (H, B, gates, elt, D, cfg)
    assert triton.cdiv(64, default_forward_config(64, 8, 4, 2, False).hidden_block) == 1


def test_interpreter_default_is_one_program():
    cfg = default_forward_config(200, 3, 4, 4, interpreting=True)
    assert cfg.hidden_block >= 200 and cfg.k_block is None


def test_tuning_key_buckets_batch_and_ignores_nothing_else():
    a = tuning_key("rnn_fwd", "LSTM", 512, 9, "bfloat16", 1, "H100", "3.6.0")
    assert a == tuning_key("rnn_fwd", "LSTM", 512, 16, "bfloat16", 1, "H100", "3.6.0")
    for changed in (dict(cell="GRU"), dict(hidden_size=256), dict(batch=17), dict(dtype="float16"),
                    dict(directions=2), dict(device="H200"), dict(triton_version="3.7.0"), dict(code="other")):
        args = dict(kernel="rnn_fwd", cell="LSTM", hidden_size=512, batch=9, dtype="bfloat16", directions=1,
                    device="H100", triton_version="3.6.0")
        args.update(changed)
        assert tuning_key(**args) != a, changed
    assert a.endswith(f"|code={code_fingerprint()}")


def test_code_fingerprint_follows_every_kernel_source(tmp_path):
    """A change to any kernel source or to the config space gives new tuning keys: an upgraded
    checkout never reuses a winner timed on other code."""
    import shutil

    from kernels import configs
    for name in FINGERPRINTED:
        shutil.copy(Path(configs.__file__).parent / name, tmp_path / name)
    base = code_fingerprint(str(tmp_path))
    assert base == code_fingerprint() and len(base) == 12
    for name in FINGERPRINTED:
        code_fingerprint.cache_clear()
        original = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(original + b"\n# changed\n")
        assert code_fingerprint(str(tmp_path)) != base, name
        (tmp_path / name).write_bytes(original)
    code_fingerprint.cache_clear()


def test_cache_round_trip(tmp_path):
    path = str(tmp_path / "sub" / "autotune.json")
    cfg = KernelConfig(8, 16, k_block=64, fused_gates=True, num_warps=8)
    AutotuneCache(path).put("k1", cfg, {"HB8": 0.001})
    assert AutotuneCache(path).get("k1") == cfg
    assert AutotuneCache(path).get("missing") is None
    data = json.loads(open(path).read())
    assert data["entries"]["k1"]["timings_ms_per_step"] == {"HB8": 0.001}


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 0, "entries": {}}), json.dumps([1, 2]),
                                     json.dumps({"format": 1, "entries": {"k1": {"config": {"hidden_block": 3}}}})],
                         ids=["garbage", "old-format", "not-a-map", "invalid-entry"])
def test_bad_cache_counts_as_empty_and_is_rewritten(tmp_path, content):
    path = tmp_path / "autotune.json"
    path.write_text(content)
    cache = AutotuneCache(str(path))
    assert cache.get("k1") is None
    cache.put("k2", KernelConfig(16, 16))
    assert AutotuneCache(str(path)).get("k2") == KernelConfig(16, 16)


def _writer(path, start):
    cache = AutotuneCache(path)
    for i in range(start, start + 20):
        cache.put(f"key{i}", KernelConfig(16, 16, num_warps=8 if i % 2 else 4))


def test_concurrent_writers_merge_and_never_corrupt(tmp_path):
    path = str(tmp_path / "autotune.json")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, 100 * n)) for n in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = json.loads(open(path).read())["entries"]
    assert len(entries) == 80
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".autotune-")], "temporary files left behind"


def test_env_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("RNN_AUTOTUNE", "0")
    assert not env.autotune_enabled()
    monkeypatch.setenv("RNN_AUTOTUNE", "1")
    assert env.autotune_enabled()
    monkeypatch.setenv("RNN_CACHE_DIR", str(tmp_path))
    assert autotune_cache().path == str(tmp_path / "autotune.json")


def test_no_tuning_off_cuda(monkeypatch, tmp_path):
    """CPU tensors (the interpreter) take the heuristic default and never touch the cache."""
    monkeypatch.setenv("RNN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(3, 2, 4)
    layer = _Layer(2, x, [(torch.randn(4 * 8, 4), torch.randn(4 * 8, 8), None, None)], None, None, None, False)
    assert _tuned_or_default(layer) == layer.default_config()
    assert not os.listdir(tmp_path)


@pytest.mark.interpreter
def test_tuning_times_every_candidate_and_caches_the_winner(monkeypatch, tmp_path):
    """The autotuner's own logic, run through the interpreter (the wall clock stands in for CUDA
    events): every candidate runs, one that fails counts as infinitely slow, the fastest of the
    rest is cached with the timings."""
    from kernels import forward
    from kernels.cells import Cell

    monkeypatch.setenv("RNN_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    H = 72  # pads to 128 > the streamed chunk: resident, streamed and pipelined candidates
    layer = _Layer(Cell.LSTM, torch.randn(2, 5, 4), [(torch.randn(4 * H, 4), torch.randn(4 * H, H), None, None)],
                   None, None, None, False)
    candidates = candidate_configs(H, 5, 4, 4, 1)
    assert any(c.num_stages > 1 for c in candidates) and any(c.k_block is None for c in candidates)
    # Candidates that fail as a device can: at launch, in ptxas, in Triton's compiler (the last
    # two are TritonErrors, not RuntimeErrors).
    import ast

    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import PTXASError
    failures = {candidates[1]: RuntimeError("cannot launch"), candidates[2]: PTXASError("ptxas failed"),
                candidates[3]: CompilationError("src", ast.parse("x").body[0], "cannot compile")}
    launch = _Layer.launch

    def failing_launch(self, cfg, *args, **kwargs):
        if cfg in failures:
            raise failures[cfg]
        return launch(self, cfg, *args, **kwargs)

    monkeypatch.setattr(_Layer, "launch", failing_launch)
    winner, timings = forward._tune(layer, "the-key", repeats=1)
    assert set(timings) == {describe(c) for c in candidates}
    assert all(timings[describe(c)] == float("inf") for c in failures)
    finite = {name: ms for name, ms in timings.items() if ms != float("inf")}
    assert len(finite) == len(candidates) - len(failures) and all(ms > 0 for ms in finite.values())
    assert describe(winner) == min(finite, key=finite.get)
    entry = json.loads((tmp_path / "autotune.json").read_text())["entries"]["the-key"]
    assert KernelConfig(**entry["config"]) == winner and entry["timings_ms_per_step"] == finite


def test_fp32_follows_cudnns_rnn_tf32_setting(monkeypatch):
    """float32 on CUDA uses TF32 exactly where torch.nn's cuDNN RNN does: its own setting, then
    cuDNN's, then the generic one; never the matmul flag."""
    from kernels.forward import cudnn_rnn_tf32, fp32_precision

    cudnn = torch.backends.cudnn
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)  # not what cuDNN's RNN reads
    assert not cudnn_rnn_tf32()  # conftest turned cuDNN's TF32 off through the legacy flag
    monkeypatch.setattr(cudnn, "allow_tf32", True)
    assert cudnn_rnn_tf32()  # the legacy flag, on by default in torch
    if hasattr(cudnn, "rnn") and hasattr(cudnn.rnn, "fp32_precision"):
        monkeypatch.setattr(cudnn.rnn, "fp32_precision", "ieee")  # the RNN's own setting decides
        assert not cudnn_rnn_tf32()
        monkeypatch.setattr(cudnn.rnn, "fp32_precision", "tf32")
        assert cudnn_rnn_tf32()
    assert fp32_precision(torch.zeros(1)) == "ieee"  # off CUDA, always full precision


def test_slow_tuning_prints_one_progress_line(monkeypatch, tmp_path, capsys):
    from kernels import forward

    monkeypatch.setenv("RNN_CACHE_DIR", str(tmp_path))
    candidates = [KernelConfig(16, 16), KernelConfig(32, 16), KernelConfig(64, 16)]
    monkeypatch.setattr(forward, "PROGRESS_AFTER_S", 1e9)  # quick: nothing printed
    forward.time_candidates("quick|code=x", candidates, lambda cfg: None, 1, torch.device("cpu"), repeats=1)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(forward, "PROGRESS_AFTER_S", -1.0)  # slow from the start
    forward.time_candidates("LSTM-key|code=x", candidates, lambda cfg: None, 1, torch.device("cpu"), repeats=1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fused-rnn: tuning LSTM-key: 3 candidates")
    assert str(tmp_path) in lines[0]


def test_tuning_reraises_a_broken_cuda_context_and_caches_nothing(monkeypatch, tmp_path):
    """A candidate that fails and leaves the context unusable (a sticky CUDA error: every later call
    fails) ends tuning with an error naming it, and nothing is cached; a candidate that merely
    fails (the context still synchronises) is skipped, and the winner is cached."""
    from kernels import forward

    monkeypatch.setenv("RNN_CACHE_DIR", str(tmp_path))
    candidates = [KernelConfig(16, 16), KernelConfig(32, 16), KernelConfig(64, 16)]
    sticky = []

    def synchronize(device=None):
        if sticky:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def run(cfg):
        if cfg == candidates[1]:
            raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(forward, "_time_ms", lambda run, repeats, device: (run(), 1.0)[1])
    cuda = torch.device("cuda")
    best, timings = forward.time_candidates("LSTM-ok|code=x", candidates, run, 1, cuda, repeats=1)
    assert timings[describe(candidates[1])] == math.inf and best == candidates[0]
    assert forward.autotune_cache().get("LSTM-ok|code=x") == candidates[0]
    sticky.append(True)
    with pytest.raises(RuntimeError, match=rf"tuning LSTM-bad: candidate {describe(candidates[1])} left the CUDA "
                                           r"context unusable \(CUDA error: an illegal memory access"):
        forward.time_candidates("LSTM-bad|code=x", candidates, run, 1, cuda, repeats=1)
    assert forward.autotune_cache().get("LSTM-bad|code=x") is None


def test_candidates_compile_on_threads_without_workers(monkeypatch, tmp_path):
    """Where no worker process runs, time_candidates compiles every candidate first on a thread
    pool under Triton's asynchronous compile (CUDA only); a candidate whose compile call fails is
    left to its timed launch; nothing is compiled that way off CUDA."""
    from triton.runtime import _async_compile

    from kernels import forward, tuning

    monkeypatch.setenv("RNN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "compile_workers", lambda: None)
    monkeypatch.setattr(tuning, "current_target", lambda: "sm_90")
    candidates = [KernelConfig(16, 16), KernelConfig(32, 16), KernelConfig(64, 16)]
    compiled = []

    def compile(cfg):
        if cfg == candidates[1]:
            raise ValueError("not for this shape")
        _jit_compile(cfg, compiled)

    tuning.compile_in_parallel(compile, candidates, torch.device("cuda"))
    assert compiled == [(candidates[0], True), (candidates[2], True)]  # inside Triton's async mode
    assert _async_compile.active_mode.get() is None
    compiled.clear()
    tuning.compile_in_parallel(compile, candidates, torch.device("cpu"))  # the interpreter compiles nothing
    assert compiled == []
    with _async_compile.AsyncCompileMode(None):  # another one active (inductor's): compile as we time
        tuning.compile_in_parallel(compile, candidates, torch.device("cuda"))
    assert compiled == []
    runs = []
    forward.time_candidates("k|code=x", candidates, runs.append, 1, torch.device("cpu"), repeats=1,
                            compile=compile)
    assert runs and not compiled  # off CUDA: timed, not precompiled


class _Kernel:
    """What the JIT hands its hooks as a kernel: one importable by module and name."""

    cache_key = "source fingerprint"


KERNEL = _Kernel()
KERNEL.__module__, KERNEL.__name__ = __name__, "KERNEL"


def _jit_compile(cfg, compiled: list):
    """What kernel.warmup does with a kernel it has not compiled: ask Triton's jit_cache_hook,
    compile unless it says skip (recorded with whether Triton's asynchronous compile was on)."""
    from triton import knobs
    from triton.runtime import _async_compile
    from triton.runtime.jit import JitFunctionInfo

    hook = knobs.runtime.jit_cache_hook
    if hook is not None and hook(key=describe(cfg), repr="", fn=JitFunctionInfo(__name__, "KERNEL", KERNEL),
                                 compile={"specialization_data": describe(cfg)}, is_manual_warmup=True,
                                 already_compiled=False):
        return
    compiled.append((cfg, _async_compile.active_mode.get() is not None))


def test_candidates_compile_in_workers_the_rest_on_threads(monkeypatch):
    """Each candidate's compile is recorded in this process (nothing compiled here) and handed to
    the workers; what no worker compiled (a worker lost, a kernel it could not reproduce) is
    compiled on threads; a candidate's own compile error, or a compile call that raises, is left
    to its timed launch. Triton's hook is restored afterwards."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    from kernels import tuning

    candidates = [KernelConfig(16, 16), KernelConfig(32, 16), KernelConfig(64, 16), KernelConfig(16, 32),
                  KernelConfig(32, 32), KernelConfig(64, 32)]
    outcome = {candidates[0]: "ok", candidates[1]: "failed", candidates[2]: "lost", candidates[3]: "skipped",
               candidates[5]: "ok"}
    target = GPUTarget("cuda", 90, 32)
    asked = []

    class Workers:
        def compile_all(self, requests):
            asked.extend(requests)
            return [outcome[next(c for c in candidates if describe(c) == r.specialization)] for r in requests]

    compiled = []

    def compile(cfg):
        if cfg == candidates[4]:
            raise ValueError("not for this shape")
        _jit_compile(cfg, compiled)

    def earlier_hook(**kwargs):  # someone else's hook: kept, and still asked outside the capture
        return None

    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", earlier_hook)
    monkeypatch.setattr(tuning, "compile_workers", Workers)
    monkeypatch.setattr(tuning, "current_target", lambda: target)
    tuning.compile_in_parallel(compile, candidates, torch.device("cuda"))
    assert [r.specialization for r in asked] == [describe(c) for c in candidates if c in outcome]
    assert all(r == tuning.CompileRequest(__name__, "KERNEL", "source fingerprint", r.specialization, target)
               for r in asked)
    assert compiled == [(candidates[2], True), (candidates[3], True)]  # on threads, asynchronously
    assert knobs.runtime.jit_cache_hook is earlier_hook
    compiled.clear()
    _jit_compile(candidates[0], compiled)  # outside the capture: compiled as usual
    assert compiled == [(candidates[0], False)]


def test_candidates_compile_on_threads_when_workers_fail(monkeypatch):
    """No worker process can start, or the workers die: every candidate compiles on threads, and
    after a breakdown the process stops starting workers."""
    import shutil

    from kernels import tuning

    candidates = [KernelConfig(16, 16), KernelConfig(32, 16)]
    monkeypatch.setattr(tuning, "current_target", lambda: "sm_90")
    for executable in ("/nonexistent/python", shutil.which("true")):  # cannot start; exits at once
        monkeypatch.setattr(tuning, "_workers", None)
        monkeypatch.setattr(tuning, "_workers_failed", False)
        monkeypatch.setattr(tuning.sys, "executable", executable)
        compiled = []
        tuning.compile_in_parallel(lambda cfg: _jit_compile(cfg, compiled), candidates, torch.device("cuda"))
        assert compiled == [(c, True) for c in candidates]
        assert tuning.compile_workers() is None


def test_compile_workers_are_reused_until_the_environment_changes(monkeypatch):
    """One set of workers serves every tuning; a change of Triton's cache-invalidating environment
    variables (the workers inherited the old ones) starts new ones."""
    from kernels import tuning

    started, closed = [], []

    class Workers:
        broken = False

        def __init__(self, count):
            self.variables = tuning.environment()[0]
            started.append(self)

        def close(self):
            closed.append(self)

    monkeypatch.setattr(tuning, "Workers", Workers)
    monkeypatch.setattr(tuning, "_workers", None)
    monkeypatch.setattr(tuning, "_workers_failed", False)
    monkeypatch.delenv("TRITON_DISABLE_LINE_INFO", raising=False)
    first = tuning.compile_workers()
    assert tuning.compile_workers() is first and started == [first] and not closed
    monkeypatch.setenv("TRITON_DISABLE_LINE_INFO", "1")  # one that changes Triton's cache keys
    second = tuning.compile_workers()
    assert second is not first and closed == [first]
    tuning.shutdown_workers()
    assert closed == [first, second]

"""Compile kernel variants for an H100 (sm_90) without a GPU, and report resources.

Catches what only the compiler sees (loop-carried type changes, non-constexpr globals, shared
memory overflow, register spills) on a CPU machine. For each variant prints registers, spilled
bytes and shared memory from ptxas; exits non-zero if a variant fails to compile, needs more
shared memory than an H100 has, or, for a heuristic default, spills.

    python -m scripts.compile_check [--quick] [--space] [--kernel fwd|bwd] [--match TEXT] [--jobs N]
    python -m scripts.compile_check --bounds

--quick: the defaults (forward, forward saving for training, backward) of a few sizes, fp16 and
the ReLU RNN left out (their code is bf16's and the tanh RNN's with another constant) (CI);
default: the defaults of every size in kernels.configs.TUNED_SIZES; --space: also every candidate
of both kernels' autotuning spaces there (with --quick, LSTM's and the tanh RNN's in bf16 at the
largest size only: the other candidates, which tuning drops if they fail on the GPU, are left to
the full sweep, to keep the CI test short on a cold cache: 232 variants, 2 min 22 s alone on 2
cores; the backward's batched dots made the former 345 take 3 min 40 s, and 9 min beside the
rest of the suite).
Must run without TRITON_INTERPRET (it compiles real GPU code).
"""
import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

H100_SHARED_BYTES = 232448  # opt-in shared memory per block on an H100

ELEMENT_SIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}


def compile_sm90(cell, dtype: str, H: int, cfg, sync: bool = True, D: int = 2, flags: dict | None = None,
                 kernel: str = "fwd", B: int = 16) -> dict:
    """Compile rnn_fwd_kernel (kernel="fwd"; flags may add save=True) or rnn_bwd_kernel ("bwd")
    for sm_90 as the JIT compiles a launch on a batch of B (see launch_arguments).
    Returns {regs, spills (bytes), shared (bytes)}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, values, meta, launch = launch_arguments(cell, dtype, H, cfg, sync, D, flags, kernel, B)
    signature, constexprs, attrs = jit_specialisation(fn, values, meta)
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=launch)
    return dict(shared=compiled.metadata.shared, **_ptxas_report(compiled.asm["ptx"]))


def launch_arguments(cell, dtype: str, H: int, cfg, sync: bool = True, D: int = 2, flags: dict | None = None,
                     kernel: str = "fwd", B: int = 16):
    """(kernel, {argument: value}, constexprs, launch options) of a launch of rnn_fwd_kernel
    (kernel="fwd"; flags may add save=True) or rnn_bwd_kernel ("bwd") on a batch of B: every
    optional input present, padded sequences in [T, B, F] layout, unless ``flags`` says otherwise
    (packed=True: torch's packed layout). Tensors are given as their torch dtypes (what
    ``kernel.warmup`` takes)."""
    import torch

    from kernels.backward import backward_meta, rnn_bwd_kernel
    from kernels.barrier import PATIENCE
    from kernels.cells import Cell
    from kernels.forward import kernel_meta, rnn_fwd_kernel

    cell = Cell(cell)
    G = cell.gates
    precision = "tf32" if dtype == "fp32" else "ieee"
    packed = bool((flags or {}).get("packed"))
    if kernel == "fwd":
        fn = rnn_fwd_kernel
        options = dict(has_h0=True, has_c0=cell == Cell.LSTM, packed=False, has_bhh=True)
        options.update(flags or {})
        meta = dict(kernel_meta(cell, D, H, cfg, upcast=False, precision=precision, **options))  # cached: copy
        acc_args = ("state_ptr",)
        # (time, sequence) strides of xw [T, B, G*H] and out [T, B, D*H]; packed rows: (0, row)
        strides = dict(stride_xt=B * G * H, stride_xb=G * H, stride_ot=B * D * H, stride_ob=D * H)
        if packed:
            strides.update(stride_xt=0, stride_ot=0)
        ints = dict(T=4 * B + 3, B=B, H=H, patience=PATIENCE, t0=0, t1=4 * B + 3, **strides)
        if not sync:
            ints.update(t0=1, t1=2)
    else:
        fn = rnn_bwd_kernel
        options = dict(has_h0=True, has_c0=cell == Cell.LSTM, packed=False, has_dout=True, has_dhn=True,
                       has_dcn=cell == Cell.LSTM)
        options.update(flags or {})
        meta = dict(backward_meta(cell, D, H, cfg, elt_size=ELEMENT_SIZE[dtype], upcast=False, precision=precision,
                                  **options))  # cached: copy
        acc_args = ("dhbuf_ptr", "dcbuf_ptr")  # the gate-gradient exchange is in the input dtype
        strides = dict(stride_ot=B * D * H, stride_ob=D * H, stride_dt=B * D * H, stride_db=D * H)
        if packed:
            strides.update(stride_ot=0, stride_dt=0)
        # The persistent launch finishes (dh0, dc0) in the same launch; a stepwise one does not.
        ints = dict(T=4 * B + 3, B=B, H=H, patience=PATIENCE, t0=0, t1=4 * B + 3, finish=1, **strides)
        if not sync:
            ints.update(t0=1, t1=2, finish=0)
    launch = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"),
                  maxnreg=meta.pop("maxnreg", None), launch_cooperative_grid=sync)
    meta["SYNC"] = sync
    torch_dtype = dict(fp16=torch.float16, bf16=torch.bfloat16, fp32=torch.float32, fp64=torch.float64)[dtype]
    acc = torch.float64 if dtype == "fp64" else torch.float32
    values = {}
    for arg in fn.arg_names:
        if arg in meta:
            continue
        if arg in ("len_ptr", "sync_ptr", "flag_ptr"):
            values[arg] = torch.int32
        elif arg == "off_ptr":
            values[arg] = torch.int64
        elif arg in acc_args:
            values[arg] = acc
        elif arg.endswith("_ptr"):
            values[arg] = torch_dtype
        else:
            values[arg] = ints[arg]
    return fn, values, meta, launch


def jit_specialisation(fn, values: dict, constexprs: dict):
    """(signature, constexprs, attrs) of a launch of ``fn`` exactly as Triton's JIT derives them
    from its arguments: pointers (here torch dtypes, standing for tensors from torch's allocator,
    which aligns every allocation) 16-byte aligned, integers divisible by 16 marked so, an integer
    equal to 1 made a constant, except where the kernel opts out (do_not_specialize)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import MockTensor

    signature, constants, attrs = {}, dict(constexprs), {}
    for i, param in enumerate(fn.params):
        if param.name in constexprs:
            signature[param.name] = "constexpr"
            continue
        value = values[param.name]
        value = MockTensor(value) if hasattr(value, "is_floating_point") else value
        kind, spec = native_specialize_impl(CUDABackend, value, param.is_const, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":
            constants[param.name] = spec
        elif spec:
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return signature, constants, attrs


def _ptxas_report(ptx_text: str) -> dict:
    """Registers and spilled bytes, from ptxas -v on the PTX (no GPU needed)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(ptx_text)
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", ptx, "-o", ptx + ".o"],
                             capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return dict(regs=regs, spills=spills)


def variants(quick: bool, space: bool):
    """(name, kernel, cell, dtype, H, B, config, sync, is_default, flags) of each variant worth compiling.

    Per size: the forward default for inference (with and without the grid barrier), with SAVE
    (training) and on packed sequences, the backward default (both modes, and packed), and with
    --space every candidate of both kernels.
    """
    from kernels.cells import Cell
    from kernels.configs import (TUNED_SIZES, candidate_backward_configs, candidate_configs, default_backward_config,
                                 default_forward_config, describe, k_block)

    sizes = [(64, 8), (256, 16), (1024, 64)] if quick else TUNED_SIZES
    seen = set()
    # --quick: see the docstring (GRU's fused code is LSTM's with three gates).
    dtypes = [d for d in ELEMENT_SIZE if not (quick and d == "fp16")]
    cells = [c for c in Cell if not (quick and c == Cell.RNN_RELU)]
    for cell, dtype, (H, B), D in itertools.product(cells, dtypes, sizes, (1, 2)):
        # fp64 is for exact checks, not speed: it must compile, at small sizes.
        if dtype == "fp64" and H > 64:
            continue
        elt = ELEMENT_SIZE[dtype]
        default = default_forward_config(H, B, cell.gates, elt, False, D)
        jobs = [("fwd", default, True, sync, None) for sync in (False, True)]
        jobs += [("fwd", default, True, True, {"save": True}), ("fwd", default, True, True, {"packed": True})]
        backward = default_backward_config(H, B, cell.gates, elt, False, D)
        jobs += [("bwd", backward, True, sync, None) for sync in (False, True)]
        jobs.append(("bwd", default_backward_config(H, B, cell.gates, elt, False, D, packed=True), True, True,
                     {"packed": True}))
        # --quick: bf16's candidates only, at the largest size (see the docstring).
        if space and not (quick and (dtype != "bf16" or H != sizes[-1][0] or cell == Cell.GRU)):
            jobs += [("fwd", cfg, False, True, None) for cfg in candidate_configs(H, B, cell.gates, elt, D)]
            jobs += [("bwd", cfg, False, True, None) for cfg in candidate_backward_configs(H, B, cell.gates, elt, D)]
        for kernel, cfg, is_default, sync, flags in jobs:
            # The code depends on H only through its power-of-two padding.
            variant = "-".join(sorted(flags)) if flags else ""
            # The JIT specialises B == 1 and B % 16 == 0 (and strides of B); H beyond its padding
            # only through H % 16 == 0.
            b_kind = "one" if B == 1 else B % 16 == 0  # not 1: it would equal True
            key = (kernel, cell, dtype, k_block(H), H % 16 == 0, b_kind, cfg, sync, variant)
            if key in seen or (not is_default and (*key[:-1], "") in seen):
                continue
            seen.add(key)
            kind = ("default" if is_default else "candidate") + (f"-{variant}" if variant else "")
            yield (f"{kernel}-{cell.name}-{dtype}-H{H}-B{B}-{kind}-{describe(cfg)}-{'sync' if sync else 'nosync'}",
                   kernel, cell, dtype, H, B, cfg, sync, is_default, flags)
    # Each optional input off once: the code without it must compile too.
    from kernels.configs import KernelConfig
    for flag in ("has_h0", "has_c0"):
        yield f"fwd-LSTM-bf16-no-{flag}", "fwd", Cell.LSTM, "bf16", 64, 16, KernelConfig(16, 16, k_block=32), \
            True, False, {flag: False}
    for flag in ("has_dout", "has_dhn", "has_h0"):
        yield f"bwd-GRU-bf16-no-{flag}", "bwd", Cell.GRU, "bf16", 64, 16, KernelConfig(16, 16, k_block=32), \
            True, False, {flag: False}


def bound_variants():
    """The probe behind the heuristic's bounds (kernels.configs): LSTM slices of W_hh kept
    resident, forward (fused gates) and backward, over hidden blocks, reductions, batch tiles,
    warps and element sizes, compiled as launched on a batch of 16 (64 for 64-row tiles)."""
    from kernels.cells import Cell
    from kernels.configs import KernelConfig

    for dtype, kernel, K, HB, BB, warps in itertools.product(("bf16", "fp32"), ("fwd", "bwd"), (256, 512, 1024),
                                                              (4, 8, 16, 32), (16, 32, 64), (4, 8)):
        if kernel == "bwd" and HB < 16:
            continue  # the backward's dot is HB wide
        cfg = KernelConfig(HB, BB, fused_gates=kernel == "fwd", num_warps=warps)
        yield (f"bound-{kernel}-LSTM-{dtype}-H{K}-{describe_bound(kernel, K, HB, BB, dtype)}-{warps}warps", kernel,
               Cell.LSTM, dtype, K, max(BB, 16), cfg, True, False, None)


def describe_bound(kernel: str, K: int, HB: int, BB: int, dtype: str) -> str:
    """The resident slice of W_hh in KiB (forward: [K, 4*HB]; backward: [4*K, HB]) and the tile."""
    return f"HB{HB}-BB{BB}-slice{4 * HB * K * ELEMENT_SIZE[dtype] // 1024}KiB"


def _compile_job(job):
    name, kernel, cell, dtype, H, B, cfg, sync, is_default, flags = job
    try:
        # Two directions: their code holds the one-direction code's (a superset of its registers).
        return name, is_default, compile_sm90(cell, dtype, H, cfg, sync, 2, flags, kernel, B), None
    except Exception as exc:  # report every failing variant, not just the first
        return name, is_default, None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the defaults of a few sizes (the CI test)")
    parser.add_argument("--space", action="store_true", help="also every autotuning candidate")
    parser.add_argument("--kernel", choices=("fwd", "bwd"), help="only this kernel's variants")
    parser.add_argument("--match", default="", help="only variants whose name contains this")
    parser.add_argument("--bounds", action="store_true",
                        help="the probe behind kernels.configs' resident bounds (a table; fails nothing)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("compile_check: unset TRITON_INTERPRET; it compiles real GPU code")
    jobs = [j for j in (bound_variants() if args.bounds else variants(args.quick, args.space))
            if args.kernel in (None, j[1]) and args.match in j[0]]
    failed = 0
    print(f"{'variant':<64} {'regs':>5} {'spill B':>8} {'shared B':>9}")
    with ProcessPoolExecutor(args.jobs) as pool:
        for name, is_default, res, err in pool.map(_compile_job, jobs):
            problem = err
            if res and res["shared"] > H100_SHARED_BYTES:
                problem = "over the H100's shared memory"
            elif res and is_default and res["spills"]:
                problem = "a default that spills registers"
            failed += problem is not None
            numbers = f"{res['regs']:>5} {res['spills']:>8} {res['shared']:>9}" if res else ""
            print(f"{name:<64} {numbers}" + (f"  FAILED: {problem}" if problem else ""))
    print(f"{len(jobs) - failed} of {len(jobs)} variants compiled for sm_90 within limits")
    return 1 if failed and not args.bounds else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile every forward-kernel variant for an H100 (sm_90) without a GPU, and report resources.

Catches what only the compiler sees (loop-carried type changes, non-constexpr globals, shared
memory overflow) on a CPU machine. For each variant prints registers, spills and shared memory
from ptxas; exits non-zero if a variant fails to compile or needs more shared memory than an H100
has. Usage: python -m scripts.compile_check [--quick] [--jobs N]
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


def variants(quick: bool):
    """(name, dtype, constexprs, num_warps) of each variant worth compiling."""
    from kernels.cells import Cell
    from kernels.configs import default_forward_config, k_block

    flags = dict(HAS_H0=True, HAS_C0=True, HAS_LEN=True, HAS_BHN=True, UPCAST=False)
    sizes = [(64, 8), (256, 16)] if quick else [(64, 8), (256, 16), (512, 64), (1024, 16)]
    for cell, dtype, (H, B), sync in itertools.product(Cell, ELEMENT_SIZE, sizes, (False, True)):
        if quick and (dtype == "fp64" and (H, B) != sizes[0]):
            continue
        cfg = default_forward_config(H, B, cell.gates, ELEMENT_SIZE[dtype], interpreting=False)
        meta = dict(CELL=int(cell), G=cell.gates, D=2, HB=cfg.hidden_block, BB=cfg.batch_block, BK=k_block(H),
                    KB=cfg.k_block or k_block(H),
                    SYNC=sync, PRECISION="tf32" if dtype == "fp32" else "ieee",
                    **dict(flags, HAS_BHN=cell == Cell.GRU, HAS_C0=cell == Cell.LSTM))
        chunk = f"-KB{cfg.k_block}" if cfg.k_block else ""
        yield f"{cell.name}-{dtype}-H{H}-B{B}{chunk}-{'sync' if sync else 'nosync'}", dtype, meta, cfg.num_warps
    # Each optional input off once: the code without it must compile too.
    for flag in ("HAS_H0", "HAS_LEN"):
        meta = dict(CELL=int(Cell.LSTM), G=4, D=1, HB=16, BB=16, BK=64, KB=32, SYNC=True, PRECISION="ieee",
                    **dict(flags, HAS_BHN=False, **{flag: False}))
        yield f"LSTM-bf16-no-{flag}", "bf16", meta, 4


def compile_one(job):
    name, dtype, meta, num_warps = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from kernels.forward import rnn_fwd_kernel

    acc = "fp64" if dtype == "fp64" else "fp32"
    signature = {}
    for arg in rnn_fwd_kernel.arg_names:
        if arg in meta:
            signature[arg] = "constexpr"
        elif arg in ("len_ptr", "sync_ptr"):
            signature[arg] = "*i32"
        elif arg in ("hbuf_ptr", "cbuf_ptr"):
            signature[arg] = f"*{acc}"
        elif arg.endswith("_ptr"):
            signature[arg] = f"*{dtype}"
        else:
            signature[arg] = "i32"
    try:
        compiled = triton.compile(ASTSource(rnn_fwd_kernel, signature, constexprs=meta),
                                  target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=num_warps, num_stages=1,
                                               launch_cooperative_grid=meta["SYNC"]))
    except Exception as exc:  # report every failing variant, not just the first
        return name, None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", ptx, "-o", ptx + ".o"],
                             capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return name, dict(regs=regs, spills=spills, shared=compiled.metadata.shared), None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes (the CI test)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("compile_check: unset TRITON_INTERPRET; it compiles real GPU code")
    jobs = list(variants(args.quick))
    failed = 0
    print(f"{'variant':<34} {'regs':>5} {'spill B':>8} {'shared B':>9}")
    print("(KB: the reduction over H runs in chunks, W_hh streamed from L2)")
    with ProcessPoolExecutor(args.jobs) as pool:
        for name, res, err in pool.map(compile_one, jobs):
            if err:
                failed += 1
                print(f"{name:<34} FAILED {err}")
            elif res["shared"] > H100_SHARED_BYTES:
                failed += 1
                print(f"{name:<34} {res['regs']:>5} {res['spills']:>8} {res['shared']:>9}  over the H100's shared memory")
            else:
                print(f"{name:<34} {res['regs']:>5} {res['spills']:>8} {res['shared']:>9}")
    print(f"{len(jobs) - failed} of {len(jobs)} variants compiled for sm_90")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

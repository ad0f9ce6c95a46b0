"""Timing and peak memory of one runner."""
import math
import statistics
import time

import torch

QUANTILES = (0.5, 0.2, 0.8)


def time_ms(step, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) of one step in milliseconds, after warm-up.

    CUDA: triton.testing.do_bench (device events; its warm-up and repeat are in milliseconds).
    CPU: the host clock over repeats filling about rep_ms, at least five.
    """
    if device.type == "cuda":
        import triton.testing
        return tuple(triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES)))
    start = time.perf_counter()
    step()
    estimate = max(time.perf_counter() - start, 1e-6) * 1e3
    for _ in range(max(0, int(warmup_ms / estimate) - 1)):
        step()
    samples = []
    for _ in range(max(5, int(rep_ms / estimate))):
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1e3)
    return tuple(_quantile(samples, q) for q in QUANTILES)


def _quantile(samples, q):
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[round(q * 100) - 1] if q != 0.5 \
        else statistics.median(samples)


def peak_memory_mib(runner, device: torch.device) -> float:
    """Peak memory of one step above what was allocated before it (model, inputs), in MiB.

    The runner's gradients are dropped first, so a training step counts allocating them as torch
    would on its first step. NaN on the CPU, where torch keeps no allocator statistics.
    """
    if runner.memory_at_build is not None:
        return runner.memory_at_build
    if device.type != "cuda":
        return math.nan
    runner.prepare()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    runner.step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20

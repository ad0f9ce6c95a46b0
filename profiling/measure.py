"""Timing, host cost, GPU launches and peak memory of one runner."""
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


QUEUED_LAUNCHES = 256  # well under the ~1000 pending launches after which CUDA makes the host wait


def host_us(step, device: torch.device, rep_ms: float = 100, launches: float = math.nan) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) of the host microseconds one call takes, from the call to
    its return, over batches of back-to-back calls.

    The clock stops when a batch's last call returns; the GPU is synchronised only before each
    batch and, untimed, after it. A batch launches at most QUEUED_LAUNCHES kernels (given
    ``launches`` per call), so the launch queue never fills and the host never waits for the GPU:
    this is what a call costs the host, however fast the GPU. On the CPU it is the whole call.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    step()
    estimate = max(time.perf_counter() - start, 1e-7)
    sync()
    most = 100 if math.isnan(launches) else max(1, int(QUEUED_LAUNCHES / max(launches, 1)))
    calls = max(1, min(most, int(2e-3 / estimate)))  # batches of about 2 ms
    samples = []
    for _ in range(max(5, int(rep_ms * 1e-3 / (calls * estimate)))):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            step()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    sync()
    return tuple(_quantile(samples, q) for q in QUANTILES)


GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # kineto's activity types of what the GPU runs


def launches_per_call(step, device: torch.device, calls: int = 3) -> float:
    """Kernels, memsets and memcpys the GPU runs per call, as torch.profiler (CUPTI) records them
    over a few calls. A replayed CUDA graph counts each kernel inside it. NaN on the CPU."""
    if device.type != "cuda":
        return math.nan
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()  # inside: every kernel of the calls must be recorded
    return sum(is_gpu_work(event) for event in prof.events()) / calls


def is_gpu_work(event) -> bool:
    """Whether a torch.profiler event is a kernel, memcpy or memset on the GPU."""
    kind = getattr(event, "activity_type", None)
    if kind:  # torch versions that keep kineto's activity type
        return kind in GPU_WORK
    # Older ones: GPU events less the GPU side of record_function ranges (e.g. compiled regions).
    return event.device_type == torch.autograd.DeviceType.CUDA and not getattr(event, "is_user_annotation", False)


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


def barrier_floor_us(launches, T: int, device: torch.device) -> float:
    """The floor of one call's step: microseconds per step of the empty time loop
    (kernels.barrier.empty_steps) on the grid and warps of each persistent launch with a grid
    barrier (several programs per group), summed over the call's launches. NaN on the CPU and
    where no launch has a barrier (one program per group, or a launch per step)."""
    grids = [(launch.grid, launch.config.num_warps) for launch in launches if launch.persistent and launch.grid[0] > 1]
    if device.type != "cuda" or not grids or T < 1:
        return math.nan
    import triton.testing
    from kernels.barrier import empty_steps
    total = 0.0
    for grid, warps in grids:
        ms = triton.testing.do_bench(lambda: empty_steps(grid, warps, T, device), warmup=5, rep=25,
                                     return_mode="median")
        total += ms * 1e3 / T
    return total

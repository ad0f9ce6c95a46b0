"""Grid barrier between timesteps of a persistent kernel."""
import torch
import triton
import triton.language as tl


# Each barrier counter (one per direction and batch tile) has a 128-byte line of its own: groups
# spinning on neighbouring counters would otherwise contend for one line.
COUNTER_STRIDE = tl.constexpr(32)  # int32 slots per counter


@triton.jit
def group_counter(sync_ptr, d, pid_b):
    """The barrier counter of direction d's batch tile pid_b (grid: hidden blocks, tiles, directions)."""
    return sync_ptr + (d * tl.num_programs(1) + pid_b) * COUNTER_STRIDE


@triton.jit
def grid_sync(counter_ptr, target):
    """Wait until ``target`` arrivals are counted at ``counter_ptr``.

    The counter only grows within a launch (zeroed by the launcher), so step k of a group of P
    programs waits for P * (k + 1): no reset and no second barrier are needed. Only valid when
    every program of the group is co-resident (cooperative launch); never used under the
    interpreter, which runs programs one after another.
    """
    # Every thread's stores of this step are issued before the program announces itself.
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while arrived < target:
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def empty_steps_kernel(sync_ptr, T, SYNC: tl.constexpr):
    """The persistent kernels' time loop with nothing in it but the grid barrier (counters as
    theirs: group_counter): its time per step is the floor that any step on that grid pays."""
    pid_b = tl.program_id(1)
    d = tl.program_id(2)
    n_prog = tl.num_programs(0)
    for s in range(T):
        if SYNC:
            grid_sync(group_counter(sync_ptr, d, pid_b), n_prog * (s + 1))
        else:
            tl.debug_barrier()


def empty_steps(grid: tuple, num_warps: int, T: int, device) -> torch.Tensor:
    """Run the empty time loop once on ``grid`` (a cooperative launch where it has a barrier, as
    the persistent kernels); returns the counters (each ends at programs per group x T)."""
    sync = torch.zeros(grid[1] * grid[2] * COUNTER_STRIDE.value, dtype=torch.int32, device=device)
    barrier = grid[0] > 1
    empty_steps_kernel[grid](sync, T, SYNC=barrier, num_warps=num_warps, launch_cooperative_grid=barrier)
    return sync[::COUNTER_STRIDE.value]

"""Grid barrier between timesteps of a persistent kernel, bounded: a wait that cannot complete
gives up, and the launch is reported as failed instead of hanging the GPU."""
import threading

import numpy as np
import torch
import triton
import triton.language as tl

from kernels.configs import KernelConfig, describe


# Each barrier counter (one per direction and batch tile) has a 128-byte line of its own: groups
# spinning on neighbouring counters would otherwise contend for one line.
COUNTER_STRIDE = tl.constexpr(32)  # int32 slots per counter

# Polls of a counter before a program stops waiting: seconds on a GPU (a poll is an L2 atomic),
# far above any real step, so only a grid that can never meet gives up.
PATIENCE = 1 << 22
# The interpreter runs programs one after another: a wait there is never answered.
INTERPRETER_PATIENCE = 4


@triton.jit
def group_counter(sync_ptr, d, pid_b):
    """The barrier counter of direction d's batch tile pid_b (grid: hidden blocks, tiles, directions)."""
    return sync_ptr + (d * tl.num_programs(1) + pid_b) * COUNTER_STRIDE


@triton.jit
def grid_sync(counter_ptr, target, patience, flag_ptr):
    """Wait until ``target`` arrivals are counted at ``counter_ptr``, polling at most ``patience``
    times; returns the patience for the next wait.

    The counter only grows within a launch (zeroed by the launcher), so step k of a group of P
    programs waits for P * (k + 1): no reset and no second barrier are needed. Only valid when
    every program of the group is co-resident (cooperative launch). A program whose wait runs out
    sets ``flag_ptr`` (the launcher raises: Watch.check) and waits no more in this launch (its
    results are void), so every program of a grid that cannot meet ends within about one wait.
    """
    # Every thread's stores of this step are issued before the program announces itself.
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    polls = patience * 0
    while (arrived < target) & (polls < patience):
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        polls += 1
    gave_up = arrived < target
    if gave_up:
        tl.store(flag_ptr, 1)
    tl.debug_barrier()
    return tl.where(gave_up, 0, patience)


class Watch:
    """Where programs that gave up waiting say so: a ring of int32 flags in host memory that the
    GPU writes directly (pinned, so the host reads it without synchronising), one 16-byte slot per
    launch, with what each launch was. ``arm`` before a launch, ``check`` raises for any armed
    launch whose flag is set. Launchers check before each launch (an earlier, asynchronous
    launch's failure surfaces at the next call); synchronous callers check after theirs."""

    SLOTS = 1024

    def __init__(self):
        self._lock = threading.Lock()
        self._flags = {}  # "cpu" (interpreter) or "pinned": ([SLOTS, 4] int32, its numpy view, each slot's view)
        self._armed = {}  # (kind, slot) -> what ran there
        self._next = 0

    def _table(self, device: torch.device) -> tuple:
        kind = "pinned" if device.type == "cuda" else "cpu"
        if kind not in self._flags:
            if kind == "pinned" and torch.cuda.is_current_stream_capturing():
                # No host allocation while capturing (a launch warmed up first has the table):
                # this launch's flag goes unread.
                return "unwatched", torch.zeros(self.SLOTS, 4, dtype=torch.int32, device=device)
            table = torch.zeros(self.SLOTS, 4, dtype=torch.int32, pin_memory=kind == "pinned")
            # Through numpy a check costs a microsecond; slot views made once: no torch op per launch.
            self._flags[kind] = (table, table.numpy(), [table[i, :1] for i in range(self.SLOTS)])
        return kind, self._flags[kind][0]

    def arm(self, kernel: str, grid: tuple, config, device: torch.device) -> tuple:
        """A cleared flag (a [1] int32 tensor the kernel may write) for one launch of ``kernel`` on
        ``grid`` with ``config`` (a KernelConfig, or a description), and the patience its barrier
        waits with."""
        self.check()
        with self._lock:
            kind, table = self._table(device)
            if kind == "unwatched":
                return table[0, :1], PATIENCE
            slot = self._next
            self._next = (slot + 1) % self.SLOTS
            _, flags, views = self._flags[kind]
            flags[slot, 0] = 0
            self._armed[(kind, slot)] = (kernel, tuple(grid), config)
        patience = PATIENCE if device.type == "cuda" else INTERPRETER_PATIENCE
        return views[slot], patience

    def check(self):
        """Raise RuntimeError naming every armed launch whose programs gave up waiting (once)."""
        failed = []
        with self._lock:
            for kind, (_, flags, _) in self._flags.items():
                for slot in np.flatnonzero(flags[:, 0]).tolist():
                    flags[slot, 0] = 0
                    kernel, grid, config = self._armed.pop((kind, slot), ("a launch", "?", "no longer recorded"))
                    failed.append(f"{kernel} on grid {grid} with config {_describe(config)}")
        if failed:
            raise RuntimeError(
                "grid barrier: programs of " + "; ".join(failed) + " waited for programs that never arrived "
                "and gave up, so its results are invalid. The grid was not co-resident, or a "
                "program left its time loop early: run it with persistent=False (a launch per step), and please "
                "report the kernel, grid and config above.")


def _describe(config) -> str:
    return describe(config) if isinstance(config, KernelConfig) else str(config)


watch = Watch()


@triton.jit
def empty_steps_kernel(sync_ptr, flag_ptr, T, patience, SYNC: tl.constexpr):
    """The persistent kernels' time loop with nothing in it but the grid barrier (counters as
    theirs: group_counter): its time per step is the floor that any step on that grid pays."""
    pid_b = tl.program_id(1)
    d = tl.program_id(2)
    n_prog = tl.num_programs(0)
    for s in range(T):
        if SYNC:
            patience = grid_sync(group_counter(sync_ptr, d, pid_b), n_prog * (s + 1), patience, flag_ptr)
        else:
            tl.debug_barrier()


def empty_steps(grid: tuple, num_warps: int, T: int, device, behind: int = 0) -> torch.Tensor:
    """Run the empty time loop once on ``grid`` (a cooperative launch where it has a barrier, as
    the persistent kernels); returns the counters (each ends at programs per group x T, less
    ``behind``: counters that start short of arrivals make a grid that can never meet, which
    times the barrier's bound). Raises RuntimeError where the grid's programs gave up waiting for
    each other (checked at once on the CPU; on a GPU at the next launch, or by ``watch.check()``
    after synchronising)."""
    device = torch.device(device)
    sync = torch.zeros(grid[1] * grid[2] * COUNTER_STRIDE.value, dtype=torch.int32, device=device)
    if behind:
        sync[::COUNTER_STRIDE.value] = -behind
    barrier = grid[0] > 1
    flag, patience = watch.arm("empty_steps_kernel", grid, f"{num_warps} warps", device)
    empty_steps_kernel[grid](sync, flag, T, patience, SYNC=barrier, num_warps=num_warps,
                             launch_cooperative_grid=barrier)
    if device.type != "cuda":
        watch.check()
    return sync[::COUNTER_STRIDE.value]

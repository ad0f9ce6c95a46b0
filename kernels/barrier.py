"""Grid barrier between timesteps of a persistent kernel."""
import triton
import triton.language as tl


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

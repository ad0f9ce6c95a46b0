"""Launch configurations of the recurrent kernels: the config type and the heuristic default."""
from dataclasses import dataclass

import triton

# tl.dot needs every dimension of a tile to be at least 16.
MIN_TILE = 16


@dataclass(frozen=True)
class ForwardConfig:
    """How one layer's recurrence is split over programs.

    hidden_block: hidden units per program (all gates of those units); programs per direction
        and batch tile = ceil(H / hidden_block).
    batch_block: batch rows per program; batch tiles = ceil(B / batch_block).
    k_block: chunk of the recurrent matmul's reduction over H; None keeps the program's whole
        slice of W_hh on-chip for all steps, a smaller power of two streams it in chunks.
    persistent: one launch for all timesteps with a grid barrier (True), one launch per step
        (False), or the launcher's choice (None): persistent whenever the grid is co-resident.
    """

    hidden_block: int
    batch_block: int
    k_block: int | None = None
    num_warps: int = 4
    persistent: bool | None = None

    def __post_init__(self):
        for name in ("hidden_block", "batch_block", "k_block"):
            value = getattr(self, name)
            if value is None and name == "k_block":
                continue
            if value < MIN_TILE or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= {MIN_TILE}, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of two up to 16, got {self.num_warps}")


def k_block(hidden_size: int) -> int:
    """H padded to a power of two (at least one dot tile): the recurrent matmul's whole reduction."""
    return max(MIN_TILE, triton.next_power_of_2(hidden_size))


# Bytes of one program's W_hh slice (and of its h tile) that the default keeps on-chip; larger
# slices are streamed in K chunks. Sized so every cell and dtype compiles within an H100's shared
# memory (scripts/compile_check.py); a measured, autotuned choice is still to come.
ON_CHIP_BUDGET = 32 * 1024


def default_forward_config(hidden_size: int, batch: int, gates: int, elt_size: int,
                           interpreting: bool) -> ForwardConfig:
    """Heuristic partition for one layer of ``gates`` gates with weights of ``elt_size`` bytes.

    On a GPU: 16 hidden units per program (all of H up to 64) spreads a layer over many SMs and
    keeps each slice of W_hh small. Under the interpreter every program costs a Python pass per
    step, so the whole layer goes to one program (fewest passes; it also runs persistently there).
    """
    full_k = k_block(hidden_size)
    batch_block = min(64, max(MIN_TILE, triton.next_power_of_2(max(batch, 1))))
    if interpreting:
        return ForwardConfig(hidden_block=full_k, batch_block=batch_block)
    hidden_block = full_k if hidden_size <= 64 else MIN_TILE
    kb = full_k
    while kb > MIN_TILE and gates * hidden_block * kb * elt_size > ON_CHIP_BUDGET:
        kb //= 2
    acc_size = max(elt_size, 4)
    while batch_block > MIN_TILE and batch_block * kb * acc_size > ON_CHIP_BUDGET:
        batch_block //= 2
    return ForwardConfig(hidden_block=hidden_block, batch_block=batch_block,
                         k_block=None if kb == full_k else kb, num_warps=4)

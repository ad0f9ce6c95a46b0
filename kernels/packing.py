"""Where each (time, sequence) of a PackedSequence lives, for kernels that read and write packed
data directly."""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packing:
    """torch's packed layout: the rows of time t are data[offsets[t] : offsets[t] + batch_sizes[t]],
    sequences sorted by length (longest first), so sequence b is at row offsets[t] + b while
    t < lengths[b]."""

    batch_sizes: torch.Tensor  # [T] int64, on the CPU (torch's)
    offsets: torch.Tensor  # [T] int64, on the data's device
    lengths: torch.Tensor  # [B] int32, on the data's device
    time_of_row: torch.Tensor  # [N] int64: t of each packed row
    seq_of_row: torch.Tensor  # [N] int64: b of each packed row
    host: torch.Tensor | None = None  # the (pinned, on CUDA) source of the copy above, kept alive

    @staticmethod
    def from_batch_sizes(batch_sizes: torch.Tensor, device) -> "Packing":
        """Everything is computed on the host and reaches a GPU in one asynchronous copy from
        pinned memory: no synchronisation, and a copy a CUDA graph can capture (the pinned
        buffer is kept alive with the Packing, so a replay reads the same values)."""
        sizes = batch_sizes.to(torch.int64)
        T, B, N = len(sizes), int(sizes[0]), int(sizes.sum())
        starts = torch.cumsum(sizes, 0) - sizes
        lengths = (sizes[None, :] > torch.arange(B)[:, None]).sum(1)
        time_of_row = torch.repeat_interleave(torch.arange(T), sizes)
        seq_of_row = torch.arange(N) - starts[time_of_row]
        host = torch.cat([starts, lengths, time_of_row, seq_of_row])
        device = torch.device(device)
        if device.type == "cuda":
            host = host.pin_memory()
        moved = host.to(device, non_blocking=True)
        offsets, lengths, time_of_row, seq_of_row = moved.split([T, B, N, N])
        return Packing(sizes, offsets, lengths.to(torch.int32), time_of_row, seq_of_row, host)

    @property
    def steps(self) -> int:
        return len(self.batch_sizes)

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def rows(self) -> int:
        return len(self.time_of_row)

    def row(self, t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Packed row of (t, b) for valid pairs (t < lengths[b])."""
        return self.offsets[t] + b

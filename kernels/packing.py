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

    @staticmethod
    def from_batch_sizes(batch_sizes: torch.Tensor, device) -> "Packing":
        sizes = batch_sizes.to(torch.int64)
        T, B = len(sizes), int(sizes[0])
        starts = torch.cumsum(sizes, 0) - sizes
        lengths = (sizes[None, :] > torch.arange(B)[:, None]).sum(1)
        time_of_row = torch.repeat_interleave(torch.arange(T), sizes)
        seq_of_row = torch.arange(int(sizes.sum())) - starts[time_of_row]
        return Packing(sizes, starts.to(device), lengths.to(device=device, dtype=torch.int32),
                       time_of_row.to(device), seq_of_row.to(device))

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

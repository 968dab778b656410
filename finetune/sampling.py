"""A batch order that is the same on every run with the same seed, sharded across ranks, and resumable."""

from __future__ import annotations

from collections.abc import Iterator

import torch


class ResumableBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Endless batches: epoch e is a permutation drawn from seed + e; each global batch (batch_size x world_size
    indices) is split so rank r takes its own disjoint slice. `set_position(k)` skips the first k batches."""

    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"the training split has {num_samples} frames, fewer than one global batch "
                f"({batch_size} x {world_size} processes); lower --batch-size or use more episodes"
            )
        self.num_samples, self.batch_size, self.world_size, self.rank, self.seed = (
            num_samples, batch_size, world_size, rank, seed)
        self.batches_per_epoch = num_samples // (batch_size * world_size)
        self.start = 0

    def set_position(self, batches_seen: int) -> None:
        self.start = batches_seen

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        while True:
            epoch, index = divmod(position, self.batches_per_epoch)
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
            global_size = self.batch_size * self.world_size
            begin = index * global_size + self.rank * self.batch_size
            yield order[begin : begin + self.batch_size].tolist()
            position += 1

    def __len__(self) -> int:  # batches per epoch on this rank (the iterator itself never ends)
        return self.batches_per_epoch

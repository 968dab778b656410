"""A batch order that is the same on every run with the same seed, sharded across ranks, and resumable."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch `epoch`: a permutation of 0..num_samples-1 (the same everywhere), drawn from a seed derived
    from (seed, epoch) together by numpy's SeedSequence, so no (seed, epoch) pair replays another (`seed + epoch`
    made seed s at epoch e+1 the order of seed s+1 at epoch e)."""
    derived = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]) >> 1  # torch: < 2**63
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(derived))


class ResumableBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Endless batches: epoch e is `epoch_permutation(num_samples, seed, e)`; each global batch (batch_size x
    world_size indices) is split so rank r takes its own disjoint slice. `set_position(k)` skips the first k batches.

    The permutation is drawn once per epoch and kept, so a batch costs O(batch_size), not O(num_samples).
    """

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
        self._epoch: int | None = None
        self._order: torch.Tensor | None = None

    def set_position(self, batches_seen: int) -> None:
        self.start = batches_seen

    def order(self, epoch: int) -> torch.Tensor:
        """Epoch `epoch`'s permutation (cached: consecutive batches of one epoch share it)."""
        if self._epoch != epoch:
            self._order, self._epoch = epoch_permutation(self.num_samples, self.seed, epoch), epoch
        return self._order

    def batch_at(self, position: int) -> list[int]:
        """This rank's indices of global batch `position` (counted from the start of training)."""
        epoch, index = divmod(position, self.batches_per_epoch)
        begin = index * self.batch_size * self.world_size + self.rank * self.batch_size
        return self.order(epoch)[begin : begin + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        while True:
            yield self.batch_at(position)
            position += 1

    def __len__(self) -> int:  # batches per epoch on this rank (the iterator itself never ends)
        return self.batches_per_epoch

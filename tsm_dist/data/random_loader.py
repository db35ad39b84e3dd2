"""Random clips of the right shape, no I/O: measures training throughput without the data pipeline.

A small pool of random batches is made once and cycled, so producing a batch costs nothing and the
sweep measures compute and communication only; labels are drawn anew for every batch.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from tsm_dist.data.loader import Batch, GeneratedLoader

POOL_BATCHES = 2


def _seed(*keys: int) -> int:
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])


class RandomLoader(GeneratedLoader):
    """A :class:`tsm_dist.data.loader.Loader` of random clips (``num_samples`` per epoch over all shards)."""

    def __init__(
        self,
        *,
        num_samples: int,
        batch_size: int,
        num_frames: int,
        crop_size: int,
        num_classes: int,
        views: int = 1,
        shard_id: int = 0,
        num_shards: int = 1,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"the random backend needs num_classes >= 1, got {num_classes}")
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.shard_id = shard_id
        self.seed = seed
        self.device = torch.device(device)
        self.skipped: list[tuple[str, str]] = []
        super().__init__(num_samples, batch_size, num_shards)
        view = (num_frames, 3, crop_size, crop_size) if views == 1 else (views, num_frames, 3, crop_size, crop_size)
        self._shape = (batch_size, *view)
        self._pool: list[torch.Tensor] = []

    def __iter__(self) -> Iterator[Batch]:
        start = self._take_start_batch()
        generator = torch.Generator(device=self.device)
        if not self._pool:
            generator.manual_seed(_seed(self.seed, self.shard_id))
            self._pool = [
                torch.randn(self._shape, generator=generator, device=self.device) for _ in range(POOL_BATCHES)
            ]
        for index in range(start, self._len):
            generator.manual_seed(_seed(self.seed, self._epoch, self.shard_id, index))
            labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=generator, device=self.device)
            yield self._pool[index % POOL_BATCHES], labels

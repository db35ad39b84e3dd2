"""Which samples each rank reads in an epoch, so that every rank gets the same number of batches.

Rule (documented in docs/data.md): with N samples, S shards and batch size B every shard gets
``L = ceil(ceil(N / S) / B)`` batches of exactly B slots.
- Training: the N samples are shuffled with a generator seeded by (seed, epoch), identical on every
  rank; the shuffled order is repeated cyclically to fill S * L * B slots (like PyTorch's
  DistributedSampler) and shard k takes every S-th slot starting at k. Every sample is seen at least
  once per epoch; a few are seen twice.
- Evaluation: no shuffle; shard k takes samples k, k + S, k + 2S, ... and the slots left over are
  padding, marked -1. Loaders give padded slots label -1; metrics and losses keep ``labels >= 0``,
  so every sample is counted exactly once over all ranks.
- ``contiguous=True`` (the default for packed sets, so a rank reads few shard files): shard k owns
  the contiguous block k of the samples in stored order (block k = ``[k*N//S, (k+1)*N//S)``). In
  training, epoch e reads block ``(k + e) % S`` (blocks rotate over the ranks, as DALI's readers do
  without ``stick_to_shard``) in the order the epoch's global permutation gives its samples, repeated
  cyclically to L * B slots; with one shard this is exactly the interleaved rule. In evaluation shard k
  reads block k, then padding.
"""
from __future__ import annotations

import math

import numpy as np

PAD = -1


def batches_per_epoch(num_samples: int, batch_size: int, num_shards: int) -> int:
    if num_samples <= 0:
        raise ValueError("a data set with no samples has no batches")
    if batch_size <= 0 or num_shards <= 0:
        raise ValueError(f"batch_size ({batch_size}) and num_shards ({num_shards}) must be positive")
    return math.ceil(math.ceil(num_samples / num_shards) / batch_size)


def shard_slots(
    num_samples: int,
    *,
    batch_size: int,
    shard_id: int,
    num_shards: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    contiguous: bool = False,
) -> np.ndarray:
    """Sample index of every slot this shard reads in ``epoch`` (length L * B; ``PAD`` = padding)."""
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id {shard_id} is outside [0, num_shards={num_shards})")
    total = num_shards * batches_per_epoch(num_samples, batch_size, num_shards) * batch_size
    if contiguous and num_samples >= num_shards:  # fewer samples than shards: interleave
        return _contiguous_slots(num_samples, total // num_shards, shard_id, num_shards, train, seed, epoch)
    if train:
        order = np.random.default_rng([seed, epoch]).permutation(num_samples)
        return np.resize(order, total)[shard_id::num_shards]
    slots = np.full(total // num_shards, PAD, dtype=np.int64)
    mine = np.arange(shard_id, num_samples, num_shards)
    slots[: len(mine)] = mine
    return slots


def contiguous_block(num_samples: int, block: int, num_shards: int) -> tuple[int, int]:
    """``[start, end)`` of contiguous block ``block`` of ``num_shards`` (sizes differ by at most 1)."""
    return block * num_samples // num_shards, (block + 1) * num_samples // num_shards


def _contiguous_slots(
    num_samples: int, length: int, shard_id: int, num_shards: int, train: bool, seed: int, epoch: int
) -> np.ndarray:
    if not train:
        start, end = contiguous_block(num_samples, shard_id, num_shards)
        slots = np.full(length, PAD, dtype=np.int64)
        slots[: end - start] = np.arange(start, end)
        return slots
    start, end = contiguous_block(num_samples, (shard_id + epoch) % num_shards, num_shards)
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    return np.resize(order[(order >= start) & (order < end)], length)

"""The tiny training run that the rank-script tests share: an in-memory tensor loader sharded like the real
ones, a network without batch norm (so accumulation is exact), and their config."""
from __future__ import annotations

import math
import os
import signal
from typing import Any

import torch
from torch import nn

from tsm_dist.config import Config, load_config

FRAMES, SIZE, CLASSES = 2, 4, 4


class TensorLoader:
    """Fixed in-memory clips, sharded and padded like the real loaders (train: wrap, eval: label -1)."""

    def __init__(self, num_samples: int, batch_size: int, shard_id: int, num_shards: int, seed: int,
                 train: bool, signal_at: tuple[int, int] | None = None) -> None:
        num_samples -= 0 if train else 1  # an odd evaluation set: one shard gets a padded slot
        g = torch.Generator().manual_seed(1234)
        self.labels = torch.randint(0, CLASSES, (num_samples,), generator=g)
        # learnable: the class shifts the clip's mean
        self.clips = torch.randn(num_samples, FRAMES, 3, SIZE, SIZE, generator=g) \
            + 0.5 * self.labels.view(-1, 1, 1, 1, 1).float()
        self.batch_size, self.shard_id, self.num_shards = batch_size, shard_id, num_shards
        self.seed, self.train, self.signal_at = seed, train, signal_at
        self.per_shard = math.ceil(num_samples / num_shards)
        self.epoch = self.start = 0
        self.skipped: list[tuple[str, str]] = []  # tsm_dist.data.loader.Loader

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return self.per_shard // self.batch_size if self.train else math.ceil(self.per_shard / self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 997 + self.epoch))
                 if self.train else torch.arange(n))
        order = torch.cat([order, order[: self.per_shard * self.num_shards - n]])
        mine = order[self.shard_id::self.num_shards]
        labels = self.labels[mine].clone()
        if not self.train:
            labels[torch.arange(self.shard_id, len(order), self.num_shards) >= n] = -1
        start, self.start = self.start, 0
        for b in range(start, len(self)):
            if self.signal_at == (self.epoch, b):
                os.kill(os.getpid(), signal.SIGUSR1)  # the scheduler's warning, on this rank only
            rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield self.clips[mine[rows]], labels[rows]


class TinyNet(nn.Module):
    """No batch norm: K micro-batches of B give exactly the gradient of one K*B batch."""

    def __init__(self, num_classes: int, num_frames: int, dropout: float) -> None:
        super().__init__()
        self.num_frames = num_frames
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(num_frames * 3 * SIZE * SIZE, 16), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(16, num_classes))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.body(clips)


def config(engine: str, **overrides: Any) -> Config:
    values = {"engine.name": engine, "data.backend": "random", "data.num_samples": 32, "data.batch_size": 2,
              "model.num_classes": CLASSES, "model.num_frames": FRAMES, "model.dropout": 0.0,
              "optim.base_lr": 0.2, "optim.base_batch": 4, "train.epochs": 3, "train.seed": 7,
              "train.eval_every_epochs": 0, "train.checkpoint_every_epochs": 0, "log.interval": 1,
              "log.wandb": "disabled", "log.progress": False}
    values.update(overrides)
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def tiny_builders(built: list[nn.Module], signal_at: list[tuple[int, int] | None]) -> tuple[Any, Any]:
    """The trainer's model and loader builders of the rank scripts: TinyNet (kept in ``built``) and a
    TensorLoader whose rank 1 sends a signal at ``signal_at[0]`` (``(epoch, batch)``) when set."""

    def model_builder(name: str, *, num_classes: int, num_frames: int, dropout: float, **_: Any) -> nn.Module:
        built.append(TinyNet(num_classes, num_frames, dropout))
        return built[-1]

    def loader_builder(file_list: Any, root: Any, *, batch_size: int, shard_id: int, num_shards: int,
                       seed: int, train: bool, num_samples: int, **_: Any) -> TensorLoader:
        return TensorLoader(num_samples, batch_size, shard_id, num_shards, seed, train,
                            signal_at[0] if shard_id == 1 and train else None)

    return model_builder, loader_builder

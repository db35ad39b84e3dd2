"""Clips of the synthetic scene generator rendered in memory, no files (``data.backend: procedural``).

Clip ``i`` of a split is a pure function of ``(scene_seed, split, i)``: its scene is drawn by
:mod:`tsm_dist.data.synthetic`'s renderer of the preset, shown in the order of its class
(``synthetic.frame_order``), and its label is that class, or, with probability ``label_noise``, a class
drawn uniformly from all classes (itself included). So a set of tens of thousands of distinct clips
needs no decoding, every rank and every training seed sees the same set, and the noise puts the
ceiling of top-1 below 100 % by design: ``1 - label_noise * (1 - 1 / classes)`` in expectation (85 %
for 20 % noise on 4 classes), the same on the validation set, whose noisy labels are fixed too.

Clips are rendered at ``crop_size`` (no crop, scale or flip: every clip is already distinct) and kept
as uint8 once rendered (``num_samples x frames x crop_size^2 x 3`` bytes per rank at most); batches
follow the file loaders' sharding rule (:mod:`tsm_dist.data.sharding`), padded evaluation slots -1.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from tsm_dist.data.loader import Batch, GeneratedLoader, normalization
from tsm_dist.data.sharding import PAD, shard_slots

SPLITS = {"train": 0, "val": 1}


def expected_ceiling(label_noise: float, num_classes: int) -> float:
    """The expected share of clips whose label is the class their frames show."""
    return 1.0 - label_noise * (1.0 - 1.0 / num_classes)


def render_clip(preset: str, scene_seed: int, split: str, index: int, num_frames: int, size: int,
                label_noise: float) -> tuple[np.ndarray, int]:
    """Clip ``index`` of ``split``: (F, size, size, 3) uint8 frames and its (possibly noisy) label."""
    from tsm_dist.data.synthetic import PRESETS, frame_order

    classes, render, _ = PRESETS[preset]
    rng = np.random.default_rng([scene_seed, SPLITS[split], index])
    shown = index % len(classes)  # balanced classes
    frames = render(rng, num_frames, size)[frame_order(shown, num_frames)]
    # the noise has its own stream, so a set with noise shows the same scenes as one without
    noise = np.random.default_rng([scene_seed, SPLITS[split], index, 1])
    label = int(noise.integers(len(classes))) if noise.random() < label_noise else shown
    return frames, label


class ProceduralLoader(GeneratedLoader):
    """A :class:`tsm_dist.data.loader.Loader` of rendered clips (``num_samples`` in the split)."""

    def __init__(self, *, num_samples: int, batch_size: int, num_frames: int, crop_size: int, num_classes: int,
                 preset: str, label_noise: float, scene_seed: int, train: bool, views: int = 1,
                 shard_id: int = 0, num_shards: int = 1, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        from tsm_dist.data.synthetic import PRESETS

        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        if num_classes != len(PRESETS[preset][0]):
            raise ValueError(f"the {preset} preset has {len(PRESETS[preset][0])} classes, num_classes is {num_classes}")
        if not 0.0 <= label_noise <= 1.0:
            raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
        self.batch_size, self.num_samples, self.views = batch_size, num_samples, views
        self.num_frames, self.size, self.preset = num_frames, crop_size, preset
        self.label_noise, self.scene_seed, self.train = label_noise, scene_seed, train
        self.shard_id, self.num_shards, self.seed = shard_id, num_shards, seed
        self.device = torch.device(device)
        self.skipped: list[tuple[str, str]] = []
        super().__init__(num_samples, batch_size, num_shards)
        self._mean, self._std = normalization(self.device)
        self._clips: dict[int, tuple[np.ndarray, int]] = {}

    def clip(self, index: int) -> tuple[np.ndarray, int]:
        """Clip ``index``'s uint8 frames and label, rendered on first use."""
        if index not in self._clips:
            self._clips[index] = render_clip(self.preset, self.scene_seed, "train" if self.train else "val", index,
                                             self.num_frames, self.size, self.label_noise)
        return self._clips[index]

    def __iter__(self) -> Iterator[Batch]:
        start = self._take_start_batch()
        slots = shard_slots(self.num_samples, batch_size=self.batch_size, shard_id=self.shard_id,
                            num_shards=self.num_shards, train=self.train, seed=self.seed, epoch=self._epoch)
        empty = (np.zeros((self.num_frames, self.size, self.size, 3), np.uint8), PAD)
        for b in range(start, self._len):
            taken = [self.clip(int(i)) if i != PAD else empty for i in slots[b * self.batch_size:(b + 1) * self.batch_size]]
            frames = torch.from_numpy(np.stack([f for f, _ in taken])).to(self.device)
            clips = (frames.permute(0, 1, 4, 2, 3).float() - self._mean) / self._std  # (N, T, 3, S, S)
            if self.views > 1:  # a rendered clip has one view: evaluation with several sees it each time
                clips = clips[:, None].expand(-1, self.views, -1, -1, -1, -1).contiguous()
            yield clips, torch.tensor([label for _, label in taken], dtype=torch.int64, device=self.device)

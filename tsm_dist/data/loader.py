"""The loader contract (:class:`Loader`, which every backend follows, the random one included) and what
the file-reading loaders share: length, epochs and resuming, skipped files, padding."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator, Protocol, Sequence, runtime_checkable

import torch

from tsm_dist.data.augment import MEAN, STD
from tsm_dist.data.sharding import batches_per_epoch
from tsm_dist.data.clips import ClipPlanner, ClipSpec
from tsm_dist.data.pack.format import ByteReader

Batch = tuple[torch.Tensor, torch.Tensor]


@runtime_checkable
class Loader(Protocol):
    """What the trainer and the evaluator use of a loader (DALI, PyAV, random, or one a test builds).

    Iterating yields one shard's ``(clips, labels)`` batches, ``len(loader)`` of them on every shard;
    padded evaluation slots have label -1. ``set_epoch(epoch, start_batch)`` reshuffles for ``epoch``
    and starts the next iteration at ``start_batch`` (resume). ``skipped`` lists ``(file, reason)`` of
    what was skipped as unreadable (empty unless ``skip_corrupt``).
    """

    batch_size: int
    skipped: list[tuple[str, str]]

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...


class VideoLoader(ABC):
    """Iterable of ``(clips, labels)``: clips float32 (N, T, 3, S, S), or (N, V, T, 3, S, S) with
    V = num_clips * num_crops > 1 views per video; labels int64 (N,), -1 on padded slots.

    Subclasses implement ``__iter__`` by decoding ``self.planner.batch(b)`` for b from
    ``self._take_start_batch()`` to ``len(self)`` and passing the clips of the real (non-padded)
    slots, shaped (n, V, T, 3, S, S), to ``self._collate``.
    """

    def __init__(self, planner: ClipPlanner, device: torch.device) -> None:
        self.planner = planner
        self.device = device
        o = planner.options
        self.view_shape = (o.views, o.num_frames, 3, o.crop_size, o.crop_size)
        self._start_batch = 0
        self.reader = ByteReader()  # every encoded byte a backend decodes comes through it (counted)

    def __len__(self) -> int:
        return len(self.planner)

    @abstractmethod
    def __iter__(self) -> Iterator[Batch]: ...

    @property
    def batch_size(self) -> int:
        return self.planner.batch_size

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(file, reason)`` of every video or list line skipped so far (``skip_corrupt=True``)."""
        return self.planner.skipped

    def io_counters(self) -> dict[str, int]:
        """Files opened, bytes read and videos probed so far on this rank (the I/O study's counts)."""
        return {**self.reader.counters(), "probes": self.planner.probes}

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Reshuffle for ``epoch`` (same order on every run); the next iteration starts at
        ``start_batch`` so a resumed run continues mid-epoch with the batches it would have seen."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside [0, {len(self)}]")
        self.planner.set_epoch(epoch)
        self._start_batch = start_batch

    def _take_start_batch(self) -> int:
        start, self._start_batch = self._start_batch, 0
        return start

    def _collate(self, specs: Sequence[ClipSpec | None], clips: torch.Tensor) -> Batch:
        labels = torch.tensor([s.label if s is not None else -1 for s in specs], dtype=torch.int64)
        if clips.shape[0] != len(specs):
            real = [i for i, s in enumerate(specs) if s is not None]
            full = torch.zeros((len(specs), *self.view_shape), dtype=torch.float32, device=self.device)
            if real:
                full[torch.tensor(real, device=self.device)] = clips
            clips = full
        if self.view_shape[0] == 1:
            clips = clips[:, 0]
        return clips, labels.to(self.device)


class GeneratedLoader:
    """The epoch position of a loader that makes its clips in memory (random, procedural): ``len`` batches
    per epoch and the batch where the next iteration starts after :meth:`set_epoch`."""

    def __init__(self, num_samples: int, batch_size: int, num_shards: int) -> None:
        self._len = batches_per_epoch(num_samples, batch_size, num_shards)
        self._epoch = 0
        self._start_batch = 0

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self._len:
            raise ValueError(f"start_batch {start_batch} is outside [0, {self._len}]")
        self._epoch, self._start_batch = epoch, start_batch

    def _take_start_batch(self) -> int:
        start, self._start_batch = self._start_batch, 0
        return start


def normalization(device: torch.device | str = "cpu", scale: float = 255.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std shaped to broadcast over (..., 3, H, W), in units of ``1 / scale``."""
    mean = torch.tensor(MEAN, device=device).view(3, 1, 1) * scale
    std = torch.tensor(STD, device=device).view(3, 1, 1) * scale
    return mean, std

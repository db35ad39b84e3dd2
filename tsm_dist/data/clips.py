"""The clip plan: for (epoch, batch) on one shard, which videos, which frames, which crop, flip or not.

Every backend decodes exactly what this plan says, so DALI and PyAV give the same clips for the same
seed, and a resumed run (``set_epoch(epoch, start_batch)``) gets the batches it would have got.
Randomness comes from a generator seeded by (seed, epoch, shard, batch, slot): it does not depend on
the number of threads, on prefetching, or on which batches were planned before.

Bad videos are found here (by probing the container, see ``probe.py``) or by a backend while
decoding (``mark_bad``). Without ``skip_corrupt`` they raise :class:`VideoError` naming the video and
its list line. With it they are recorded in ``skipped`` and their slot is refilled: in training by
the next usable sample of the data set, in evaluation by padding (label -1), so that no rank's batch
count changes and no skip goes unreported.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

import numpy as np

from tsm_dist.data.augment import (
    TRAIN_CROPS, Box, default_scale_size, eval_crop_boxes, flipped_label, train_crop_box, warn_if_upsampled,
)
from tsm_dist.data.errors import DataError, VideoError
from tsm_dist.data.filelist import VideoRecord
from tsm_dist.data.pack.format import Location
from tsm_dist.data.probe import VideoInfo, probe_video
from tsm_dist.data.sampling import SAMPLINGS, frames_needed, sample_indices
from tsm_dist.data.sharding import PAD, batches_per_epoch, shard_slots

SHORT_VIDEO_POLICIES = ("error", "loop")


@dataclass(frozen=True)
class ClipOptions:
    """How clips are cut from a video. ``views = num_clips * num_crops`` clips per video in testing."""

    num_frames: int
    sampling: str = "segment"
    stride: int = 1
    crop_size: int = 224
    scale_size: int | None = None
    train: bool = True
    num_clips: int = 1
    num_crops: int = 1
    flip: bool = True
    flip_label_map: Mapping[int, int] | None = None
    train_crop: str = "multiscale"
    short_videos: str = "error"

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        for name in ("num_frames", "stride", "crop_size", "num_clips", "num_crops"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train and self.views > 1:
            raise ValueError("num_clips and num_crops > 1 are for testing (train=False)")
        if self.num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {self.num_crops}")
        if self.train_crop not in TRAIN_CROPS:
            raise ValueError(f"train_crop must be one of {TRAIN_CROPS}, got {self.train_crop!r}")
        if self.short_videos not in SHORT_VIDEO_POLICIES:
            raise ValueError(f"short_videos must be one of {SHORT_VIDEO_POLICIES}, got {self.short_videos!r}")

    @property
    def views(self) -> int:
        return self.num_clips * self.num_crops

    @property
    def test_scale(self) -> int:
        return self.scale_size or default_scale_size(self.crop_size)


@dataclass(frozen=True)
class ClipSpec:
    """One planned clip: ``frames`` are frame numbers in the file (``num_clips * num_frames``),
    ``boxes`` one crop box per crop, shared by all frames; ``location`` where a packed video's bytes
    are (None: the file ``path``)."""

    path: str
    where: str
    label: int
    frames: np.ndarray
    boxes: tuple[Box, ...]
    flip: bool
    location: Location | None = None


class ClipPlanner:
    def __init__(
        self,
        records: list[VideoRecord],
        root: str | None,
        options: ClipOptions,
        *,
        batch_size: int,
        shard_id: int = 0,
        num_shards: int = 1,
        seed: int = 0,
        skip_corrupt: bool = False,
        infos: Sequence[VideoInfo] | None = None,
        locations: Sequence[Location] | None = None,
        contiguous: bool = False,
    ) -> None:
        """``infos`` (frame counts, sizes, codecs known from a packed index) replace probing;
        ``locations`` say where packed videos' bytes are; ``contiguous`` selects the contiguous-block
        sharding rule (``sharding.py``)."""
        if not records:
            raise DataError("no videos to load")
        self._known = infos
        self.locations = locations
        self.contiguous = contiguous
        self.probes = 0  # videos probed (each opens the file): the metadata cost that packing removes
        self._lock = threading.RLock()  # loaders plan on a background thread
        self.records = records
        self.root = root
        self.options = options
        self.batch_size = batch_size
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.seed = seed
        self.skip_corrupt = skip_corrupt
        self._codecs: frozenset[str] | None = None
        self._codec_hint = ""
        self.skipped: list[tuple[str, str]] = []
        self._skipped_paths: set[str] = set()
        self._num_batches = batches_per_epoch(len(records), batch_size, num_shards)
        self._infos: dict[int, VideoInfo] = {}
        self._bad: dict[int, str] = {}
        self.epoch = 0
        self._slots = self._epoch_slots(0)

    def __len__(self) -> int:
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._slots = self._epoch_slots(epoch)

    def _epoch_slots(self, epoch: int) -> np.ndarray:
        return shard_slots(
            len(self.records),
            batch_size=self.batch_size,
            shard_id=self.shard_id,
            num_shards=self.num_shards,
            train=self.options.train,
            seed=self.seed,
            epoch=epoch,
            contiguous=self.contiguous,
        )

    def batch(self, index: int) -> list[ClipSpec | None]:
        """The clips of batch ``index`` of the current epoch; ``None`` is a padded slot (label -1)."""
        with self._lock:
            return self._batch(index)

    def _batch(self, index: int) -> list[ClipSpec | None]:
        if not 0 <= index < self._num_batches:
            raise IndexError(f"batch {index} is outside the epoch's {self._num_batches} batches")
        slots = self._slots[index * self.batch_size : (index + 1) * self.batch_size]
        specs: list[ClipSpec | None] = []
        for position, sample in enumerate(slots):
            sample = self._usable(int(sample))
            if sample == PAD:
                specs.append(None)
                continue
            rng = np.random.default_rng([self.seed, self.epoch, self.shard_id, index, position])
            specs.append(self._spec(sample, rng))
        return specs

    def shard_samples(self) -> list[int]:
        """The samples (record indices) this shard reads in the current epoch, each once."""
        return sorted({int(i) for i in self._slots if int(i) != PAD})

    def check(self, i: int) -> VideoInfo | None:
        """Probe record ``i`` now (cached): its info, or None if it is bad and skipped; without
        ``skip_corrupt`` a bad video raises :class:`VideoError`."""
        return self._check(i)

    def restrict_codecs(self, codecs: Collection[str], hint: str) -> None:
        """Treat videos in other codecs as bad, with ``hint`` (what to do instead) in the error."""
        self._codecs = frozenset(codecs)
        self._codec_hint = hint

    def mark_bad(self, path: str, reason: str) -> None:
        """A backend failed to decode ``path``: skip it from now on (only with ``skip_corrupt``)."""
        hits = [i for i, r in enumerate(self.records) if r.resolve(self.root) == path]
        if not hits:
            raise KeyError(f"{path} is not in the file list")
        with self._lock:
            for i in hits:
                self._reject(i, VideoError(path, reason, self.records[i].where))

    def any_spec(self) -> ClipSpec:
        """Some usable clip (a filler for backends that cannot run an empty batch)."""
        with self._lock:
            for i in range(len(self.records)):
                if self._check(i) is not None:
                    return self._spec(i, np.random.default_rng(0))
        raise DataError("no usable video in the file list: all were skipped, see loader.skipped")

    def _usable(self, sample: int) -> int:
        """``sample`` if usable, else its replacement: the next usable sample (training) or PAD."""
        if sample == PAD or self._check(sample) is not None:
            return sample
        if not self.options.train:
            return PAD
        count = len(self.records)
        for step in range(1, count):
            candidate = (sample + step) % count
            if self._check(candidate) is not None:
                return candidate
        raise DataError("no usable video in the file list: all were skipped, see loader.skipped")

    def _check(self, i: int) -> VideoInfo | None:
        """The video's info, or None if it is bad and skipped; raises without ``skip_corrupt``."""
        if i in self._infos:
            return self._infos[i]
        if i in self._bad:
            return None
        record = self.records[i]
        path = record.resolve(self.root)
        try:
            if self._known is not None:
                info = self._known[i]
            else:
                with self._lock:  # check-data probes from several threads
                    self.probes += 1
                info = probe_video(path, record.where)
            if self._codecs is not None and info.codec not in self._codecs:
                raise VideoError(path, f"codec {info.codec} cannot be decoded here; {self._codec_hint}", record.where)
            length = self._length(record, info, path)
            needed = frames_needed(self.options.sampling, self.options.num_frames, self.options.stride)
            if length < needed and self.options.short_videos == "error":
                raise VideoError(
                    path,
                    f"video has {length} usable frames, {self.options.sampling} sampling of "
                    f"{self.options.num_frames} frames (stride {self.options.stride}) needs {needed}; "
                    "use short_videos='loop' to repeat frames",
                    record.where,
                )
        except VideoError as err:
            self._reject(i, err)
            return None
        self._infos[i] = info
        return info

    def _reject(self, i: int, err: VideoError) -> None:
        if not self.skip_corrupt:
            raise err
        if i not in self._bad:
            self._bad[i] = err.reason
            self._infos.pop(i, None)
            if err.path not in self._skipped_paths:  # a file listed twice is reported once
                self._skipped_paths.add(err.path)
                self.skipped.append((err.path, f"{err.reason} (listed at {err.where})" if err.where else err.reason))

    @staticmethod
    def _length(record: VideoRecord, info: VideoInfo, path: str) -> int:
        if record.start is None or record.end is None:
            return info.num_frames
        if record.end > info.num_frames:
            raise VideoError(
                path,
                f"frame range [{record.start}, {record.end}) exceeds the video's {info.num_frames} frames",
                record.where,
            )
        return record.end - record.start

    def _spec(self, i: int, rng: np.random.Generator) -> ClipSpec:
        o = self.options
        record = self.records[i]
        info = self._infos[i]
        frames = sample_indices(
            self._length(record, info, record.path),
            sampling=o.sampling,
            num_frames=o.num_frames,
            stride=o.stride,
            train=o.train,
            rng=rng,
            num_clips=o.num_clips,
        ) + (record.start or 0)
        if o.train:
            boxes = (train_crop_box(rng, info.height, info.width, o.train_crop),)
            flip = o.flip and bool(rng.random() < 0.5)
        else:
            boxes = tuple(eval_crop_boxes(info.height, info.width, o.crop_size, o.test_scale, o.num_crops))
            flip = False
        if self.shard_id == 0:  # one rank warns
            warn_if_upsampled(record.path, info.height, info.width, o.crop_size)
        label = flipped_label(record.label, o.flip_label_map) if flip else record.label
        location = self.locations[i] if self.locations is not None else None
        return ClipSpec(record.resolve(self.root), record.where, label, frames.astype(np.int32), boxes, flip, location)

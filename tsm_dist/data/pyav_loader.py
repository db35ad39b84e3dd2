"""PyAV (FFmpeg) backend: decodes any codec FFmpeg can, on the CPU, in a pool of threads.

The fallback for H.264/HEVC files on machines without a GPU and the baseline of the loader
benchmark. It decodes each video from the start up to its last planned frame and converts only the
planned frames; crop, resize (bilinear, antialiased), flip and normalization run in torch. The encoded
bytes come from ``pack_format.ByteReader`` (a video file, or a packed shard); a feeder thread
(``feed.py``) plans batches and hands their clips to the decoding threads ahead of the consumer.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator, Sequence

import av
import numpy as np
import torch
import torch.nn.functional as F

from tsm_dist.data.augment import Box
from tsm_dist.data.errors import VideoError
from tsm_dist.data.feed import Feeder
from tsm_dist.data.loader import Batch, VideoLoader, normalization
from tsm_dist.data.clips import ClipPlanner, ClipSpec
from tsm_dist.data.pack.format import encoded_file


def decode_frames(path: str, frame_numbers: np.ndarray, where: str = "", data: np.ndarray | None = None) -> np.ndarray:
    """RGB frames ``frame_numbers`` (any order, repeats allowed) of ``path``: (len, H, W, 3) uint8.
    ``data``: the video's encoded bytes, already read (``path`` then only names it in errors)."""
    wanted = np.unique(frame_numbers)
    last = int(wanted[-1])
    wanted_set = set(wanted.tolist())
    got: dict[int, np.ndarray] = {}
    decoded = 0
    try:
        with av.open(path if data is None else encoded_file(data)) as container:
            stream = container.streams.video[0]
            stream.thread_count = 1  # parallelism comes from decoding several videos at once
            for decoded, frame in enumerate(container.decode(stream), start=1):
                if decoded - 1 in wanted_set:
                    got[decoded - 1] = frame.to_ndarray(format="rgb24")
                if decoded > last:
                    break
    except (av.FFmpegError, IndexError, OSError) as err:
        raise VideoError(path, f"decoding failed ({err})", where) from err
    if len(got) < len(wanted):
        raise VideoError(path, f"decoded only {decoded} frames, frame {last} was requested", where)
    frames = np.stack([got[i] for i in wanted.tolist()])
    return frames[np.searchsorted(wanted, frame_numbers)]


def crop_resize(frames: np.ndarray, boxes: Sequence[Box], size: int, flip: bool) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (len(boxes), F, 3, size, size) float in [0, 255]."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)
    crops = []
    for x0, y0, x1, y1 in boxes:
        crop = video[:, :, y0:y1, x0:x1].float()
        if crop.shape[-2:] != (size, size):
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        crops.append(crop.flip(-1) if flip else crop)
    return torch.stack(crops)


class PyAVLoader(VideoLoader):
    def __init__(self, planner: ClipPlanner, *, num_threads: int = 2, prefetch: int = 2, feed_thread: bool = True) -> None:
        """``feed_thread=False`` plans batches on the thread that calls ``next`` (for comparisons)."""
        super().__init__(planner, torch.device("cpu"))
        self.num_threads = num_threads
        self.prefetch = prefetch
        self.feed_thread = feed_thread
        self._mean, self._std = normalization()

    def load_clip(self, spec: ClipSpec) -> torch.Tensor:
        """One video's views, normalized: (V, T, 3, S, S)."""
        data = self.reader.read(spec.path, spec.where, spec.location)
        frames = decode_frames(spec.path, spec.frames, spec.where, data=data)
        crops = crop_resize(frames, spec.boxes, self.view_shape[-1], spec.flip)
        crops.sub_(self._mean).div_(self._std)
        num_crops, num_frames = len(spec.boxes), self.view_shape[1]
        # (crops, clips * T, ...) -> (clips * crops, T, ...): clip-major views, as the DALI backend.
        crops = crops.view(num_crops, -1, num_frames, *crops.shape[2:]).transpose(0, 1)
        return crops.reshape(-1, *crops.shape[2:])

    def __iter__(self) -> Iterator[Batch]:
        start = self._take_start_batch()
        pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="pyav-decode")

        def submit(index: int) -> tuple[list[ClipSpec | None], list[Future | None]]:
            specs = self.planner.batch(index)
            return specs, [pool.submit(self.load_clip, s) if s else None for s in specs]

        # prefetch batches wait ready; inline (feed_thread=False) submits prefetch + 1 ahead, on this thread
        feeder = Feeder(submit, start, len(self), self.prefetch if self.feed_thread else self.prefetch + 1,
                        thread=self.feed_thread)
        try:
            while True:
                try:
                    index, (specs, futures) = feeder.get()
                except StopIteration:
                    break
                yield self._gather(index, specs, futures, pool)
        finally:
            feeder.close()
            pool.shutdown(wait=True, cancel_futures=True)
            self.reader.close()

    def _gather(
        self, index: int, specs: list[ClipSpec | None], futures: list[Future | None], pool: ThreadPoolExecutor
    ) -> Batch:
        while True:
            try:
                clips = [f.result() for f in futures if f is not None]
                break
            except VideoError as err:
                self.planner.mark_bad(err.path, err.reason)  # raises unless skip_corrupt
                specs = self.planner.batch(index)
                futures = [pool.submit(self.load_clip, s) if s else None for s in specs]
        stacked = torch.stack(clips) if clips else torch.empty(0, *self.view_shape)
        return self._collate(specs, stacked)

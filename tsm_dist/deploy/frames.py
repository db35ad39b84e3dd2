"""Frames for a deployed model: decode a video (or render a synthetic one) and preprocess frames as
the evaluation does (shorter side to ``scale_size``, center ``size`` crop, ImageNet normalisation).

A video argument ``synthetic:LABEL[:SEED]`` renders one clip of the synthetic temporal-order set
(tsm_dist.data.synthetic) in memory, so a stream can be tried without any file.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from tsm_dist.data.augment import eval_crop_boxes
from tsm_dist.data.loader import normalization
from tsm_dist.data.pyav_loader import crop_resize, decode_frames
from tsm_dist.commands.exit_codes import UsageError

SYNTHETIC = "synthetic:"


def synthetic_video(spec: str, frames: int = 32, size: int = 64) -> np.ndarray:
    """``synthetic:LABEL[:SEED]`` -> (frames, size, size, 3) uint8, as ``tsm-dist make-synthetic`` renders it."""
    from tsm_dist.data.synthetic import CLASSES, frame_order, render_scene

    parts = spec[len(SYNTHETIC):].split(":")
    try:
        label, seed = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise UsageError(f"--video {spec}: expected synthetic:LABEL[:SEED] with integers") from None
    if not 0 <= label < len(CLASSES):
        raise UsageError(f"--video {spec}: the synthetic set has labels 0..{len(CLASSES) - 1}")
    scene = render_scene(np.random.default_rng([seed, 10_000]), frames, size)
    return scene[frame_order(label, frames)]


def iter_video(path: str) -> Iterator[np.ndarray]:
    """RGB frames (H, W, 3) uint8 of ``path`` (or a ``synthetic:`` spec), decoded one at a time.

    A file that ends before the frames its header promises (cut off by a failed copy: FFmpeg decodes what
    is there and stops without an error) raises :class:`VideoError` after its last frame, so a stream's
    consumer has had every frame there is and still learns that the rest is missing."""
    if path.startswith(SYNTHETIC):
        yield from synthetic_video(path)
        return
    import av

    from tsm_dist.data.errors import VideoError
    from tsm_dist.data.probe import is_short, promised_frames

    decoded = 0
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            promised, exact = promised_frames(container, stream)
            for frame in container.decode(stream):
                decoded += 1
                yield frame.to_ndarray(format="rgb24")
    except (av.FFmpegError, IndexError, OSError) as err:
        raise VideoError(path, f"decoding failed after {decoded} frame(s) ({err})", "") from err
    if is_short(decoded, promised, exact):
        raise VideoError(path, f"truncated: {decoded} frame(s) decoded, the container promises "
                               f"{'' if exact else 'about '}{promised} (an interrupted copy or download?)", "")


def segment_frames(path: str, count: int) -> np.ndarray:
    """``count`` frames at the centers of equal segments of the video (the test-time TSN sampling)."""
    if path.startswith(SYNTHETIC):
        video = synthetic_video(path)
        return video[_centers(len(video), count)]
    from tsm_dist.data.probe import probe_video

    return decode_frames(path, _centers(probe_video(path).num_frames, count))


def _centers(num_frames: int, count: int) -> np.ndarray:
    return np.minimum(((np.arange(count) + 0.5) * num_frames / count).astype(np.int64), num_frames - 1)


class Preprocess:
    """RGB uint8 frames (F, H, W, 3) -> normalised float32 (F, 3, size, size), the evaluation's center crop."""

    def __init__(self, size: int, scale_size: int) -> None:
        self.size, self.scale_size = size, scale_size
        self.mean, self.std = normalization("cpu")

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        if frames.ndim == 3:
            frames = frames[None]
        (box,) = eval_crop_boxes(frames.shape[1], frames.shape[2], self.size, self.scale_size, 1)
        crops = crop_resize(frames, [box], self.size, flip=False)[0]
        with torch.no_grad():
            return ((crops - self.mean) / self.std).numpy().astype(np.float32, copy=False)

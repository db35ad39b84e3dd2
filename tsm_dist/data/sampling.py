"""Which frames of a video make a clip: segment sampling (TSN/TSM) and dense sampling (I3D).

Segment sampling splits the video into T equal segments and takes one frame from each: a random
frame of the segment in training, the center in testing (so T frames see the whole video). Dense
sampling takes T frames ``stride`` apart from one start: random in training, centered in testing.
With K clips per video (multi-clip testing) segment clips take the frames at (k + 0.5) / K of each
segment and dense clips start at K evenly spaced positions. All functions return frame indices
relative to the first usable frame, K clips concatenated: shape (K * T,).
"""
from __future__ import annotations

import numpy as np

SAMPLINGS = ("segment", "dense")


def frames_needed(sampling: str, num_frames: int, stride: int = 1) -> int:
    """The shortest video that gives a clip without repeating frames."""
    if sampling == "segment":
        return num_frames
    if sampling == "dense":
        return (num_frames - 1) * stride + 1
    raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")


def segment_indices(
    length: int, num_segments: int, *, train: bool, rng: np.random.Generator | None = None, num_clips: int = 1
) -> np.ndarray:
    """One frame per segment; a video shorter than ``num_segments`` repeats frames."""
    segment = length / num_segments
    starts = np.arange(num_segments) * segment
    if train:
        if rng is None:
            raise ValueError("training segment sampling needs a random generator")
        positions = starts + rng.random(num_segments) * segment
    else:
        offsets = (np.arange(num_clips) + 0.5) / num_clips
        positions = (starts[None, :] + offsets[:, None] * segment).reshape(-1)
    return np.minimum(positions.astype(np.int64), length - 1)


def dense_indices(
    length: int,
    num_frames: int,
    stride: int = 1,
    *,
    train: bool,
    rng: np.random.Generator | None = None,
    num_clips: int = 1,
) -> np.ndarray:
    """``num_frames`` frames ``stride`` apart; a video shorter than the span loops around."""
    span = (num_frames - 1) * stride + 1
    room = max(length - span, 0)
    if train:
        if rng is None:
            raise ValueError("training dense sampling needs a random generator")
        starts = np.array([rng.integers(0, room + 1)])
    elif num_clips == 1:
        starts = np.array([room // 2])
    else:
        starts = np.round(np.linspace(0, room, num_clips)).astype(np.int64)
    indices = starts[:, None] + np.arange(num_frames)[None, :] * stride
    return (indices % length).reshape(-1)


def sample_indices(
    length: int,
    *,
    sampling: str,
    num_frames: int,
    stride: int = 1,
    train: bool,
    rng: np.random.Generator | None = None,
    num_clips: int = 1,
) -> np.ndarray:
    if sampling == "segment":
        return segment_indices(length, num_frames, train=train, rng=rng, num_clips=num_clips)
    if sampling == "dense":
        return dense_indices(length, num_frames, stride, train=train, rng=rng, num_clips=num_clips)
    raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")

"""A synthetic video data set whose classes differ only in the order of their frames.

Each scene is a static textured background and one object (disk or square) placed at F points
spaced evenly along a mostly horizontal line. The four classes show the SAME F frames of a scene in
different orders:

  0 sweeping right        the object crosses left to right
  1 sweeping left         the same frames reversed
  2 sweeping right twice  every other point rightwards, then the skipped ones rightwards again
  3 sweeping left twice   class 2 reversed

Scene ``i`` is rendered once and written in all four orders, so the unordered set of frames of a
video says nothing about its class: a model that averages per-frame predictions (TSN) stays at
chance (25 %), while a model that exchanges information between frames (TSM) can tell the direction
and speed of the motion. Like Something-Something for the paper, it needs temporal modeling.
A horizontal flip turns "right" into "left": pass ``FLIP_LABEL_MAP`` to the loader.

Videos are VP9 in WebM (DALI decodes them on the CPU) and byte-for-byte deterministic given the seed.
NVDEC (DALI with ``data.device=gpu``) decodes VP9 only from 128x128 up: the default 64x64 is for CPUs;
make the set with ``--size 128`` (or more) to decode it on a GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np

from tsm_dist.data.augment import left_right_swap_map
from tsm_dist.data.encode import write_video
from tsm_dist.data.filelist import VideoRecord, write_class_names, write_file_list

CLASSES = ("sweeping right", "sweeping left", "sweeping right twice", "sweeping left twice")
FLIP_LABEL_MAP: dict[int, int] = left_right_swap_map(CLASSES)
NVDEC_MIN_VP9 = 128  # NVDEC's smallest VP9 frame, both sides (see data/dali_loader.py NVDEC_MIN_SIZE)


@dataclass(frozen=True)
class SyntheticSet:
    root: str
    train_list: str
    val_list: str
    classes_file: str
    num_train: int
    num_val: int


def frame_order(label: int, num_frames: int) -> np.ndarray:
    """Order in which class ``label`` shows a scene's frames (frame k has the object at point k)."""
    forward = np.arange(num_frames)
    twice = np.concatenate([forward[0::2], forward[1::2]])
    orders = (forward, forward[::-1], twice, twice[::-1])
    if not 0 <= label < len(orders):
        raise ValueError(f"label must be in [0, {len(orders)}), got {label}")
    return orders[label]


def render_scene(rng: np.random.Generator, num_frames: int, size: int) -> np.ndarray:
    """(F, size, size, 3) uint8 frames; frame k has the object at the k-th point from the left."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Background: a gradient between two random colors plus static rectangles (distractors).
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / size
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    low, high = rng.uniform(20, 120, 3), rng.uniform(60, 170, 3)
    background = low + ramp[..., None] * (high - low)
    for _ in range(rng.integers(1, 4)):
        x0, y0 = rng.integers(0, size - 4, 2)
        w, h = rng.integers(3, max(4, size // 4), 2)
        background[y0 : y0 + h, x0 : x0 + w] = rng.uniform(20, 170, 3)
    # Object: bright, radius 9-14 % of the frame, moving between two random points.
    radius = rng.uniform(0.09, 0.14) * size
    color = rng.uniform(190, 255, 3)
    square = bool(rng.integers(2))
    margin = radius + 1
    start = np.array([rng.uniform(margin, 0.3 * size), rng.uniform(margin, size - margin)])
    end = np.array([rng.uniform(0.7 * size, size - margin), 0.0])
    end[1] = np.clip(start[1] + rng.uniform(-0.25, 0.25) * size, margin, size - margin)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for k in range(num_frames):
        cx, cy = start + (end - start) * (k / max(num_frames - 1, 1))
        dx, dy = np.abs(xx - cx), np.abs(yy - cy)
        distance = np.maximum(dx, dy) if square else np.hypot(dx, dy)
        alpha = np.clip(radius + 0.5 - distance, 0.0, 1.0)[..., None]  # antialiased edge
        frames[k] = np.round(background * (1 - alpha) + color * alpha).astype(np.uint8)
    return frames


def make_synthetic(
    out: str,
    *,
    videos_per_class: int = 80,
    frames: int = 32,
    size: int = 64,
    seed: int = 0,
    val_fraction: float = 0.2,
    fps: int = 12,
) -> SyntheticSet:
    """Write ``videos_per_class`` videos of each class under ``out/videos`` and the lists
    ``train.txt``, ``val.txt`` (the last ``val_fraction`` of the scenes) and ``classes.txt``."""
    if videos_per_class < 2:
        raise ValueError(f"videos_per_class must be >= 2 (train and val), got {videos_per_class}")
    if frames < 2 or size < 16 or size % 2:
        raise ValueError(f"need frames >= 2 and an even size >= 16, got frames={frames}, size={size}")
    num_val = min(max(1, int(round(videos_per_class * val_fraction))), videos_per_class - 1)
    num_train = videos_per_class - num_val
    train: list[VideoRecord] = []
    val: list[VideoRecord] = []
    for scene_index in range(videos_per_class):
        scene = render_scene(np.random.default_rng([seed, scene_index]), frames, size)
        for label, name in enumerate(CLASSES):
            relative = os.path.join("videos", name.replace(" ", "_"), f"{scene_index:05d}.webm")
            write_video(os.path.join(out, relative), scene[frame_order(label, frames)], fps=fps)
            (train if scene_index < num_train else val).append(VideoRecord(relative, label))
    train_list, val_list, classes_file = (os.path.join(out, n) for n in ("train.txt", "val.txt", "classes.txt"))
    write_file_list(train_list, train)
    write_file_list(val_list, val)
    write_class_names(classes_file, CLASSES)
    return SyntheticSet(out, train_list, val_list, classes_file, len(train), len(val))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tsm-dist make-synthetic",
        description="Write the synthetic temporal-order video set (VP9/WebM) with train.txt, val.txt, classes.txt.",
    )
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--videos-per-class", type=int, default=80, help="scenes per class (default 80)")
    parser.add_argument("--frames", type=int, default=32, help="frames per video (default 32)")
    parser.add_argument("--size", type=int, default=64,
                        help=f"frame width and height, even (default 64; >= {NVDEC_MIN_VP9} to decode on a GPU, NVDEC)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of scenes in val.txt (default 0.2)")
    args = parser.parse_args(argv)
    try:
        result = make_synthetic(
            args.out,
            videos_per_class=args.videos_per_class,
            frames=args.frames,
            size=args.size,
            seed=args.seed,
            val_fraction=args.val_fraction,
        )
    except ValueError as err:
        print(f"make-synthetic: {err}", file=sys.stderr)
        return 2
    if args.size < NVDEC_MIN_VP9:
        print(f"note: {args.size}x{args.size} VP9 is below NVDEC's minimum {NVDEC_MIN_VP9}x{NVDEC_MIN_VP9}: decode this "
              f"set on the CPU (data.device=cpu), or make it with --size {NVDEC_MIN_VP9} for data.device=gpu")
    print(
        f"wrote {result.num_train} train and {result.num_val} val videos of {len(CLASSES)} classes to {result.root} "
        f"({result.train_list}, {result.val_list}, {result.classes_file})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

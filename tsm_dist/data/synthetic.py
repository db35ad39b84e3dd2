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

The ``hard`` preset (``--preset hard``, :data:`HARD_CLASSES`) does not saturate: eight orders of the
same frames (the four above, there-and-back in both directions, and a sweep that starts in the middle
and jumps back, in both directions), a small low-contrast object whose travel (speed) and path vary per
scene, flickering distractor blobs and pixel noise that belong to the frames (so they are permuted with
them and every class still shows the same unordered frames). docs/data.md explains the design.

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
HARD_CLASSES = CLASSES + ("going right and back left", "going left and back right",
                          "sweeping right from the middle", "sweeping left from the middle")
# the hard set's flip map (a file of these pairs can be given as data.flip_label_map)
HARD_FLIP_LABEL_MAP: dict[int, int] = left_right_swap_map(HARD_CLASSES)
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
    """Order in which class ``label`` shows a scene's frames (frame k has the object at point k).

    Labels 0-3 are the temporal preset's classes, 4-7 the hard preset's extra ones; a class and its
    mirror (``HARD_FLIP_LABEL_MAP``) are each other's order read as ``num_frames - 1 - k``.
    """
    forward = np.arange(num_frames)
    twice = np.concatenate([forward[0::2], forward[1::2]])
    there_and_back = np.concatenate([forward[0::2], forward[1::2][::-1]])
    middle = np.concatenate([forward[num_frames // 2:], forward[: num_frames // 2]])
    orders = (forward, forward[::-1], twice, twice[::-1],
              there_and_back, num_frames - 1 - there_and_back, middle, num_frames - 1 - middle)
    if not 0 <= label < len(orders):
        raise ValueError(f"label must be in [0, {len(orders)}), got {label}")
    return orders[label]


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, *, low: tuple[int, int],
                high: tuple[int, int], rectangles: tuple[int, int], side: int, fill: tuple[int, int]) -> np.ndarray:
    """A gradient between two random colors (channel values drawn from ``low`` and ``high``) plus static
    rectangles (distractors; count in ``rectangles``, sides up to size // ``side``, colors from ``fill``)."""
    size = xx.shape[0]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / size
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    start, end = rng.uniform(*low, 3), rng.uniform(*high, 3)
    background = start + ramp[..., None] * (end - start)
    for _ in range(rng.integers(*rectangles)):
        x0, y0 = rng.integers(0, size - 4, 2)
        w, h = rng.integers(3, max(4, size // side), 2)
        background[y0 : y0 + h, x0 : x0 + w] = rng.uniform(*fill, 3)
    return background


def render_scene(rng: np.random.Generator, num_frames: int, size: int) -> np.ndarray:
    """(F, size, size, 3) uint8 frames; frame k has the object at the k-th point from the left."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    background = _background(rng, xx, yy, low=(20, 120), high=(60, 170), rectangles=(1, 4), side=4, fill=(20, 170))
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


def render_hard_scene(rng: np.random.Generator, num_frames: int, size: int) -> np.ndarray:
    """The hard preset's scene: (F, size, size, 3) uint8, frame k has the object at the k-th point.

    Harder than :func:`render_scene` in every way that does not give away the order: the object is
    of lower contrast (60-90 levels off the background mean), its travel is 30-70 % of the frame (speed)
    along a path tilted up to 30 degrees starting anywhere that leaves room (phase), two distractor blobs
    of half its radius jump to new random places in every frame, and every frame has its own pixel noise.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    background = _background(rng, xx, yy, low=(40, 130), high=(80, 180), rectangles=(2, 5), side=3, fill=(40, 200))
    radius = rng.uniform(0.09, 0.13) * size
    color = background.mean(axis=(0, 1)) + rng.choice([-1, 1]) * rng.uniform(60, 90, 3)  # lower contrast
    margin = radius + 1
    travel = rng.uniform(0.30, 0.70) * (size - 2 * margin)
    tilt = rng.uniform(-np.pi / 6, np.pi / 6)
    delta = travel * np.array([np.cos(tilt), np.sin(tilt)])
    low_corner = np.maximum(margin, margin - delta)
    high_corner = np.minimum(size - margin, size - margin - delta)
    start = rng.uniform(low_corner, np.maximum(low_corner, high_corner))
    blob_colors = rng.uniform(20, 235, (2, 3))
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for k in range(num_frames):
        image = background.copy()
        centers = [start + delta * (k / max(num_frames - 1, 1))] + [rng.uniform(margin, size - margin, 2) for _ in range(2)]
        for (cx, cy), paint, r in zip(centers, [color, *blob_colors], [radius, radius / 2, radius / 2]):
            alpha = np.clip(r + 0.5 - np.hypot(xx - cx, yy - cy), 0.0, 1.0)[..., None]
            image = image * (1 - alpha) + paint * alpha
        image += rng.normal(0.0, 12.0, image.shape)
        frames[k] = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return frames


# preset -> (classes, scene renderer, make_synthetic defaults)
PRESETS = {
    "temporal": (CLASSES, render_scene, {"videos_per_class": 80, "frames": 32, "size": 64}),
    "hard": (HARD_CLASSES, render_hard_scene, {"videos_per_class": 160, "frames": 16, "size": 32}),
}


def make_synthetic(
    out: str,
    *,
    videos_per_class: int | None = None,
    frames: int | None = None,
    size: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    fps: int = 12,
    preset: str = "temporal",
) -> SyntheticSet:
    """Write ``videos_per_class`` videos of each class of ``preset`` under ``out/videos`` and the lists
    ``train.txt``, ``val.txt`` (the last ``val_fraction`` of the scenes) and ``classes.txt``.
    Sizes left None take the preset's defaults (:data:`PRESETS`)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    classes, render, defaults = PRESETS[preset]
    videos_per_class = defaults["videos_per_class"] if videos_per_class is None else videos_per_class
    frames = defaults["frames"] if frames is None else frames
    size = defaults["size"] if size is None else size
    if videos_per_class < 2:
        raise ValueError(f"videos_per_class must be >= 2 (train and val), got {videos_per_class}")
    if frames < 2 or size < 16 or size % 2:
        raise ValueError(f"need frames >= 2 and an even size >= 16, got frames={frames}, size={size}")
    num_val = min(max(1, int(round(videos_per_class * val_fraction))), videos_per_class - 1)
    num_train = videos_per_class - num_val
    train: list[VideoRecord] = []
    val: list[VideoRecord] = []
    for scene_index in range(videos_per_class):
        scene = render(np.random.default_rng([seed, scene_index]), frames, size)
        for label, name in enumerate(classes):
            relative = os.path.join("videos", name.replace(" ", "_"), f"{scene_index:05d}.webm")
            write_video(os.path.join(out, relative), scene[frame_order(label, frames)], fps=fps)
            (train if scene_index < num_train else val).append(VideoRecord(relative, label))
    train_list, val_list, classes_file = (os.path.join(out, n) for n in ("train.txt", "val.txt", "classes.txt"))
    write_file_list(train_list, train)
    write_file_list(val_list, val)
    write_class_names(classes_file, classes)
    return SyntheticSet(out, train_list, val_list, classes_file, len(train), len(val))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tsm-dist make-synthetic",
        description="Write the synthetic temporal-order video set (VP9/WebM) with train.txt, val.txt, classes.txt.",
    )
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="temporal",
                        help="temporal: 4 classes, TSM saturates (the demo's); hard: 8 classes with distractors, "
                             "speed variation and noise, for the batch-size study (default temporal)")
    parser.add_argument("--videos-per-class", type=int, help="scenes per class (default 80; hard: 160)")
    parser.add_argument("--frames", type=int, help="frames per video (default 32; hard: 16)")
    parser.add_argument("--size", type=int,
                        help=f"frame width and height, even (default 64; hard: 32; >= {NVDEC_MIN_VP9} to decode on "
                             "a GPU, NVDEC)")
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
            preset=args.preset,
        )
    except ValueError as err:
        print(f"make-synthetic: {err}", file=sys.stderr)
        return 2
    size = PRESETS[args.preset][2]["size"] if args.size is None else args.size
    if size < NVDEC_MIN_VP9:
        print(f"note: {size}x{size} VP9 is below NVDEC's minimum {NVDEC_MIN_VP9}x{NVDEC_MIN_VP9}: decode this "
              f"set on the CPU (data.device=cpu), or make it with --size {NVDEC_MIN_VP9} for data.device=gpu")
    print(
        f"wrote {result.num_train} train and {result.num_val} val videos of {len(PRESETS[args.preset][0])} classes to {result.root} "
        f"({result.train_list}, {result.val_list}, {result.classes_file})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

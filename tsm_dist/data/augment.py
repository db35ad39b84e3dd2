"""Where each clip is cropped, whether it is flipped, and what a flip does to its label.

Crop boxes are planned here in source-pixel coordinates ``(x0, y0, x1, y1)`` (end exclusive) so that
every backend (DALI CPU, DALI GPU, PyAV) crops the same pixels and only has to resize the box to
``crop_size`` squared. The box is the same for all frames of a clip, as temporal models need.
"""
from __future__ import annotations

import math
import re
import sys
from typing import Mapping, Sequence

import numpy as np

Box = tuple[int, int, int, int]

# TSM's multi-scale crop: crop sides relative to the shorter video side.
MULTISCALE_SCALES = (1.0, 0.875, 0.75, 0.66)
TRAIN_CROPS = ("multiscale", "random_resized")
# ImageNet statistics, in [0, 1] units; the pretrained ResNet-50 expects them.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


_warned_small: list[str] = []  # once per process: a data set of small videos would repeat it per clip


def warn_if_upsampled(path: str, height: int, width: int, crop_size: int) -> bool:
    """A video whose shorter side is below ``crop_size`` has every crop upsampled: say so once (True when
    this call printed). Not an error: small sets (the synthetic one) do it on purpose."""
    if min(height, width) >= crop_size or _warned_small:
        return False
    _warned_small.append(path)
    print(f"tsm-dist: warning: {path} is {width}x{height}, smaller than data.crop_size={crop_size}: its crops are "
          "upsampled (blurred); lower data.crop_size or use larger videos (warned once)", file=sys.stderr, flush=True)
    return True


def default_scale_size(crop_size: int) -> int:
    """Shorter side a test video is resized to before the crop: 256 for a 224 crop."""
    return int(round(crop_size * 256 / 224))


def multiscale_crop_box(
    rng: np.random.Generator, height: int, width: int, scales: Sequence[float] = MULTISCALE_SCALES, max_distort: int = 1
) -> Box:
    """TSM's multi-scale crop: width and height from ``scales`` (at most ``max_distort`` scale steps
    apart) times the shorter side, placed at one of 13 fixed positions (corners, center, edges,
    quarter points)."""
    base = min(height, width)
    sides = [max(1, int(base * s)) for s in scales]
    pairs = [(w, h) for i, w in enumerate(sides) for j, h in enumerate(sides) if abs(i - j) <= max_distort]
    crop_w, crop_h = pairs[rng.integers(len(pairs))]
    step_x, step_y = (width - crop_w) / 4, (height - crop_h) / 4
    grid = ((0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3))
    gx, gy = grid[rng.integers(len(grid))]
    x0, y0 = int(gx * step_x), int(gy * step_y)
    return x0, y0, x0 + crop_w, y0 + crop_h


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    area: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """Inception-style crop: random area fraction and aspect ratio; center square if 10 draws fail."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = height * width * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return x0, y0, x0 + w, y0 + h
    side = min(height, width)
    x0, y0 = (width - side) // 2, (height - side) // 2
    return x0, y0, x0 + side, y0 + side


def train_crop_box(rng: np.random.Generator, height: int, width: int, kind: str) -> Box:
    if kind == "multiscale":
        return multiscale_crop_box(rng, height, width)
    if kind == "random_resized":
        return random_resized_crop_box(rng, height, width)
    raise ValueError(f"train_crop must be one of {TRAIN_CROPS}, got {kind!r}")


def eval_crop_boxes(height: int, width: int, crop_size: int, scale_size: int, num_crops: int) -> list[Box]:
    """Boxes equal to resizing the shorter side to ``scale_size`` and cutting ``crop_size`` squares:
    the center (1 crop) or both ends and the center of the longer side (3 crops)."""
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 (center) or 3 (along the longer side), got {num_crops}")
    side = min(height, width, max(1, int(round(crop_size * min(height, width) / scale_size))))
    if num_crops == 1:
        fractions = (0.5,)
    else:
        fractions = (0.0, 0.5, 1.0)
    boxes = []
    for f in fractions:
        if width >= height:
            x0, y0 = int(round(f * (width - side))), (height - side) // 2
        else:
            x0, y0 = (width - side) // 2, int(round(f * (height - side)))
        boxes.append((x0, y0, x0 + side, y0 + side))
    return boxes


_LEFT_RIGHT = re.compile(r"\b(left|right)", re.IGNORECASE)


def left_right_swap_map(class_names: Sequence[str]) -> dict[int, int]:
    """Label map for horizontal flip: a class whose name, with "left" and "right" exchanged, is another
    class maps to it (e.g. Something-Something's "Pushing something from left to right")."""
    index = {name: i for i, name in enumerate(class_names)}
    swap = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}
    mapping = {}
    for i, name in enumerate(class_names):
        mirrored = _LEFT_RIGHT.sub(lambda m: swap.get(m.group(1), m.group(1)), name)
        if mirrored != name and mirrored in index:
            mapping[i] = index[mirrored]
    return mapping


def flipped_label(label: int, flip_label_map: Mapping[int, int] | None) -> int:
    return flip_label_map.get(label, label) if flip_label_map else label

"""How one video model differs from the plain per-frame 2D network: 3D convolutions or the temporal shift,
which convolutions are inflated (I3D), and where the temporal resolution is pooled."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class VideoSpec:
    """How one video model differs from the plain per-frame 2D ResNet.

    ``inflate`` chooses which convolution of a block gets a temporal kernel of 3: every spatial 3x3
    conv ("3x3", I3D3x3x3) or the block's first conv ("first", I3D3x1x1: the bottleneck's 1x1 becomes
    3x1x1). ``inflate_blocks[s]`` is a pattern cycled over the blocks of stage s (1 = inflate), so
    "every other block" stays meaningful at any depth.
    """

    num_frames: int
    conv3d: bool = False
    shift: bool = False
    stem_kt: int = 1
    stem_t_stride: int = 1
    pool1_t_stride: int = 1
    pool2_t_stride: int = 1  # a temporal max pool after res2 (Wang et al.'s "pool2")
    stage_t_strides: tuple[int, int, int, int] = (1, 1, 1, 1)
    inflate: Literal["none", "3x3", "first"] = "none"
    inflate_blocks: tuple[tuple[int, ...], ...] = ((1,), (1,), (1,), (1,))

    def __post_init__(self) -> None:
        temporal = (self.stem_kt, self.stem_t_stride, self.pool1_t_stride, self.pool2_t_stride,
                    *self.stage_t_strides)
        if not self.conv3d and (any(v != 1 for v in temporal) or self.inflate != "none"):
            raise ValueError("a 2D spec cannot have temporal kernels, strides or pooling")
        if self.conv3d and self.shift:
            raise ValueError("the temporal shift is defined for the 2D backbone only")

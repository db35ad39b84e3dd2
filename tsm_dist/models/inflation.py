"""I3D inflation (Carreira & Zisserman): which convolutions of the 2D ResNet get a temporal kernel, and 2D
weights inflated to 3D ones (repeated kt times along time and divided by kt, so a clip of identical frames
gives the 2D network's activations)."""
from __future__ import annotations

from torch import Tensor


def temporal_kernels(kind: str, inflate: str, inflated: bool) -> tuple[int, int]:
    """(kt of the block's first conv, kt of its second conv)."""
    if not inflated or inflate == "none":
        return 1, 1
    if inflate == "first":
        return 3, 1
    return (1, 3) if kind == "bottleneck" else (3, 3)  # "3x3": every spatial 3x3 conv


def inflate(weight2d: Tensor, kt: int) -> Tensor:
    """(O, I, kH, kW) -> (O, I, kt, kH, kW): repeated along time, divided by kt."""
    return weight2d.unsqueeze(2).repeat(1, 1, kt, 1, 1) / kt

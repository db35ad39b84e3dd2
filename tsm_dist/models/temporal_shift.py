"""The Temporal Shift Module (Sections 3-4): move a fraction of the channels one frame along time.

Frames of a clip travel through the 2D backbone folded into the batch, ``(N*T, C, H, W)``. A shift
moves channel groups by one frame; what is shifted out of the clip is dropped and the vacated frame
is zero, exactly as in the paper:

* bi-directional (offline): channels ``[0, C/d)`` take frame ``t+1``, ``[C/d, 2C/d)`` take ``t-1``;
* uni-directional (online): channels ``[0, C/d)`` take frame ``t-1`` only, so frame ``t`` never sees
  the future and a streaming model can cache those channels between frames.

:func:`temporal_shift` is the paper's shift in its few lines (the reference every kernel is tested
against, bit for bit). The network does not run it: :class:`TemporalShift` calls the fused kernels
of :mod:`tsm_dist.models.shift_kernels`, which move only the shifted channels, fuse the residual
shift with the convolution that follows, and dispatch the same number of ops for any batch.
"""
from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import Tensor, nn

from tsm_dist.models.shift_kernels import Group, ShiftedConvCall, shift_copy

Direction = Literal["bi", "uni"]


def temporal_shift(x: Tensor, num_frames: int, fold_div: int = 8, direction: Direction = "bi") -> Tensor:
    """The shift of the paper (and of the official TSM code): a zero tensor, then every channel copied
    from the frame it takes. ``x`` is ``(N*T, C, ...)`` and left untouched; differentiable by autograd."""
    nt, c = x.shape[:2]
    if nt % num_frames:
        raise ValueError(f"batch dim {nt} is not a multiple of num_frames={num_frames}")
    x5 = x.view(nt // num_frames, num_frames, *x.shape[1:])
    fold = shift_groups(c, fold_div, direction)[0][1]
    out = torch.zeros_like(x5)
    if direction == "bi":
        out[:, :-1, :fold] = x5[:, 1:, :fold]  # shift left: frame t takes t+1
        out[:, 1:, fold:2 * fold] = x5[:, :-1, fold:2 * fold]  # shift right: frame t takes t-1
        out[:, :, 2 * fold:] = x5[:, :, 2 * fold:]  # not shifted
    else:
        out[:, 1:, :fold] = x5[:, :-1, :fold]
        out[:, :, fold:] = x5[:, :, fold:]
    return out.view(x.shape)


@functools.lru_cache(maxsize=256)  # called by every shifted layer in every step
def shift_groups(channels: int, fold_div: int = 8, direction: Direction = "bi") -> tuple[Group, ...]:
    """The channel groups a shift moves and where each comes from, as the kernels take them."""
    if fold_div < 1:
        raise ValueError(f"fold_div must be >= 1, got {fold_div}")
    fold = channels // fold_div
    if fold == 0:
        raise ValueError(f"fold_div={fold_div} leaves no channel to shift out of {channels}")
    if direction == "bi":
        if 2 * fold > channels:
            raise ValueError(f"fold_div={fold_div} shifts more than all {channels} channels both ways")
        return ((0, fold, 1), (fold, 2 * fold, -1))
    if direction == "uni":
        return ((0, fold, -1),)
    raise ValueError(f"direction must be 'bi' or 'uni', got {direction!r}")


def conv_call(conv: nn.Conv2d, num_frames: int, groups: tuple[Group, ...]) -> ShiftedConvCall:
    """The shifted call of a Conv2d module: ``call(x, conv.weight, conv.bias)`` is ``(conv(shift(x)), x)``."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError("shifted_conv needs a Conv2d with numeric zero padding")
    return ShiftedConvCall(num_frames, groups, conv.stride, conv.padding, conv.dilation, conv.groups)


def shifted_conv(x: Tensor, conv: nn.Conv2d, num_frames: int, groups: tuple[Group, ...]) -> tuple[Tensor, Tensor]:
    """``(conv(shift(x)), x)`` for a Conv2d module (see :class:`shift_kernels.ShiftedConvCall`)."""
    return conv_call(conv, num_frames, groups)(x, conv.weight, conv.bias)


class TemporalShift(nn.Module):
    """A shift point of the network: no parameters, knows its clip length, fold and direction.

    It shifts whole clips; streaming one frame at a time replaces it by a cache slot
    (:mod:`tsm_dist.streaming`).
    """

    def __init__(self, num_frames: int, fold_div: int = 8, direction: Direction = "bi") -> None:
        super().__init__()
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if direction not in ("bi", "uni"):
            raise ValueError(f"direction must be 'bi' or 'uni', got {direction!r}")
        if fold_div < (2 if direction == "bi" else 1):
            raise ValueError(f"fold_div={fold_div} is too small for a {direction}-directional shift")
        self.num_frames = num_frames
        self.fold_div = fold_div
        self.direction: Direction = direction
        self._calls: dict[tuple, ShiftedConvCall] = {}  # conv(): resolved once per input width, shift and conv
        # conv()'s last resolution: the conv, its geometry's objects then, and the op's entry for that call
        self._last: tuple | None = None

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name in ("num_frames", "fold_div", "direction"):  # a changed shift point resolves again
            self.__dict__["_last"] = None

    def __getstate__(self) -> dict:
        """Copies and pickles resolve their calls anew (a resolved call holds the op's entry, which neither
        copies nor pickles)."""
        return {**super().__getstate__(), "_calls": {}, "_last": None}

    def extra_repr(self) -> str:
        return f"num_frames={self.num_frames}, fold_div={self.fold_div}, direction={self.direction}"

    def groups(self, channels: int) -> tuple[Group, ...]:
        return shift_groups(channels, self.fold_div, self.direction)

    def forward(self, x: Tensor) -> Tensor:
        """``shift(x)`` as a new tensor (the in-place placement, where it replaces the block input)."""
        return shift_copy(x, self.num_frames, self.groups(x.shape[1]))

    def conv(self, x: Tensor, conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
        """``(conv(shift(x)), x)`` leaving ``x`` intact (the residual placement); use the returned
        ``x`` as the block's identity (see :class:`shift_kernels.ShiftedConvCall`)."""
        last = self._last
        # The same conv with the same geometry as last time: the op's entry checks the rest in C++ (the input's
        # width included) and takes the call, or says None. Every check here is an identity (nothing allocated):
        # between a step's kernels each Python-level operation costs microseconds (docs/models.md, sixth pass).
        if (last is not None and last[0] is conv and last[1] is conv.stride and last[2] is conv.padding
                and last[3] is conv.dilation and last[4] == conv.groups and last[5] is conv.padding_mode):
            out = last[6](x, conv.weight, conv.bias)
            if out is not None:
                return out
        key = (x.shape[1], self.num_frames, self.fold_div, self.direction, conv.stride, conv.padding, conv.dilation,
               conv.groups, conv.padding_mode)
        call = self._calls.get(key)
        if call is None:
            call = self._calls[key] = conv_call(conv, self.num_frames, self.groups(x.shape[1]))
        out = call(x, conv.weight, conv.bias)
        if call.plan:
            self.__dict__["_last"] = (conv, conv.stride, conv.padding, conv.dilation, conv.groups,
                                      conv.padding_mode, call.plan)
        return out

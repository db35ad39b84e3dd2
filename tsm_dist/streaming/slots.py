"""The cache slot: what stands in for one uni-directional shift point while a model streams.

The channels a shift point takes from frame t-1 (``[0, C/fold)``, uni-directional) come from the slot's cache
input, and the frame's own channels leave as its cache output, instead of living in module state. A
:class:`CacheBoard` holds one step's inputs and outputs for all slots of a model, in module order.

Forms (the same function, numerically):

* ``"swap"``: the cached channels are written into the frame's tensor in place around the conv and restored
  after (no copy of the input; PyTorch without autograd only) — :class:`~tsm_dist.streaming.online.OnlineTSM`;
* ``"concat"``: the cached channels and the rest as a concatenation, the official online demo's graph;
* ``"delta"``: ``conv(x) + conv_w[:, :fold](cache - x[:, :fold])``, a 1/fold-wide conv of the change instead
  of a copy of the whole input (on BN-folded weights: :func:`tsm_dist.streaming.step.fold_batchnorm`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tsm_dist.models.temporal_shift import TemporalShift

SLOT_FORMS = ("swap", "concat", "delta")


class CacheBoard:
    """Where the slots of one model read their caches and leave the new ones, for one time step."""

    def __init__(self, slots: int) -> None:
        self.inputs: list[Tensor | None] = [None] * slots
        self.outputs: list[Tensor | None] = [None] * slots

    def __len__(self) -> int:
        return len(self.inputs)

    def start(self, caches: tuple[Tensor, ...] | list[Tensor] | None) -> None:
        """Caches for the next step (None or empty: zeros, a new stream)."""
        if caches and len(caches) != len(self):
            raise ValueError(f"expected {len(self)} caches, got {len(caches)}")
        self.inputs = list(caches) if caches else [None] * len(self)
        self.outputs = [None] * len(self)

    def finish(self) -> list[Tensor | None]:
        """This step's new caches; the inputs are let go."""
        outputs, self.inputs = self.outputs, [None] * len(self)
        return outputs


class CacheSlot(nn.Module):
    """Stands in for one uni-directional :class:`TemporalShift`; see the module docstring for ``form``."""

    def __init__(self, shift: TemporalShift, board: CacheBoard, index: int, form: str = "concat") -> None:
        super().__init__()
        if form not in SLOT_FORMS:
            raise ValueError(f"form must be one of {SLOT_FORMS}, got {form!r}")
        self.shift, self.board, self.index, self.form = shift, board, index, form

    def extra_repr(self) -> str:
        return f"index={self.index}, form={self.form}"

    def _fold(self, x: Tensor) -> int:
        # int(): the fold is a constant of the graph, not Shape -> Gather -> Div at every shift point
        ((c0, c1, _),) = self.shift.groups(int(x.shape[1]))  # uni: channels [0, fold) from frame t-1
        return c1

    def _swap(self, current: Tensor) -> Tensor:
        """The previous frame's channels (zeros to start a stream); ``current`` leaves as the new cache."""
        cached = self.board.inputs[self.index]
        self.board.outputs[self.index] = current
        return torch.zeros_like(current) if cached is None else cached

    def forward(self, x: Tensor) -> Tensor:
        """The shifted input as a new tensor (the in-place placement, where it replaces the block input)."""
        fold = self._fold(x)
        if self.form == "swap":
            out = x.clone()
            out[:, :fold] = self._swap(x[:, :fold].clone())
            return out
        return torch.cat((self._swap(x[:, :fold]), x[:, fold:]), 1)

    def conv(self, x: Tensor, conv: nn.Module) -> tuple[Tensor, Tensor]:
        """``(conv(shift(x)), x)`` (the residual placement); ``x`` comes back as the block's identity."""
        fold = self._fold(x)
        if self.form == "swap":
            if torch.is_grad_enabled():
                raise RuntimeError("the swap form writes into activations: stream under torch.no_grad()")
            current = x[:, :fold].clone()
            x[:, :fold] = self._swap(current)
            try:
                return conv(x), x
            finally:
                x[:, :fold] = current
        if self.form == "concat" or conv.groups != 1:
            return conv(self.forward(x)), x
        current = x[:, :fold]
        cached = self._swap(current)
        # conv is linear: conv(shift(x)) = conv(x) + the conv of the shifted channels' change
        delta = F.conv2d(cached - current, conv.weight[:, :fold], None, conv.stride, conv.padding, conv.dilation)
        return conv(x) + delta, x


class NoShift(nn.Module):
    """Stands in for a shift that is not there: the same 2D network without temporal modelling."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    def conv(self, x: Tensor, conv: nn.Module) -> tuple[Tensor, Tensor]:
        return conv(x), x


def replace_shifts(model: nn.Module, make: Callable[[TemporalShift, int], nn.Module]) -> int:
    """Replace every TemporalShift child of ``model`` (in place) by ``make(shift, index)``; returns the count."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TemporalShift):
                setattr(parent, name, make(child, count))
                count += 1
    return count


def check_streamable(model: nn.Module) -> None:
    """A ValueError for a model that cannot stream frame by frame."""
    if getattr(model, "conv3d", True):
        raise ValueError("only a 2D model (TSM, TSN) streams frame by frame; a 3D model pools time inside")
    if any(s.direction != "uni" for s in model.shift_modules()):
        raise ValueError("the model shifts bi-directionally (it reads the next frame): "
                         "an online model must be built (trained) with online=True (config: model.online: true)")

"""The cache slot: what stands in for one uni-directional shift point while a model streams.

The channels a shift point takes from frame t-1 (``[0, C/fold)``, uni-directional) come from the slot's cache
input, and the frame's own channels leave as its cache output, instead of living in module state. A
:class:`CacheBoard` holds one step's inputs and outputs for all slots of a model, in module order.

Forms (the same function, numerically):

* ``"swap"``: the cached channels are written into the frame's tensor in place around the conv and restored
  after (no copy of the input; PyTorch without autograd only) — :class:`~tsm_dist.streaming.online.OnlineTSM`;
* ``"concat"``: the cached channels and the rest as a concatenation, the official online demo's graph;
* ``"mask"``: convs only, so that onnxruntime keeps every tensor in its blocked layout (docs/deploy.md): the
  shifted input is ``conv1x1(cache, one-hot placement) + depthwise1x1(x, 0 on the cached channels, 1 after)``
  and the new cache ``x[:, :fold]`` a 1x1 conv with one-hot weights (:func:`select_channels`);
* ``"sub"``: as ``"mask"``, but the shifted input is ``x + conv1x1(cache - new cache, one-hot placement)``: the
  difference is taken on the small NCHW caches instead of a depthwise pass over ``x``, and the new cache is
  computed before the block's convs (:func:`add_difference`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tsm_dist.models.temporal_shift import TemporalShift

SLOT_FORMS = ("swap", "concat", "mask", "sub")


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
        if self.form == "concat":
            return conv(self.forward(x)), x
        new = select_channels(x, fold)
        if self.form == "sub":
            return conv(add_difference(x, self._swap(new), new)), x
        return conv(mask_input(x, self._swap(new), fold)), x


def select_channels(x: Tensor, fold: int) -> Tensor:
    """``x[:, :fold]`` as a 1x1 conv with one-hot weights: exact (one product by 1, the others by 0) and,
    unlike a Slice, computed by onnxruntime in the blocked layout the tensor already has."""
    eye = torch.eye(fold, int(x.shape[1]), dtype=x.dtype, device=x.device)[:, :, None, None]
    return F.conv2d(x, eye)


def mask_input(x: Tensor, cached: Tensor, fold: int) -> Tensor:
    """``cat(cached, x[:, fold:])`` in convs: a one-hot placement of the cache plus a depthwise mask of ``x``.
    The conv that reads it keeps its fusions (MobileNetV2's expand conv + BN + ReLU6; the cheaper looking
    ``conv(x, W zero on the cached columns) + conv(cache, W[:, :fold])`` puts an Add before the ReLU6, which
    onnxruntime does not fuse in its blocked layout: a layout round trip of the expanded tensor instead)."""
    channels = int(x.shape[1])
    # built from Python numbers: a constant of the graph (an in-place write is traced as ScatterND)
    mask = torch.tensor([0.0] * fold + [1.0] * (channels - fold), dtype=x.dtype, device=x.device)
    place = torch.eye(channels, fold, dtype=x.dtype, device=x.device)[:, :, None, None]
    # the placement conv first: onnxruntime fuses an Add into the conv of its first input
    return F.conv2d(cached, place) + F.conv2d(x, mask[:, None, None, None], groups=channels)


def add_difference(x: Tensor, cached: Tensor, new: Tensor) -> Tensor:
    """``cat(cached, x[:, fold:])`` as ``x + place(cached - new)``, ``new = x[:, :fold]``. Against
    :func:`mask_input`, the depthwise pass over the C channels of ``x`` becomes a Sub on the fold channels of the
    NCHW caches (the new one is converted for the graph's output anyway), and because the new cache feeds the
    shifted input, onnxruntime computes it before the block's convs: with it scheduled after them (its place in
    the mask form), ``x`` is still alive when the block's last conv adds the identity, which then copies ``x``
    instead of accumulating into it (docs/deploy.md)."""
    place = torch.eye(int(x.shape[1]), int(new.shape[1]), dtype=x.dtype, device=x.device)[:, :, None, None]
    # the placement conv first: onnxruntime fuses an Add into the conv of its first input
    return F.conv2d(cached - new, place) + x


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

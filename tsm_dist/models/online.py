"""Online recognition with the uni-directional TSM (Section 4, Fig. 4): one frame in, logits out.

Every residual block keeps the 1/8 of its input channels that the next frame will shift in; a new
frame replaces those channels with the cached ones and caches its own. Nothing is recomputed, so a
frame costs the same as a 2D network. The outputs equal the offline uni-directional model's
per-frame logits on the whole clip (frame t's output at time t).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tsm_dist.models.temporal_shift import TemporalShift


class OnlineTSM(nn.Module):
    """Streaming wrapper: ``online(frame)`` with ``frame`` ``(N, 3, H, W)`` -> logits ``(N, K)``.

    The model must be a 2D model built with ``online=True`` (uni-directional shift) and be in eval
    mode: a frame alone cannot reproduce the batch statistics of a whole clip. The batch dim holds N
    independent streams; :meth:`reset` starts new ones.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if model.conv3d:
            raise ValueError("OnlineTSM needs a 2D model (TSM or TSN); 3D models pool time inside")
        bidirectional = [s for s in model.shift_modules() if s.direction != "uni"]
        if bidirectional:
            raise ValueError("OnlineTSM needs a uni-directional shift: build the model with online=True")
        self.model = model

    def reset(self) -> None:
        """Forget the cached features: the next frame starts new streams."""
        self.model.stop_stream()

    @torch.no_grad()
    def forward(self, frame: Tensor) -> Tensor:
        if self.model.training:
            raise ValueError("OnlineTSM runs the model in eval mode; call .eval() first")
        if frame.dim() != 4 or frame.shape[1] != 3:
            raise ValueError(f"expected one frame per stream shaped (N, 3, H, W), got {tuple(frame.shape)}")
        if not self.model.streaming:
            self.model.start_stream()
        return self.model.frame_logits(frame.unsqueeze(1))[:, 0]

    def cache_nbytes(self) -> int:
        """Bytes held between frames (the paper's "0.9 MB" figure for ResNet-50)."""
        return self.model.stream_cache_nbytes()


# -- explicit caches: the same network as a pure function, for export (tsm_dist/deploy) --------------
class _CacheBoard:
    """Where the stand-ins of one exported model read their caches and leave the new ones."""

    def __init__(self, slots: int) -> None:
        self.inputs: list[Tensor | None] = [None] * slots
        self.outputs: list[Tensor | None] = [None] * slots


class _CacheSlot(nn.Module):
    """Stands in for one uni-directional :class:`TemporalShift`: the channels it shifts in come from
    a graph input, and the frame's own channels leave as a graph output, instead of module state."""

    def __init__(self, shift: TemporalShift, board: _CacheBoard, index: int, delta: bool = False) -> None:
        super().__init__()
        self.shift, self.board, self.index, self.delta = shift, board, index, delta

    def _swap(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        """(previous frame's channels, this frame's, where they end); this frame's leave as the new cache."""
        # int(): the fold is a constant of the graph, not Shape -> Gather -> Div at every shift point
        ((c0, c1, _),) = self.shift.groups(int(x.shape[1]))  # uni: channels [0, fold) from frame t-1
        current = x[:, c0:c1]
        cached = self.board.inputs[self.index]
        self.board.outputs[self.index] = current
        return (torch.zeros_like(current) if cached is None else cached), current, c1

    def forward(self, x: Tensor) -> Tensor:
        cached, _, c1 = self._swap(x)
        return torch.cat((cached, x[:, c1:]), 1)

    def conv(self, x: Tensor, conv: nn.Module) -> tuple[Tensor, Tensor]:
        if not self.delta or conv.groups != 1:
            return conv(self.forward(x)), x
        cached, current, c1 = self._swap(x)
        # conv is linear: conv(shift(x)) = conv(x) + the conv of the shifted channels' change, a 1/fold-wide
        # conv instead of a copy of the whole input
        delta = F.conv2d(cached - current, conv.weight[:, :c1], None, conv.stride, conv.padding, conv.dilation)
        return conv(x) + delta, x


class _NoShift(nn.Module):
    """Stands in for a shift that is not there: the same 2D network without temporal modelling."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    def conv(self, x: Tensor, conv: nn.Module) -> tuple[Tensor, Tensor]:
        return conv(x), x


class _CatShift(nn.Module):
    """A shift from slices and concatenation only (any exporter and runtime knows these ops), for the
    offline clip graph; the training kernels move data in place, which a graph cannot express."""

    def __init__(self, shift: TemporalShift) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x: Tensor) -> Tensor:
        # constant channel groups and frame sizes in the graph; only the batch stays dynamic
        groups = self.shift.groups(int(x.shape[1]))
        x5 = x.reshape(-1, self.shift.num_frames, *(int(d) for d in x.shape[1:]))
        parts = []
        for c0, c1, off in groups:
            g = x5[:, :, c0:c1]
            zero = torch.zeros_like(g[:, :1])
            parts.append(torch.cat((g[:, 1:], zero), 1) if off > 0 else torch.cat((zero, g[:, :-1]), 1))
        parts.append(x5[:, :, groups[-1][1]:])
        return torch.cat(parts, 2).reshape(-1, *(int(d) for d in x.shape[1:]))

    def conv(self, x: Tensor, conv: nn.Module) -> tuple[Tensor, Tensor]:
        return conv(self.forward(x)), x


def _per_frame_logits(model: nn.Module, frames: Tensor) -> Tensor:
    """A 2D model's logits for frames ``(M, 3, H, W)``: backbone, pool, classifier, without the clip
    interface's reshapes, which a graph would compute from the input's shape at every call."""
    feats = model.avgpool(model._backbone(frames)).flatten(1)
    return model.fc(model.dropout(feats))


def _replace_shifts(model: nn.Module, make) -> int:
    """Replace every TemporalShift child of ``model`` (in place) by ``make(shift, index)``; returns the count."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TemporalShift):
                setattr(parent, name, make(child, count))
                count += 1
    return count


def _check_streamable(model: nn.Module) -> None:
    if getattr(model, "conv3d", True):
        raise ValueError("only a 2D model (TSM, TSN) streams frame by frame; a 3D model pools time inside")
    if any(s.direction != "uni" for s in model.shift_modules()):
        raise ValueError("the model shifts bi-directionally (it reads the next frame): "
                         "an online model must be built (trained) with model.online=true")


# "concat": the shifted input as slices and a concatenation (the official demo's graph); "delta":
# conv(x) + conv_w[:, :fold](cache - x[:, :fold]) on BN-folded weights (docs/deploy.md has the timings)
GRAPH_FORMS = ("concat", "delta")


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d (``convK``/``bnK`` of a block, or
    neighbours in a Sequential) into the conv's weight and bias, in place; the BN becomes Identity."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for parent in list(model.modules()):
        if isinstance(parent, nn.Sequential):
            pairs = [(str(i), str(i + 1)) for i in range(len(parent) - 1)]
        else:
            pairs = [(f"conv{k}", f"bn{k}") for k in (1, 2, 3)]
        for conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
    return model


class ExplicitCacheTSM(nn.Module):
    """``(frame (N, 3, H, W), *caches) -> (logits (N, K), *new caches)``: :class:`OnlineTSM` as a pure
    function, with every shift cache an explicit tensor, so that a graph exporter can carry it.

    ``caches[i]`` holds shift point i's first ``C_i / fold_div`` channels of the previous frame,
    ``(N, C_i / fold_div, H_i, W_i)`` (:meth:`cache_shapes`); zeros start a stream. Shift points are
    numbered in module order. ``with_shift=False`` gives the same network without any shift (no caches).
    """

    def __init__(self, model: nn.Module, *, with_shift: bool = True, form: str = "concat") -> None:
        super().__init__()
        if with_shift:
            _check_streamable(model)
        if form not in GRAPH_FORMS:
            raise ValueError(f"form must be one of {GRAPH_FORMS}, got {form!r}")
        self.model = copy.deepcopy(model).eval()
        if form == "delta":
            # the delta's Add sits between a conv and its BN, where no runtime folds the BN any more
            fold_batchnorm(self.model)
        self.model.num_frames = 1  # one time step per call: the frame count check of clips passes
        if not with_shift:
            _replace_shifts(self.model, lambda shift, i: _NoShift())
            self._board = _CacheBoard(0)
            return
        count = len(model.shift_modules())
        self._board = _CacheBoard(count)
        _replace_shifts(self.model, lambda shift, i: _CacheSlot(shift, self._board, i, form == "delta"))

    @property
    def num_caches(self) -> int:
        return len(self._board.inputs)

    def cache_names(self) -> list[str]:
        return [f"cache_{i:02d}" for i in range(self.num_caches)]

    @torch.no_grad()
    def cache_shapes(self, frame_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Each cache's shape for frames of ``frame_shape`` ``(N, 3, H, W)`` (one forward on the meta device)."""
        with torch.device("meta"):
            meta = copy.deepcopy(self).to("meta")
            outputs = meta(torch.empty(frame_shape))
        return [tuple(t.shape) for t in outputs[1:]]

    def forward(self, frame: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        board = self._board
        if caches and len(caches) != self.num_caches:
            raise ValueError(f"expected {self.num_caches} caches, got {len(caches)}")
        board.inputs = list(caches) if caches else [None] * self.num_caches
        board.outputs = [None] * self.num_caches
        try:
            return (self._frame_logits(frame), *board.outputs)
        finally:
            board.inputs = [None] * self.num_caches


    def _frame_logits(self, frame: Tensor) -> Tensor:
        if frame.dim() != 4 or frame.shape[1] != 3:
            raise ValueError(f"expected one frame per stream shaped (N, 3, H, W), got {tuple(frame.shape)}")
        return _per_frame_logits(self.model, frame)


class CatShiftClipModel(nn.Module):
    """The clip model ``(N, T, 3, H, W) -> (N, K)`` with its shifts written as slices and concatenation
    (:class:`_CatShift`): the same function as ``model``, in ops every graph format has."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        _replace_shifts(self.model, lambda shift, i: _CatShift(shift))

    def forward(self, clips: Tensor) -> Tensor:
        model = self.model
        if model.conv3d:
            return model(clips)
        model._check_input(clips)
        t, size = int(clips.shape[1]), [int(d) for d in clips.shape[2:]]
        logits = _per_frame_logits(model, clips.reshape(-1, *size))
        return logits.reshape(-1, t, model.num_classes).mean(1)  # TSN's consensus

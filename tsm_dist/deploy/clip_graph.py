"""The offline clip model as a graph: ``(N, T, 3, H, W) -> (N, K)`` with every shift written as slices and a
concatenation, ops that every exporter and runtime knows (the training kernels move data in place, which a
graph cannot express). The online graph, with caches, is :mod:`tsm_dist.streaming.step`'s.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from tsm_dist.models.temporal_shift import TemporalShift
from tsm_dist.streaming.slots import replace_shifts


class CatShift(nn.Module):
    """Stands in for a :class:`TemporalShift` of whole clips: the same shift from slices and concatenation."""

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


class CatShiftClipModel(nn.Module):
    """The clip model ``(N, T, 3, H, W) -> (N, K)`` with its shifts written as slices and concatenation
    (:class:`CatShift`): the same function as ``model``, in ops every graph format has."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).eval()
        replace_shifts(self.model, lambda shift, i: CatShift(shift))

    def forward(self, clips: Tensor) -> Tensor:
        model = self.model
        if model.conv3d:
            return model(clips)
        model._check_input(clips)
        t, size = int(clips.shape[1]), [int(d) for d in clips.shape[2:]]
        logits = model.backbone_logits(clips.reshape(-1, *size))
        return logits.reshape(-1, t, model.num_classes).mean(1)  # TSN's consensus

"""What every video model shares, whatever its backbone (the ResNet builder, MobileNetV2): the clip interface.

Clips ``(N, T, 3, H, W)`` in, logits ``(N, num_classes)`` out. A 2D backbone sees the frames folded into
the batch, ``(N*T, 3, H, W)``, and its per-frame logits are averaged (TSN's consensus); a 3D backbone sees
``(N, 3, T, H, W)`` and pools time itself. Then global pooling, dropout and the classifier. Also shared:
the weight init and the input checks. Streaming frame by frame is :mod:`tsm_dist.streaming`'s, on a copy of
the model whose shifts it replaces.

A backbone subclass sets ``spec``, ``num_frames``, ``num_classes``, ``conv3d``, ``avgpool``, ``dropout`` and
``fc``, defines :meth:`VideoModel._backbone`, and calls :meth:`VideoModel._finish` at the end of its
``__init__``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from torch import Tensor, nn

from tsm_dist.models.temporal_shift import TemporalShift
from tsm_dist.models.video_spec import VideoSpec


class VideoModel(nn.Module, ABC):
    """Clips ``(N, T, 3, H, W)`` -> logits ``(N, num_classes)``; subclasses provide the backbone."""

    spec: VideoSpec
    num_frames: int
    num_classes: int
    conv3d: bool
    avgpool: nn.Module
    dropout: nn.Module
    fc: nn.Linear

    @abstractmethod
    def _backbone(self, x: Tensor) -> Tensor:
        """Features before global pooling, in the backbone's layout."""

    def _finish(self) -> None:
        """The end of a subclass's ``__init__``: initialize the weights, find the shifts."""
        self._init_weights()
        # A plain tuple (not registered twice)
        self._shifts = tuple(m for m in self.modules() if isinstance(m, TemporalShift))

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # A small classifier init, as in the reference TSM code, so fine-tuning starts near uniform.
        nn.init.normal_(self.fc.weight, 0.0, 0.001)
        nn.init.zeros_(self.fc.bias)

    # -- forward -----------------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 5 or x.shape[2] != 3:
            raise ValueError(f"expected clips shaped (N, T, 3, H, W), got {tuple(x.shape)}")
        if self.spec.shift and x.shape[1] != self.num_frames:
            raise ValueError(f"this TSM model shifts over num_frames={self.num_frames}, "
                             f"got clips of {x.shape[1]} frames")

    def _to_backbone_layout(self, clips: Tensor) -> Tensor:
        if self.conv3d:
            return clips.transpose(1, 2)  # (N, 3, T, H, W)
        return clips.flatten(0, 1)  # (N*T, 3, H, W)

    def backbone_logits(self, x: Tensor) -> Tensor:
        """Backbone, pooling and classifier on ``x`` in the backbone's layout (2D: frames ``(M, 3, H, W)``
        -> ``(M, K)``), without the clip interface's checks and reshapes."""
        feats = self.avgpool(self._backbone(x)).flatten(1)
        return self.fc(self.dropout(feats))

    def _logits(self, clips: Tensor) -> Tensor:
        """Logits per frame (2D: ``(N*T, K)``) or per clip (3D: ``(N, K)``)."""
        self._check_input(clips)
        return self.backbone_logits(self._to_backbone_layout(clips))

    def frame_logits(self, clips: Tensor) -> Tensor:
        """Per-frame logits ``(N, T, num_classes)`` of a 2D model (TSN's consensus averages them)."""
        if self.conv3d:
            raise ValueError("a 3D model pools time inside the network and has no per-frame logits")
        return self._logits(clips).view(clips.shape[0], clips.shape[1], -1)

    def forward(self, clips: Tensor) -> Tensor:
        if self.conv3d:
            return self._logits(clips)
        return self.frame_logits(clips).mean(dim=1)

    def shift_modules(self) -> tuple[TemporalShift, ...]:
        return self._shifts

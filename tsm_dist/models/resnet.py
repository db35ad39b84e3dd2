"""The one ResNet builder behind every model: 2D per frame (TSN, TSM) or inflated 3D (I3D).

A model is this builder plus a :class:`VideoSpec` (video_spec.py; the variants in registry.py), a few lines of data saying how it
handles time: 3D convolutions or not, the shift, which convolutions get a temporal kernel, and where
the temporal resolution is pooled. Depth and width are build options so tests and the CPU demo run
small versions of exactly the same code. Module names follow torchvision's ResNet (conv1, bn1,
layer1..layer4, fc) so ImageNet state_dicts load directly (pretrained.py).

Layouts: a 2D model folds the frames into the batch, ``(N*T, C, H, W)``, and averages per-frame
logits (TSN's consensus); a 3D model runs on ``(N, C, T, H, W)`` and pools time globally.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import Tensor, nn

from tsm_dist.models.temporal_shift import Direction, TemporalShift
from tsm_dist.models.inflation import temporal_kernels
from tsm_dist.models.video_model import VideoModel
from tsm_dist.models.video_spec import VideoSpec

ShiftPlace = Literal["residual", "inplace"]
BlockKind = Literal["basic", "bottleneck"]

# depth -> (block kind, blocks per stage)
DEPTHS: dict[int, tuple[BlockKind, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    26: ("bottleneck", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
STAGES = ("res2", "res3", "res4", "res5")


def _conv(conv3d: bool, cin: int, cout: int, k: int, stride: int = 1, kt: int = 1,
          t_stride: int = 1) -> nn.Module:
    if not conv3d:
        return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
    return nn.Conv3d(cin, cout, (kt, k, k), (t_stride, stride, stride), (kt // 2, k // 2, k // 2), bias=False)


def _bn(conv3d: bool, channels: int) -> nn.Module:
    return nn.BatchNorm3d(channels) if conv3d else nn.BatchNorm2d(channels)


class _Block(nn.Module, ABC):
    """What basic and bottleneck blocks share: the shortcut, the shift and the final add."""

    def __init__(self, conv3d: bool, cin: int, cout: int, stride: int, t_stride: int,
                 shift: TemporalShift | None, shift_place: ShiftPlace) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or t_stride != 1 or cin != cout:
            self.downsample = nn.Sequential(_conv(conv3d, cin, cout, 1, stride, 1, t_stride), _bn(conv3d, cout))
        self.shift = shift
        self.shift_place = shift_place

    @abstractmethod
    def _after_first_conv(self, out: Tensor) -> Tensor:
        """The residual branch after its first conv (whose input may be shifted)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.shift is not None and self.shift_place == "inplace":
            x = self.shift(x)
        if self.shift is not None and self.shift_place == "residual":
            # x comes back as the identity: the shift's backward folds the identity's gradient
            # into its own pass (see temporal_shift.py).
            out, x = self.shift.conv(x, self.conv1)
        else:
            out = self.conv1(x)
        identity = x if self.downsample is None else self.downsample(x)
        out = self._after_first_conv(out)
        out += identity
        return self.relu(out)


class BasicBlock(_Block):
    expansion = 1

    def __init__(self, conv3d: bool, cin: int, width: int, stride: int, t_stride: int, kt_first: int,
                 kt_second: int, shift: TemporalShift | None, shift_place: ShiftPlace) -> None:
        super().__init__(conv3d, cin, width, stride, t_stride, shift, shift_place)
        self.conv1 = _conv(conv3d, cin, width, 3, stride, kt_first, t_stride)
        self.bn1 = _bn(conv3d, width)
        self.conv2 = _conv(conv3d, width, width, 3, 1, kt_second)
        self.bn2 = _bn(conv3d, width)

    def _after_first_conv(self, out: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(out))))


class Bottleneck(_Block):
    expansion = 4

    def __init__(self, conv3d: bool, cin: int, width: int, stride: int, t_stride: int, kt_first: int,
                 kt_second: int, shift: TemporalShift | None, shift_place: ShiftPlace) -> None:
        super().__init__(conv3d, cin, width * 4, stride, t_stride, shift, shift_place)
        # Stride on the 3x3 (ResNet v1.5, torchvision's layout): the layout the paper's FLOPs assume.
        self.conv1 = _conv(conv3d, cin, width, 1, 1, kt_first)
        self.bn1 = _bn(conv3d, width)
        self.conv2 = _conv(conv3d, width, width, 3, stride, kt_second, t_stride)
        self.bn2 = _bn(conv3d, width)
        self.conv3 = _conv(conv3d, width, width * 4, 1)
        self.bn3 = _bn(conv3d, width * 4)

    def _after_first_conv(self, out: Tensor) -> Tensor:
        out = self.relu(self.bn2(self.conv2(self.relu(self.bn1(out)))))
        return self.bn3(self.conv3(out))


class VideoResNet(VideoModel):
    """Clips ``(N, T, 3, H, W)`` -> logits ``(N, num_classes)`` through a 2D or inflated 3D ResNet."""

    def __init__(self, spec: VideoSpec, *, num_classes: int, num_frames: int, depth: int = 50,
                 width: int = 64, dropout: float = 0.5, fold_div: int = 8,
                 shift_place: ShiftPlace = "residual", direction: Direction = "bi") -> None:
        super().__init__()
        kind, blocks = DEPTHS[depth]
        block_cls = Bottleneck if kind == "bottleneck" else BasicBlock
        c3 = spec.conv3d
        self.spec = spec
        self.num_frames = num_frames
        self.num_classes = num_classes
        self.conv3d = c3
        self.memory_format = torch.channels_last_3d if c3 else torch.channels_last

        self.conv1 = _conv(c3, 3, width, 7, 2, spec.stem_kt, spec.stem_t_stride)
        self.bn1 = _bn(c3, width)
        self.relu = nn.ReLU(inplace=True)
        if c3:
            kt = 3 if spec.pool1_t_stride > 1 else 1
            self.maxpool: nn.Module = nn.MaxPool3d((kt, 3, 3), (spec.pool1_t_stride, 2, 2), (kt // 2, 1, 1))
        else:
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.pool2: nn.Module = nn.Identity()
        if spec.pool2_t_stride > 1:
            self.pool2 = nn.MaxPool3d((3, 1, 1), (spec.pool2_t_stride, 1, 1), (1, 0, 0))

        cin = width
        for s, n_blocks in enumerate(blocks):
            layer = []
            for b in range(n_blocks):
                pattern = spec.inflate_blocks[s]
                kt_first, kt_second = temporal_kernels(kind, spec.inflate, bool(pattern[b % len(pattern)]))
                shift = TemporalShift(num_frames, fold_div, direction) if spec.shift else None
                first = b == 0
                layer.append(block_cls(c3, cin, width * 2 ** s, 2 if first and s > 0 else 1,
                                       spec.stage_t_strides[s] if first else 1, kt_first, kt_second,
                                       shift, shift_place))
                cin = width * 2 ** s * block_cls.expansion
            self.add_module(f"layer{s + 1}", nn.Sequential(*layer))
        self.num_features = cin
        self.avgpool = nn.AdaptiveAvgPool3d(1) if c3 else nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin, num_classes)
        self._finish()

    # -- forward -----------------------------------------------------------------------------------
    def _backbone(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.pool2(self.layer1(x))
        return self.layer4(self.layer3(self.layer2(x)))

    # -- introspection -----------------------------------------------------------------------------
    def temporal_resolution(self, clips: Tensor) -> list[tuple[str, int]]:
        """Frames (temporal positions) after each stage for ``clips``, the paper's Table 11.

        Runs one forward pass (cheap on the meta device) and reads the stage outputs.
        """
        n, t = clips.shape[:2]
        rows: list[tuple[str, int]] = [("input", t)]
        stages = [("conv1", self.conv1), ("pool1", self.maxpool), ("res2", self.layer1)]
        if self.spec.pool2_t_stride > 1:
            stages.append(("pool2", self.pool2))
        stages += [("res3", self.layer2), ("res4", self.layer3), ("res5", self.layer4)]

        def frames(out: Tensor) -> int:
            return out.shape[2] if self.conv3d else out.shape[0] // n

        handles = [m.register_forward_hook(lambda _m, _i, out, name=name: rows.append((name, frames(out))))
                   for name, m in stages]
        try:
            with torch.no_grad():
                self(clips)
        finally:
            for h in handles:
                h.remove()
        rows.append(("global pool", 1))
        return rows

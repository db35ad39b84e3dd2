"""MobileNetV2-TSM: the paper's edge model (Section 4, Table 8), a 2D MobileNetV2 run per frame.

The shift sits where the official TSM code puts it: at the input of the residual branch of every
inverted-residual block that has a residual connection and an expansion (stride 1, same width in
and out, expand ratio 6; 10 of MobileNetV2's 17 blocks), so ``x + branch(shift(x))`` and the
identity path keeps the frame's own features. Offline the shift is bi-directional; built online it
is uni-directional and :class:`tsm_dist.streaming.online.OnlineTSM` streams it with one cache per
shifted block.

Module names follow torchvision's ``mobilenet_v2`` (``features.N.conv...``; the classifier is ``fc``
as in our ResNet, pretrained.py maps torchvision's ``classifier.1``), so an ImageNet state_dict
loads as ``pretrained``. ``width`` is the stem's channel count (32 in MobileNetV2); every layer is
scaled by ``width / 32`` and rounded to a multiple of 8, as torchvision's ``width_mult``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from tsm_dist.models.video_spec import VideoSpec
from tsm_dist.models.temporal_shift import Direction, TemporalShift
from tsm_dist.models.video_model import VideoModel

# (expand ratio t, output channels c, blocks n, stride of the first block s): MobileNetV2's Table 2
SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
           (6, 320, 1, 1))
STEM, LAST = 32, 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's rounding of scaled widths: nearest multiple of ``divisor``, never 10 % below."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn_relu6(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """``x + branch(shift(x))`` (residual blocks) or ``branch(x)``; branch = 1x1 expand, 3x3 depthwise,
    1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, shift: TemporalShift | None) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = [_conv_bn_relu6(cin, hidden, 1)] if expand != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.shift = shift

    def forward(self, x: Tensor) -> Tensor:
        if self.shift is None:
            out = self.conv(x)
            return x + out if self.use_res_connect else out
        expand = self.conv[0]
        # The shift reads x for the expand conv only; x itself is the identity (see temporal_shift.py).
        out, x = self.shift.conv(x, expand[0])
        out = expand[2](expand[1](out))
        for layer in self.conv[1:]:
            out = layer(out)
        return x + out


class VideoMobileNetV2(VideoModel):
    """Clips ``(N, T, 3, H, W)`` -> logits ``(N, num_classes)``: frames folded into the batch, per-frame
    logits averaged (TSN's consensus); the clip interface, init and stream control are :class:`VideoModel`'s."""

    conv3d = False
    memory_format = torch.channels_last

    def __init__(self, spec: VideoSpec, *, num_classes: int, num_frames: int, width: int = STEM,
                 dropout: float = 0.5, fold_div: int = 8, direction: Direction = "bi") -> None:
        super().__init__()
        if spec.conv3d:
            raise ValueError("MobileNetV2 is a 2D network")
        self.spec = spec
        self.num_frames = num_frames
        self.num_classes = num_classes
        mult = width / STEM
        cin = make_divisible(STEM * mult)
        features: list[nn.Module] = [_conv_bn_relu6(3, cin, 3, 2)]
        for t, c, n, s in SETTING:
            cout = make_divisible(c * mult)
            for i in range(n):
                stride = s if i == 0 else 1
                shifted = spec.shift and t != 1 and stride == 1 and cin == cout
                block_shift = TemporalShift(num_frames, fold_div, direction) if shifted else None
                features.append(InvertedResidual(cin, cout, stride, t, block_shift))
                cin = cout
        self.num_features = make_divisible(LAST * max(1.0, mult))
        features.append(_conv_bn_relu6(cin, self.num_features, 1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.num_features, num_classes)
        self._finish()

    def _backbone(self, x: Tensor) -> Tensor:
        return self.features(x)

    def temporal_resolution(self, clips: Tensor) -> list[tuple[str, int]]:
        """A 2D network keeps every frame to the end (the paper's Table 11 row for TSM)."""
        t = clips.shape[1]
        return [("input", t), ("features", t), ("global pool", 1)]

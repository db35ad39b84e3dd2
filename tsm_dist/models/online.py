"""Online recognition with the uni-directional TSM (Section 4, Fig. 4): one frame in, logits out.

Every residual block keeps the 1/8 of its input channels that the next frame will shift in; a new
frame replaces those channels with the cached ones and caches its own. Nothing is recomputed, so a
frame costs the same as a 2D network. The outputs equal the offline uni-directional model's
per-frame logits on the whole clip (frame t's output at time t).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from tsm_dist.models.resnet import VideoResNet


class OnlineTSM(nn.Module):
    """Streaming wrapper: ``online(frame)`` with ``frame`` ``(N, 3, H, W)`` -> logits ``(N, K)``.

    The model must be a 2D model built with ``online=True`` (uni-directional shift) and be in eval
    mode: a frame alone cannot reproduce the batch statistics of a whole clip. The batch dim holds N
    independent streams; :meth:`reset` starts new ones.
    """

    def __init__(self, model: VideoResNet) -> None:
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

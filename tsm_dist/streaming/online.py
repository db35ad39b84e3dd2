"""Online recognition with the uni-directional TSM in PyTorch (Section 4, Fig. 4): one frame in, logits out.

Every shift point keeps the 1/8 of its input channels that the next frame will shift in; a new frame swaps
those channels with the cached ones and caches its own. Nothing is recomputed, so a frame costs the same as a
2D network. The outputs equal the offline uni-directional model's per-frame logits on the whole clip (frame
t's output at time t). The step is :class:`~tsm_dist.streaming.step.ExplicitCacheTSM` in the form "swap";
this module carries its caches from one call to the next.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from tsm_dist.streaming.step import ExplicitCacheTSM


class OnlineTSM(nn.Module):
    """Streaming wrapper: ``online(frame)`` with ``frame`` ``(N, 3, H, W)`` -> logits ``(N, K)``.

    The model must be a 2D model built with ``online=True`` (uni-directional shift), and the wrapper in eval
    mode (it takes the model's mode; ``.eval()`` sets it): a frame alone cannot reproduce the batch statistics
    of a whole clip. The batch dim holds N independent streams; :meth:`reset` starts new ones. The model
    itself is left as it is (whole clips still run on it) and its weights are shared, not copied.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if getattr(model, "conv3d", True):
            raise ValueError("OnlineTSM needs a 2D model (TSM or TSN); 3D models pool time inside")
        self.step = ExplicitCacheTSM(model, form="swap")
        self.train(model.training)
        self._caches: list[Tensor] | None = None

    def reset(self) -> None:
        """Forget the cached features: the next frame starts new streams."""
        self._caches = None

    @torch.no_grad()
    def forward(self, frame: Tensor) -> Tensor:
        if self.training:
            raise ValueError("OnlineTSM runs the model in eval mode; call .eval() first")
        if frame.dim() != 4 or frame.shape[1] != 3:
            raise ValueError(f"expected one frame per stream shaped (N, 3, H, W), got {tuple(frame.shape)}")
        if self._caches and (self._frame_shape != frame.shape):
            raise ValueError(f"the stream changed shape from {tuple(self._frame_shape)} to {tuple(frame.shape)}; "
                             "reset() before feeding other streams")
        logits, *self._caches = self.step(frame, *(self._caches or ()))
        self._frame_shape = frame.shape
        return logits

    def cache_nbytes(self) -> int:
        """Bytes held between frames (the paper's "0.9 MB" figure for ResNet-50)."""
        return sum(c.numel() * c.element_size() for c in self._caches or ())

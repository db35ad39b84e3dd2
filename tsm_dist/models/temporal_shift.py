"""The Temporal Shift Module (Sections 3-4): move a fraction of the channels one frame along time.

Frames of a clip travel through the 2D backbone folded into the batch, ``(N*T, C, H, W)``. A shift
moves channel groups by one frame; what is shifted out of the clip is dropped and the vacated frame
is zero, exactly as in the paper (and the reference implementation):

* bi-directional (offline): channels ``[0, C/d)`` take frame ``t+1``, ``[C/d, 2C/d)`` take ``t-1``;
* uni-directional (online): channels ``[0, C/d)`` take frame ``t-1`` only, so frame ``t`` never sees
  the future and a streaming model can cache those channels between frames.

Cost. The shift computes nothing, but moving data is not free: the reference implementation
allocates a zero tensor and copies every channel, which costs about as much memory traffic as the
1x1 convolution that follows. Here the residual shift is fused with that convolution
(:func:`shifted_conv2d_and_identity`) and only the moved 2/d of the channels are ever touched:

* forward: the moved channels of the block input are shifted in place, frame by frame (no
  temporary), the conv runs, and the move is undone bit-exactly, because the identity path and the
  previous ReLU's backward still need the original input;
* backward: the weight gradient of a 1x1 conv on a large frame is computed from the unshifted
  input by matmuls at frame offsets (elsewhere the input is shifted again for it and restored), and
  the input gradient is moved back inside the sum with the identity path's gradient, which
  autograd would compute anyway.

Nothing of activation size is allocated and the input is bit-identical whenever the shift returns.
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

Direction = Literal["bi", "uni"]
# (first channel, end channel, offset): frame t of those channels takes frame t + offset.
Group = tuple[int, int, int]


def shift_groups(channels: int, fold_div: int = 8, direction: Direction = "bi") -> tuple[Group, ...]:
    """The channel groups a shift moves and where each comes from (see the module docstring)."""
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


def _frames_view(x: Tensor, num_frames: int) -> Tensor:
    """``(N*T, C, ...)`` as ``(N, T, C, ...)``; a view for any memory format (the batch dim splits)."""
    if x.shape[0] % num_frames:
        raise ValueError(f"batch dim {x.shape[0]} is not a multiple of num_frames={num_frames}")
    return x.view(x.shape[0] // num_frames, num_frames, *x.shape[1:])


def _opposite(groups: Sequence[Group]) -> tuple[Group, ...]:
    return tuple((c0, c1, -off) for c0, c1, off in groups)


def _shift_inplace(x5: Tensor, groups: Sequence[Group]) -> list[Tensor]:
    """Shift ``x5`` (N, T, C, ...) in place; returns each group's frame pushed out of the clip.

    Frames move one at a time, in the order that never overwrites a frame still to be read, so
    nothing but the pushed-out frame is kept aside: the traffic is exactly the moved channels.
    """
    lost = []
    for c0, c1, off in groups:
        frames = _frames(x5, c0, c1, backwards=off < 0)
        lost.append(frames[0].clone())
        for dst, src in zip(frames, frames[1:]):
            dst.copy_(src)
        frames[-1].zero_()
    return lost


def _unshift_inplace(x5: Tensor, groups: Sequence[Group], lost: Sequence[Tensor]) -> None:
    """Undo :func:`_shift_inplace` exactly (pure copies, so bit-exact)."""
    for (c0, c1, off), frame in zip(groups, lost):
        frames = _frames(x5, c0, c1, backwards=off > 0)
        for dst, src in zip(frames, frames[1:]):
            dst.copy_(src)
        frames[-1].copy_(frame)


def _frames(x5: Tensor, c0: int, c1: int, backwards: bool) -> tuple[Tensor, ...]:
    frames = x5[:, :, c0:c1].unbind(1)
    return frames[::-1] if backwards else frames


def _shift_into(out5: Tensor, x5: Tensor, groups: Sequence[Group]) -> None:
    """Write shift(x5) into out5, every element once (no zero fill of moved data)."""
    moved_end = groups[-1][1]
    out5[:, :, moved_end:].copy_(x5[:, :, moved_end:])
    for c0, c1, off in groups:
        if off > 0:
            out5[:, :-1, c0:c1].copy_(x5[:, 1:, c0:c1])
            out5[:, -1, c0:c1].zero_()
        else:
            out5[:, 1:, c0:c1].copy_(x5[:, :-1, c0:c1])
            out5[:, 0, c0:c1].zero_()


class _ShiftFn(torch.autograd.Function):
    """Out-of-place shift; its backward is the opposite shift."""

    @staticmethod
    def forward(ctx, x: Tensor, num_frames: int, groups: tuple[Group, ...]) -> Tensor:  # type: ignore[override]
        ctx.num_frames, ctx.groups = num_frames, groups
        out = torch.empty_like(x)
        _shift_into(_frames_view(out, num_frames), _frames_view(x, num_frames), groups)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        out = torch.empty_like(grad)
        _shift_into(_frames_view(out, ctx.num_frames), _frames_view(grad, ctx.num_frames),
                    _opposite(ctx.groups))
        return out, None, None


def temporal_shift(x: Tensor, num_frames: int, fold_div: int = 8, direction: Direction = "bi") -> Tensor:
    """Shifted copy of ``x`` (N*T, C, ...); differentiable. ``x`` itself is left untouched."""
    return _ShiftFn.apply(x, num_frames, shift_groups(x.shape[1], fold_div, direction))


def _compute_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _shift_back_add_(g5: Tensor, direct5: Tensor | None, groups: Sequence[Group]) -> Tensor:
    """``g5 <- shift^T(g5) + direct5`` in place (``g5`` must be ours).

    ``g5`` is the gradient of ``shift(x)``, ``direct5`` the gradient x received on its identity
    path; their sum is x's gradient. Autograd would add the two anyway, so the move back rides
    along inside that sum, frame by frame, at no extra traffic.
    """
    back = _opposite(groups)
    if direct5 is None:
        _shift_inplace(g5, back)
        return g5
    moved_end = groups[-1][1]
    g5[:, :, moved_end:].add_(direct5[:, :, moved_end:])
    for c0, c1, off in back:
        # Walk time so that a frame is read before it is overwritten.
        frames, direct = _frames(g5, c0, c1, off < 0), _frames(direct5, c0, c1, off < 0)
        for dst, src, d in zip(frames, frames[1:], direct):
            torch.add(src, d, out=dst)
        frames[-1].copy_(direct[-1])
    return g5


def _weight_grad_1x1(grad_y: Tensor, x: Tensor, num_frames: int, groups: Sequence[Group],
                     weight_stride: Sequence[int]) -> Tensor:
    """Weight gradient of a 1x1 conv applied to ``shift(x)``, computed from the *unshifted* ``x``.

    Each channel group's columns correlate the output gradient at frame t with x at the frame the
    group was read from (t + offset): batched matmuls on views, so x is not moved again. The result
    (float32) has the weight's strides, so neither autograd nor DDP's bucket views copy it again.
    """
    t = num_frames
    g5 = grad_y.flatten(2).unflatten(0, (-1, t))  # (N, T, O, H*W), a view for NCHW and NHWC
    x5 = x.flatten(2).unflatten(0, (-1, t))  # (N, T, C, H*W)
    grad_w = torch.empty_strided((g5.shape[2], x5.shape[2], 1, 1), tuple(weight_stride), dtype=torch.float32,
                                 device=x.device)
    out = grad_w.view(g5.shape[2], x5.shape[2])  # size-1 dims dropped: a view for either layout
    moved_end = groups[-1][1]
    for c0, c1, off in ((moved_end, x5.shape[2], 0), *groups):
        if c0 == c1:
            continue
        gs = g5[:, max(0, -off):t - max(0, off)]
        xs = x5[:, max(0, off):t - max(0, -off), c0:c1].transpose(-1, -2)
        if off == 0:
            part = torch.bmm(gs.flatten(0, 1), xs.flatten(0, 1)).sum(0, dtype=torch.float32)
        else:  # the frame ranges differ, so the (N, T') batch is not one stride: one bmm per clip
            part = sum(torch.bmm(gs[n], xs[n]).sum(0, dtype=torch.float32) for n in range(gs.shape[0]))
        out[:, c0:c1] = part
    return grad_w


class _ShiftedConvFn(torch.autograd.Function):
    """``(conv(shift(x)), x)``: the shifted conv, and x itself for the identity path, so that x's
    gradient from both is summed in the backward's move-back pass. See the module docstring.

    ``x`` is moved through ``x.data``, so its autograd version does not change: the previous ReLU's
    saved output is bit-identical again before anyone reads it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, conv: tuple,  # type: ignore[override]
                num_frames: int, groups: tuple[Group, ...]) -> tuple[Tensor, Tensor]:
        stride, padding, dilation, conv_groups = conv
        dtype = _compute_dtype(x)
        w = weight.detach().to(dtype)
        b = None if bias is None else bias.detach().to(dtype)
        # Under autocast the conv may run in another dtype than x: the cast is a copy anyway, so
        # shift while casting and keep that copy (x is then never touched).
        private = x.dtype != dtype
        if private:
            xs = torch.empty_like(x, dtype=dtype)
            _shift_into(_frames_view(xs, num_frames), _frames_view(x.detach(), num_frames), groups)
        else:
            xs = x.data
            lost = _shift_inplace(_frames_view(xs, num_frames), groups)
        with torch.autocast(x.device.type, enabled=False):
            y = F.conv2d(xs, w, b, stride, padding, dilation, conv_groups)
        if not private:
            _unshift_inplace(_frames_view(xs, num_frames), groups, lost)
        ctx.conv, ctx.num_frames, ctx.groups, ctx.private = conv, num_frames, groups, private
        ctx.x_dtype, ctx.w_dtype, ctx.has_bias = x.dtype, weight.dtype, bias is not None
        ctx.w_stride = weight.stride()
        ctx.save_for_backward(xs if private else x, w)
        return y, x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor, grad_identity: Tensor | None):  # type: ignore[override]
        saved, w = ctx.saved_tensors
        stride, padding, dilation, conv_groups = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_y = grad_y.to(w.dtype)
        xs = saved if ctx.private else saved.data
        x5 = _frames_view(xs, ctx.num_frames)
        conv_backward = (grad_y, xs, w, None, list(stride), list(padding), list(dilation), False, [0, 0],
                         conv_groups)
        # For a 1x1 conv the weight gradient can read x unshifted, at frame offsets (matmuls that
        # materialise one (out, in) product per frame: worth it while that is smaller than a frame,
        # H*W >= out channels, i.e. in the large early stages, where moving x costs the most).
        by_matmul = (not ctx.private and need_w and w.shape[2:] == (1, 1) and stride == (1, 1)
                     and padding == (0, 0) and conv_groups == 1 and xs[0, 0].numel() >= w.shape[0])
        if by_matmul:
            grad_x = torch.ops.aten.convolution_backward(*conv_backward, [need_x, False, False])[0]
            grad_w = _weight_grad_1x1(grad_y, xs, ctx.num_frames, ctx.groups, ctx.w_stride)
        else:
            # Otherwise the weight gradient needs shift(x) itself: shift x again and undo it.
            lost = None if ctx.private or not need_w else _shift_inplace(x5, ctx.groups)
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(*conv_backward, [need_x, need_w, False])
            if lost is not None:
                _unshift_inplace(x5, ctx.groups, lost)
        if grad_x is not None:
            direct = None if grad_identity is None else _frames_view(grad_identity, ctx.num_frames)
            # convolution_backward's result is fresh: ours to move and add into.
            grad_x = _shift_back_add_(_frames_view(grad_x.to(ctx.x_dtype), ctx.num_frames), direct,
                                      ctx.groups).flatten(0, 1)
        elif grad_identity is not None:
            grad_x = grad_identity
        grad_b = grad_y.sum((0, 2, 3)).to(ctx.w_dtype) if need_b and ctx.has_bias else None
        grad_w = None if grad_w is None else _with_strides(grad_w, ctx.w_dtype, ctx.w_stride)
        return (grad_x, grad_w, grad_b, None, None, None)


def _with_strides(grad: Tensor, dtype: torch.dtype, stride: Sequence[int]) -> Tensor:
    """``grad`` in ``dtype`` with exactly ``stride`` (the parameter's): a channels-last weight must get a
    channels-last gradient (DDP warns "Grad strides do not match bucket view strides" and copies otherwise;
    a 1x1 weight's strides differ between layouts only in its size-1 dims, which autograd ignores)."""
    if grad.dtype == dtype and grad.stride() == tuple(stride):
        return grad
    return torch.empty_strided(grad.shape, tuple(stride), dtype=dtype, device=grad.device).copy_(grad)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def shifted_conv2d_and_identity(x: Tensor, weight: Tensor, bias: Tensor | None, num_frames: int,
                                groups: tuple[Group, ...], stride: int | Sequence[int] = 1,
                                padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
                                conv_groups: int = 1) -> tuple[Tensor, Tensor]:
    """``(conv2d(shift(x), weight, bias, ...), x)``, moving only the shifted channels of ``x``.

    ``x`` is left bit-identical. Use the returned ``x`` for the residual identity path: its
    gradient is then summed with the shifted path's in the same pass that moves the latter back.
    """
    conv = (_pair(stride), _pair(padding), _pair(dilation), conv_groups)
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _ShiftedConvFn.apply(x, weight, bias, conv, num_frames, groups)
    x5 = _frames_view(x.data, num_frames)
    lost = _shift_inplace(x5, groups)
    try:
        return F.conv2d(x, weight, bias, *conv), x
    finally:
        _unshift_inplace(x5, groups, lost)


def shifted_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, num_frames: int,
                   groups: tuple[Group, ...], stride: int | Sequence[int] = 1,
                   padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
                   conv_groups: int = 1) -> Tensor:
    """``conv2d(shift(x), weight, bias, ...)``; see :func:`shifted_conv2d_and_identity`."""
    return shifted_conv2d_and_identity(x, weight, bias, num_frames, groups, stride, padding, dilation,
                                       conv_groups)[0]


def shifted_conv(x: Tensor, conv: nn.Conv2d, num_frames: int, groups: tuple[Group, ...]) -> tuple[Tensor, Tensor]:
    """``(conv(shift(x)), x)`` for a Conv2d module (see :func:`shifted_conv2d_and_identity`)."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError("shifted_conv needs a Conv2d with numeric zero padding")
    return shifted_conv2d_and_identity(x, conv.weight, conv.bias, num_frames, groups, conv.stride,
                                       conv.padding, conv.dilation, conv.groups)


class TemporalShift(nn.Module):
    """A shift point of the network: no parameters, knows its clip length, fold and direction.

    In streaming mode (used by :class:`tsm_dist.models.online.OnlineTSM`, uni-directional only) every
    call is one time step of the batch, ``(N, C, H, W)``: the moved channels come from a cache of the
    previous step and the current ones are cached for the next, so no frame is ever recomputed.
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
        self.streaming = False
        self._cache: Tensor | None = None

    def extra_repr(self) -> str:
        return f"num_frames={self.num_frames}, fold_div={self.fold_div}, direction={self.direction}"

    def groups(self, channels: int) -> tuple[Group, ...]:
        return shift_groups(channels, self.fold_div, self.direction)

    def forward(self, x: Tensor) -> Tensor:
        """``shift(x)`` as a new tensor (the in-place placement, where it replaces the block input)."""
        if self.streaming:
            fold = self.groups(x.shape[1])[0][1]
            out = x.clone()
            out[:, :fold] = self._swap_cache(x[:, :fold].clone())
            return out
        return _ShiftFn.apply(x, self.num_frames, self.groups(x.shape[1]))

    def conv(self, x: Tensor, conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
        """``(conv(shift(x)), x)`` leaving ``x`` intact (the residual placement); use the returned
        ``x`` as the block's identity (see :func:`shifted_conv2d_and_identity`)."""
        if not self.streaming:
            return shifted_conv(x, conv, self.num_frames, self.groups(x.shape[1]))
        if torch.is_grad_enabled():
            return conv(self.forward(x)), x
        fold = self.groups(x.shape[1])[0][1]
        xd = x.data
        current = xd[:, :fold].clone()
        xd[:, :fold] = self._swap_cache(current)
        try:
            return conv(x), x
        finally:
            xd[:, :fold] = current

    # -- streaming -------------------------------------------------------------------------------
    def start_stream(self) -> None:
        if self.direction != "uni":
            raise ValueError("streaming needs a uni-directional shift (build the model with online=True)")
        self.streaming, self._cache = True, None

    def stop_stream(self) -> None:
        self.streaming, self._cache = False, None

    def cache_nbytes(self) -> int:
        return 0 if self._cache is None else self._cache.numel() * self._cache.element_size()

    def _swap_cache(self, current: Tensor) -> Tensor:
        """Return the previous step's channels (zeros at the first step); keep ``current`` (owned)."""
        previous = torch.zeros_like(current) if self._cache is None else self._cache
        if previous.shape != current.shape:
            raise ValueError(f"stream changed shape from {tuple(previous.shape)} to {tuple(current.shape)};"
                             " reset the stream before feeding another one")
        self._cache = current
        return previous

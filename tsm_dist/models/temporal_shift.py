"""The Temporal Shift Module (Sections 3-4): move a fraction of the channels one frame along time.

Frames of a clip travel through the 2D backbone folded into the batch, ``(N*T, C, H, W)``. A shift
moves channel groups by one frame; what is shifted out of the clip is dropped and the vacated frame
is zero, exactly as in the paper (and the reference implementation):

* bi-directional (offline): channels ``[0, C/d)`` take frame ``t+1``, ``[C/d, 2C/d)`` take ``t-1``;
* uni-directional (online): channels ``[0, C/d)`` take frame ``t-1`` only, so frame ``t`` never sees
  the future and a streaming model can cache those channels between frames.

Cost. The shift computes nothing, but moving data is not free: the reference implementation
allocates a zero tensor and copies every channel, which on a CPU costs about as much memory traffic
as the 1x1 convolution that follows. Here the residual shift is fused with that convolution
(:func:`shifted_conv2d_and_identity`) and only the moved 2/d of the channels are touched:

* forward: the moved channels of the block input are shifted in place, frame by frame, the conv
  runs, and the move is undone bit-exactly (the identity path and the previous ReLU's backward still
  need the original input);
* backward: the weight gradient of a 1x1 conv is computed from the unshifted input by matmuls at
  frame offsets, so the input is not moved again; the input gradient is moved back inside the sum
  with the identity path's gradient, which autograd would do anyway.

So a step moves the shifted channels twice and allocates nothing of activation size. Small tensors
on a CPU take an out-of-place copy instead (a few large ops beat two small ops per frame there).
"""
from __future__ import annotations

import weakref
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


def _add_unshifted_(out5: Tensor, xs5: Tensor, groups: Sequence[Group], lost: Sequence[Tensor]) -> None:
    """``out5 += x`` where ``xs5`` holds ``shift(x)`` and ``lost`` the frames it pushed out: the
    moved channels are read at the frame they came from, so x need not be restored first."""
    moved_end = groups[-1][1]
    out5[:, :, moved_end:].add_(xs5[:, :, moved_end:])
    for (c0, c1, off), frame in zip(groups, lost):
        # xs[t] = x[t + off], hence x[t] = xs[t - off]; the frame at the far end was pushed out.
        if off > 0:
            out5[:, 1:, c0:c1].add_(xs5[:, :-1, c0:c1])
            out5[:, 0, c0:c1].add_(frame)
        else:
            out5[:, :-1, c0:c1].add_(xs5[:, 1:, c0:c1])
            out5[:, -1, c0:c1].add_(frame)


class PendingShift:
    """A residual block's input, left shifted in place from the block's forward to its backward.

    Keeping it shifted saves moving it back and forth around every use: the shifted conv reads it
    as is (forward and weight gradient), the identity add reads the moved channels where they now
    sit, and the backward restores it (bit-exactly) before the previous layer's backward, the only
    other reader, can run. Until then the tensor holds ``shift(x)``: a TSM block must be the only
    reader of its input (true inside VideoResNet, whose block inputs are internal).
    """

    __slots__ = ("x5", "groups", "lost", "shifted", "identity_grad", "__weakref__")

    def __init__(self, x5: Tensor, groups: tuple[Group, ...]) -> None:
        self.x5, self.groups = x5, groups
        self.lost: list[Tensor] = []
        self.shifted = False
        self.identity_grad: Tensor | None = None

    def shift(self) -> None:
        self.lost, self.shifted = _shift_inplace(self.x5, self.groups), True
        _PENDING.add(self)

    def restore(self) -> None:
        _unshift_inplace(self.x5, self.groups, self.lost)
        self.lost, self.shifted = [], False
        _PENDING.discard(self)

    def __del__(self) -> None:
        # The graph was dropped without a backward (e.g. a forward in grad mode for evaluation):
        # put x back all the same.
        if self.shifted:
            self.restore()


# Inputs currently left shifted; entries vanish with their autograd graph.
_PENDING: "weakref.WeakSet[PendingShift]" = weakref.WeakSet()


def _check_not_pending(x: Tensor) -> None:
    ptr = x.data_ptr()
    if any(p.shifted and p.x5.data_ptr() == ptr for p in list(_PENDING)):
        raise RuntimeError("this tensor is a TSM block input still shifted in place, waiting for the "
                           "block's backward; running a block on it again before that (e.g. activation "
                           "checkpointing inside TSM blocks) is not supported")


class _ResidualShiftFn(torch.autograd.Function):
    """``conv1(shift(x))`` and, for a downsampling block, ``downsample(x)``; leaves x shifted.

    The downsample conv runs here, before the shift, so that its backward also runs here, after x
    is restored, whatever order autograd would pick for two consumers of x.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor | None, w_ds: Tensor | None,  # type: ignore[override]
                conv1: tuple, ds: tuple, pending: PendingShift):
        dtype = x.dtype  # callers route autocast casts elsewhere: the conv runs in x's dtype
        w1c = w1.detach().to(dtype)
        b1c = None if b1 is None else b1.detach().to(dtype)
        w_dsc = None if w_ds is None else w_ds.detach().to(dtype)
        xd = x.data
        with torch.autocast(x.device.type, enabled=False):
            ds_out = None if w_dsc is None else F.conv2d(xd, w_dsc, None, *ds)
            pending.shift()
            y = F.conv2d(xd, w1c, b1c, *conv1)
        ctx.conv1, ctx.ds, ctx.pending = conv1, ds, pending
        ctx.dtypes = (w1.dtype, None if b1 is None else b1.dtype, None if w_ds is None else w_ds.dtype)
        ctx.save_for_backward(x, w1c, w_dsc)
        return y if ds_out is None else (y, ds_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor, grad_ds: Tensor | None = None):  # type: ignore[override]
        x, w1, w_ds = ctx.saved_tensors
        pending: PendingShift = ctx.pending
        need_x, need_w1, need_b1, need_ds = ctx.needs_input_grad[:4]
        xd = x.data
        if not pending.shifted:  # a second backward through a retained graph
            pending.shift()
        grad_y = grad_y.to(w1.dtype)
        grad_x, grad_w1, _ = torch.ops.aten.convolution_backward(
            grad_y, xd, w1, None, *_conv_lists(ctx.conv1), [need_x, need_w1, False])
        pending.restore()
        direct = None
        grad_w_ds = None
        if w_ds is not None:
            direct, grad_w_ds, _ = torch.ops.aten.convolution_backward(
                grad_ds.to(w_ds.dtype), xd, w_ds, None, *_conv_lists(ctx.ds), [need_x, need_ds, False])
        else:
            direct, pending.identity_grad = pending.identity_grad, None
        if need_x:
            frames = pending.x5.shape[1]
            direct5 = None if direct is None else _frames_view(direct, frames)
            # convolution_backward's result is fresh, so it is ours to move and add into.
            grad_x = _shift_back_add_(_frames_view(grad_x, frames), direct5, pending.groups).flatten(0, 1)
        w1_dtype, b1_dtype, ds_dtype = ctx.dtypes
        grad_b1 = grad_y.sum((0, 2, 3)).to(b1_dtype) if need_b1 and b1_dtype is not None else None
        return (grad_x, None if grad_w1 is None else grad_w1.to(w1_dtype), grad_b1,
                None if grad_w_ds is None else grad_w_ds.to(ds_dtype), None, None, None)


class _AddUnshiftedFn(torch.autograd.Function):
    """``out += x`` for a pending (still shifted) block input; x's gradient goes to the shift's
    backward, which sums it with the shifted path's gradient in the same pass."""

    @staticmethod
    def forward(ctx, out: Tensor, pending: PendingShift) -> Tensor:  # type: ignore[override]
        out5 = _frames_view(out, pending.x5.shape[1])
        if pending.shifted:
            _add_unshifted_(out5, pending.x5, pending.groups, pending.lost)
        else:
            out5.add_(pending.x5)
        ctx.mark_dirty(out)
        ctx.pending = pending
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        ctx.pending.identity_grad = grad
        return grad, None


def _conv_args(conv: nn.Conv2d) -> tuple:
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError("a shifted conv needs numeric zero padding")
    return (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)


def _conv_lists(args: tuple) -> tuple:
    """F.conv2d's (stride, padding, dilation, groups) as convolution_backward's arguments."""
    stride, padding, dilation, groups = args
    return list(stride), list(padding), list(dilation), False, [0, 0], groups


def residual_shift(x: Tensor, conv1: nn.Conv2d, downsample: nn.Conv2d | None, num_frames: int,
                   groups: tuple[Group, ...]) -> tuple[Tensor, Tensor | None, PendingShift]:
    """``(conv1(shift(x)), downsample(x) or None, pending)`` for training, moving only the shifted
    channels; finish the block with :func:`add_unshifted` (when there is no downsample).

    ``x`` is left shifted until the backward restores it (see :class:`PendingShift`).
    """
    _check_not_pending(x)
    pending = PendingShift(_frames_view(x.data, num_frames), groups)
    ds_args = (None, None) if downsample is None else (downsample.weight, _conv_args(downsample))
    out = _ResidualShiftFn.apply(x, conv1.weight, conv1.bias, ds_args[0], _conv_args(conv1), ds_args[1],
                                 pending)
    y, ds_out = (out, None) if downsample is None else out
    return y, ds_out, pending


def add_unshifted(out: Tensor, pending: PendingShift) -> Tensor:
    """``out += x`` (in place) for the input x of a pending :func:`residual_shift`."""
    return _AddUnshiftedFn.apply(out, pending)


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

    def residual(self, x: Tensor, conv1: nn.Conv2d, downsample: nn.Conv2d | None = None
                 ) -> tuple[Tensor, Tensor | None, PendingShift | None]:
        """The residual placement: ``(conv1(shift(x)), downsample(x) or None, pending)``; finish the
        block with :meth:`add_identity`. Only the shifted channels of ``x`` are moved."""
        params = [p for m in (conv1, downsample) if m is not None for p in m.parameters()]
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        if needs_grad and not self.streaming and _compute_dtype(x) == x.dtype:
            return residual_shift(x, conv1, downsample, self.num_frames, self.groups(x.shape[1]))
        ds = None if downsample is None else downsample(x)  # before any move of x
        if self.streaming:
            return self._stream_conv(x, conv1, needs_grad), ds, None
        if needs_grad:  # autocast will cast x for the conv anyway: shift while copying
            return conv1(self(x)), ds, None
        groups = self.groups(x.shape[1])
        x5 = _frames_view(x.data, self.num_frames)
        lost = _shift_inplace(x5, groups)
        try:
            return conv1(x), ds, None
        finally:
            _unshift_inplace(x5, groups, lost)

    @staticmethod
    def add_identity(out: Tensor, x: Tensor, pending: PendingShift | None) -> Tensor:
        """``out += x`` with x the block input given to :meth:`residual` (maybe still shifted)."""
        if pending is None:
            out += x
            return out
        return add_unshifted(out, pending)

    def _stream_conv(self, x: Tensor, conv: nn.Conv2d, needs_grad: bool) -> Tensor:
        if needs_grad:
            return conv(self(x))
        fold = self.groups(x.shape[1])[0][1]
        xd = x.data
        current = xd[:, :fold].clone()
        xd[:, :fold] = self._swap_cache(current)
        try:
            return conv(x)
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

"""Fused temporal-shift kernels: the shift of :mod:`tsm_dist.models.temporal_shift`, made cheap.

The reference shift allocates a zero tensor and copies every channel, which costs about as much
memory traffic as the 1x1 convolution that follows. Here the residual shift is fused with that
convolution (:func:`shifted_conv2d_and_identity`) and only the moved 2/d of the channels are touched:

* forward: the moved channels of the block input are set aside (one copy into a buffer that has a
  zero frame beside each group), shifted in place (one copy from a strided view of that buffer), the
  conv runs, and they are copied back bit-exactly, because the identity path and the previous ReLU's
  backward still need the original input;
* backward: the weight gradient needs shift(x). For a 1x1 conv whose per-frame products are no
  larger than a frame (H*W >= out channels: the big early stages) it is read from the unshifted x
  by one batched matmul per channel group at that group's frame offset (:func:`_weight_grad_1x1`),
  so x is not moved again; otherwise the same three copies run around ``convolution_backward``.
  The input gradient is moved back inside the sum with the identity path's gradient, which
  autograd would compute anyway (one add for the moved channels, one for the rest).

Every kernel moves whole (clip, frame, group) ranges through ``as_strided`` views, so a shifted
layer dispatches the same ops for any batch and clip length, fewer than the reference shift's (a GPU
launches no more kernels for a larger batch; ``tests/models/test_shift.py`` counts them). The only
temporary is the moved channels (2/d of the activation, plus one frame), freed when the layer
returns; the input is bit-identical whenever a kernel returns. Three cases shift while copying instead
(the copy is kept for the backward, whose weight gradient then reads it): a conv that autocast runs in
another dtype (the cast copies anyway), and, on a CPU, channels-last tensors with so few channels that
their moved channels are runs too short to move fast in place (:func:`_short_runs`), and small tensors
(:func:`_shifts_while_copying`), whose cost is ops and Python rather than bytes: there the forward is one
whole copy, a copy per group and one zero fill, and the backward's move-back is one whole add (the sum
autograd makes anyway), an add per group and one copy. The views of every path come from a per-layout cache
(:func:`_layout`), so a call computes no strides in Python.

A CPU training step runs without Python when the shift's C++ ops are built (:mod:`tsm_dist.models.shift_native`,
by ./install.sh; :func:`_runs_native`): one op that shifts x in place around the conv and restores it (the frames
pushed out of each clip kept aside), shifts it again around ``convolution_backward`` for the weight gradient, and
moves the input gradient back in place with the identity's added, so no layer input is copied at all. There the
Python kernels above run only on GPUs, under autocast, for non-dense inputs, or when the library is not built.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

import tsm_dist.models.shift_native as shift_native

# (first channel, end channel, offset): frame t of those channels takes frame t + offset. The groups of
# one shift are adjacent and start at channel 0 (see temporal_shift.shift_groups).
Group = tuple[int, int, int]
# On a CPU, layer inputs up to this many elements are shifted while copying (see _shifts_while_copying).
SMALL_NUMEL = 1 << 18  # 1 MB of float32: every shifted layer of the demo-sized models, none of R50 at 224²


def check_frames(x: Tensor, num_frames: int) -> None:
    """``x`` must be ``(N*T, C, ...)``: whole clips of ``num_frames`` frames folded into the batch."""
    if x.shape[0] % num_frames:
        raise ValueError(f"batch dim {x.shape[0]} is not a multiple of num_frames={num_frames}")


def _opposite(groups: Sequence[Group]) -> tuple[Group, ...]:
    return tuple((c0, c1, -off) for c0, c1, off in groups)


def _moved_end(groups: Sequence[Group]) -> int:
    return groups[-1][1]


def _fold(groups: Sequence[Group]) -> int:
    """The channels per group; the kernels take adjacent, equal groups from channel 0 (at most two)."""
    fold = groups[0][1]
    if len(groups) > 2 or any((c0, c1) != (g * fold, (g + 1) * fold) for g, (c0, c1, _) in enumerate(groups)):
        raise ValueError(f"shift groups {groups} are not adjacent equal groups from channel 0")
    return fold


# An as_strided view: (size, stride, offset from the tensor's own storage offset).
Spec = tuple[tuple[int, ...], tuple[int, ...], int]


def _frames_spec(shape: Sequence[int], s: Sequence[int], num_frames: int, frames: tuple[int, int],
                 channels: tuple[int, int]) -> Spec:
    (t0, t1), (c0, c1) = frames, channels
    return (shape[0] // num_frames, t1 - t0, c1 - c0, *shape[2:]), (num_frames * s[0], *s), t0 * s[0] + c0 * s[1]


def _frames_slice(x: Tensor, num_frames: int, frames: tuple[int, int], channels: tuple[int, int]) -> Tensor:
    """``x5[:, t0:t1, c0:c1]`` of ``x`` (N*T, C, ...) as one view op (index chains dispatch one per dim)."""
    return _view(x, _frames_spec(x.shape, x.stride(), num_frames, frames, channels))


def _view(x: Tensor, spec: Spec) -> Tensor:
    return x.as_strided(spec[0], spec[1], x.storage_offset() + spec[2])


def _merge(specs: Sequence[Spec]) -> tuple[Spec, ...]:
    """Equal-sized views as one view with a leading dim over them, where their offsets allow a positive
    stride (they never overlap: each is another group's frame); otherwise the views themselves."""
    if len(specs) != 2 or specs[0][0] != specs[1][0]:
        return tuple(specs)
    first, second = sorted(specs, key=lambda v: v[2])
    if second[2] == first[2]:
        return tuple(specs)
    return (((2, *first[0]), (second[2] - first[2], *first[1]), first[2]),)


class _Layout(NamedTuple):
    """Where a shift moves data in a tensor of one shape and strides: per group the frames that take
    data (``takes``) and the frames they take it from (``gives``), and the vacated frames (``vacated``,
    merged into one view where possible). Computed once per layout (:func:`_layout`), so a call only
    dispatches the views and the copies."""

    takes: tuple[Spec, ...]
    gives: tuple[Spec, ...]
    vacated: tuple[Spec, ...]


@functools.lru_cache(maxsize=512)
def _layout(shape: tuple[int, ...], stride: tuple[int, ...], num_frames: int, groups: tuple[Group, ...]) -> _Layout:
    t = num_frames
    takes, gives, vacated = [], [], []
    for c0, c1, off in groups:
        src, dst = ((1, t), (0, t - 1)) if off > 0 else ((0, t - 1), (1, t))
        takes.append(_frames_spec(shape, stride, t, dst, (c0, c1)))
        gives.append(_frames_spec(shape, stride, t, src, (c0, c1)))
        v = t - 1 if off > 0 else 0
        vacated.append(_frames_spec(shape, stride, t, (v, v + 1), (c0, c1)))
    return _Layout(tuple(takes), tuple(gives), _merge(vacated))


def _layout_of(x: Tensor, num_frames: int, groups: tuple[Group, ...]) -> _Layout:
    return _layout(tuple(x.shape), x.stride(), num_frames, groups)


def _moved_view(x: Tensor, num_frames: int, groups: Sequence[Group]) -> Tensor:
    """The moved channels of ``x`` (N*T, C, ...) as (N, T, G, fold, ...), one view op."""
    fold, s = _fold(groups), x.stride()
    return x.as_strided((x.shape[0] // num_frames, num_frames, len(groups), fold, *x.shape[2:]),
                        (num_frames * s[0], s[0], fold * s[1], *s[1:]), x.storage_offset())


class _PaddedMoved:
    """The moved channels of a tensor kept aside, each group with a zero frame where it shifts in from.

    Buffer (G, N, T+1, fold, ...), inner dims in the tensor's memory order (a channels-last tensor is
    kept channels-last, so copies run at memory speed). A group that takes frame t+1 stores frames
    0..T-1 and a zero at T; one that takes t-1 a zero at 0 and frames 0..T-1 after it. Then
    ``shifted()`` is one strided view of the buffer for every group and clip: the shift, its vacated
    frames included, is a single copy, and the original values stay here for the way back.
    """

    def __init__(self, x: Tensor, num_frames: int, groups: Sequence[Group]) -> None:
        t, self.offsets, self.stored_frames = num_frames, [off for _, _, off in groups], num_frames
        self.view = _moved_view(x, t, groups)  # where the moved channels live in x (moves go through it)
        inner = sorted(range(1, x.dim()), key=lambda d: -x.stride(d))
        self.inner_shape = (_fold(groups), *x.shape[2:])
        stride, step = {}, 1
        for d in reversed(inner):
            stride[d], step = step, step * self.inner_shape[d - 1]
        self.inner_stride = tuple(stride[d] for d in range(1, x.dim()))
        self.frame, self.clips = step, x.shape[0] // t
        self.buffer = x.new_empty(len(groups) * self.clips * (t + 1) * step)
        self._view([t if off > 0 else 0 for off in self.offsets], None).zero_()
        self.stored = self._view([0 if off > 0 else 1 for off in self.offsets], t)
        self.stored.copy_(self.view)

    def _view(self, starts: list[int], frames: int | None) -> Tensor:
        """(N, frames, G, fold, ...) from buffer frame ``starts[g]`` of group g; without ``frames``,
        the single frame ``starts[g]`` as (N, G, fold, ...)."""
        clip = (self.stored_frames + 1) * self.frame
        group = self.clips * clip + (starts[-1] - starts[0]) * self.frame
        lead, lead_stride = ((), ()) if frames is None else ((frames,), (self.frame,))
        return self.buffer.as_strided((self.clips, *lead, len(starts), *self.inner_shape),
                                      (clip, *lead_stride, group, *self.inner_stride), starts[0] * self.frame)

    def shifted(self) -> Tensor:
        """(N, T, G, fold, ...): frame t of group g is the original frame t + offset (zero outside)."""
        return self._view([1 if off > 0 else 0 for off in self.offsets], self.stored_frames)


def _short_runs(x: Tensor, groups: Sequence[Group]) -> bool:
    """Whether the moved channels of ``x`` lie in runs too short to move fast: channels-last keeps a
    pixel's channels together, so its moved channels are one run of ``moved_end`` values per pixel, and a
    strided copy pays per run (a 16-channel layer: 4 floats). Then a whole copy of x, which runs at memory
    speed, plus one pass over the moved channels is cheaper than moving them in place (docs/models.md).
    A CPU measurement: on a GPU the copy would only cost memory, so GPUs keep moving in place."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1
            and _moved_end(groups) * x.element_size() < 64)


def _shifts_while_copying(x: Tensor, groups: Sequence[Group]) -> bool:
    """Whether the conv reads a shifted copy of ``x`` (kept for the backward) instead of x shifted in place:
    on a CPU for short runs (above) and for small tensors (at most ``SMALL_NUMEL`` elements), where a layer's
    cost is its op count and Python, not its bytes: the copy path dispatches fewer ops both ways (docs/models.md)
    and its extra memory, one copy of the layer input, is small. GPUs keep moving in place (memory)."""
    return x.device.type == "cpu" and (x.numel() <= SMALL_NUMEL or _short_runs(x, groups))


def _shift_into(out: Tensor, x: Tensor, num_frames: int, groups: tuple[Group, ...]) -> None:
    """Write shift(x) into out (both (N*T, C, ...)): one copy of the channels that stay, or of the whole
    tensor when both have the same strides and it is channels-last (the staying channels are then short
    runs, slower than one contiguous copy) or small (one op instead of a strided one); then a copy per group
    into the frames it fills and one zero fill of the frames the groups vacate."""
    lo = _layout_of(out, num_frames, groups)
    lx = lo if x.stride() == out.stride() else _layout_of(x, num_frames, groups)
    moved_end = _moved_end(groups)
    if lx is lo and (x.stride(1) == 1 or x.numel() <= SMALL_NUMEL):
        out.copy_(x)
    else:
        out.narrow(1, moved_end, x.shape[1] - moved_end).copy_(x.narrow(1, moved_end, x.shape[1] - moved_end))
    for take, give in zip(lo.takes, lx.gives):
        _view(out, take).copy_(_view(x, give))
    for vacated in lo.vacated:
        _view(out, vacated).zero_()


def _shift_inplace(x: Tensor, num_frames: int, groups: Sequence[Group]) -> _PaddedMoved:
    """Shift ``x`` (N*T, C, ...) in place; returns what :func:`_unshift_inplace` needs to undo it."""
    moved = _PaddedMoved(x, num_frames, groups)
    moved.view.copy_(moved.shifted())
    return moved


def _unshift_inplace(moved: _PaddedMoved) -> None:
    """Undo :func:`_shift_inplace` exactly (a pure copy, so bit-exact)."""
    moved.view.copy_(moved.stored)


class _ShiftFn(torch.autograd.Function):
    """Out-of-place shift; its backward is the opposite shift."""

    @staticmethod
    def forward(ctx, x: Tensor, num_frames: int, groups: tuple[Group, ...]) -> Tensor:  # type: ignore[override]
        ctx.num_frames, ctx.groups = num_frames, groups
        check_frames(x, num_frames)
        out = torch.empty_like(x)
        _shift_into(out, x, num_frames, groups)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        out = torch.empty_like(grad)
        _shift_into(out, grad, ctx.num_frames, _opposite(ctx.groups))
        return out, None, None


def shift_copy(x: Tensor, num_frames: int, groups: tuple[Group, ...]) -> Tensor:
    """Shifted copy of ``x`` (N*T, C, ...), every element written once; differentiable."""
    return _ShiftFn.apply(x, num_frames, groups)


def _shift_back_add_(grad: Tensor, direct: Tensor | None, num_frames: int, groups: tuple[Group, ...]) -> Tensor:
    """``shift^T(grad) + direct``, in place in ``grad`` (N*T, C, ...) when that pays (``grad`` must be ours).

    ``grad`` is the gradient of ``shift(x)``, ``direct`` the gradient x received on its identity
    path; their sum is x's gradient. Autograd would add the two anyway, so the move back rides
    along inside that sum: one add for the moved channels, one for the others.
    """
    back = _opposite(groups)
    if _shifts_while_copying(grad, back):
        return _shift_back_add_copying(grad, direct, num_frames, back)
    if direct is None:
        _shift_inplace(grad, num_frames, back)
        return grad
    moved = _PaddedMoved(grad, num_frames, back)
    torch.add(moved.shifted(), _moved_view(direct, num_frames, back), out=moved.view)
    rest, end = grad.shape[1] - _moved_end(groups), _moved_end(groups)
    grad.narrow(1, end, rest).add_(direct.narrow(1, end, rest))
    return grad


def _shift_back_add_copying(grad: Tensor, direct: Tensor | None, num_frames: int, back: tuple[Group, ...]) -> Tensor:
    """``back(grad) + direct`` into a new tensor: the whole sum (which autograd would make anyway), then the
    moved groups' frames summed again from where they come from, and the vacated frames set to ``direct``'s:
    whole-tensor ops run at memory speed, and there are four of them."""
    if direct is None:
        out = torch.empty_like(grad)
        _shift_into(out, grad, num_frames, back)
        return out
    out = torch.add(grad, direct)
    lo, lg, ld = (_layout_of(t, num_frames, back) for t in (out, grad, direct))
    for take_out, take_direct, give in zip(lo.takes, ld.takes, lg.gives):
        torch.add(_view(direct, take_direct), _view(grad, give), out=_view(out, take_out))
    for vacated_out, vacated_direct in zip(lo.vacated, ld.vacated):
        _view(out, vacated_out).copy_(_view(direct, vacated_direct))
    return out


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
        device = x.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        # Under autocast the conv may run in another dtype than x: the cast is a copy anyway, so
        # shift while casting and keep that copy (x is then never touched). Moved channels in short runs
        # (channels-last, few channels) are shifted while copying too: the backward then reads that copy.
        private = x.dtype != dtype or _shifts_while_copying(x, groups)
        if private:
            xs = torch.empty_like(x, dtype=dtype)
            _shift_into(xs, x, num_frames, groups)
        else:
            xs = x.data
            moved = _shift_inplace(xs, num_frames, groups)
        if autocast:  # the conv runs in dtype, as the shift does
            with torch.autocast(device, enabled=False):
                y = F.conv2d(xs, w, b, stride, padding, dilation, conv_groups)
        else:
            y = F.conv2d(xs, w, b, stride, padding, dilation, conv_groups)
        if not private:
            _unshift_inplace(moved)
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
        conv_backward = (grad_y, saved, w, None, list(stride), list(padding), list(dilation), False, [0, 0],
                         conv_groups)
        if need_w and not ctx.private and _weight_grad_by_matmul(saved, grad_y, w, ctx.conv):
            grad_x = torch.ops.aten.convolution_backward(*conv_backward, [True, False, False])[0] if need_x else None
            grad_w = _weight_grad_1x1(grad_y, saved, ctx.num_frames, ctx.groups, ctx.w_stride)
        elif need_w and not ctx.private:
            # The weight gradient needs shift(x) itself: shift x again (through .data, see above) and undo it.
            moved = _shift_inplace(saved.data, ctx.num_frames, ctx.groups)
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(*conv_backward, [need_x, True, False])
            _unshift_inplace(moved)
        else:
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(*conv_backward, [need_x, need_w, False])
        if grad_x is not None:
            # convolution_backward's result is fresh: ours to move and add into.
            grad_x = _shift_back_add_(grad_x.to(ctx.x_dtype), grad_identity, ctx.num_frames, ctx.groups)
        elif grad_identity is not None:
            grad_x = grad_identity
        grad_b = grad_y.sum((0, 2, 3)).to(ctx.w_dtype) if need_b and ctx.has_bias else None
        grad_w = None if grad_w is None else _with_strides(grad_w, ctx.w_dtype, ctx.w_stride)
        return (grad_x, grad_w, grad_b, None, None, None)


def _merges_hw(t: Tensor) -> bool:
    """Whether ``t`` (N, C, H, W) can be seen as (N, C, H*W) by strides alone (NCHW and channels-last can)."""
    return t.shape[3] == 1 or t.stride(2) == t.shape[3] * t.stride(3)


def _weight_grad_by_matmul(x: Tensor, grad_y: Tensor, w: Tensor, conv: tuple) -> bool:
    """A plain 1x1 conv whose per-frame (out, in) products are no larger than a frame of its output
    gradient (H*W >= out channels: the large early stages, where moving x costs the most)."""
    stride, padding, dilation, conv_groups = conv
    return (w.shape[2:] == (1, 1) and stride == (1, 1) and padding == (0, 0) and conv_groups == 1
            and x.shape[2] * x.shape[3] >= w.shape[0] and _merges_hw(x) and _merges_hw(grad_y))


def _frame_matrices(t: Tensor, first: int, frames: int, channels: tuple[int, int], transpose: bool = False) -> Tensor:
    """Frames ``first .. first+frames-1`` of ``t`` (N*T, C, H, W), channels ``c0:c1``, as a batch of
    (C', H*W) matrices, or (H*W, C') with ``transpose``: one view op."""
    (c0, c1), s = channels, t.stride()
    size, stride = ((c1 - c0, t.shape[2] * t.shape[3]), (s[1], s[3]))
    if transpose:
        size, stride = size[::-1], stride[::-1]
    return t.as_strided((frames, *size), (s[0], *stride), t.storage_offset() + first * s[0] + c0 * s[1])


def _weight_grad_1x1(grad_y: Tensor, x: Tensor, num_frames: int, groups: Sequence[Group],
                     weight_stride: Sequence[int]) -> Tensor:
    """The weight gradient of a 1x1 conv of ``shift(x)``, read from the *unshifted* ``x`` (so x is not
    moved again): each channel group correlates the output gradient at frame i with x at frame
    i + offset. One batched matmul per group over every clip and frame, the products summed in float32
    (float64 for float64) into columns of a tensor with the weight's strides; pairs across a clip
    boundary are computed and left out of the sum by a view, so the ops are the same for any N and T."""
    t, nt, out_channels, end = num_frames, x.shape[0], grad_y.shape[1], _moved_end(groups)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    grad_w = torch.empty_strided((out_channels, x.shape[1], 1, 1), tuple(weight_stride), dtype=acc, device=x.device)

    def columns(c0: int, c1: int) -> Tensor:
        return grad_w.as_strided((out_channels, c1 - c0), tuple(weight_stride[:2]), c0 * weight_stride[1])

    products = torch.bmm(_frame_matrices(grad_y, 0, nt, (0, out_channels)),
                         _frame_matrices(x, 0, nt, (end, x.shape[1]), transpose=True))
    torch.sum(products, 0, dtype=acc, out=columns(end, x.shape[1]))
    for c0, c1, off in groups:
        pairs = torch.bmm(_frame_matrices(grad_y, max(0, -off), nt - 1, (0, out_channels)),
                          _frame_matrices(x, max(0, off), nt - 1, (c0, c1), transpose=True))
        f = c1 - c0
        within_clips = pairs.as_strided((nt // t, t - 1, out_channels, f),
                                        (t * out_channels * f, out_channels * f, f, 1))
        torch.sum(within_clips, (0, 1), dtype=acc, out=columns(c0, c1))
    return grad_w


def _with_strides(grad: Tensor, dtype: torch.dtype, stride: Sequence[int]) -> Tensor:
    """``grad`` in ``dtype`` with exactly ``stride`` (the parameter's): a channels-last weight must get a
    channels-last gradient (DDP warns "Grad strides do not match bucket view strides" and copies otherwise;
    a 1x1 weight's strides differ between layouts only in its size-1 dims, which autograd ignores)."""
    if grad.dtype == dtype and grad.stride() == tuple(stride):
        return grad
    return torch.empty_strided(grad.shape, tuple(stride), dtype=dtype, device=grad.device).copy_(grad)


@functools.lru_cache(maxsize=64)
def _native_groups(groups: tuple[Group, ...]) -> tuple[int, list[int]]:
    return _fold(groups), [off for _, _, off in groups]


def _runs_native(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the C++ op (:mod:`shift_native`) runs this layer's training step: any CPU layer with a dense
    4-d input in the conv's dtype and no autocast, when the library is built (GPUs, autocast and non-dense
    inputs keep :class:`_ShiftedConvFn`)."""
    return (x.device.type == "cpu" and x.dim() == 4 and weight.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype) and not torch.is_autocast_enabled("cpu")
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
            and shift_native.available())


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class ShiftedConvCall:
    """One shifted layer's ``(conv2d(shift(x), weight, bias, ...), x)``, its arguments resolved once: the conv's
    parameters, the clip length and the groups, and the C++ op's argument list (a block calls it every step,
    and what is not re-derived per call is what a small layer's step does not pay for)."""

    __slots__ = ("num_frames", "groups", "conv", "native", "plan")

    def __init__(self, num_frames: int, groups: tuple[Group, ...], stride: int | Sequence[int] = 1,
                 padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, conv_groups: int = 1) -> None:
        self.num_frames, self.groups = num_frames, groups
        self.conv = (_pair(stride), _pair(padding), _pair(dilation), conv_groups)
        try:  # the op takes adjacent equal groups from channel 0 (every shift of the models)
            fold, offsets = _native_groups(groups)
        except ValueError:
            self.native: tuple | None = None
        else:
            self.native = (list(self.conv[0]), list(self.conv[1]), list(self.conv[2]), conv_groups, num_frames,
                           fold, offsets)
        # The op's Python entry for these arguments and the first call's input width (shift_native.plan), made on
        # first use; False: none (the library has no entry, or the op does not run).
        self.plan: Callable | None | bool = None

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        """``x`` is left bit-identical. Use the returned ``x`` for the residual identity path: its gradient is
        then summed with the shifted path's."""
        plan = self.plan
        if plan is None and self.native is not None:
            plan = self.plan = shift_native.plan(*self.native, x.shape[1]) or False
        if plan:  # the op's entry checks in C++ whether the op takes this call (what _slow checks in Python)
            out = plan(x, weight, bias)
            if out is not None:
                return out
        return self._slow(x, weight, bias)

    def _slow(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            if self.native is not None and _runs_native(x, weight, bias):
                # tensor subclasses and torch-function modes see the op through torch.ops (as does a library
                # built without the Python entry)
                return torch.ops.tsm_dist.shifted_conv2d.default(x, weight, bias, *self.native,
                                                                 x.numel() > shift_native.copy_numel())
            return _ShiftedConvFn.apply(x, weight, bias, self.conv, self.num_frames, self.groups)
        check_frames(x, self.num_frames)
        if _shifts_while_copying(x, self.groups):
            shifted = torch.empty_like(x)
            _shift_into(shifted, x, self.num_frames, self.groups)
            return F.conv2d(shifted, weight, bias, *self.conv), x
        moved = _shift_inplace(x.data, self.num_frames, self.groups)
        try:
            return F.conv2d(x, weight, bias, *self.conv), x
        finally:
            _unshift_inplace(moved)


def shifted_conv2d_and_identity(x: Tensor, weight: Tensor, bias: Tensor | None, num_frames: int,
                                groups: tuple[Group, ...], stride: int | Sequence[int] = 1,
                                padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
                                conv_groups: int = 1) -> tuple[Tensor, Tensor]:
    """``(conv2d(shift(x), weight, bias, ...), x)``, moving only the shifted channels of ``x`` (a
    :class:`ShiftedConvCall` made for this one call).

    ``x`` is left bit-identical. Use the returned ``x`` for the residual identity path: its
    gradient is then summed with the shifted path's.
    """
    return ShiftedConvCall(num_frames, groups, stride, padding, dilation, conv_groups)(x, weight, bias)


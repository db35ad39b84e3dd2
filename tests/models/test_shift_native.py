"""The shift's C++ ops (tsm_dist/models/csrc/shift_ops.cpp): built by install.sh, bit-exact against the reference
shift, taken by small CPU layers in training, and replaced by the Python kernels when they are not there."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from tsm_dist.models import build_model, shift_kernels, shift_native
from tsm_dist.models.temporal_shift import TemporalShift, shift_groups, shifted_conv, temporal_shift

needs_ops = pytest.mark.skipif(not shift_native.available(), reason=f"shift ops: {shift_native.why_not()}")


def test_the_shift_ops_are_built() -> None:
    """./install.sh builds them (g++ is there: it builds Horovod); a failed build shows here, not only as speed."""
    if os.environ.get("TSM_DIST_SHIFT_NATIVE") == "0":
        pytest.skip("TSM_DIST_SHIFT_NATIVE=0")
    assert shift_native.available(), shift_native.why_not()
    assert shift_native.library_path().is_file()
    # Python's headers are there (Horovod builds against them): the library is the layers' Python entry too
    assert shift_native.plan([1, 1], [0, 0], [1, 1], 1, 4, 2, [1, -1], 16) is not None


def _ops(direction: str, channels: int, fold_div: int) -> tuple[int, list[int]]:
    groups = shift_groups(channels, fold_div, direction)
    return groups[0][1], [off for _, _, off in groups]


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("direction", ["bi", "uni"])
@pytest.mark.parametrize("channels,fold_div,frames", [(16, 8, 4), (24, 8, 3), (64, 8, 5), (40, 4, 2), (3, 1, 3),
                                                      (256, 8, 4), (16, 8, 1)])
def test_shift_copy_and_in_place_move_back_equal_the_reference_bit_for_bit(dtype, memory_format, direction: str,
                                                                          channels: int, fold_div: int,
                                                                          frames: int) -> None:
    """Folds 1, 2, 3, 8, 10 and 32 (fixed-size and general copies), one-frame clips, both layouts."""
    if direction == "bi" and 2 * (channels // fold_div) > channels:
        pytest.skip("no room for two groups")
    torch.manual_seed(0)
    x = torch.randn(2 * frames, channels, 3, 5).to(dtype=dtype, memory_format=memory_format)
    fold, offsets = _ops(direction, channels, fold_div)
    got = torch.ops.tsm_dist.shift_copy(x, frames, fold, offsets)
    assert torch.equal(got, temporal_shift(x, frames, fold_div, direction)) and got.stride() == x.stride()
    # the adjoint of the shift (a frame's group goes back where it came from), alone and plus a direct gradient,
    # rounded once as autograd's sum of the two gradients of the reference
    direct = torch.randn_like(x)
    ref_x = x.detach().requires_grad_()
    (want,) = torch.autograd.grad(temporal_shift(ref_x, frames, fold_div, direction), [ref_x], x)
    (want_sum,) = torch.autograd.grad([temporal_shift(ref_x, frames, fold_div, direction), ref_x], [ref_x],
                                      [x, direct])
    for add, expected in [(None, want), (direct, want_sum)]:
        moved = x.clone()
        torch.ops.tsm_dist.shift_add_(moved, add, frames, fold, [-o for o in offsets])
        assert torch.equal(moved, expected)


@needs_ops
def test_the_ops_name_what_they_cannot_take() -> None:
    with pytest.raises(RuntimeError, match="dense NCHW or channels-last"):
        torch.ops.tsm_dist.shift_copy(torch.zeros(8, 16, 4, 4)[:, :, :, ::2], 4, 2, [1, -1])
    with pytest.raises(RuntimeError, match="not a multiple of num_frames=3"):
        torch.ops.tsm_dist.shift_copy(torch.zeros(8, 16, 4, 4), 3, 2, [1, -1])
    with pytest.raises(RuntimeError, match="do not fit 16 channels"):
        torch.ops.tsm_dist.shift_copy(torch.zeros(8, 16, 4, 4), 4, 9, [1, -1])
    with pytest.raises(RuntimeError, match="direct must have x's sizes, strides and dtype"):
        torch.ops.tsm_dist.shift_add_(torch.zeros(8, 16, 4, 4), torch.zeros(8, 16, 4, 4).to(
            memory_format=torch.channels_last), 4, 2, [1, -1])


class _Names(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _train_ops(x: torch.Tensor, conv: nn.Conv2d) -> list[str]:
    with _Names() as names:
        y, identity = shifted_conv(x, conv, 4, shift_groups(x.shape[1], 8))
        (y.square().sum() + identity.sum()).backward()
    return names.names


@needs_ops
def test_dense_cpu_layers_train_through_the_op_and_others_do_not() -> None:
    """The op takes every dense CPU training step, small and large, shifting x in place (no shifted copy) unless
    the input is at most shift_native.copying's elements; a non-dense input and autocast keep the Python kernels,
    all with the reference's results."""
    conv = nn.Conv2d(16, 8, 3, padding=1, bias=False)
    x = torch.randn(8, 16, 5, 5, requires_grad=True)
    names = _train_ops(x, conv)  # the mode sees the ops below autograd: shifted_conv2d's backward calls shift_add_
    assert "tsm_dist.shift_add_.default" in names and "tsm_dist.shift_copy.default" not in names
    with shift_native.copying(x.numel()):
        assert "tsm_dist.shift_copy.default" in _train_ops(x, conv)
    with shift_native.turned_off():
        assert not any(n.startswith("tsm_dist") for n in _train_ops(x, conv))
    sparse = torch.randn(8, 16, 5, 10)[:, :, :, ::2].requires_grad_()
    assert not any(n.startswith("tsm_dist") for n in _train_ops(sparse, conv))
    y, _ = shifted_conv(sparse, conv, 4, shift_groups(16, 8))
    assert torch.equal(y, conv(temporal_shift(sparse, 4, 8)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not any(n.startswith("tsm_dist") for n in _train_ops(x, conv))
    large = torch.randn(8, 16, 128, 130, requires_grad=True)
    names = _train_ops(large, nn.Conv2d(16, 2, 1, bias=False))
    assert "tsm_dist.shift_add_.default" in names and "tsm_dist.shift_copy.default" not in names


class _Functions(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@needs_ops
def test_a_layer_calls_the_op_through_its_python_entry_and_through_torch_ops_where_a_mode_must_see_it(
        monkeypatch) -> None:
    """A layer's call (ShiftedConvCall) goes through the library's own Python entry (ShiftedConvPlan: the layer's
    fixed arguments held once, none converted per call), with torch.ops' results bit for bit; under a
    torch-function mode (and for tensor subclasses) it goes through torch.ops, so that the mode sees the op;
    turned off, neither runs; a library built without Python's headers has no entry and takes torch.ops."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(8, 16, 5, 5).to(memory_format=torch.channels_last).requires_grad_()
    call = shift_kernels.ShiftedConvCall(4, shift_groups(16, 8), 1, 1)
    g = torch.randn(8, 8, 5, 5)
    y, identity = call(x, conv.weight, conv.bias)
    assert call.plan and identity is x and type(y.grad_fn).__name__ == "ConvolutionBackward0"
    got = torch.autograd.grad((y, identity), [x, conv.weight, conv.bias], (g, x.detach()))
    y_ops, identity_ops = torch.ops.tsm_dist.shifted_conv2d.default(x, conv.weight, conv.bias, *call.native, True)
    want = torch.autograd.grad((y_ops, identity_ops), [x, conv.weight, conv.bias], (g, x.detach()))
    assert torch.equal(y, y_ops) and all(torch.equal(a, b) for a, b in zip(got, want))
    with _Functions() as mode:
        call(x, conv.weight, conv.bias)
    assert "tsm_dist.shifted_conv2d.default" in mode.names
    with _Names() as names:  # a dispatch mode sees what the op runs, through either entry
        (call(x, conv.weight, conv.bias)[0].sum()).backward()
    assert "tsm_dist.shift_add_.default" in names.names
    with shift_native.turned_off():
        assert shift_native.plan(*call.native, 16) is None
        assert torch.equal(call(x, conv.weight, conv.bias)[0], y)

    class Sub(torch.Tensor):  # a subclass gets torch.ops, whose __torch_function__ handling it may rely on
        seen: list[str] = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
            cls.seen.append(str(func))
            return super().__torch_function__(func, types, args, kwargs or {})

    y_sub, _ = call(x.detach().as_subclass(Sub).requires_grad_(), conv.weight, conv.bias)
    assert "tsm_dist.shifted_conv2d.default" in Sub.seen and torch.equal(y_sub.as_subclass(torch.Tensor), y)
    monkeypatch.delitem(shift_native._state, "loaded")  # loaded again: the entry is the module initialised before
    assert shift_native.available() and shift_native.plan(*call.native, 16) is not None
    monkeypatch.setitem(shift_native._state, "entry", None)
    without = shift_kernels.ShiftedConvCall(4, shift_groups(16, 8), 1, 1)
    assert torch.equal(without(x, conv.weight, conv.bias)[0], y) and without.plan is False


@needs_ops
def test_a_shift_points_resolved_call_is_checked_in_cpp_and_every_change_takes_the_full_path() -> None:
    """TemporalShift.conv keeps its last resolution, whose entry (ShiftedConvPlan.take) checks in C++ what the Python
    call checked: each condition that fails there (no grad, another width, autocast, a non-dense input, the ops
    turned off, a copy-method size) and each change of the conv or the shift point gives the full path's result, and
    copies resolve anew."""
    import copy

    torch.manual_seed(0)
    shift = TemporalShift(4)
    conv = nn.Conv2d(16, 8, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(8, 16, 6, 6).to(memory_format=torch.channels_last).requires_grad_()

    def check(x: torch.Tensor, frames: int = 4) -> list[str]:
        with _Names() as names:
            y, identity = shift.conv(x, conv)
            if torch.is_grad_enabled():
                (y.square().sum() + identity.sum()).backward()
        assert torch.equal(identity, x) and torch.equal(y, conv(temporal_shift(x, frames)))
        return names.names

    assert "tsm_dist.shift_add_.default" in check(x)
    take = shift._last[6]
    assert take(x, conv.weight, conv.bias) is not None  # the resolved call is taken, in C++
    wider = torch.randn(8, 32, 6, 6, requires_grad=True)
    assert take(wider, conv.weight, conv.bias) is None  # another width: not this resolution's
    with torch.no_grad():
        assert take(x, conv.weight, conv.bias) is None and not any(n.startswith("tsm_dist") for n in check(x))
    assert take(x.detach(), conv.weight.detach(), conv.bias.detach()) is None  # nothing wants a gradient
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert take(x, conv.weight, conv.bias) is None
    assert take(x, conv.weight.double(), conv.bias) is None  # the conv's dtype differs
    sparse = torch.randn(8, 16, 6, 12)[:, :, :, ::2].requires_grad_()
    assert take(sparse, conv.weight, conv.bias) is None and not any(n.startswith("tsm_dist") for n in check(sparse))
    with shift_native.turned_off():
        assert take(x, conv.weight, conv.bias) is None and not any(n.startswith("tsm_dist") for n in check(x))
    with shift_native.copying(x.numel()):
        assert "tsm_dist.shift_copy.default" in check(x)  # the resolved call reads the copy method's size per call
    assert "tsm_dist.shift_copy.default" not in check(x)
    conv.stride = (2, 2)  # a changed conv resolves again
    assert torch.equal(shift.conv(x, conv)[0], conv(temporal_shift(x, 4)))
    shift.num_frames = 2  # and so does a changed shift point
    assert shift._last is None and "tsm_dist.shift_add_.default" in check(x, 2)
    twin = copy.deepcopy(shift)  # the entry neither copies nor pickles: a copy resolves anew
    assert twin._last is None and not twin._calls and torch.equal(twin.conv(x, conv)[0], shift.conv(x, conv)[0])


def _shifted(x: torch.Tensor, frames: int, fold: int, offsets: list[int]) -> torch.Tensor:
    """The shift for any offsets: channels [g*fold, (g+1)*fold) of frame t take frame t + offsets[g], zero
    outside the clip (the reference shift's rule, which temporal_shift implements for offsets of one)."""
    out = x.clone()
    for g, off in enumerate(offsets):
        for t in range(frames):
            dst = out[t::frames, g * fold:(g + 1) * fold]
            dst.copy_(x[t + off::frames, g * fold:(g + 1) * fold] if 0 <= t + off < frames else torch.zeros_like(dst))
    return out


@needs_ops
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape,frames,fold,offsets", [
    ((8, 16, 5, 7), 4, 2, [1, -1]), ((6, 24, 3, 3), 3, 3, [-1]), ((3, 16, 4, 4), 1, 2, [1, -1]),
    ((10, 16, 3, 2), 5, 4, [2, -3]), ((6, 8, 2, 3), 3, 2, [5, -4]),  # pushed out by more than a frame, or all
    ((8, 64, 20, 21), 4, 8, [1, -1]), ((4, 16, 48, 48), 4, 2, [1, -1])])  # several chunks per group
def test_the_in_place_op_equals_the_reference_and_leaves_x_bit_identical(threads: int, dtype, memory_format, shape,
                                                                         frames: int, fold: int,
                                                                         offsets: list[int]) -> None:
    """shifted_conv2d shifting x in place: its output, x's gradient (with the identity path's), the weight and
    bias gradients equal a conv of the shifted copy bit for bit, and x is bit-identical and unversioned after
    the forward and after the backward (the frames a group pushes out of its clip are kept and put back)."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_in_place(torch.randn(shape).to(dtype=dtype, memory_format=memory_format), frames, fold, offsets)
    finally:
        torch.set_num_threads(saved_threads)


def _check_in_place(x: torch.Tensor, frames: int, fold: int, offsets: list[int]) -> None:
    """The in-place op on x against a conv of the shifted copy: output, gradients, x left as it was."""
    torch.manual_seed(0)
    x = x.requires_grad_()
    memory_format = torch.channels_last if not x.is_contiguous() else torch.contiguous_format
    conv = nn.Conv2d(x.shape[1], 6, 3, padding=1).to(dtype=x.dtype, memory_format=memory_format)
    before, version = x.detach().clone(), x._version
    y, identity = torch.ops.tsm_dist.shifted_conv2d(x, conv.weight, conv.bias, [1, 1], [1, 1], [1, 1], 1,
                                                    frames, fold, offsets, True)
    assert torch.equal(x.detach(), before) and x._version == version
    ref_x = before.clone().requires_grad_()
    ref = conv(_shifted(ref_x, frames, fold, offsets))
    assert torch.equal(y, ref)
    g, gi = torch.randn_like(ref), torch.randn_like(ref_x)
    got = torch.autograd.grad((y, identity), [x, conv.weight, conv.bias], (g, gi))
    want = torch.autograd.grad((ref, ref_x), [ref_x, conv.weight, conv.bias], (g, gi))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(x.detach(), before) and x._version == version
    with torch.no_grad():  # the op's CPU kernel (no autograd) shifts in place too
        assert torch.equal(torch.ops.tsm_dist.shifted_conv2d(x, conv.weight, conv.bias, [1, 1], [1, 1], [1, 1],
                                                             1, frames, fold, offsets, True)[0], ref)
    assert torch.equal(x.detach(), before)


@needs_ops
@pytest.mark.parametrize("dtype,fold", [(torch.bfloat16, 1), (torch.bfloat16, 2), (torch.float32, 2),
                                        (torch.float32, 4), (torch.float64, 4), (torch.float32, 16),
                                        (torch.float32, 32), (torch.float32, 64)])
@pytest.mark.parametrize("offsets", [[1, -1], [-1, 1], [1, 1], [-1, -1], [0, 1], [1, 0], [0, -1], [-1, 0], [1], [-1]])
def test_eight_frame_channels_last_clips_every_group_size_and_unit_offset(dtype, fold: int,
                                                                         offsets: list[int]) -> None:
    """Channels-last clips of 8 frames with offsets of -1, 0 or 1 take a kernel compiled per group size (2 to 128
    bytes a pixel; 256, the last case, takes the general one): the in-place op, and shift_add_ with and without
    a direct gradient, equal the reference bit for bit. At 20x21 pixels the narrow layers span several chunks."""
    channels = 8 * fold
    x = torch.randn(16, channels, 20, 21).to(dtype=dtype, memory_format=torch.channels_last)
    _check_in_place(x, 8, fold, offsets)
    direct = torch.randn_like(x)
    for add in (None, direct):
        moved = x.clone()
        torch.ops.tsm_dist.shift_add_(moved, add, 8, fold, offsets)
        want = _shifted(x, 8, fold, offsets)
        assert torch.equal(moved, want if add is None else want + direct)


@needs_ops
@pytest.mark.parametrize("grad", [True, False])
def test_an_error_inside_the_in_place_op_leaves_x_restored(grad: bool) -> None:
    """x is shifted while the conv runs: a conv that raises (a weight for other channels) must not leave it
    shifted."""
    x = torch.randn(8, 16, 4, 4).requires_grad_(grad)
    before = x.detach().clone()
    with pytest.raises(RuntimeError, match="channels"):
        torch.ops.tsm_dist.shifted_conv2d(x, torch.randn(4, 12, 1, 1), None, [1, 1], [0, 0], [1, 1], 1, 4, 2,
                                          [1, -1], True)
    assert torch.equal(x.detach(), before)


def test_without_the_library_the_python_kernels_give_the_same_training_step(monkeypatch, tmp_path) -> None:
    """A checkout whose ops are not built (or were built for another source or torch) trains on the Python
    kernels: available() says why, and a whole network's outputs and gradients equal the op's bit for bit."""

    def step() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = build_model("tsm8f_r50", 5, num_frames=4, depth=18, width=16, dropout=0.0)
        model = model.to(memory_format=torch.channels_last)
        out = model(torch.randn(2, 4, 3, 32, 32))
        out.square().sum().backward()
        return [out.detach()] + [p.grad for p in model.parameters()]

    with_ops = step()
    monkeypatch.setenv("TSM_DIST_NATIVE_DIR", str(tmp_path))
    monkeypatch.setattr(shift_native, "_state", {})
    assert not shift_native.available() and "not built" in shift_native.why_not()
    assert shift_native.summary().startswith("shift ops: Python (")
    without = step()
    assert all(torch.equal(a, b) for a, b in zip(with_ops, without))


def test_an_install_without_the_cpp_source_runs_the_python_kernels(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(shift_native, "SOURCE", tmp_path / "shift_ops.cpp")
    monkeypatch.setattr(shift_native, "_state", {})
    assert not shift_native.available() and "is missing" in shift_native.why_not()


@needs_ops
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_in_place_op_trains_through_the_convs_own_autograd_node(memory_format) -> None:
    """No autograd Function of ours on the in-place path: y's node is the conv's own ConvolutionBackward0 (TSN's
    node), whose hooks shift x around the weight gradient and move the input gradient back, and the identity is
    x itself (autograd sums its two gradients). Against the reference: both gradients, the same graph run twice
    (each run shifts and restores), and the input's gradient alone, for which x is not shifted (only the weight
    gradient reads its values; a hook after ours sees x as it is while the node runs); x is intact after all."""
    torch.manual_seed(0)
    x = torch.randn(8, 16, 5, 5).to(memory_format=memory_format).requires_grad_()
    conv = nn.Conv2d(16, 8, 3, padding=1, bias=False).to(memory_format=memory_format)
    before = x.detach().clone()
    y, identity = torch.ops.tsm_dist.shifted_conv2d(x, conv.weight, None, [1, 1], [1, 1], [1, 1], 1, 4, 2,
                                                    [1, -1], True)
    assert type(y.grad_fn).__name__ == "ConvolutionBackward0" and identity is x
    ref_x = before.clone().requires_grad_()
    ref = conv(_shifted(ref_x, 4, 2, [1, -1]))
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, [ref_x, conv.weight], g, retain_graph=True)
    shifted_while_running: list[bool] = []
    y.grad_fn.register_prehook(lambda grads: shifted_while_running.append(not torch.equal(x.detach(), before)))
    for _ in range(2):
        got = torch.autograd.grad(y, [x, conv.weight], g, retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert torch.equal(x.detach(), before)
    assert torch.equal(torch.autograd.grad(y, [x], g)[0], want[0])
    assert torch.equal(x.detach(), before)
    assert shifted_while_running == [True, True, False]

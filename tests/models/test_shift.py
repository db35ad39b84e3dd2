"""Temporal shift semantics on known values, the fused in-place shift, and their gradients."""
from __future__ import annotations

from typing import Iterator

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck
from torch.utils._python_dispatch import TorchDispatchMode

from tsm_dist.models import build_model, shift_kernels, shift_native
from tsm_dist.models.shift_kernels import shift_copy, shifted_conv2d_and_identity
from tsm_dist.models.temporal_shift import TemporalShift, shift_groups, shifted_conv, temporal_shift


@pytest.fixture(params=["native", "native-copy", "copy", "in-place"])
def kernel_path(request, monkeypatch) -> Iterator[str]:
    """The four CPU paths of the fused shift: the C++ op (when ./install.sh built it: see
    test_the_shift_ops_are_built) shifts x in place around the conv (``native``) or, with
    ``shift_native.copying`` above the input's size, reads a shifted copy (``native-copy``); without the op, the
    Python kernels shift small tensors while copying (``copy``), and ``SMALL_NUMEL = 0`` sends them through
    the Python in-place kernels that GPUs take (channels-last tensors with short moved runs still copy)."""
    if request.param.startswith("native"):
        if not shift_native.available():
            pytest.skip(f"the shift's C++ ops: {shift_native.why_not()}")
        with shift_native.copying(1 << 62 if request.param == "native-copy" else 0):
            yield request.param
        return
    if request.param == "in-place":
        monkeypatch.setattr(shift_kernels, "SMALL_NUMEL", 0)
    with shift_native.turned_off():
        yield request.param


def _clip(n: int, t: int, c: int, hw: int = 1, dtype=torch.float64) -> torch.Tensor:
    """(N*T, C, hw, hw) whose value encodes (sample, frame, channel): 1000 n + 100 (t+1) + c."""
    n_, t_, c_ = torch.meshgrid(torch.arange(n), torch.arange(t), torch.arange(c), indexing="ij")
    v = (1000 * n_ + 100 * (t_ + 1) + c_).to(dtype)
    return v.reshape(n * t, c, 1, 1).expand(n * t, c, hw, hw).contiguous()


def _expected(n: int, t: int, c: int, moves: dict[int, int]) -> torch.Tensor:
    """Channel ch at frame f takes frame f + moves[ch] (0 outside the clip); other channels stay."""
    out = torch.zeros(n, t, c, dtype=torch.float64)
    for s in range(n):
        for f in range(t):
            for ch in range(c):
                src = f + moves.get(ch, 0)
                out[s, f, ch] = 1000 * s + 100 * (src + 1) + ch if 0 <= src < t else 0.0
    return out.reshape(n * t, c, 1, 1)


@pytest.mark.parametrize("fold_div,channels", [(8, 16), (4, 8), (2, 4)])
def test_bidirectional_shift_known_values(fold_div: int, channels: int) -> None:
    fold = channels // fold_div
    x = _clip(2, 4, channels)
    moves = {ch: 1 for ch in range(fold)} | {ch: -1 for ch in range(fold, 2 * fold)}
    assert torch.equal(temporal_shift(x, 4, fold_div, "bi"), _expected(2, 4, channels, moves))


@pytest.mark.parametrize("fold_div,channels", [(8, 16), (4, 8), (1, 3)])
def test_unidirectional_shift_takes_only_the_past(fold_div: int, channels: int) -> None:
    fold = channels // fold_div
    x = _clip(2, 5, channels)
    moves = {ch: -1 for ch in range(fold)}
    assert torch.equal(temporal_shift(x, 5, fold_div, "uni"), _expected(2, 5, channels, moves))


def test_shift_groups_and_bad_arguments() -> None:
    assert shift_groups(64, 8, "bi") == ((0, 8, 1), (8, 16, -1))
    assert shift_groups(64, 8, "uni") == ((0, 8, -1),)
    with pytest.raises(ValueError, match="no channel"):
        shift_groups(4, 8)
    with pytest.raises(ValueError, match="direction"):
        shift_groups(16, 8, "sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiple of num_frames"):
        temporal_shift(torch.zeros(6, 16, 1, 1), 4)
    with pytest.raises(ValueError, match="too small"):
        TemporalShift(8, fold_div=1, direction="bi")


@pytest.mark.parametrize("direction", ["bi", "uni"])
def test_shift_gradcheck(direction: str) -> None:
    x = torch.randn(2 * 3, 8, 2, 2, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda v: temporal_shift(v, 3, 4, direction), (x,))


@pytest.mark.parametrize("direction", ["bi", "uni"])
@pytest.mark.parametrize("kernel,stride,bias,out", [(1, 1, False, 2), (1, 1, True, 3), (1, 1, False, 12),
                                                    (3, 2, True, 2)])
def test_shifted_conv_gradcheck(direction: str, kernel: int, stride: int, bias: bool,
                                out: int, kernel_path: str) -> None:
    """Every backward path (1x1 with H*W >= out channels: weight gradient by matmuls on the unshifted
    input; otherwise shift again), with the identity output whose gradient is folded into the pass
    that moves the shifted path's gradient back."""
    torch.manual_seed(0)
    groups = shift_groups(8, 4, direction)
    x = torch.randn(2 * 3, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out, 8, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, w) if b is None else (x, w, b)

    def fn(v, wt, *bs):
        y, identity = shifted_conv2d_and_identity(v, wt, bs[0] if bs else None, 3, groups, stride, kernel // 2)
        return y, identity * torch.arange(1.0, 1 + identity.shape[1], dtype=torch.float64).view(1, -1, 1, 1)

    assert gradcheck(fn, inputs, fast_mode=True)
    assert gradcheck(lambda v, wt, *bs: shifted_conv2d_and_identity(v, wt, bs[0] if bs else None, 3, groups, stride,
                                                                    kernel // 2)[0], inputs, fast_mode=True)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_shifted_conv_matches_shift_then_conv_and_restores_input(grad: bool, memory_format, kernel_path: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 4, 1)
    x = torch.randn(2 * 4, 16, 5, 5).to(memory_format=memory_format).requires_grad_(grad)
    before, version = x.detach().clone(), x._version
    with torch.set_grad_enabled(grad):
        fused, identity = shifted_conv(x, conv, 4, shift_groups(16, 8))
        ref = conv(temporal_shift(x, 4, 8))
    assert torch.equal(fused, ref) and torch.equal(identity, x)
    assert torch.equal(x.detach(), before) and x._version == version
    if grad:
        g, gi = torch.randn_like(ref), torch.randn_like(x)
        got = torch.autograd.grad((fused, identity), [x, conv.weight, conv.bias], (g, gi))
        want = torch.autograd.grad((ref, x), [x, conv.weight, conv.bias], (g, gi))
        for a, b in zip(got, want):
            assert torch.allclose(a, b, atol=1e-6)
        assert torch.equal(x.detach(), before) and x._version == version


@pytest.mark.parametrize("depth,memory_format", [(18, torch.contiguous_format), (26, torch.contiguous_format),
                                                 (26, torch.channels_last)])
def test_tsm_network_with_fused_shift_equals_shift_then_conv(depth: int, memory_format, monkeypatch,
                                                              kernel_path: str) -> None:
    """The in-place trick inside a real network (previous ReLU and the downsample conv hold the
    block input for backward) gives the same outputs and gradients as a plain shifted copy."""

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = build_model("tsm8f_r50", 5, num_frames=4, depth=depth, width=16, dropout=0.0)
        model = model.to(memory_format=memory_format)
        clips = torch.randn(2, 4, 3, 32, 32, requires_grad=True)
        out = model(clips)
        out.square().sum().backward()
        return out.detach(), [clips.grad] + [p.grad for p in model.parameters()]

    out, grads = run()
    monkeypatch.setattr(TemporalShift, "conv", lambda self, x, conv: (conv(self(x)), x))
    ref_out, ref_grads = run()
    assert torch.allclose(out, ref_out, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-6)


def test_inplace_placement_shifts_the_whole_block_input() -> None:
    torch.manual_seed(0)
    model = build_model("tsm8f_r50", 5, num_frames=4, depth=26, width=16, shift_place="inplace").eval()
    block = model.layer2[1]
    x = torch.randn(2 * 4, block.conv1.in_channels, 4, 4)
    with torch.no_grad():
        out = block(x)
        shift, block.shift = block.shift, None
        ref = block(temporal_shift(x, 4, 8))
        block.shift = shift
    assert torch.equal(out, ref)


def test_residual_placement_keeps_the_identity_unshifted() -> None:
    torch.manual_seed(0)
    model = build_model("tsm8f_r50", 5, num_frames=4, depth=26, width=16).eval()
    block = model.layer2[1]
    x = torch.randn(2 * 4, block.conv1.in_channels, 4, 4)
    with torch.no_grad():
        out = block(x)
        b = block
        branch = b.relu(b.bn1(b.conv1(temporal_shift(x, 4, 8))))
        branch = b.bn3(b.conv3(b.relu(b.bn2(b.conv2(branch)))))
        ref = b.relu(branch + x)
    assert torch.equal(out, ref)


def test_second_backward_through_a_retained_graph_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 4, 1)
    x = torch.randn(2 * 4, 16, 3, 3, requires_grad=True)
    y, identity = shifted_conv(x * 1, conv, 4, shift_groups(16, 8))
    loss = y.square().sum() + identity.sum()
    first = torch.autograd.grad(loss, [x, conv.weight], retain_graph=True)
    second = torch.autograd.grad(loss, [x, conv.weight])
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
@pytest.mark.parametrize("depth", [18, 26])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_every_gradient_has_its_parameters_strides(depth: int, memory_format, amp, kernel_path: str) -> None:
    """DDP's bucket views and Horovod's in-place allreduce take a gradient with its parameter's strides;
    the fused shift's 1x1 weight gradient (matmul path, depth 26) and 3x3 one (depth 18) must follow the
    weight's layout, also under autocast, where the conv runs on a private copy."""
    torch.manual_seed(0)
    model = build_model("tsm8f_r50", 5, num_frames=4, depth=depth, width=16, dropout=0.0)
    model = model.to(memory_format=memory_format)
    clips = torch.randn(2, 4, 3, 32, 32)
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        out = model(clips)
    out.float().square().sum().backward()
    wrong = [(name, tuple(p.stride()), tuple(p.grad.stride())) for name, p in model.named_parameters()
             if p.grad.stride() != p.stride()]
    assert not wrong
    shifted = [m for m in model.modules() if isinstance(m, TemporalShift)]
    assert shifted  # the check covered the fused shift


@pytest.mark.parametrize("hw", [1, 6])  # 1: weight gradient by convolution_backward; 6: by frame matmuls
def test_fused_shift_weight_gradient_is_channels_last_for_a_channels_last_weight(hw: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 1, bias=False).to(memory_format=torch.channels_last)
    x = torch.randn(2 * 4, 16, hw, hw).to(memory_format=torch.channels_last).requires_grad_()
    y, identity = shifted_conv(x, conv, 4, shift_groups(16, 8))
    (y.square().sum() + identity.sum()).backward()
    assert conv.weight.grad.stride() == conv.weight.stride() == (16, 1, 16, 16)
    weight = conv.weight.detach().clone().requires_grad_()
    ref = nn.functional.conv2d(temporal_shift(x.detach(), 4, 8), weight)
    (want,) = torch.autograd.grad(ref.square().sum(), [weight])
    assert torch.allclose(conv.weight.grad, want, atol=1e-5)


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (views included; on a GPU every other op is a kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _layer_ops(shift: str, clips: int, frames: int, memory_format, direction: str = "bi", hw: int = 5,
               channels: int = 16) -> list[str]:
    """Ops of one shifted 1x1 conv (``channels`` -> 8) with its identity path, forward and backward."""
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, 8, 1, bias=False).to(memory_format=memory_format)
    x = torch.randn(clips * frames, channels, hw, hw).to(memory_format=memory_format).requires_grad_()
    with _OpCounter() as counter:
        if shift == "fused":
            y, identity = shifted_conv(x, conv, frames, shift_groups(channels, 8, direction))
        elif shift == "reference":
            y, identity = conv(temporal_shift(x, frames, 8, direction)), x
        else:
            y, identity = conv(x), x
        (y.sum() + identity.sum()).backward()
    return counter.ops


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("direction", ["bi", "uni"])
@pytest.mark.parametrize("hw", [5, 2], ids=["weight-grad-by-matmul", "shift-again"])
@pytest.mark.parametrize("channels", [16, 64], ids=["short-runs", "long-runs"])  # channels-last: copy vs in place
def test_fused_shift_dispatches_the_same_ops_for_any_batch_and_clip_length(memory_format, direction, hw,
                                                                         channels, kernel_path: str) -> None:
    """A GPU launches a kernel per op: the fused shift's count must not grow with N or T (it issued one
    copy per frame and one matmul per clip before) and must stay below the reference (bi-directional,
    offline) shift's, on both backward paths (H*W >= out channels: the weight gradient by batched
    matmuls; otherwise x shifted again); the uni-directional reference is two copies, which the fused
    kernels do not beat."""
    runs = {(n, t): _layer_ops("fused", n, t, memory_format, direction, hw, channels)
            for n, t in [(1, 4), (3, 4), (2, 8)]}
    assert len({tuple(ops) for ops in runs.values()}) == 1, {k: len(v) for k, v in runs.items()}
    plain = len(_layer_ops("none", 3, 4, memory_format, hw=hw, channels=channels))
    fused = len(runs[(3, 4)]) - plain
    reference = len(_layer_ops("reference", 3, 4, memory_format, hw=hw, channels=channels)) - plain
    assert 0 < fused <= reference, (fused, reference)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("direction", ["bi", "uni"])
def test_every_shift_kernel_equals_the_reference_bit_for_bit(memory_format, direction, kernel_path: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(3 * 5, 16, 4, 3).to(memory_format=memory_format)
    groups, ref = shift_groups(16, 8, direction), temporal_shift(x, 5, 8, direction)
    assert torch.equal(shift_copy(x, 5, groups), ref)
    before = x.clone()
    weight = torch.eye(16).view(16, 16, 1, 1)  # the identity conv shows the shifted input itself
    with torch.no_grad():
        assert torch.equal(shifted_conv2d_and_identity(x, weight, None, 5, groups)[0], nn.functional.conv2d(ref, weight))
    assert torch.equal(x, before)


@pytest.mark.parametrize("channels,in_place", [(16, False), (64, True)])
def test_channels_last_short_runs_shift_while_copying(channels: int, in_place: bool) -> None:
    """Channels-last with few channels (a pixel's moved channels are 2*C/8 values, here 4 or 16 floats):
    moving such short runs in place costs more than one whole copy, so the conv reads a shifted copy; with
    longer runs x is shifted in place (and restored) unless it is small. Either way x ends bit-identical and
    unversioned."""
    from tsm_dist.models.shift_kernels import _short_runs

    torch.manual_seed(0)
    x = torch.randn(2 * 4, channels, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    groups = shift_groups(channels, 8)
    assert _short_runs(x, groups) is not in_place
    assert not _short_runs(x.detach().contiguous(), groups)  # NCHW: a frame's moved channels are one run
    conv = nn.Conv2d(channels, 4, 1, bias=False).to(memory_format=torch.channels_last)
    before, version = x.detach().clone(), x._version
    y, identity = shifted_conv(x, conv, 4, groups)
    assert torch.equal(y, conv(temporal_shift(x, 4, 8)))
    (y.square().sum() + identity.sum()).backward()
    assert torch.equal(x.detach(), before) and x._version == version


@pytest.mark.parametrize("identity", [True, False])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("direction", ["bi", "uni"])
def test_small_tensors_shift_while_copying_and_match_the_reference_exactly(identity: bool, memory_format,
                                                                           direction: str) -> None:
    """On a CPU a small layer input is shifted while copying whatever its layout (fewer ops than moving it in
    place; a large one is moved in place), and its gradients, the identity path's sum included, equal the
    reference shift's bit for bit."""
    from tsm_dist.models.shift_kernels import _shifts_while_copying

    groups = shift_groups(64, 8, direction)
    assert _shifts_while_copying(torch.empty(8, 64, 4, 4).to(memory_format=memory_format), groups)
    assert not _shifts_while_copying(torch.empty(8, 64, 2 ** 9, 2 ** 9), groups)
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 8, 3, padding=1, bias=False).to(memory_format=memory_format)
    x = torch.randn(2 * 4, 64, 5, 5).to(memory_format=memory_format).requires_grad_()
    g, gi = torch.randn(8, 8, 5, 5), torch.randn_like(x)
    y, identity_out = shifted_conv(x, conv, 4, groups)
    ref = conv(temporal_shift(x, 4, 8, direction))
    assert torch.equal(y, ref)
    outputs, grads = ((y, identity_out), (g, gi)) if identity else ((y,), (g,))
    got = torch.autograd.grad(outputs, [x, conv.weight], grads)
    want = torch.autograd.grad((ref, x) if identity else (ref,), [x, conv.weight], grads)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_shift_point_resolves_its_layer_call_once_per_input_width_and_conv(kernel_path: str) -> None:
    """TemporalShift.conv keeps one resolved call (ShiftedConvCall) per input width, shift and conv geometry, and
    each gives that conv's result on the shifted input."""
    shift = TemporalShift(4)
    plain, strided = nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1, stride=2)
    x = torch.randn(8, 16, 6, 6, requires_grad=True)
    for conv in (plain, strided, plain, strided):
        y, identity = shift.conv(x, conv)
        assert torch.equal(y, conv(temporal_shift(x, 4))) and torch.equal(identity, x)
    assert len(shift._calls) == 2
    shift.num_frames = 2  # a changed shift point resolves again
    assert torch.equal(shift.conv(x, plain)[0], plain(temporal_shift(x, 2)))

"""Temporal shift semantics on known values, the fused in-place shift, and their gradients."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

from tsm_dist.models import build_model
from tsm_dist.models.temporal_shift import (TemporalShift, add_unshifted, residual_shift, shift_groups,
                                            temporal_shift)


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


def _residual_block(x: torch.Tensor, conv1: nn.Conv2d, back: nn.Conv2d, ds: nn.Conv2d | None,
                    frames: int, groups) -> tuple[torch.Tensor, ...]:
    """A minimal residual block on the fused shift: conv1(shift(x)) -> back -> + identity."""
    y, ds_out, pending = residual_shift(x, conv1, ds, frames, groups)
    out = back(y)
    if ds is not None:
        return out, ds_out
    return (add_unshifted(out, pending),)


def _reference_block(x, conv1, back, ds, frames, fold_div, direction) -> tuple[torch.Tensor, ...]:
    out = back(conv1(temporal_shift(x, frames, fold_div, direction)))
    return (out, ds(x)) if ds is not None else (out + x,)


@pytest.mark.parametrize("direction", ["bi", "uni"])
@pytest.mark.parametrize("kernel,stride,bias,downsample", [(1, 1, False, False), (1, 1, True, True),
                                                           (3, 2, True, False), (3, 1, False, True)])
def test_residual_shift_gradcheck(direction: str, kernel: int, stride: int, bias: bool, downsample: bool) -> None:
    torch.manual_seed(0)
    groups = shift_groups(8, 4, direction)
    conv1 = nn.Conv2d(8, 3, kernel, stride, kernel // 2, bias=bias).double()
    back = nn.ConvTranspose2d(3, 8, stride, stride).double()  # back to x's shape for the identity add
    ds = nn.Conv2d(8, 5, 1, 2, bias=False).double() if downsample else None
    x = torch.randn(2 * 3, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    params = [*conv1.parameters(), *(ds.parameters() if ds else [])]
    # x * 1: the block input must be a tensor only the block reads, as inside the network.
    assert gradcheck(lambda v, *_: _residual_block(v * 1, conv1, back, ds, 3, groups), (x, *params),
                     fast_mode=True)


@pytest.mark.parametrize("downsample", [False, True])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_residual_shift_matches_reference_and_restores_input(downsample: bool, memory_format) -> None:
    torch.manual_seed(0)
    conv1, back = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
    ds = nn.Conv2d(16, 6, 1, 2, bias=False) if downsample else None
    x = torch.randn(2 * 4, 16, 6, 6).to(memory_format=memory_format).requires_grad_()
    params = [x, *conv1.parameters(), *(ds.parameters() if ds else [])]
    ref = _reference_block(x, conv1, back, ds, 4, 8, "bi")
    h = x * 1
    before, version = h.detach().clone(), h._version
    fused = _residual_block(h, conv1, back, ds, 4, shift_groups(16, 8))
    for a, b in zip(fused, ref):
        assert torch.allclose(a, b, atol=1e-6)
    grads = [torch.randn_like(r) for r in ref]
    got = torch.autograd.grad(fused, params, grads, retain_graph=True)
    want = torch.autograd.grad(ref, params, grads)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(h.detach(), before) and h._version == version  # restored bit-exactly
    again = torch.autograd.grad(fused, params, grads)  # a second backward shifts again
    for a, b in zip(again, want):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(h.detach(), before)


def test_pending_input_is_guarded_and_restored_when_the_graph_is_dropped() -> None:
    conv1 = nn.Conv2d(16, 4, 1)
    h = torch.randn(8, 16, 2, 2, requires_grad=True) * 1
    before = h.detach().clone()
    first = residual_shift(h, conv1, None, 4, shift_groups(16, 8))
    assert not torch.equal(h.detach(), before)  # left shifted for the backward
    with pytest.raises(RuntimeError, match="still shifted"):
        residual_shift(h, conv1, None, 4, shift_groups(16, 8))
    del first  # no backward will come: dropping the graph puts the input back
    assert torch.equal(h.detach(), before)


def test_no_grad_paths_leave_the_input_untouched() -> None:
    torch.manual_seed(0)
    shift, conv1 = TemporalShift(4), nn.Conv2d(16, 4, 1)
    x = torch.randn(8, 16, 3, 3)
    before = x.clone()
    with torch.no_grad():
        y, ds_out, pending = shift.residual(x, conv1)
        assert pending is None and ds_out is None
        assert torch.equal(y, conv1(temporal_shift(x, 4)))
    assert torch.equal(x, before)


@pytest.mark.parametrize("depth,memory_format", [(18, torch.contiguous_format), (26, torch.contiguous_format),
                                                 (26, torch.channels_last)])
def test_tsm_network_with_fused_shift_equals_shift_then_conv(depth: int, memory_format, monkeypatch) -> None:
    """The fused shift inside a real network (the previous ReLU holds the block input for its
    backward; downsampling blocks) gives the same outputs and gradients as a plain shifted copy."""

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = build_model("tsm8f_r50", 5, num_frames=4, depth=depth, width=16, dropout=0.0)
        model = model.to(memory_format=memory_format)
        clips = torch.randn(2, 4, 3, 32, 32, requires_grad=True)
        out = model(clips)
        out.square().sum().backward()
        return out.detach(), [clips.grad] + [p.grad for p in model.parameters()]

    out, grads = run()
    monkeypatch.setattr(TemporalShift, "residual", lambda self, x, conv1, ds=None: (
        conv1(self(x)), None if ds is None else ds(x), None))
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

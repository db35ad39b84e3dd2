"""The four models on the shared builder: shapes, gradients, temporal behaviour, options."""
from __future__ import annotations

import pytest
import torch

from tsm_dist.models import build_model, list_models

SMALL = {"depth": 18, "width": 8}


def _clips(model, n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, model.num_frames, 3, size, size)


def test_registry_names() -> None:
    assert list_models() == ["tsn8f_r50", "tsm8f_r50", "i3d3x3x3_r50", "i3d3x1x1_r50", "tsm8f_mbv2"]
    with pytest.raises(ValueError, match="known models: tsn8f_r50"):
        build_model("resnet9000", 10)


@pytest.mark.parametrize("name,frames", [("tsn8f_r50", 8), ("tsm8f_r50", 8), ("i3d3x3x3_r50", 16),
                                         ("i3d3x1x1_r50", 32)])
def test_default_clip_length(name: str, frames: int) -> None:
    with torch.device("meta"):
        assert build_model(name, 400).num_frames == frames


@pytest.mark.parametrize("name", ["tsn8f_r50", "tsm8f_r50", "i3d3x3x3_r50", "i3d3x1x1_r50"])
@pytest.mark.parametrize("depth", [18, 26])
def test_forward_backward_small(name: str, depth: int) -> None:
    torch.manual_seed(0)
    frames = 4 if name.startswith("ts") else 8
    model = build_model(name, num_classes=7, num_frames=frames, depth=depth, width=8)
    clips = _clips(model)
    logits = model(clips)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 3])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad
    assert model.fc.weight.grad.abs().sum() > 0 and model.conv1.weight.grad.abs().sum() > 0


def test_tsn_ignores_frame_order_and_tsm_does_not() -> None:
    torch.manual_seed(0)
    tsn = build_model("tsn8f_r50", 5, num_frames=6, **SMALL).eval()
    tsm = build_model("tsm8f_r50", 5, num_frames=6, **SMALL).eval()
    tsm.load_state_dict(tsn.state_dict())  # same weights: the shift is the only difference
    clips = _clips(tsn, size=24)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        assert torch.allclose(tsn(clips), tsn(clips[:, perm]), atol=1e-6)
        assert not torch.allclose(tsm(clips), tsm(clips.flip(1)), atol=1e-4)
        assert not torch.allclose(tsm(clips), tsn(clips), atol=1e-4)


def test_tsm_and_tsn_have_identical_parameters() -> None:
    with torch.device("meta"):
        tsn, tsm = build_model("tsn8f_r50", 400), build_model("tsm8f_r50", 400)
    assert [(n, p.shape) for n, p in tsn.named_parameters()] == [(n, p.shape) for n, p in tsm.named_parameters()]


def test_state_dict_uses_torchvision_resnet_names() -> None:
    """ImageNet files in torchvision's layout must load without renaming."""
    with torch.device("meta"):
        sd = build_model("tsn8f_r50", 1000).state_dict()
    expected = {"conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,), "layer1.0.conv1.weight": (64, 64, 1, 1),
                "layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer2.0.conv2.weight": (128, 128, 3, 3),
                "layer3.5.bn3.weight": (1024,), "layer4.2.conv3.weight": (2048, 512, 1, 1),
                "fc.weight": (1000, 2048), "fc.bias": (1000,)}
    assert {k: tuple(sd[k].shape) for k in expected} == expected
    assert sum(1 for k in sd if k.endswith("num_batches_tracked")) == 53


def test_dropout_and_default_options() -> None:
    model = build_model("tsm8f_r50", 3, num_frames=None, dropout=None, fold_div=None, shift_place=None,
                        online=None, depth=18, width=8, pretrained=None)
    assert model.dropout.p == 0.5
    shift = model.shift_modules()[0]
    assert (shift.fold_div, shift.direction, shift.num_frames) == (8, "bi", 8)
    assert build_model("tsm8f_r50", 3, online=True, **SMALL).shift_modules()[0].direction == "uni"
    assert build_model("tsm8f_r50", 3, dropout=0.2, **SMALL).dropout.p == 0.2
    assert not build_model("tsn8f_r50", 3, **SMALL).shift_modules()


@pytest.mark.parametrize("options,match", [
    ({"depth": 42}, "depth=42"), ({"shift_place": "everywhere"}, "shift_place"),
    ({"fold_div": 1}, "fold_div"), ({"dropout": 1.5}, "dropout"), ({"width": 4}, "width"),
    ({"online": True, "name": "i3d3x3x3_r50"}, "online"), ({"num_frames": 0}, "num_frames"),
    ({"pretrained": "/nonexistent/r50.pth"}, "pretrained"),
])
def test_bad_options_name_the_culprit(options: dict, match: str) -> None:
    name = options.pop("name", "tsm8f_r50")
    with pytest.raises(ValueError, match=match):
        build_model(name, 3, **options)


def test_unknown_option_and_bad_input() -> None:
    with pytest.raises(TypeError, match="frames_per_clip"):
        build_model("tsm8f_r50", 3, frames_per_clip=8)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("tsm8f_r50", 0)
    model = build_model("tsm8f_r50", 3, **SMALL)
    with pytest.raises(ValueError, match="num_frames=8"):
        model(torch.zeros(1, 4, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, T, 3, H, W\)"):
        model(torch.zeros(8, 3, 32, 32))


@pytest.mark.parametrize("name", ["tsm8f_r50", "i3d3x3x3_r50"])
def test_channels_last_gives_the_same_logits(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 4, num_frames=4, **SMALL).eval()
    clips = _clips(model)
    with torch.no_grad():
        ref = model(clips)
        out = model.to(memory_format=model.memory_format)(clips)
    assert torch.allclose(out, ref, atol=1e-5)


def test_channels_last_training_step_with_tsm() -> None:
    torch.manual_seed(0)
    model = build_model("tsm8f_r50", 4, num_frames=4, dropout=0.0, **SMALL)
    clips = _clips(model)
    ref = torch.autograd.grad(model(clips).sum(), model.conv1.weight)[0]
    model = model.to(memory_format=torch.channels_last)
    got = torch.autograd.grad(model(clips).sum(), model.conv1.weight)[0]
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_i3d_accepts_other_clip_lengths() -> None:
    model = build_model("i3d3x1x1_r50", 4, **SMALL).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 4, 3, 32, 32)).shape == (1, 4)

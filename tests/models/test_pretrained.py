"""2D ImageNet-style weights load into the 2D models and inflate into the I3D models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tsm_dist.models import build_model
from tsm_dist.models.pretrained import load_pretrained

SMALL = {"depth": 18, "width": 8}


@pytest.fixture()
def imagenet_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 2D ResNet-18 (width 8) with 1000 classes, saved the way torchvision saves one."""
    torch.manual_seed(1)
    state = build_model("tsn8f_r50", 1000, **SMALL).state_dict()
    state = {k: v + torch.rand_like(v) if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path / "resnet18_w8.pth"
    torch.save(state, path)
    return path, state


def test_2d_model_loads_backbone_and_skips_other_classifier(imagenet_file) -> None:
    path, state = imagenet_file
    model = build_model("tsm8f_r50", 5, pretrained=str(path), **SMALL)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in state.items() if not k.startswith("fc."))
    report = load_pretrained(model, path)
    assert report.skipped == ["fc.weight", "fc.bias"] and not report.inflated


@pytest.mark.parametrize("name", ["i3d3x3x3_r50", "i3d3x1x1_r50"])
def test_3d_models_inflate_by_repeating_and_dividing(imagenet_file, name: str) -> None:
    path, state = imagenet_file
    model = build_model(name, 5, **SMALL)
    report = load_pretrained(model, path)
    sd = model.state_dict()
    inflated = 0
    for key, w2d in state.items():
        if key.startswith("fc."):
            continue
        w = sd[key]
        if w.dim() == 5:
            kt = w.shape[2]
            assert torch.allclose(w, w2d.unsqueeze(2).expand_as(w) / kt)
            inflated += kt > 1
        else:
            assert torch.equal(w, w2d)
    assert inflated > 0 and len(report.inflated) == sum(1 for v in sd.values() if v.dim() == 5)


def test_inflated_conv_reproduces_the_2d_conv_on_a_static_clip(imagenet_file) -> None:
    path, _ = imagenet_file
    i3d = build_model("i3d3x3x3_r50", 5, **SMALL)
    load_pretrained(i3d, path)
    tsn = build_model("tsn8f_r50", 5, pretrained=str(path), **SMALL)
    frame = torch.randn(1, 3, 16, 16)
    static = frame.unsqueeze(2).expand(1, 3, 9, 16, 16)  # 9 identical frames, (N, C, T, H, W)
    with torch.no_grad():
        out3d = i3d.conv1(static)  # 7x7x7 stem: the middle frame sees all 7 taps inside the clip
        out2d = tsn.conv1(frame)
    assert torch.allclose(out3d[:, :, 4], out2d, atol=1e-5)


def test_wrapped_and_prefixed_checkpoints_load(imagenet_file, tmp_path: Path) -> None:
    path, state = imagenet_file
    wrapped = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90}, wrapped)
    model = build_model("tsn8f_r50", 1000, pretrained=str(wrapped), **SMALL)
    assert torch.equal(model.fc.weight, state["fc.weight"])


def test_mismatched_files_are_errors_naming_file_and_key(imagenet_file, tmp_path: Path) -> None:
    path, state = imagenet_file
    with pytest.raises(ValueError, match=rf"{path.name}: conv1.weight has shape \(8, 3, 7, 7\)"):
        build_model("tsn8f_r50", 5, pretrained=str(path), depth=18, width=16)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4")}, partial)
    with pytest.raises(ValueError, match="partial.pth: does not match the model; missing .*layer4"):
        build_model("tsn8f_r50", 5, pretrained=str(partial), **SMALL)
    junk = tmp_path / "junk.pth"
    torch.save({"weights": [1, 2]}, junk)
    with pytest.raises(ValueError, match="junk.pth: not a state_dict"):
        build_model("tsn8f_r50", 5, pretrained=str(junk), **SMALL)


def test_unreadable_files_are_errors_saying_why_in_a_few_words(tmp_path: Path) -> None:
    import argparse

    from tsm_dist.models.pretrained import PretrainedError

    foreign = tmp_path / "notes.pth"
    foreign.write_text("not weights\n")
    objects = tmp_path / "objects.pth"
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, objects)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(objects.read_bytes()[:100])
    cases = [(foreign, "not a PyTorch file"), (objects, r"Python objects beyond tensors .*argparse.Namespace"),
             (cut, "a damaged or truncated archive")]
    for path, why in cases:
        with pytest.raises(PretrainedError, match=why) as caught:
            build_model("tsn8f_r50", 5, pretrained=str(path), **SMALL)
        assert str(path) in str(caught.value) and "weights_only" not in str(caught.value)

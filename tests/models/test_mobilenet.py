"""MobileNetV2-TSM: the official shift placement, sizes, online streaming, options, pretrained names."""
from __future__ import annotations

import pytest
import torch

from tsm_dist.config import ConfigError, ModelConfig, resolve_model_options
from tsm_dist.models import build_model
from tsm_dist.streaming import OnlineTSM
from tsm_dist.models.mobilenet import InvertedResidual, make_divisible
from tsm_dist.models.pretrained import load_pretrained


def test_shift_sits_in_the_ten_residual_expanding_blocks() -> None:
    model = build_model("tsm8f_mbv2", 400)
    blocks = [m for m in model.features if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17
    shifted = [i for i, b in enumerate(blocks) if b.shift is not None]
    # the official online demo's shift_block_idx: residual blocks with an expansion
    assert shifted == [2, 4, 5, 7, 8, 9, 11, 12, 14, 15]
    assert all(blocks[i].use_res_connect for i in shifted)
    assert len(model.shift_modules()) == 10


def test_full_size_params_and_macs() -> None:
    """MobileNetV2 1.0 at 224: 3.5 M parameters with 1000 classes, ~0.30 G MACs per frame."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model("tsm8f_mbv2", 1000).eval()
        clip = torch.empty(1, 8, 3, 224, 224)
    assert abs(sum(p.numel() for p in model.parameters()) - 3_504_872) < 1000
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(clip)
    assert 0.29e9 < counter.get_total_flops() / 2 / 8 < 0.32e9


def test_online_streams_equal_the_offline_unidirectional_model() -> None:
    torch.manual_seed(0)
    model = build_model("tsm8f_mbv2", 5, num_frames=4, width=16, online=True).eval()
    clips = torch.randn(2, 4, 3, 64, 64)
    with torch.no_grad():
        offline = model.frame_logits(clips)
    online = OnlineTSM(model)
    streamed = torch.stack([online(clips[:, t]) for t in range(4)], 1)
    assert torch.allclose(streamed, offline, rtol=1e-4, atol=1e-5)
    assert online.cache_nbytes() > 0


def test_trains_a_step_and_the_shift_reaches_the_gradient() -> None:
    torch.manual_seed(0)
    model = build_model("tsm8f_mbv2", 3, num_frames=4, width=8, dropout=0.0)
    clips = torch.randn(2, 4, 3, 32, 32, requires_grad=True)
    model(clips).sum().backward()
    # frame 0 of a bi-directional TSM influences the other frames' logits, hence the loss through them
    assert clips.grad is not None and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_options_it_does_not_have_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="model.depth=50 is a ResNet option"):
        resolve_model_options(ModelConfig(name="tsm8f_mbv2", depth=50))
    with pytest.raises(ConfigError, match="model.shift_place"):
        resolve_model_options(ModelConfig(name="tsm8f_mbv2", shift_place="inplace"))
    resolved = resolve_model_options(ModelConfig(name="tsm8f_mbv2", online=True))
    assert (resolved["width"], resolved["depth"], resolved["online"]) == (32, None, True)


def test_width_scales_like_torchvision() -> None:
    assert [make_divisible(c * 0.5) for c in (32, 16, 24, 96, 160)] == [16, 8, 16, 48, 80]
    model = build_model("tsm8f_mbv2", 4, width=16)
    assert model.features[0][0].out_channels == 16 and model.num_features == 1280


def test_torchvision_names_load_as_pretrained(tmp_path) -> None:
    model = build_model("tsm8f_mbv2", 4, width=16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state = {("classifier.1." + k[3:] if k.startswith("fc.") else k): v for k, v in state.items()}
    state["classifier.1.weight"] = torch.zeros(1000, model.num_features)
    state["classifier.1.bias"] = torch.zeros(1000)
    torch.save(state, tmp_path / "mbv2.pth")
    report = load_pretrained(build_model("tsm8f_mbv2", 4, width=16), tmp_path / "mbv2.pth")
    assert report.skipped == ["fc.weight", "fc.bias"] and "features.0.0.weight" in report.loaded


def test_a_sweep_run_config_of_a_resnet_base_trains_online_mobilenet(tmp_path) -> None:
    from pathlib import Path

    from tsm_dist.studies.runconfig import write_run_config

    base = Path(__file__).parents[2] / "configs" / "synthetic_tsm.yaml"  # a ResNet-18 config (depth 18)
    cfg = write_run_config(base, "tsm8f_mbv2", ["model.online=true"], tmp_path / "run.yaml")
    assert (cfg.model.name, cfg.model.depth, cfg.model.online, cfg.model.width) == ("tsm8f_mbv2", None, True, 16)
    written = (tmp_path / "run.yaml").read_text()
    assert "online: true" in written

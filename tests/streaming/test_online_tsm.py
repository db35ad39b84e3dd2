"""Online streaming TSM equals the offline uni-directional model frame by frame."""
from __future__ import annotations

import pytest
import torch

from tsm_dist.models import build_model
from tsm_dist.streaming import OnlineTSM
from tsm_dist.streaming.slots import CacheSlot


@pytest.mark.parametrize("depth,shift_place", [(18, "residual"), (26, "residual"), (26, "inplace")])
def test_online_equals_offline_unidirectional(depth: int, shift_place: str) -> None:
    torch.manual_seed(0)
    model = build_model("tsm8f_r50", 6, num_frames=5, depth=depth, width=16, online=True,
                        shift_place=shift_place).eval()
    clips = torch.randn(2, 5, 3, 32, 32)
    with torch.no_grad():
        offline = model.frame_logits(clips)  # (N, T, K)
        still = model.frame_logits(clips[:, :1].expand(-1, 5, -1, -1, -1))
    online = OnlineTSM(model)
    streamed = torch.stack([online(clips[:, t]) for t in range(5)], dim=1)
    assert torch.allclose(streamed, offline, rtol=1e-4, atol=1e-5)
    # The cache carries the past: a frame's output depends on the frames before it.
    assert not torch.allclose(still[:, 1], still[:, 0], atol=1e-4)
    assert not torch.allclose(offline[:, 1:], still[:, 1:], atol=1e-4)


def test_reset_starts_new_streams_and_the_model_is_left_as_it_is() -> None:
    torch.manual_seed(0)
    model = build_model("tsm8f_r50", 4, num_frames=3, depth=18, width=8, online=True).eval()
    online = OnlineTSM(model)
    a, b = torch.randn(1, 3, 3, 32, 32), torch.randn(1, 3, 3, 32, 32)
    with torch.no_grad():
        offline_b = model.frame_logits(b)
    for t in range(3):
        online(a[:, t])
    with torch.no_grad():  # whole clips run on the model while it streams: nothing of it was changed
        assert torch.equal(model.frame_logits(b), offline_b)
    assert isinstance(online.step.model.layer1[0].shift, CacheSlot)
    assert not any(isinstance(m, CacheSlot) for m in model.modules())
    assert online.step.model.layer1[0].conv1.weight is model.layer1[0].conv1.weight  # weights shared
    with pytest.raises(ValueError, match="changed shape"):
        online(torch.randn(2, 3, 32, 32))
    online.reset()
    streamed_b = torch.stack([online(b[:, t]) for t in range(3)], dim=1)
    assert torch.allclose(streamed_b, offline_b, rtol=1e-4, atol=1e-5)


def test_online_rejects_what_cannot_stream() -> None:
    with pytest.raises(ValueError, match="online=True"):
        OnlineTSM(build_model("tsm8f_r50", 4, depth=18, width=8))
    with pytest.raises(ValueError, match="2D model"):
        OnlineTSM(build_model("i3d3x1x1_r50", 4, depth=18, width=8))
    online = OnlineTSM(build_model("tsm8f_r50", 4, depth=18, width=8, online=True))
    with pytest.raises(ValueError, match="eval"):
        online(torch.zeros(1, 3, 32, 32))
    online.eval()
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        online(torch.zeros(1, 1, 3, 32, 32))


@pytest.mark.parametrize("form", ["concat", "mask", "split"])
def test_a_graph_step_of_a_train_mode_model_is_refused_not_traced_with_batch_statistics(form: str) -> None:
    from tsm_dist.streaming import ExplicitCacheTSM

    model = build_model("tsm8f_r50", 4, depth=18, width=8, online=True)  # train mode, as built
    step = ExplicitCacheTSM(model, form=form)
    with pytest.raises(ValueError, match="eval mode"):
        step(torch.zeros(1, 3, 32, 32))
    assert model.training  # the model's own mode is left as it is
    logits, *caches = step.eval()(torch.zeros(1, 3, 32, 32))
    assert logits.shape == (1, 4) and len(caches) == len(model.shift_modules())


def test_resnet50_cache_size() -> None:
    """1/8 of every residual block's input channels at 224x224, batch 1, float32."""
    with torch.device("meta"):
        online = OnlineTSM(build_model("tsm8f_r50", 400, online=True).eval())
        online(torch.empty(1, 3, 224, 224))
    # (input channels, side) of the 16 bottleneck blocks; stage strides sit on the 3x3 conv, so a
    # stage's first block still sees the previous resolution.
    blocks = ([(64, 56)] + [(256, 56)] * 2 + [(256, 56)] + [(512, 28)] * 3
              + [(512, 28)] + [(1024, 14)] * 5 + [(1024, 14)] + [(2048, 7)] * 2)
    assert online.cache_nbytes() == 4 * sum(c // 8 * s * s for c, s in blocks) == 2_809_856

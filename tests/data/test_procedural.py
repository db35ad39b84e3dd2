"""The procedural backend (``data.backend: procedural``): clips of the synthetic scenes rendered in memory,
deterministic by (scene seed, split, index), label noise at the rate asked, the file loaders' sharding
(every validation clip once over the ranks), resume mid-epoch, and ``tsm-dist train`` on it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tsm_dist.training.build import build_loader_from_config, has_val_set
from tsm_dist.config import ConfigError, load_config
from tsm_dist.data.procedural_loader import ProceduralLoader, expected_ceiling, render_clip
from tsm_dist.data.synthetic import frame_order, render_scene
from tsm_dist.data.video_loader import build_video_loader


def loader(**overrides) -> ProceduralLoader:
    options = dict(num_samples=24, batch_size=4, num_frames=8, crop_size=32, num_classes=4, preset="temporal",
                   label_noise=0.0, scene_seed=0, train=True)
    options.update(overrides)
    return ProceduralLoader(**options)


def batches(source: ProceduralLoader, epoch: int = 0, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    source.set_epoch(epoch, start)
    return list(source)


def test_a_clip_is_its_scene_in_its_class_order_and_the_same_every_time():
    frames, label = render_clip("temporal", 3, "train", 6, 8, 32, label_noise=0.0)
    assert label == 6 % 4 and frames.shape == (8, 32, 32, 3) and frames.dtype == np.uint8
    scene = render_scene(np.random.default_rng([3, 0, 6]), 8, 32)
    np.testing.assert_array_equal(frames, scene[frame_order(label, 8)])
    np.testing.assert_array_equal(frames, render_clip("temporal", 3, "train", 6, 8, 32, 0.0)[0])
    assert not np.array_equal(frames, render_clip("temporal", 4, "train", 6, 8, 32, 0.0)[0])  # another set
    assert not np.array_equal(frames, render_clip("temporal", 3, "val", 6, 8, 32, 0.0)[0])  # val is not train
    # noise redraws labels only: the frames are the same with and without it
    np.testing.assert_array_equal(frames, render_clip("temporal", 3, "train", 6, 8, 32, 0.5)[0])


def test_label_noise_keeps_the_expected_share_of_true_labels():
    n = 4000
    true = [render_clip("temporal", 0, "val", i, 2, 16, 0.2)[1] == i % 4 for i in range(n)]
    assert expected_ceiling(0.2, 4) == pytest.approx(0.85)
    assert abs(np.mean(true) - 0.85) < 3 * np.sqrt(0.85 * 0.15 / n)  # 3 sigma
    assert all(render_clip("temporal", 0, "val", i, 2, 16, 0.0)[1] == i % 4 for i in range(40))


def test_batches_are_normalized_clips_and_the_same_for_the_same_seed_and_epoch():
    first, again = batches(loader(seed=1)), batches(loader(seed=1))
    assert len(first) == 6 and first[0][0].shape == (4, 8, 3, 32, 32) and first[0][0].dtype == torch.float32
    assert abs(float(first[0][0].mean())) < 2.5  # ImageNet-normalized, not 0..255
    for (x, y), (x2, y2) in zip(first, again):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    other_epoch = batches(loader(seed=1), epoch=1)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other_epoch))  # reshuffled per epoch
    resumed = batches(loader(seed=1), epoch=0, start=4)
    assert len(resumed) == 2 and torch.equal(resumed[0][0], first[4][0])


def test_validation_shards_see_every_clip_once_with_padding():
    shards = [batches(loader(num_samples=10, train=False, shard_id=k, num_shards=2, batch_size=4)) for k in (0, 1)]
    labels = torch.cat([y for shard in shards for _, y in shard])
    assert len(shards[0]) == len(shards[1]) == 2 and int((labels >= 0).sum()) == 10
    assert sorted(labels[labels >= 0].tolist()) == sorted(i % 4 for i in range(10))


def test_bad_options_are_refused_in_one_line():
    with pytest.raises(ValueError, match="the temporal preset has 4 classes, num_classes is 8"):
        loader(num_classes=8)
    with pytest.raises(ValueError, match="label_noise must be in"):
        loader(label_noise=1.5)
    with pytest.raises(ValueError, match="needs num_samples > 0"):
        build_video_loader(None, None, backend="procedural", num_frames=8, batch_size=2, crop_size=32, train=True,
                           num_classes=4)
    with pytest.raises(ConfigError, match="data.num_samples must be > 0 with data.backend=procedural"):
        load_config(None, ["data.backend=procedural"])
    with pytest.raises(ConfigError, match="data.label_noise"):
        load_config(None, ["data.backend=procedural", "data.num_samples=8", "data.label_noise=-0.1"])


def test_config_builds_both_splits_through_the_one_builder():
    from tsm_dist.distributed.engine import Engine  # noqa: F401  (the type the builder takes)

    cfg = load_config(None, ["data.backend=procedural", "data.num_samples=16", "data.num_val_samples=6",
                             "data.batch_size=4", "data.crop_size=32", "data.label_noise=0.2", "model.num_classes=4",
                             "model.num_frames=8", "data.scene_seed=5"])
    assert has_val_set(cfg) and not has_val_set(load_config(None, ["data.backend=procedural", "data.num_samples=8"]))

    class OneRank:
        rank, size, device = 0, 1, torch.device("cpu")

    train_loader = build_loader_from_config(cfg, OneRank(), train=True)
    val_loader = build_loader_from_config(cfg, OneRank(), train=False)
    assert (len(train_loader), len(val_loader)) == (4, 2)
    assert (train_loader.scene_seed, train_loader.label_noise, val_loader.num_samples) == (5, 0.2, 6)


def test_train_runs_on_the_procedural_backend(tmp_path):
    from tsm_dist.runlog.records import read_records
    from tsm_dist.training.train import train

    cfg = load_config(None, [
        "engine.name=torch", "data.backend=procedural", "data.num_samples=16", "data.num_val_samples=8",
        "data.batch_size=4", "data.crop_size=32", "model.num_classes=4", "model.num_frames=8", "model.depth=18",
        "model.width=8", "model.classifier_init=linear", "optim.base_batch=4", "optim.warmup_epochs=1",
        "optim.warmup_min_steps=3", "train.epochs=2", "log.wandb=disabled", "log.progress=false",
        "log.interval=1", "train.checkpoint_every_epochs=1", "train.eval_every_epochs=1"])
    assert train(cfg, tmp_path) == 0
    records = read_records(tmp_path / "metrics.jsonl")
    header = next(r for r in records if r["type"] == "header")
    assert (header["steps_per_epoch"], header["warmup_steps"]) == (4, 4)  # 1 epoch = 4 steps >= the floor 3
    evals = [r for r in records if r["type"] == "eval"]
    assert [e["num_samples"] for e in evals] == [8, 8] and records[-1]["status"] == "completed"

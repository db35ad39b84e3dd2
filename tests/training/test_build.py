"""Config -> run objects (tsm_dist.training.build): the one data-path rule, flip maps, AMP dtype, model arguments."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tsm_dist.config import Config, ConfigError, config_from_dict, load_config
from tsm_dist.training.build import (
    amp_dtype, build_loader_from_config, build_model_from_config, flip_label_map, resolve_list,
)
from tsm_dist.training.run_spec import resolve_run


def test_relative_list_under_root_first_then_working_directory(tmp_path, monkeypatch):
    cfg = Config()
    root, cwd = tmp_path / "root", tmp_path / "cwd"
    root.mkdir(), cwd.mkdir()
    monkeypatch.chdir(cwd)
    (cwd / "train.txt").write_text("a.webm 0\n")
    cfg.data.root, cfg.data.train_list = str(root), "train.txt"
    assert resolve_list(cfg, "train_list") == "train.txt"  # not under the root: the working directory's
    (root / "train.txt").write_text("b.webm 0\n")
    assert resolve_list(cfg, "train_list") == str(root / "train.txt")
    cfg.data.train_list = str(cwd / "train.txt")
    assert resolve_list(cfg, "train_list") == str(cwd / "train.txt")  # absolute: kept
    assert resolve_list(cfg, "val_list") is None


def test_flip_label_map_file_and_bad_line(tmp_path):
    cfg = Config()
    assert flip_label_map(cfg) is None
    path = tmp_path / "flip.txt"
    path.write_text("0 1\n1 0\n\n")
    cfg.data.flip_label_map = str(path)
    assert flip_label_map(cfg) == {0: 1, 1: 0}
    path.write_text("0 1\n2\n")
    with pytest.raises(ConfigError, match=f"{path}:2: expected two class ids"):
        flip_label_map(cfg)


def test_amp_dtype():
    cfg = Config()
    assert amp_dtype(cfg) is None
    cfg.train.amp = "bf16"
    assert amp_dtype(cfg) is torch.bfloat16
    cfg.train.amp = "fp16"
    assert amp_dtype(cfg) is torch.float16


def test_model_builder_gets_the_model_section():
    cfg = load_config(None, ["data.train_list=t.txt", "model.name=tsn8f_r50", "model.num_classes=7", "model.depth=18"])
    seen = {}
    build_model_from_config(cfg, lambda name, **kw: seen.update(name=name, **kw))
    assert seen["name"] == "tsn8f_r50" and seen["num_classes"] == 7 and seen["depth"] == 18
    assert seen["num_frames"] == 8 and seen["width"] == 64  # the registry's, where the config says nothing


@pytest.mark.parametrize("name, frames", [("i3d3x3x3_r50", 16), ("i3d3x1x1_r50", 32), ("tsm8f_r50", 8)])
def test_model_options_left_unset_are_the_models_own_once_loaded(tmp_path, name, frames):
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  name: {name}\n  num_classes: 5\ndata:\n  train_list: t.txt\n")
    cfg = load_config(path)  # the one place model options are resolved
    assert cfg.model.num_frames == frames and cfg.model.depth == 50 and cfg.model.dropout == 0.5
    assert load_config(path, ["model.num_frames=4"]).model.num_frames == 4  # a value in the config wins
    # what a checkpoint stores reads back as the same resolved config, without --set strings
    again = config_from_dict(cfg.to_dict(), "checkpoint c.pt")
    assert again == cfg
    with pytest.raises(ConfigError, match="checkpoint c.pt: model.fold_div"):
        config_from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "fold_div": "x"}}, "checkpoint c.pt")


def test_loader_and_model_get_the_resolved_frame_count():
    cfg = load_config(None, ["model.name=i3d3x1x1_r50", "data.backend=random", "data.num_samples=8"])
    engine = SimpleNamespace(rank=1, size=2, device=torch.device("cpu"))
    seen = {}
    build_loader_from_config(cfg, engine, train=True, builder=lambda lst, root, **kw: seen.update(kw))
    assert seen["num_frames"] == 32 and (seen["shard_id"], seen["num_shards"]) == (1, 2)
    build_model_from_config(cfg, lambda name, **kw: seen.update(model_frames=kw["num_frames"]))
    assert seen["model_frames"] == 32


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError, match="model.name='resnet9000' is not a known model"):
        load_config(None, ["data.train_list=t.txt", "model.name=resnet9000"])


def test_a_run_is_resolved_once_for_its_world():
    cfg = load_config(None, ["data.backend=random", "data.num_samples=64", "data.batch_size=4",
                             "train.global_batch=32", "optim.base_lr=0.1", "optim.base_batch=16",
                             "train.epochs=10", "optim.warmup_epochs=2"])
    run = resolve_run(cfg, world_size=2)
    assert (run.batch.per_gpu_batch, run.batch.world_size, run.accumulate, run.batch.global_batch) == (4, 2, 4, 32)
    schedule = run.lr_schedule(steps_per_epoch=2)  # the two halves of large batch from one description
    assert schedule.peak_lr == pytest.approx(0.2) and schedule.warmup_steps == 4 and schedule.total_steps == 20
    cfg.train.epochs = 99  # the run holds its own copy: a caller's later change does not reach it
    assert run.config.train.epochs == 10
    # --accumulate is a typed value on the config, not a --set string parsed back
    assert load_config(None, ["data.backend=random", "data.num_samples=8"], {"train.accumulate": 3}).train.accumulate == 3
    with pytest.raises(ConfigError, match="train.accumulate: expected int"):
        load_config(None, ["data.backend=random", "data.num_samples=8"], {"train.accumulate": "3"})

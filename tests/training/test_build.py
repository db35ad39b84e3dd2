"""Config -> run objects (tsm_dist.training.build): the one data-path rule, flip maps, AMP dtype, model arguments."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tsm_dist.training.build import (amp_dtype, build_loader_from_config, build_model_from_config, flip_label_map,
                            resolve_list, resolve_model)
from tsm_dist.config import Config, ConfigError, load_config


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
    cfg = Config()
    cfg.model.name, cfg.model.num_classes, cfg.model.depth = "tsn8f_r50", 7, 18
    seen = {}
    build_model_from_config(cfg, lambda name, **kw: seen.update(name=name, **kw))
    assert seen["name"] == "tsn8f_r50" and seen["num_classes"] == 7 and seen["depth"] == 18
    assert seen["num_frames"] == 8 and seen["width"] == 64  # the registry's, where the config says nothing


@pytest.mark.parametrize("name, frames", [("i3d3x3x3_r50", 16), ("i3d3x1x1_r50", 32), ("tsm8f_r50", 8)])
def test_model_options_left_unset_are_the_models_own(tmp_path, name, frames):
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  name: {name}\n  num_classes: 5\ndata:\n  train_list: t.txt\n")
    cfg = load_config(path)
    assert cfg.model.num_frames is None and cfg.model.depth is None  # the config leaves them to the model
    resolved = resolve_model(cfg)
    assert resolved.model.num_frames == frames and resolved.model.depth == 50 and resolved.model.dropout == 0.5
    assert cfg.model.num_frames is None  # the loaded config is not changed
    cfg.model.num_frames = 4
    assert resolve_model(cfg).model.num_frames == 4  # a value in the config wins


def test_loader_and_model_get_the_resolved_frame_count():
    cfg = Config()
    cfg.model.name, cfg.data.backend, cfg.data.num_samples = "i3d3x1x1_r50", "random", 8
    engine = SimpleNamespace(rank=1, size=2, device=torch.device("cpu"))
    seen = {}
    build_loader_from_config(cfg, engine, train=True, builder=lambda lst, root, **kw: seen.update(kw))
    assert seen["num_frames"] == 32 and (seen["shard_id"], seen["num_shards"]) == (1, 2)
    build_model_from_config(cfg, lambda name, **kw: seen.update(model_frames=kw["num_frames"]))
    assert seen["model_frames"] == 32


def test_unknown_model_is_a_config_error():
    cfg = Config()
    cfg.model.name = "resnet9000"
    with pytest.raises(ConfigError, match="model.name='resnet9000' is not a known model"):
        resolve_model(cfg)

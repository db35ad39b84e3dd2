"""Config -> run objects (tsm_dist.build): the one data-path rule, flip maps, AMP dtype, model arguments."""
from __future__ import annotations

import pytest
import torch

from tsm_dist.build import amp_dtype, build_model_from_config, flip_label_map, resolve_list
from tsm_dist.config import Config, ConfigError


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
    cfg.model.name, cfg.model.num_classes, cfg.model.depth = "tsn_r50", 7, 18
    seen = {}
    build_model_from_config(cfg, lambda name, **kw: seen.update(name=name, **kw))
    assert seen["name"] == "tsn_r50" and seen["num_classes"] == 7 and seen["depth"] == 18

"""Configs are typed and validated: unknown keys, wrong types and misfit batches name the culprit."""
from __future__ import annotations

from pathlib import Path

import pytest

from tsm_dist.config import ConfigError, load_config
from tsm_dist.training.batch_plan import plan_batch

REPO = Path(__file__).resolve().parents[2]
PAPER_CONFIGS = ["tsm8f_r50_kinetics400.yaml", "i3d3x3x3_r50_kinetics400.yaml", "i3d3x1x1_r50_kinetics400.yaml",
                 "tsm8f_r50_somethingv2.yaml"]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", PAPER_CONFIGS + ["synthetic_tsm.yaml", "synthetic_tsn.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    from tsm_dist.models import list_models

    assert cfg.model.name in list_models()
    assert cfg.model.name[:3] in name  # tsm / tsn / i3d, as the file name says


def test_paper_recipe_in_kinetics_config():
    cfg = load_config(REPO / "configs" / "tsm8f_r50_kinetics400.yaml")
    assert (cfg.optim.base_lr, cfg.optim.base_batch, cfg.train.epochs) == (0.01, 64, 100)
    assert (cfg.optim.decay_epochs, cfg.optim.decay_factor) == ([40.0, 80.0], 0.1)
    assert (cfg.optim.weight_decay, cfg.model.dropout, cfg.optim.momentum) == (1e-4, 0.5, 0.9)


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = _write(tmp_path, "model:\n  name: tsm8f_r50\n  num_clases: 4\n")
    with pytest.raises(ConfigError, match=rf"{path}:3: unknown key 'model.num_clases' \(did you mean 'num_classes'\?\)"):
        load_config(path)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml:1: unknown key 'optimizer' \(did you mean 'optim'\?\)"):
        load_config(_write(tmp_path, "optimizer:\n  base_lr: 0.1\n"))


@pytest.mark.parametrize("text, match", [
    ("data:\n  batch_size: eight\n", r"c.yaml:2: data.batch_size: expected int, got str 'eight'"),
    ("data:\n  batch_size: 8.5\n", r"data.batch_size: expected int, got float"),
    ("train:\n  channels_last: 1\n", r"train.channels_last: expected bool, got int"),
    ("optim:\n  decay_epochs: 40\n", r"optim.decay_epochs: expected a list"),
    ("optim:\n  schedule: linear\n", r"optim.schedule='linear' is not one of step, cosine"),
    ("train:\n  amp: fp8\n", r"train.amp='fp8' is not one of none, bf16, fp16"),
    ("data:\n  batch_size: 0\n", r"data.batch_size=0 must be > 0"),
    ("model:\n  dropout: 1.5\n", r"model.dropout=1.5 must be in \[0, 1\)"),
    ("model: [1, 2]\n", r"section 'model' must be a mapping"),
    ("engine:\n  name: torch\n  timeline: /tmp/t.json\n", r"engine.timeline is a Horovod option"),
    ("engine:\n  elastic: true\n  name: torch\n", r"engine.elastic needs engine.name=horovod"),
    ("engine:\n  elastic: true\n  elastic_min_ranks: 4\n  elastic_max_ranks: 2\n",
     r"engine.elastic_min_ranks=4 must be <= engine.elastic_max_ranks=2"),
    ("engine:\n  elastic_max_ranks: 4\n", r"engine.elastic_max_ranks is an elastic option; set engine.elastic: true"),
    ("engine:\n  elastic: true\n  commit_every: 0\n", r"engine.commit_every=0 must be > 0"),
    ("engine:\n  elastic_min_ranks: -1\n", r"engine.elastic_min_ranks=-1 must be >= 0"),
    ("engine:\n  on_resize: keep_lr\n", r"engine.on_resize='keep_lr' is not one of keep_global_batch, keep_rank_batch"),
])
def test_wrong_types_and_values(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, text), ["data.backend=random", "data.num_samples=8"])


def test_overrides_are_typed_and_checked():
    cfg = load_config(None, ["data.backend=random", "data.num_samples=16", "optim.base_lr=0.1",
                             "model.pretrained=null", "model.name=tsn8f_r50", "optim.decay_epochs=[10, 20]"])
    assert cfg.optim.base_lr == 0.1 and cfg.model.pretrained is None and cfg.optim.decay_epochs == [10.0, 20.0]
    with pytest.raises(ConfigError, match=r"--set train.epocs=3: unknown key 'train.epocs' \(did you mean 'epochs'\?\)"):
        load_config(None, ["train.epocs=3"])
    with pytest.raises(ConfigError, match=r"--set train.epochs=many: train.epochs: expected int"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["train.epochs"])


def test_batch_plan_and_world_size_misfit():
    cfg = load_config(None, ["data.backend=random", "data.num_samples=64", "data.batch_size=8",
                             "train.global_batch=64"])
    plan = plan_batch(cfg, world_size=2)
    assert (plan.accumulate, plan.global_batch) == (4, 64)
    with pytest.raises(ConfigError, match=r"train.global_batch=64 does not fit the world: data.batch_size=8 x 3 ranks"):
        plan_batch(cfg, world_size=3)
    cfg.train.accumulate = 2
    with pytest.raises(ConfigError, match="needs accumulate=4 on 2 ranks, but train.accumulate=2"):
        plan_batch(cfg, world_size=2)
    cfg.train.global_batch = 0
    assert plan_batch(cfg, world_size=3).global_batch == 8 * 3 * 2


def test_cli_reports_config_errors_before_starting(tmp_path, capsys):
    from tsm_dist.training.train import main

    path = _write(tmp_path, "train:\n  epochs: 2\n  bogus: 1\n")
    assert main(["--config", str(path), "--workdir", str(tmp_path / "w")]) == 2
    assert "c.yaml:3: unknown key 'train.bogus'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing started


def test_batch_that_does_not_fit_the_data_is_an_error_on_every_rank(tmp_path, capsys):
    from tsm_dist.training.train import main

    code = main(["--config", str(REPO / "configs" / "synthetic_tsm.yaml"), "--workdir", str(tmp_path / "w"),
                 "--set", "data.backend=random", "--set", "data.num_samples=12", "--set", "data.batch_size=4",
                 "--set", "log.wandb=disabled", "--set", "engine.name=torch", "--accumulate", "4"])
    assert code == 2
    assert "does not fit the training set" in capsys.readouterr().err

"""The train loop in one process (engine torch, no launcher): AMP paths and a non-finite loss."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from tiny_run import TensorLoader, TinyNet, config
from tsm_dist.runlog.records import read_records
from tsm_dist.training.train import EXIT_NONFINITE, train


def model_builder(name: str, *, num_classes: int, num_frames: int, dropout: float, **_: Any) -> TinyNet:
    return TinyNet(num_classes, num_frames, dropout)


class PoisonedLoader(TensorLoader):
    """Yields a NaN clip as the 3rd batch of epoch 0."""

    def __iter__(self):
        for b, (clips, labels) in enumerate(super().__iter__()):
            yield (clips * float("nan") if (self.epoch, b) == (0, 2) else clips), labels


def loader_builder(file_list: Any, root: Any, *, batch_size: int, shard_id: int, num_shards: int, seed: int,
                   train: bool, num_samples: int, **_: Any) -> TensorLoader:
    return PoisonedLoader(num_samples, batch_size, shard_id, num_shards, seed, train) if train and seed == 13 \
        else TensorLoader(num_samples, batch_size, shard_id, num_shards, seed, train)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, amp):
    cfg = config("torch", **{"train.amp": amp, "train.epochs": 1, "train.eval_every_epochs": 1})
    assert train(cfg, tmp_path, model_builder=model_builder, loader_builder=loader_builder) == 0
    records = read_records(tmp_path / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["type"] == "step"]
    assert len(losses) == 16 and all(torch.isfinite(torch.tensor(losses)))
    assert records[-1]["status"] == "completed"


def test_nonfinite_loss_stops_with_the_step_number(tmp_path, capsys):
    cfg = config("torch", **{"train.seed": 13, "train.checkpoint_every_epochs": 1})
    assert train(cfg, tmp_path, model_builder=model_builder, loader_builder=loader_builder) == EXIT_NONFINITE
    assert "NaN or Inf at optimizer step 3 (epoch 0)" in capsys.readouterr().err
    end = read_records(tmp_path / "metrics.jsonl")[-1]
    assert (end["status"], end["step"]) == ("failed", 3)
    assert not (tmp_path / "checkpoints").exists()  # nothing saved from a diverged model

"""Checkpoint files, top-k counts, the progress bar and the preemption flag (single process)."""
from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import pytest
import torch

from tsm_dist import checkpoint as ckpt
from tsm_dist.errors import CheckpointError
from tsm_dist.metrics import Progress, topk_counts
from tsm_dist.preemption import (PREEMPTED_EXIT_CODE, REQUEUE_ENV, TERMINATED_EXIT_CODE, PreemptionFlag,
                                 exit_code_for, stop_message)

REPO_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "synthetic_tsm.yaml")


def test_keep_last_n_plus_best_and_latest(tmp_path):
    for i, step in enumerate([10, 20, 30, 40]):
        ckpt.save_checkpoint(tmp_path, {"model": {"w": torch.tensor(float(step))}}, epoch=i + 1, step=step,
                             keep_last=2, is_best=step == 20)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pt", "ckpt_e0003_s00000030.pt", "ckpt_e0004_s00000040.pt"]
    assert ckpt.latest_checkpoint(tmp_path).name == "ckpt_e0004_s00000040.pt"
    assert ckpt.load_checkpoint(tmp_path / "best.pt")["model"]["w"].item() == 20.0
    assert ckpt.resolve_resume("auto", tmp_path.parent / "nothing") is None  # a fresh run


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    ckpt.atomic_save({"model": {}}, tmp_path / "a.pt")

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_save({"model": {}}, tmp_path / "b.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]  # no b.pt, no temp file


def test_corrupt_checkpoint_is_named(tmp_path):
    bad = tmp_path / "ckpt_e0001_s00000001.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=f"checkpoint {bad} cannot be read"):
        ckpt.load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "missing.pt"), tmp_path)


def test_topk_counts_skip_padded_samples():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.9, 0.0, 0.1]])
    labels = torch.tensor([1, 2, 1, -1])  # last one is padding
    n, top1, top2 = topk_counts(logits, labels, ks=(1, 2)).tolist()
    assert (n, top1, top2) == (3, 1, 2)
    assert topk_counts(logits[:0], labels[:0]).tolist() == [0, 0, 0]


def test_preemption_flag_records_signals_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionFlag() as flag:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.requested and flag.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before
    assert PREEMPTED_EXIT_CODE == 75


from tsm_dist.metrics import Progress, topk_counts
from tsm_dist.preemption import (PREEMPTED_EXIT_CODE, REQUEUE_ENV, TERMINATED_EXIT_CODE, PreemptionFlag,
                                 exit_code_for, stop_message)

REPO_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "synthetic_tsm.yaml")

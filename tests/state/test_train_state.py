"""Checkpoint files, top-k counts, the progress bar and the preemption flag (single process)."""
from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import pytest
import torch

from tsm_dist.state import checkpoint as ckpt
from tsm_dist.commands.exit_codes import CheckpointError
from tsm_dist.training.accuracy import topk_counts
from tsm_dist.runlog.progress import Progress
from tsm_dist.state.stop_signals import (PREEMPTED_EXIT_CODE, REQUEUE_ENV, TERMINATED_EXIT_CODE, StopSignals,
                                 exit_code_for, stop_message)

REPO_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "synthetic_tsm.yaml")


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


def test_stop_signals_record_signals_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as flag:
        assert flag.level == 0 and flag.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.level == 1 and flag.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before
    assert PREEMPTED_EXIT_CODE == 75


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("enabled, tty, shown", [(None, True, True), (None, False, False), (True, False, True),
                                                 (False, True, False)])
def test_progress_bar_only_on_a_terminal_unless_asked(enabled, tty, shown):
    stream = _Stream(tty)
    bar = Progress(10, enabled=enabled, stream=stream, initial=2)  # resumed at step 2
    bar.update(5, 1, loss=0.5, lr=0.1)
    bar.close()
    text = stream.getvalue()
    assert bool(text) == shown
    if shown:
        assert "epoch 1" in text and "5/10" in text and "loss=0.5" in text


def test_stop_signals_rank_sigterm_over_the_warning_and_exit_with_the_decided_code():
    import subprocess
    import sys

    with StopSignals() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)  # a later warning does not downgrade a cancel
        assert flag.level == 2 and flag.received == signal.SIGTERM
    assert exit_code_for(1) == PREEMPTED_EXIT_CODE and exit_code_for(2) == TERMINATED_EXIT_CODE == 143
    # once the outcome is decided, a launcher's SIGTERM (horovodrun/mpirun terminate the remaining
    # ranks when the first exits) ends the process with that code, not with 143
    code = ("import os, signal, time\nfrom tsm_dist.state.stop_signals import StopSignals\n"
            "with StopSignals() as s:\n    s.exit_on_signal(75)\n    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(5)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == 75, proc.stderr


def test_stop_message_says_what_the_job_script_will_do():
    assert "requeued" in stop_message(1, 7, {REQUEUE_ENV: "requeue"})
    assert "resubmitted" in stop_message(1, 7, {REQUEUE_ENV: "resubmit"})
    assert "not requeued" in stop_message(1, 7, {REQUEUE_ENV: "none"})
    assert "not requeued" in stop_message(1, 7, {})  # started by hand: nobody requeues
    assert "not requeued by the job script" in stop_message(2, 7, {REQUEUE_ENV: "requeue"})  # a cancel sticks


def test_stale_temporaries_of_killed_writes_are_removed(tmp_path):
    ckpt.save_checkpoint(tmp_path, {"model": {}}, epoch=1, step=5, keep_last=2)
    stale = [tmp_path / ".ckpt_e0001_s00000009.pt.k2j3h4.tmp", tmp_path / ".best.pt.zz.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    (tmp_path / "notes.tmp").write_text("not ours")
    assert sorted(p.name for p in ckpt.remove_stale_temporaries(tmp_path)) == sorted(p.name for p in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_e0001_s00000005.pt", "notes.tmp"]


def test_resume_auto_skips_an_unreadable_newest_checkpoint(tmp_path):
    directory = tmp_path / ckpt.CHECKPOINT_DIR
    ckpt.save_checkpoint(directory, {"model": {"w": torch.tensor(1.0)}}, epoch=1, step=10, keep_last=3)
    ckpt.save_checkpoint(directory, {"model": {"w": torch.tensor(2.0)}}, epoch=2, step=20, keep_last=3)
    newest = directory / ckpt.checkpoint_name(2, 20)
    newest.write_bytes(newest.read_bytes()[:100])  # a file system that lost the tail
    warnings: list[str] = []
    path, state = ckpt.load_resume("auto", tmp_path, warn=warnings.append)
    assert path.name == ckpt.checkpoint_name(1, 10) and state["model"]["w"].item() == 1.0
    assert len(warnings) == 1 and "skipped 1 unreadable" in warnings[0] and newest.name in warnings[0]
    (directory / ckpt.checkpoint_name(1, 10)).write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoint"):
        ckpt.load_resume("auto", tmp_path, warn=warnings.append)
    assert ckpt.load_resume("auto", tmp_path / "fresh") == (None, None)


def test_check_model_names_both_models():
    state = {"model": {}, "config": {"model": {"name": "tsm8f_r50", "num_classes": 4, "depth": 18, "width": 8,
                                               "num_frames": 8}}}
    ckpt.check_model(state, dict(state["config"]["model"]), "c.pt")  # the same model passes
    with pytest.raises(CheckpointError, match="it has name=tsm8f_r50, width=8, the config asks for "
                                              "name=tsn8f_r50, width=16"):
        ckpt.check_model(state, {**state["config"]["model"], "name": "tsn8f_r50", "width": 16}, "c.pt")
    ckpt.check_model({"model": {}}, {"name": "x"}, "old.pt")  # no recorded config: nothing to compare


class _SignalAt:
    """A loader that sends this process SIGUSR1 (as a scheduler's warning) before batch ``i`` of an epoch
    when ``when(epoch, i)`` holds; otherwise the wrapped loader as it is."""

    def __init__(self, inner, when):
        self.inner, self.when, self.epoch = inner, when, 0

    def __len__(self):
        return len(self.inner)

    @property
    def skipped(self):
        return self.inner.skipped

    def set_epoch(self, epoch, start=0):
        self.epoch = epoch
        self.inner.set_epoch(epoch, start)

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            if self.when(self.epoch, i):
                os.kill(os.getpid(), signal.SIGUSR1)
            yield batch


def test_stop_on_an_epochs_last_step_redoes_its_evaluation_on_resume(tmp_path):
    """SIGUSR1 arrives during the last batch of epoch 0: the checkpoint says the epoch's evaluation is
    pending, and the resumed run evaluates epoch 1's start (and writes best.pt) before training on."""
    from tsm_dist.training.build import default_loader_builder
    from tsm_dist.config import load_config
    from tsm_dist.runlog.records import read_records
    from tsm_dist.training.train import train

    cfg = load_config(REPO_CONFIG, ["data.backend=random", "data.num_samples=16", "data.batch_size=4",
                                    "data.crop_size=32", "model.width=8", "train.epochs=2",
                                    "log.wandb=disabled", "log.progress=false", "engine.name=torch"])

    def builder(*args, **kwargs):
        loader = default_loader_builder()(*args, **kwargs)
        last = len(loader) - 1
        return _SignalAt(loader, lambda epoch, i: epoch == 0 and i == last) if kwargs["train"] else loader

    assert train(cfg, tmp_path, loader_builder=builder) == PREEMPTED_EXIT_CODE
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / ckpt.CHECKPOINT_DIR))
    assert (saved["epoch"], saved["step"], saved["epoch_end_pending"]) == (1, 4, True)
    assert not (tmp_path / ckpt.CHECKPOINT_DIR / ckpt.BEST_NAME).exists()
    assert train(cfg, tmp_path, resume="auto") == 0
    records = read_records(tmp_path / "metrics.jsonl")
    evals = [(r["epoch"], r["step"]) for r in records if r["type"] == "eval"]
    assert evals == [(1, 4), (2, 8)], evals  # epoch 1's evaluation was redone, not lost
    assert (tmp_path / ckpt.CHECKPOINT_DIR / ckpt.BEST_NAME).exists()


def test_second_ctrl_c_interrupts():
    with StopSignals() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.level == 2
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            signal.sigtimedwait([], 0.1) if hasattr(signal, "sigtimedwait") else None


def test_stop_signal_during_an_evaluation_stops_before_the_next_step(tmp_path):
    """A signal that arrives while epoch 0 is evaluated stops the run right after that evaluation (checkpoint
    at the epoch boundary), not one training step (and maybe another evaluation) later: the scheduler's
    grace time may not cover more."""
    from tsm_dist.training.build import default_loader_builder
    from tsm_dist.config import load_config
    from tsm_dist.runlog.records import read_records
    from tsm_dist.training.train import train

    cfg = load_config(REPO_CONFIG, ["data.backend=random", "data.num_samples=16", "data.batch_size=4",
                                    "data.crop_size=32", "model.width=8", "train.epochs=3",
                                    "log.wandb=disabled", "log.progress=false", "engine.name=torch"])
    signalled = []

    def first_time(epoch, i):
        signalled.append(True)
        return len(signalled) == 1

    def builder(*args, **kwargs):
        loader = default_loader_builder()(*args, **kwargs)
        return loader if kwargs["train"] else _SignalAt(loader, first_time)

    assert train(cfg, tmp_path, loader_builder=builder) == PREEMPTED_EXIT_CODE
    saved = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / ckpt.CHECKPOINT_DIR))
    assert (saved["epoch"], saved["step"], saved["epoch_end_pending"]) == (1, 4, False)
    end = [r for r in read_records(tmp_path / "metrics.jsonl") if r["type"] == "end"]
    assert [(r["status"], r["step"]) for r in end] == [("preempted", 4)]

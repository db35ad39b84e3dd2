"""Stop signals: USR1 and TERM become a flag the loop acts on at a step boundary, and the exit code it decides."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tsm_dist.state import checkpoint as ckpt
from tsm_dist.state.stop_signals import (
    PREEMPTED_EXIT_CODE, REQUEUE_ENV, TERMINATED_EXIT_CODE, StopSignals, exit_code_for, stop_message,
)

REPO_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "synthetic_tsm.yaml")


def test_stop_signals_record_signals_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as flag:
        assert flag.level == 0 and flag.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.level == 1 and flag.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before
    assert PREEMPTED_EXIT_CODE == 75


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

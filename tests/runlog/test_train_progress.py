"""Rank 0's progress (issue 32 item 1): plain lines in a batch log, the bar on a terminal, one summary line.

Both modes as users meet them: 2 ranks under a real ``horovodrun`` (stderr a pipe, as in every batch job)
and one process whose stderr is a pseudo-terminal. The epoch shown agrees with the checkpoint's and the
eval record's (1-based).
"""
from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

import pytest

from conftest import PYTHON, REPO, horovodrun, launcher_env, run_bounded
from tsm_dist.state.checkpoint import latest_checkpoint, load_checkpoint
from tsm_dist.runlog.progress import Progress, duration
from tsm_dist.runlog.records import read_last_run

CONFIG = str(REPO / "configs" / "synthetic_tsm.yaml")
TINY = ["model.width=8", "model.num_frames=2", "data.backend=random", "data.num_samples=32", "data.batch_size=2",
        "data.crop_size=32", "data.scale_size=32", "log.wandb=disabled", "log.interval=2", "train.epochs=2"]


def _args(workdir, *sets: str) -> list[str]:
    return ["-m", "tsm_dist.training.train", "--config", CONFIG, "--workdir", str(workdir),
            *[a for s in [*TINY, *sets] for a in ("--set", s)]]


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_every_n_seconds_and_per_epoch_without_a_terminal():
    stream, clock = io.StringIO(), _Clock()
    progress = Progress(100, stream=stream, initial=0, epochs=4, every_s=30, clock=clock)
    clock.now = 10
    progress.update(10, 1, loss=1.5, lr=0.1, clips_s=50.0, data_time=0.1, step_time=0.4)
    assert stream.getvalue() == ""  # not yet 30 s
    clock.now = 40
    progress.update(20, 1, loss=1.25, lr=0.1, clips_s=70.0, data_time=0.3, step_time=0.4)
    first = stream.getvalue().splitlines()
    # mean clips/s and data-wait share over the window; ETA from 20 of 100 steps in 40 s
    assert first == ["tsm-dist train: epoch 1/4 step 20/100, loss 1.25, lr 0.1, 60.0 clips/s, data wait 50 %, "
                     "ETA 2m40s, elapsed 40s"], first
    clock.now = 50
    progress.epoch_done(1, 25, "val top-1 50.0 % (best 50.0 %, epoch 1)")
    last = stream.getvalue().splitlines()[-1]
    assert last.startswith("tsm-dist train: epoch 1/4 done, step 25/100, ETA 2m30s") and last.endswith("epoch 1)")


@pytest.mark.parametrize("enabled, tty, bar, lines", [(None, True, True, False), (None, False, False, True),
                                                      (True, False, True, False), (False, True, False, False)])
def test_the_mode_follows_the_terminal_unless_asked(enabled, tty, bar, lines):
    stream = io.StringIO()
    stream.isatty = lambda: tty  # type: ignore[method-assign]
    progress = Progress(10, enabled=enabled, stream=stream, initial=2, epochs=2, every_s=0)
    progress.update(5, 1, loss=0.5, lr=0.1)
    progress.close()
    text = stream.getvalue()
    assert ("5/10 [" in text) == bar and ("tsm-dist train: epoch 1/2 step 5/10" in text) == lines, text


def test_duration():
    assert [duration(s) for s in (0, 59.6, 95, 3599, 7325)] == ["0s", "1m00s", "1m35s", "59m59s", "2h02m"]


def _checked_against_records(workdir) -> None:
    run = read_last_run(workdir / "metrics.jsonl")
    assert [r["epoch"] for r in run.evals] == [1, 2]  # the epochs the lines and the bar named
    assert load_checkpoint(latest_checkpoint(workdir / "checkpoints"))["epoch"] == 2


@pytest.mark.multirank
def test_under_horovodrun_rank_0_writes_progress_lines_and_a_summary(tmp_path):
    workdir = tmp_path / "w"
    cmd = horovodrun(2, PYTHON, *_args(workdir, "log.progress_every_s=0"))
    result = run_bounded(cmd, timeout=420, env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:]
    out = result.stdout
    # 32 clips / (2 ranks x 2) = 8 steps per epoch; a line at every logged step (every_s=0) and epoch end
    steps = re.findall(r"tsm-dist train: epoch (\d)/2 step (\d+)/16, loss \S+, lr \S+, [\d.]+ clips/s, "
                       r"data wait \d+ %, ETA \S+, elapsed", out)
    assert [(int(e), int(s)) for e, s in steps] == [(1, 2), (1, 4), (1, 6), (1, 8), (2, 10), (2, 12), (2, 14),
                                                    (2, 16)][:len(steps)] and len(steps) >= 7, out[-3000:]
    assert len(re.findall(r"tsm-dist train: epoch 1/2 done, step 8/16,.*val top-1 [\d.]+ % \(best", out)) == 1
    assert len(re.findall(r"tsm-dist train: epoch 2/2 done, step 16/16,", out)) == 1
    summary = [line for line in out.splitlines() if "tsm-dist train: completed at epoch 2/2, step 16" in line]
    assert len(summary) == 1, out[-3000:]  # rank 0 alone
    assert re.search(r"best val top-1 [\d.]+ % at epoch [12]; checkpoints in .*w/checkpoints, metrics in "
                     r".*w/metrics.jsonl", summary[0]), summary
    _checked_against_records(workdir)


def test_on_a_terminal_the_bar_shows_the_epoch_as_the_records_count_it(tmp_path):
    workdir = tmp_path / "w"
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))  # a terminal 150 wide
    proc = subprocess.Popen([PYTHON, *_args(workdir, "engine.name=torch", "data.num_samples=16")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                            start_new_session=True)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + 420  # 2 shared cores can be very busy
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                try:
                    data = os.read(leader, 4096)
                except OSError:  # the terminal's other end closed: the trainer exited
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=max(30.0, deadline - time.monotonic())) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    # one rank, 16 clips of 2: 8 steps per epoch
    assert "epoch 1/2:" in text and "epoch 2/2:" in text and "16/16 [" in text, text[-2000:]
    assert "epoch 0" not in text and "step 2/16, loss" not in text  # the bar, not the batch-log lines
    assert "tsm-dist train: completed at epoch 2/2, step 16" in text
    _checked_against_records(workdir)
    # the same run's 2 checkpoints, evaluated with --last-n 5: the answer says 5 were asked (issue 32)
    sets = [a for s in [*TINY, "engine.name=torch", "data.num_samples=16"] for a in ("--set", s)]
    result = run_bounded([PYTHON, "-m", "tsm_dist.training.evaluate", "--config", CONFIG, "--workdir",
                          str(workdir), "--last-n", "5", *sets], timeout=180, env=launcher_env(PYTHONPATH=str(REPO)),
                         cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:]
    summary = next(line for line in result.stdout.splitlines() if line.startswith("mean +- std over 2"))
    assert summary.endswith(f"(only 2: 5 asked (--last-n / eval.last_n), {workdir / 'checkpoints'} holds 2)")

"""Runs that cannot be lost or mixed up (issue 19): a resume under a new batch plan trains every epoch, a
fresh run refuses another run's workdir, a diverged model is never checkpointed nor "best", a checkpoint
of another TSM variant is refused, checkpoints are readable by the group, a YAML syntax error is one line.

The trainer runs as users start it (``python -m tsm_dist.training.train``; 2 ranks under horovodrun) on the random
backend, so each run takes seconds.
"""
from __future__ import annotations

import math
import stat
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, REPO, horovodrun, launcher_env, run_bounded
from tsm_dist.state import checkpoint as ckpt
from tsm_dist.commands.exit_codes import (
    CheckpointError, EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_NONFINITE, EXIT_STORAGE, StorageError,
)
from tsm_dist.runlog.records import read_records
from tsm_dist.training.batch_plan import BatchPlan
from tsm_dist.state.resume import continue_under

CONFIG = str(REPO / "configs" / "synthetic_tsm.yaml")
# 32 clips of batch 4 on one rank: 8 optimizer steps per epoch
TINY = ["data.backend=random", "data.num_samples=32", "data.batch_size=4", "data.crop_size=32",
        "model.width=8", "model.num_frames=2", "train.epochs=3", "log.wandb=disabled", "log.progress=false",
        "engine.name=torch", "log.interval=1"]


def _train(workdir: Path, *sets: str, extra: tuple[str, ...] = (), np: int = 1):
    args = ["--config", CONFIG, "--workdir", str(workdir)]
    args += [a for s in [*TINY, *sets] for a in ("--set", s)] + list(extra)
    cmd = [PYTHON, "-m", "tsm_dist.training.train", *args]
    if np > 1:
        cmd = horovodrun(np, *cmd)
    return run_bounded(cmd, timeout=240, env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO)


def _ours(output: str) -> list[str]:
    return [line for line in output.splitlines() if "tsm-dist train:" in line]


def _records(workdir: Path, kind: str) -> list[dict]:
    return [r for r in read_records(workdir / "metrics.jsonl") if r["type"] == kind]


# ------------------------------------------------------------------- 1. resume under a new batch plan
def _state(epoch: int, step: int, batch_in_epoch: int, world: int, per_gpu: int, accumulate: int) -> dict:
    return {"epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch, "world_size": world,
            "per_gpu_batch": per_gpu, "accumulate": accumulate, "global_batch": world * per_gpu * accumulate}


def test_the_position_in_clips_carries_over_to_any_plan_that_fits():
    state = _state(epoch=1, step=12, batch_in_epoch=4, world=1, per_gpu=4, accumulate=1)  # 16 clips into epoch 1
    same = continue_under(state, BatchPlan(per_gpu_batch=4, world_size=1, accumulate=1), 8, ordered_prefix=True)
    assert (same.epoch, same.step, same.batch_in_epoch, same.note) == (1, 12, 4, None)
    doubled = continue_under(state, BatchPlan(per_gpu_batch=4, world_size=2, accumulate=2), 2, ordered_prefix=True)  # 16 clips per step, 2 per epoch
    assert (doubled.epoch, doubled.step, doubled.batch_in_epoch) == (1, 3, 2)
    assert "step 12 of the old plan is step 3" in doubled.note and "2 rank(s) x batch 4 x accumulate 2" in doubled.note
    with pytest.raises(CheckpointError, match="16 clips are not a whole number of the new plan's steps"):
        continue_under(state, BatchPlan(per_gpu_batch=4, world_size=1, accumulate=3), 2, ordered_prefix=True)
    with pytest.raises(CheckpointError, match="contiguous shards change with the number of ranks"):
        continue_under(state, BatchPlan(per_gpu_batch=4, world_size=2, accumulate=2), 2, ordered_prefix=False)
    same_ranks = continue_under(state, BatchPlan(per_gpu_batch=8, world_size=1, accumulate=2), 2, ordered_prefix=False)  # one rank's block: exact
    assert (same_ranks.epoch, same_ranks.step, same_ranks.batch_in_epoch) == (1, 3, 2)
    boundary = _state(epoch=2, step=16, batch_in_epoch=0, world=1, per_gpu=4, accumulate=1)
    moved = continue_under(boundary, BatchPlan(per_gpu_batch=2, world_size=4, accumulate=1), 4, ordered_prefix=False)
    assert (moved.epoch, moved.step, moved.batch_in_epoch) == (2, 8, 0)
    shorter = continue_under(state, BatchPlan(per_gpu_batch=4, world_size=2, accumulate=2), 1, ordered_prefix=True)  # the new epoch is already over
    assert (shorter.epoch, shorter.step, shorter.epoch_end_pending) == (2, 2, True)
    old = {k: v for k, v in state.items() if k != "per_gpu_batch"}  # a checkpoint before it was saved
    assert continue_under(old, BatchPlan(per_gpu_batch=4, world_size=1, accumulate=1), 8, ordered_prefix=True).note is None


@pytest.mark.multirank
def test_resume_on_two_ranks_with_accumulation_runs_every_epoch(tmp_path):
    """1 rank x batch 4 stops 16 clips into epoch 1; resumed on 2 ranks x batch 4 x accumulate 2 it trains
    the rest of epoch 1 and epoch 2 (steps numbered by the new plan), instead of ending at once."""
    workdir = tmp_path / "w"
    first = _train(workdir, "train.max_steps=12")
    assert first.returncode == 0, first.stdout[-3000:]
    result = _train(workdir, "engine.name=horovod", extra=("--resume", "auto", "--accumulate", "2"), np=2)
    assert result.returncode == 0, result.stdout[-3000:]
    notes = [line for line in _ours(result.stdout) if "new batch plan" in line]
    assert len(notes) == 1 and "step 12 of the old plan is step 3 of the new one" in notes[0], result.stdout[-3000:]
    headers = _records(workdir, "header")
    assert len(headers) == 2 and headers[0]["run_id"] == headers[1]["run_id"]  # one run, resumed
    records = read_records(workdir / "metrics.jsonl")
    resumed = records[records.index(headers[1]):]
    steps = [r["step"] for r in resumed if r["type"] == "step"]
    assert steps == [4, 5, 6], steps  # log.interval 1: every step of the new plan, none skipped
    evals = [(r["epoch"], r["step"]) for r in _records(workdir, "eval")]
    assert evals[-2:] == [(2, 4), (3, 6)], evals
    end = _records(workdir, "end")[-1]
    assert (end["status"], end["epoch"], end["step"]) == ("completed", 3, 6)


def test_a_resume_that_cannot_be_exact_is_refused_in_one_line(tmp_path):
    workdir = tmp_path / "w"
    assert _train(workdir, "train.max_steps=12").returncode == 0
    result = _train(workdir, "train.accumulate=3", extra=("--resume", "auto"))
    assert result.returncode == EXIT_CHECKPOINT, result.stdout[-3000:]
    lines = [line for line in result.stdout.splitlines() if "checkpoint error:" in line]
    assert len(lines) == 1 and "cannot continue exactly" in lines[0] and "Traceback" not in result.stdout


# ------------------------------------------------------------------- 2. a workdir belongs to one run
def test_a_fresh_run_refuses_another_runs_workdir_and_start_over_moves_it(tmp_path):
    workdir = tmp_path / "w"
    assert _train(workdir, "train.epochs=1").returncode == 0
    saved = sorted((workdir / "checkpoints").glob("ckpt_*.pt"))
    run_id = _records(workdir, "header")[0]["run_id"]
    assert ckpt.load_checkpoint(saved[-1])["run_id"] == run_id
    before = {p: p.read_bytes() for p in saved}
    result = _train(workdir, "train.epochs=1")
    assert result.returncode == EXIT_CONFIG, result.stdout[-3000:]
    lines = [line for line in result.stdout.splitlines() if "config error:" in line]
    assert len(lines) == 1 and saved[-1].name in lines[0] and "--resume auto" in lines[0] \
        and "--start-over" in lines[0], result.stdout[-3000:]
    assert {p: p.read_bytes() for p in saved} == before  # nothing touched
    result = _train(workdir, "train.epochs=1", extra=("--start-over",))
    assert result.returncode == 0, result.stdout[-3000:]
    moved = workdir / "previous" / run_id
    assert sorted(p.name for p in (moved / "checkpoints").glob("ckpt_*.pt")) == [p.name for p in saved]
    assert any(str(moved) in line for line in _ours(result.stdout))
    assert _records(workdir, "header")[0]["run_id"] != run_id  # a new run, with its own records


# ------------------------------------------------------------------- 5. the model identity is complete
@pytest.mark.parametrize("option", ["model.fold_div=4", "model.shift_place=inplace"])
def test_a_checkpoint_of_another_tsm_variant_is_refused(tmp_path, option):
    workdir = tmp_path / "w"
    assert _train(workdir, "train.epochs=1").returncode == 0
    result = _train(workdir, option, "train.epochs=2", extra=("--resume", "auto"))
    assert result.returncode == EXIT_CHECKPOINT and "is for another model" in result.stdout, result.stdout[-3000:]
    key = option.split(".")[1].split("=")[0]
    assert f"{key}=" in result.stdout
    sets = [a for s in [*TINY, option] for a in ("--set", s)]
    saved = sorted((workdir / "checkpoints").glob("ckpt_*.pt"))[-1]
    result = run_bounded([PYTHON, "-m", "tsm_dist.training.evaluate", "--config", CONFIG, "--checkpoint", str(saved), *sets],
                         timeout=240, env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO)
    lines = [line for line in result.stdout.splitlines() if "checkpoint error:" in line]
    assert result.returncode == EXIT_CHECKPOINT and len(lines) == 1 and key in lines[0], result.stdout[-3000:]


def test_the_identity_covers_every_model_option_and_fills_defaults():
    saved = {"model": {}, "config": {"model": {"name": "tsm8f_r50", "num_classes": 4, "num_frames": 8,
                                               "fold_div": 8, "depth": 18, "width": 8}}}
    ckpt.check_model(saved, {"name": "tsm8f_r50", "num_classes": 4, "depth": 18, "width": 8}, "c.pt")
    ckpt.check_model(saved, {**saved["config"]["model"], "pretrained": "/elsewhere.pt", "dropout": 0.2}, "c.pt")
    with pytest.raises(CheckpointError, match="it has shift_place=residual, the config asks for shift_place=inplace"):
        ckpt.check_model(saved, {**saved["config"]["model"], "shift_place": "inplace"}, "c.pt")
    newer = {**saved, "config": {"model": {**saved["config"]["model"], "some_new_option": False}}}
    with pytest.raises(CheckpointError, match="some_new_option=True"):  # a field added later is covered
        ckpt.check_model(newer, {**saved["config"]["model"], "some_new_option": True}, "c.pt")


# ------------------------------------------------------------------- 6. a diverged model is never best
def test_a_non_finite_validation_loss_stops_with_3_and_writes_no_checkpoint(tmp_path, capsys):
    """Training losses stay finite, the model's evaluation logits are NaN from epoch 1 on: exit 3 naming
    the step, epoch 0's best.pt and checkpoint stay those of epoch 0, nothing is written from epoch 1."""
    from tsm_dist.training.build import default_model_builder
    from tsm_dist.config import load_config
    from tsm_dist.training.train import train

    evaluations = []

    class NanInEvaluation(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, clips):
            logits = self.inner(clips)
            if not self.training and len(evaluations) >= 2:  # from the second evaluation on
                return logits * math.nan
            return logits

        def eval(self):
            evaluations.append(True)
            return super().eval()

    def builder(*args, **kwargs):
        return NanInEvaluation(default_model_builder()(*args, **kwargs))

    cfg = load_config(CONFIG, [*TINY, "train.epochs=3", "engine.name=torch"])
    assert train(cfg, tmp_path, model_builder=builder) == EXIT_NONFINITE
    lines = [line for line in capsys.readouterr().err.splitlines() if "NaN or Inf" in line]
    assert len(lines) == 1 and "the validation loss is NaN or Inf" in lines[0] and "optimizer step 16" in lines[0]
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))
    assert saved == ["best.pt", ckpt.checkpoint_name(1, 8)], saved  # epoch 0's only
    evals = _records(tmp_path, "eval")
    assert [e["epoch"] for e in evals] == [1, 2] and math.isnan(evals[-1]["loss"])
    end = _records(tmp_path, "end")[-1]
    assert (end["status"], end["exit_code"], end["step"]) == ("failed", EXIT_NONFINITE, 16)


def test_evaluate_reports_nan_for_non_finite_logits():
    from tsm_dist.config import EngineConfig
    from tsm_dist.distributed.engine import started
    from tsm_dist.training.evaluate import evaluate

    class Broken(torch.nn.Module):
        def forward(self, clips):
            return torch.full((clips.shape[0], 3), math.nan)

    loader = [(torch.zeros(2, 1, 1), torch.tensor([0, 1]))]
    with started(EngineConfig(name="torch")) as engine:
        result = evaluate(Broken(), loader, engine)
    assert math.isnan(result["loss"])


# ------------------------------------------------------------------- 8. smaller
def test_checkpoints_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path = ckpt.atomic_save({"model": {}}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("text, where", [
    ("train:\n  epochs: [1, 2\n", ":3:"),
    ("train:\n\tepochs: 1\n", ":2:1"),
    ("model:\n  name: tsm\n   width: 8\n", ":3:"),
])
def test_yaml_syntax_error_is_one_line_with_file_and_line(tmp_path, text, where):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run_bounded([PYTHON, "-m", "tsm_dist.training.train", "--config", str(path), "--workdir", str(tmp_path / "w")],
                         timeout=120, env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert result.returncode == EXIT_CONFIG and len(lines) == 1, result.stdout
    assert f"{path}{where}" in lines[0] and "invalid YAML" in lines[0] and "<unicode string>" not in lines[0]


# ------------------------------------------------------------------- 3. unwritable workdir, full disk, quota
def test_an_unwritable_workdir_is_one_line_with_code_6_before_training(tmp_path):
    workdir = Path("/sys/tsm_dist_cannot_be_here")  # refused even to root (EPERM)
    result = _train(workdir)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert result.returncode == EXIT_STORAGE and len(lines) == 1, result.stdout[-3000:]
    assert "storage error: cannot write /sys/tsm_dist_cannot_be_here" in lines[0] and "not permitted" in lines[0]


def test_too_little_free_space_for_one_checkpoint_is_refused(tmp_path):
    with pytest.raises(StorageError, match=r"MiB free, one checkpoint needs about \d+ MiB"):
        ckpt.check_storage(tmp_path, need_bytes=1 << 62)
    ckpt.check_storage(tmp_path, need_bytes=1 << 10)


def test_a_checkpoint_write_that_fails_keeps_the_previous_one_and_records_the_end(tmp_path):
    """A file-size quota (``ulimit -f``, as a full quota reports it: EFBIG) hit by the epoch-2 checkpoint:
    exit 6 in one line naming the directory, the epoch-1 checkpoint intact, no temporary left, the ``end``
    record ``failed`` with the cause; resumed without the quota, the run completes."""
    workdir = tmp_path / "w"
    assert _train(workdir, "train.epochs=1").returncode == 0
    first = sorted((workdir / "checkpoints").iterdir())
    args = ["--config", CONFIG, "--workdir", str(workdir), "--resume", "auto"]
    args += [a for s in [*TINY, "train.epochs=2"] for a in ("--set", s)]
    quota = "trap '' XFSZ; ulimit -f 1024; exec \"$@\""  # 1 MiB per file; metrics and config fit, a checkpoint not
    result = run_bounded(["bash", "-c", quota, "bash", PYTHON, "-m", "tsm_dist.training.train", *args], timeout=240,
                         env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO)
    lines = [line for line in result.stdout.splitlines() if "storage error:" in line]
    assert result.returncode == EXIT_STORAGE and len(lines) == 1, result.stdout[-3000:]
    assert str(workdir / "checkpoints") in lines[0] and "File too large" in lines[0]
    assert "Traceback" not in result.stdout
    assert sorted((workdir / "checkpoints").iterdir()) == first  # the previous checkpoint, nothing half-written
    ckpt.load_checkpoint(first[-1])
    end = _records(workdir, "end")[-1]
    assert (end["status"], end["exit_code"]) == ("failed", EXIT_STORAGE) and "File too large" in end["cause"]
    assert _train(workdir, "train.epochs=2", extra=("--resume", "auto")).returncode == 0


def test_a_crop_larger_than_the_video_is_warned_once(capsys, monkeypatch):
    from tsm_dist.data import augment

    monkeypatch.setattr(augment, "_warned_small", [])
    assert not augment.warn_if_upsampled("big.webm", 256, 340, 224)
    assert augment.warn_if_upsampled("small.webm", 128, 170, 224)
    assert not augment.warn_if_upsampled("small2.webm", 128, 170, 224)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "small.webm is 170x128, smaller than data.crop_size=224" in err[0]


def test_ctrl_c_while_a_command_imports_is_one_line():
    """The first second of ``python -m tsm_dist.training.train`` is spent importing torch, before any handler of ours;
    a Ctrl-C there is one line (argv[0] is "-m" while the package is imported, as under ``python -m``)."""
    import subprocess
    import sys

    code = "import sys; sys.argv[0] = '-m'; import tsm_dist; raise KeyboardInterrupt"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env=launcher_env(PYTHONPATH=str(REPO)))
    assert result.stderr.strip() == "tsm-dist: interrupted" and result.returncode != 0, result.stderr
    library = subprocess.run([sys.executable, "-c", "import tsm_dist; raise KeyboardInterrupt"], capture_output=True,
                             text=True, timeout=60, env=launcher_env(PYTHONPATH=str(REPO)))
    assert "Traceback" in library.stderr  # a program that imports tsm_dist keeps Python's own handling

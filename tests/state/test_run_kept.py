"""Nothing of a run is lost (issue 29, the silent losses): a kill during the ``best.pt`` write still ends
with a ``best.pt``; ``--start-over`` gives the new run its own wandb run and moves the old wandb files
aside; any file of a run marks its workdir as used; a stop checkpoint always comes with its ``end`` record,
even when the launcher's SIGKILL follows at once (mpirun: 1 s after its SIGTERM).

The trainer runs as users start it (``python -m tsm_dist.training.train``) on the random backend; kills are real
signals (SIGKILL from inside, at the moment under test; SIGTERM to the whole process group of a 2-rank
mpirun job, as schedulers send it).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, launcher_env, mpirun, run_bounded, wait_for_steps
from tsm_dist.state import checkpoint as ckpt
from tsm_dist.commands.exit_codes import EXIT_CONFIG
from tsm_dist.runlog.records import MetricsError, read_records
from tsm_dist.state.identity import RUN_FILES, run_files

CONFIG = str(REPO / "configs" / "synthetic_tsm.yaml")
# 32 clips of batch 4 on one rank: 8 optimizer steps per epoch
TINY = ["data.backend=random", "data.num_samples=32", "data.batch_size=4", "data.crop_size=32",
        "model.width=8", "model.num_frames=2", "train.epochs=1", "log.wandb=disabled", "log.progress=false",
        "engine.name=torch", "log.interval=1"]

# The trainer under a wrapper that SIGKILLs it at one moment: KILL_AT=best (during the best.pt write, a
# temporary file half written) or KILL_AT=after-checkpoint (at the first collective after a checkpoint
# write: where a launcher's SIGKILL lands when the stop path is slow).
KILLER = """
import os, runpy, signal, sys
import tsm_dist.state.checkpoint as c
import tsm_dist.distributed.engine as e
real_save, real_broadcast, written = c.atomic_save, e.Engine.broadcast_object, []
def save(obj, path, **kw):
    if os.environ["KILL_AT"] == "best" and path.name == c.BEST_NAME:
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / ".best.pt.killed.tmp").write_bytes(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    out = real_save(obj, path, **kw)
    written.append(path.name)
    return out
def broadcast(self, *args, **kw):
    if os.environ["KILL_AT"] == "after-checkpoint" and any(n.startswith("ckpt_") for n in written):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_broadcast(self, *args, **kw)
c.atomic_save, e.Engine.broadcast_object = save, broadcast
sys.argv = ["-m", *sys.argv[1:]]
runpy.run_module("tsm_dist.training.train", run_name="__main__")
"""


def _args(workdir: Path, *sets: str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["--config", CONFIG, "--workdir", str(workdir), *[a for s in [*TINY, *sets] for a in ("--set", s)],
            *extra]


def _train(workdir: Path, *sets: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return run_bounded([PYTHON, "-m", "tsm_dist.training.train", *_args(workdir, *sets, extra=extra)], timeout=240,
                       env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO)


def _records(workdir: Path, kind: str) -> list[dict]:
    try:
        return [r for r in read_records(workdir / "metrics.jsonl") if r["type"] == kind]
    except (FileNotFoundError, MetricsError):  # not written yet / a line being written
        return []


# ------------------------------------------------------------------- 1. best.pt
def test_a_kill_during_the_best_write_then_resume_auto_ends_with_best(tmp_path):
    """The only evaluation of a 1-epoch run is the best; SIGKILL while ``best.pt`` is written. ``--resume
    auto`` must end with a ``best.pt`` (it did not: the epoch's checkpoint was already written and counted the
    evaluation as the best, so nothing wrote ``best.pt`` again)."""
    workdir = tmp_path / "w"
    killed = run_bounded([PYTHON, "-c", KILLER, *_args(workdir)], timeout=240,
                         env=launcher_env(PYTHONPATH=str(REPO), KILL_AT="best"), cwd=REPO)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert not (workdir / "checkpoints" / "best.pt").exists() and _records(workdir, "eval")
    result = _train(workdir, extra=("--resume", "auto"))
    assert result.returncode == 0, result.stdout[-3000:]
    assert "removed 1 temporary file(s)" in result.stdout
    best = ckpt.load_checkpoint(workdir / "checkpoints" / "best.pt")
    assert best["best_top1"] == _records(workdir, "eval")[-1]["top1"]
    assert _records(workdir, "end")[-1]["status"] == "completed"


def test_a_resumed_run_without_best_writes_it_at_its_next_evaluation(tmp_path):
    """``best.pt`` lost some other way (an older version's kill, a hand): the next evaluation writes it."""
    workdir = tmp_path / "w"
    assert _train(workdir).returncode == 0
    (workdir / "checkpoints" / "best.pt").unlink()
    result = _train(workdir, "train.epochs=2", extra=("--resume", "auto"))
    assert result.returncode == 0, result.stdout[-3000:]
    assert any("best.pt is missing" in line and "the next evaluation writes it" in line
               for line in result.stdout.splitlines()), result.stdout[-3000:]
    assert ckpt.load_checkpoint(workdir / "checkpoints" / "best.pt")["epoch"] == 2


# ------------------------------------------------------------------- 2. --start-over and wandb
def test_start_over_gives_a_new_wandb_run_and_moves_the_old_one(tmp_path):
    workdir = tmp_path / "w"
    first = _train(workdir, "log.wandb=offline")
    assert first.returncode == 0, first.stdout[-3000:]
    old_id, run_id = (workdir / "wandb_id").read_text().strip(), _records(workdir, "header")[0]["run_id"]
    old_runs = sorted(p.name for p in (workdir / "wandb").glob("offline-run-*"))
    assert old_runs and old_runs[0].endswith(old_id)
    again = _train(workdir, "log.wandb=offline", extra=("--start-over",))
    assert again.returncode == 0, again.stdout[-3000:]
    moved = workdir / "previous" / run_id
    assert (moved / "wandb_id").read_text().strip() == old_id
    assert sorted(p.name for p in (moved / "wandb").glob("offline-run-*")) == old_runs
    new_id = (workdir / "wandb_id").read_text().strip()
    assert new_id != old_id
    assert [p.name for p in (workdir / "wandb").glob("offline-run-*")] and \
        all(p.name.endswith(new_id) for p in (workdir / "wandb").glob("offline-run-*"))


def test_start_over_with_resume_is_refused(tmp_path):
    result = _train(tmp_path / "w", extra=("--start-over", "--resume", "auto"))
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert result.returncode == EXIT_CONFIG and len(lines) == 1, result.stdout[-3000:]
    assert "--start-over" in lines[0] and "--resume" in lines[0] and "config error" in lines[0]


# ------------------------------------------------------------------- 3. any file of a run marks the workdir
@pytest.mark.parametrize("name", ["checkpoints/best.pt", *RUN_FILES])
def test_any_file_of_a_run_marks_the_workdir(tmp_path, name):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text("")
    assert run_files(tmp_path) == [name]
    (tmp_path / "train.log").write_text("")  # not the run's: the job's own log beside it
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    assert run_files(tmp_path) == [name]


def test_a_workdir_with_best_metrics_and_config_but_no_checkpoint_is_refused(tmp_path):
    workdir = tmp_path / "w"
    assert _train(workdir).returncode == 0
    for path in (workdir / "checkpoints").glob("ckpt_*.pt"):
        path.unlink()
    kept = {p: p.read_bytes() for p in [workdir / "checkpoints" / "best.pt", workdir / "metrics.jsonl",
                                         workdir / "config.yaml"]}
    result = _train(workdir)
    lines = [line for line in result.stdout.splitlines() if "config error:" in line]
    assert result.returncode == EXIT_CONFIG and len(lines) == 1, result.stdout[-3000:]
    assert "checkpoints/best.pt" in lines[0] and "metrics.jsonl" in lines[0] and "--start-over" in lines[0]
    assert {p: p.read_bytes() for p in kept} == kept  # nothing overwritten, nothing appended
    run_id = _records(workdir, "header")[0]["run_id"]
    assert _train(workdir, extra=("--start-over",)).returncode == 0
    assert sorted(p.name for p in (workdir / "previous" / run_id).iterdir()) == \
        ["checkpoints", "config.yaml", "metrics.jsonl"]


# ------------------------------------------------------------------- 4. a stop checkpoint has its end record
def _stop(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return output


def test_the_end_record_is_written_before_anything_can_delay_it_after_the_stop_checkpoint(tmp_path):
    """SIGTERM, then SIGKILL at the first collective after the stop checkpoint is in place (what mpirun's
    SIGKILL 1 s after its SIGTERM hit on a loaded machine): the end record is already there."""
    workdir = tmp_path / "w"
    sets = ["train.epochs=50", "train.checkpoint_every_epochs=0"]  # the stop writes the only checkpoint
    proc = subprocess.Popen([PYTHON, "-c", KILLER, *_args(workdir, *sets)],
                            env=launcher_env(PYTHONPATH=str(REPO), KILL_AT="after-checkpoint"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_steps(proc, workdir / "metrics.jsonl", 3)
        os.killpg(proc.pid, signal.SIGTERM)
    finally:
        output = _stop(proc)
    assert proc.returncode == -signal.SIGKILL, output[-3000:]
    saved = sorted((workdir / "checkpoints").glob("ckpt_*.pt"))
    assert len(saved) == 1, output[-3000:]
    end = _records(workdir, "end")
    assert len(end) == 1 and (end[0]["status"], end[0]["exit_code"]) == ("terminated", 143), output[-3000:]
    assert saved[0].name == ckpt.checkpoint_name(end[0]["epoch"], end[0]["step"])


@pytest.mark.multirank
@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not on PATH")
def test_sigterm_to_the_process_group_of_an_mpirun_job_ends_with_checkpoint_and_end_record(tmp_path):
    """``kill -TERM -PGID`` of a 2-rank mpirun job: mpirun passes SIGTERM on to the ranks (each in a
    process group of its own) and SIGKILLs them 1 s later. The stop checkpoint and the end record
    come together."""
    workdir = tmp_path / "w"
    sets = ["engine.name=horovod", "data.num_samples=64", "train.epochs=50", "train.checkpoint_every_epochs=0"]
    proc = subprocess.Popen(mpirun(2, PYTHON, "-m", "tsm_dist.training.train", *_args(workdir, *sets)),
                            env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_steps(proc, workdir / "metrics.jsonl", 3)
        os.killpg(proc.pid, signal.SIGTERM)
    finally:
        output = _stop(proc)
    saved = sorted((workdir / "checkpoints").glob("ckpt_*.pt"))
    end = _records(workdir, "end")
    if not saved and not end:  # SIGKILL before the checkpoint: the job script's record covers that case
        pytest.skip(f"mpirun's SIGKILL came before the stop checkpoint (load {os.getloadavg()[0]:.0f})")
    assert saved and len(end) == 1, (saved, end, output[-3000:])  # never one without the other
    assert end[0]["status"] == "terminated" and saved[-1].name == ckpt.checkpoint_name(end[0]["epoch"],
                                                                                        end[0]["step"])

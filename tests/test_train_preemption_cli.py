"""`tsm-dist train` as a job runs it: 2 ranks under mpirun (Horovod's MPI controller), a real small TSM.

A SIGTERM sent from outside to rank 1 alone must make both ranks stop after the same step, rank 0
write a checkpoint, and both processes exit with 75; `--resume auto` then finishes the run, and
`tsm-dist eval` scores its checkpoints with 2 clips x 3 crops on 2 ranks.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, launcher_env, mpirun, run_bounded
from tsm_dist.records import read_records

pytestmark = [pytest.mark.multirank,
              pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not on PATH")]

SETTINGS = ["data.backend=random", "data.num_samples=128", "data.batch_size=4", "data.crop_size=32",
            "model.depth=18", "model.width=8", "train.epochs=3", "train.keep_last=2", "log.interval=1",
            "log.wandb=disabled", "engine.name=horovod", "eval.last_n=2"]


def _rank_command(out: Path, module: str, *args: str) -> list[str]:
    """Each rank records its pid and its exit code, so the test can signal one rank and check each."""
    cmd = " ".join(shlex.quote(a) for a in [PYTHON, "-m", module, *args])
    script = (f'{cmd} & pid=$!; echo $pid > {out}/pid.$OMPI_COMM_WORLD_RANK; '
              f'wait $pid; echo $? > {out}/rc.$OMPI_COMM_WORLD_RANK')
    return mpirun(2, "sh", "-c", script)


def _train_args(workdir: Path, *extra: str) -> list[str]:
    sets = [a for s in SETTINGS for a in ("--set", s)]
    return ["--config", str(REPO / "configs" / "synthetic_tsm.yaml"), "--workdir", str(workdir), *sets, *extra]


def _steps(metrics: Path) -> list[dict]:
    try:
        return [r for r in read_records(metrics) if r["type"] == "step"]
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet / a line being written
        return []


def test_sigterm_checkpoints_exits_75_and_resume_completes(tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "ranks"
    out.mkdir()
    env = launcher_env(PYTHONPATH=str(REPO))
    proc = subprocess.Popen(_rank_command(out, "tsm_dist.train", *_train_args(workdir)), env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(_steps(workdir / "metrics.jsonl")) < 3:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no training steps within 120 s"
            time.sleep(0.05)
        os.kill(int((out / "pid.1").read_text()), signal.SIGTERM)  # rank 1 only
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert [(out / f"rc.{r}").read_text().strip() for r in (0, 1)] == ["75", "75"], output[-3000:]
    end = read_records(workdir / "metrics.jsonl")[-1]
    assert end["type"] == "end" and end["status"] == "preempted"
    assert 3 <= end["step"] < 48, end  # 3 epochs x 16 steps: stopped early, at a step boundary
    saved = sorted(p.name for p in (workdir / "checkpoints").glob("ckpt_*.pt"))
    assert saved[-1].endswith(f"_s{end['step']:08d}.pt"), saved
    assert "preempted; checkpoint at step" in output

    result = run_bounded(_rank_command(out, "tsm_dist.train", *_train_args(workdir, "--resume", "auto")),
                         timeout=180, env=env, cwd=REPO)
    assert [(out / f"rc.{r}").read_text().strip() for r in (0, 1)] == ["0", "0"], result.stdout[-3000:]
    records = read_records(workdir / "metrics.jsonl")
    assert records[-1]["status"] == "completed" and records[-1]["step"] == 48
    resumed = [r for r in records if r["type"] == "header"][-1]
    assert resumed["resumed_from"].endswith(saved[-1])
    steps = [r["step"] for r in records if r["type"] == "step"]
    assert steps == list(range(1, 49))  # no step lost or repeated across the restart

    report = tmp_path / "eval.json"
    sets = [a for s in SETTINGS for a in ("--set", s)]
    result = run_bounded(_rank_command(out, "tsm_dist.evaluate", "--config", str(REPO / "configs" / "synthetic_tsm.yaml"),
                                       "--workdir", str(workdir), "--num-clips", "2", "--num-crops", "3",
                                       "--json", str(report), *sets), timeout=180, env=env, cwd=REPO)
    assert (out / "rc.0").read_text().strip() == "0", result.stdout[-3000:]
    summary = json.loads(report.read_text())
    assert (summary["num_clips"], summary["num_crops"], summary["world_size"]) == (2, 3, 2)
    assert len(summary["checkpoints"]) == 2  # eval.last_n
    assert all(c["num_samples"] == 128 for c in summary["checkpoints"])
    assert "mean +- std over 2" in result.stdout

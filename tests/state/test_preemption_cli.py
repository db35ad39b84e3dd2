"""`tsm-dist train` as a job runs it: 2 ranks under mpirun (Horovod's MPI controller) and horovodrun
(Gloo), a real small TSM, signals sent the way schedulers send them.

- The time-limit warning (SIGUSR1) to rank 1 alone: both ranks stop after the same step, rank 0
  writes a checkpoint, both processes exit with 75; ``--resume auto`` then finishes the run, and
  ``tsm-dist eval`` scores its checkpoints with 2 clips x 3 crops on 2 ranks.
- SIGTERM to the whole job as Slurm's cancel/preemption and LSF's kill send it: every process of the
  job, wandb's service process (``wandb-core``, a child of rank 0 in its own session) included, with
  ``log.wandb=offline``. wandb's failure is one warning; the checkpoint and the ``end`` record are
  written; both ranks exit 143.
- Under horovodrun, which terminates the other ranks as soon as one exits, every rank still exits
  with the coordinated code (75 after the warning, 3 after a NaN loss).
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from conftest import PYTHON, REPO, horovodrun, launcher_env, mpirun, run_bounded, wait_for_steps
from tsm_dist.runlog.records import MetricsError, read_records

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
    except (FileNotFoundError, MetricsError):  # not written yet / a line being written
        return []


def test_warning_signal_checkpoints_exits_75_and_resume_completes(tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "ranks"
    out.mkdir()
    env = launcher_env(PYTHONPATH=str(REPO))
    proc = subprocess.Popen(_rank_command(out, "tsm_dist.training.train", *_train_args(workdir)), env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(_steps(workdir / "metrics.jsonl")) < 3:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no training steps within 120 s"
            time.sleep(0.05)
        os.kill(int((out / "pid.1").read_text()), signal.SIGUSR1)  # the time-limit warning, rank 1 only
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
    assert "preempted by the time-limit warning; checkpoint at step" in output

    result = run_bounded(_rank_command(out, "tsm_dist.training.train", *_train_args(workdir, "--resume", "auto")),
                         timeout=180, env=env, cwd=REPO)
    assert [(out / f"rc.{r}").read_text().strip() for r in (0, 1)] == ["0", "0"], result.stdout[-3000:]
    records = read_records(workdir / "metrics.jsonl")
    assert records[-1]["status"] == "completed" and records[-1]["step"] == 48
    resumed = [r for r in records if r["type"] == "header"][-1]
    assert resumed["resumed_from"].endswith(saved[-1])
    assert f"resumed from {resumed['resumed_from']}" in result.stdout
    steps = [r["step"] for r in records if r["type"] == "step"]
    assert steps == list(range(1, 49))  # no step lost or repeated across the restart

    report = tmp_path / "eval.json"
    sets = [a for s in SETTINGS for a in ("--set", s)]
    result = run_bounded(_rank_command(out, "tsm_dist.training.evaluate", "--config", str(REPO / "configs" / "synthetic_tsm.yaml"),
                                       "--workdir", str(workdir), "--num-clips", "2", "--num-crops", "3",
                                       "--json", str(report), *sets), timeout=180, env=env, cwd=REPO)
    assert (out / "rc.0").read_text().strip() == "0", result.stdout[-3000:]
    summary = json.loads(report.read_text())
    assert (summary["num_clips"], summary["num_crops"], summary["world_size"]) == (2, 3, 2)
    assert len(summary["checkpoints"]) == 2  # eval.last_n
    assert all(c["num_samples"] == 128 for c in summary["checkpoints"])
    assert "mean +- std over 2" in result.stdout


# ------------------------------------------------------------------------------ under horovodrun
def _horovodrun_ranks(out: Path, *args: str, np: int = 2) -> list[str]:
    """horovodrun starting each rank in a bash that records the rank's pid and exit code. The bash
    survives the job-wide SIGTERM (trap) and waits for its rank, as a job step's shell would."""
    cmd = " ".join(shlex.quote(a) for a in [PYTHON, "-m", "tsm_dist.training.train", *args])
    script = (f"trap 'echo TERM >> {out}/sig.$HOROVOD_RANK' TERM; {cmd} & pid=$!; echo $pid > {out}/pid.$HOROVOD_RANK; "
              f"while :; do wait $pid; rc=$?; kill -0 $pid 2>/dev/null || break; done; "
              f"echo $rc > {out}/rc.$HOROVOD_RANK")
    return horovodrun(np, "bash", "-c", script)


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            for p in psutil.Process(proc.pid).children(recursive=True):
                p.kill()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return output


def _rank_codes(out: Path) -> list[str]:
    return [(out / f"rc.{r}").read_text().strip() if (out / f"rc.{r}").exists() else "none" for r in (0, 1)]


def test_sigterm_to_the_whole_job_with_wandb_checkpoints_and_exits_143(tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "ranks"
    out.mkdir()
    settings = [a for s in SETTINGS if s != "log.wandb=disabled" for a in ("--set", s)]
    args = ["--config", str(REPO / "configs" / "synthetic_tsm.yaml"), "--workdir", str(workdir), *settings,
            "--set", "log.wandb=offline", "--set", "train.epochs=20"]
    proc = _start(_horovodrun_ranks(out, *args), launcher_env(PYTHONPATH=str(REPO), WANDB_MODE="offline"))
    try:
        wait_for_steps(proc, workdir / "metrics.jsonl", 3)
        # what slurmstepd does on scancel / preemption: SIGTERM to every process of the job at once --
        # the process group, and wandb-core, which wandb starts in a session of its own
        job = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        names = [p.name() for p in job]
        assert "wandb-core" in names, names  # the service process is there to be killed
        os.killpg(proc.pid, signal.SIGTERM)
        for p in job:
            with contextlib.suppress(psutil.NoSuchProcess):
                if os.getpgid(p.pid) != proc.pid:
                    p.send_signal(signal.SIGTERM)
    finally:
        output = _finish(proc)
    assert _rank_codes(out) == ["143", "143"], output[-4000:]
    records = read_records(workdir / "metrics.jsonl")
    end = records[-1]
    assert end["type"] == "end" and end["status"] == "terminated", records[-3:]
    saved = sorted(p.name for p in (workdir / "checkpoints").glob("ckpt_*.pt"))
    assert saved and saved[-1].endswith(f"_s{end['step']:08d}.pt"), saved
    assert "not requeued by the job script" in output, output[-3000:]
    assert output.count("warning: wandb failed") <= 1, output[-3000:]
    assert "tsm_dist" not in "".join(line for line in output.splitlines() if 'File "' in line), output[-4000:]


@pytest.mark.parametrize("case", ["warning", "nonfinite"])
def test_every_rank_exits_with_the_coordinated_code_under_horovodrun(tmp_path, case):
    workdir, out = tmp_path / "run", tmp_path / "ranks"
    out.mkdir()
    # wandb offline: rank 0 has more to do after the stop than rank 1 (wandb's finish), as in real runs
    extra = ["--set", "log.wandb=offline"] + (["--set", "train.epochs=20"] if case == "warning" else
                                              ["--set", "optim.base_lr=1e30"])
    proc = _start(_horovodrun_ranks(out, *_train_args(workdir, *extra)), launcher_env(PYTHONPATH=str(REPO)))
    try:
        if case == "warning":
            wait_for_steps(proc, workdir / "metrics.jsonl", 3)
            os.kill(int((out / "pid.1").read_text()), signal.SIGUSR1)  # one rank is enough: the ranks agree
    finally:
        output = _finish(proc)
    expected = "75" if case == "warning" else "3"
    assert _rank_codes(out) == [expected, expected], output[-4000:]
    end = read_records(workdir / "metrics.jsonl")[-1]
    assert end["type"] == "end" and end["status"] == ("preempted" if case == "warning" else "failed"), end

"""Rendered Slurm job scripts on a real single-host Slurm cluster (munged + slurmctld + slurmd, 2 CPUs).

The cluster is provisioned by tests/slurm_cluster.py (installing slurm-wlm and munge with apt when
missing and permitted) and torn down at the end of the module. Each test submits a script rendered
by ``tsm-dist render-job`` with 2 CPU tasks, so srun starts the ranks through launch/rank.sh and
the real trainer runs on 2 Horovod ranks:

- Gloo controller (srun --mpi=none, rendezvous hosted by the first task): trains to the end and
  writes metrics.jsonl and checkpoints;
- the same script signalled with ``scancel --signal=USR1`` mid-run: the trainer checkpoints and
  exits 75, the script runs ``scontrol requeue``, and the requeued job resumes from the checkpoint;
  with ``TSM_DIST_RESUBMIT`` set, the script submits itself again instead and the new job resumes;
- a plain ``scancel`` (SIGTERM to every process of the job, wandb's service process included, with
  ``log.wandb=offline``): the trainer checkpoints, writes its ``end`` record and exits 143, and the
  script does not requeue: the cancel sticks;
- MPI controller (srun --mpi=pmix, OpenMPI direct launch): trains to the end;
- preempted by a higher-priority partition's job under PreemptMode=REQUEUE (its own cluster): the
  script requeues it and does not ask the user to resubmit.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import URGENT, SlurmCluster, job_log, job_records, task_pids, trainer_cluster
from tsm_dist.scheduler.render import render_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "synthetic_tsm.yaml")
# A tiny TSM on random clips: the tests are about how ranks start, stop and resume, not about learning.
TINY = ["data.backend=random", "data.batch_size=4", "data.crop_size=32", "model.width=8", "model.num_frames=4",
        "log.wandb=disabled", "log.interval=1", "log.progress=false", "train.eval_every_epochs=0"]
JOB_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with trainer_cluster(tmp_path_factory.mktemp("slurm"), accounting=True) as c:  # sacct too, as operators read it
        yield c


def _submit(cluster: SlurmCluster, tmp_path: Path, settings: list[str], controller: str = "gloo",
            env: dict[str, str] | None = None) -> tuple[int, Path]:
    workdir = tmp_path / "run"
    script = tmp_path / "job.sh"
    script.write_text(render_job("slurm", 1, 0, CONFIG, ranks_per_node=2, cpus_per_rank=1, time="00:10",
                                 workdir=str(workdir), job_name="slurmtest", overrides=TINY + settings,
                                 controller=controller, warn_seconds=60, python=sys.executable))
    return cluster.sbatch(script, cwd=tmp_path, env=env), workdir


def _job_log(tmp_path: Path, job_id: int) -> str:
    return job_log(tmp_path, "slurmtest", job_id)


_records = job_records


def _assert_completed(cluster: SlurmCluster, tmp_path: Path, job_id: int, workdir: Path, steps: int) -> str:
    fields = cluster.wait_final(job_id, JOB_TIMEOUT_S)
    log = _job_log(tmp_path, job_id)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", f"{fields}\n{log}\n{cluster.logs()}"
    headers = _records(workdir, "header")
    assert headers and all(h["world_size"] == 2 and h["engine"] == "horovod" for h in headers), headers
    ends = _records(workdir, "end")
    assert ends[-1]["status"] == "completed" and ends[-1]["step"] == steps, ends
    assert sorted(workdir.glob("checkpoints/ckpt_e*_s*.pt")), f"no checkpoint in {workdir}\n{log}"
    return log


def test_gloo_job_trains_on_two_srun_ranks(cluster: SlurmCluster, tmp_path: Path) -> None:
    # 32 clips / (2 ranks x 4) = 4 steps per epoch
    job_id, workdir = _submit(cluster, tmp_path, ["data.num_samples=32", "train.epochs=2"])
    log = _assert_completed(cluster, tmp_path, job_id, workdir, steps=8)
    assert "tsm-dist launch: slurm, 2 rank(s)" in log and "controller gloo" in log, log
    steps = [r["step"] for r in _records(workdir, "step")]
    assert steps == list(range(1, 9)), steps
    assert (workdir / "checkpoints" / "ckpt_e0002_s00000008.pt").exists()
    acct = cluster.sacct(job_id)  # docs/launch.md's sacct column
    assert (acct[str(job_id)], acct[f"{job_id}.0"]) == (("COMPLETED", "0:0"), ("COMPLETED", "0:0")), acct


def _assert_resumed(workdir: Path, log: str, total: int) -> None:
    assert "ranks exited with status 75" in log, log
    ends = _records(workdir, "end")
    assert [e["status"] for e in ends] == ["preempted", "completed"], ends
    stopped = ends[0]["step"]
    assert 3 <= stopped < total, ends
    headers = _records(workdir, "header")
    assert len(headers) == 2 and headers[0]["resumed_from"] is None
    assert headers[1]["resumed_from"] and f"_s{stopped:08d}.pt" in headers[1]["resumed_from"], headers[1]
    # every optimizer step ran exactly once across the two runs: nothing repeated, nothing skipped
    steps = [r["step"] for r in _records(workdir, "step")]
    assert steps == list(range(1, total + 1)), steps[:5] + ["..."] + steps[-5:]


def _signal_mid_run(cluster: SlurmCluster, tmp_path: Path, job_id: int, workdir: Path) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any(r["step"] >= 3 for r in _records(workdir, "step")):
        assert time.monotonic() < deadline, f"no training steps after {JOB_TIMEOUT_S} s\n{_job_log(tmp_path, job_id)}"
        assert cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), _job_log(tmp_path, job_id)
        time.sleep(0.2)
    cluster.scancel(job_id, "USR1")  # what --signal=USR1@<secs> sends before the time limit


# 800 clips / (2 ranks x 4) = 100 steps per epoch, 200 in all: long enough to be signalled mid-run
LONG, LONG_STEPS = ["data.num_samples=800", "train.epochs=2"], 200


def test_signalled_job_requeues_and_resumes(cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id, workdir = _submit(cluster, tmp_path, LONG)
    _signal_mid_run(cluster, tmp_path, job_id, workdir)
    # The script requeues the job itself; Slurm then holds a requeued job for a while (BeginTime),
    # which the test cuts short so that it does not wait out the scheduler's grace period.
    cluster.wait(job_id, lambda f: int(f.get("Restarts", 0)) >= 1, JOB_TIMEOUT_S)
    cluster.release_now(job_id)
    log = _assert_completed(cluster, tmp_path, job_id, workdir, steps=LONG_STEPS)
    assert cluster.job(job_id)["Restarts"] == "1"
    assert "preempted: requeueing job" in log, log
    _assert_resumed(workdir, log, LONG_STEPS)
    # sacct shows the last run; with --duplicates also the first, REQUEUED 0:0 (its steps: FAILED 75:0)
    acct = cluster.sacct(job_id)
    runs = cluster._run(["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State,ExitCode", "-j", str(job_id)]).stdout
    print(f"sacct after a requeue: {acct}; sacct -D -X: {runs.split()}")
    assert acct[str(job_id)] == ("COMPLETED", "0:0"), acct
    assert runs.split() == [f"{job_id}|REQUEUED|0:0", f"{job_id}|COMPLETED|0:0"], runs


def test_signalled_job_resubmits_and_resumes(cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    job_id, workdir = _submit(cluster, tmp_path, LONG, env={"TSM_DIST_RESUBMIT": str(script)})
    _signal_mid_run(cluster, tmp_path, job_id, workdir)
    first = cluster.wait_final(job_id, JOB_TIMEOUT_S)
    first_log = _job_log(tmp_path, job_id)
    assert first["JobState"] == "FAILED" and first["ExitCode"] == "75:0", f"{first}\n{first_log}"
    acct = cluster.sacct(job_id)
    assert (acct[str(job_id)], acct[f"{job_id}.0"]) == (("FAILED", "75:0"), ("FAILED", "75:0")), acct
    submitted = re.search(r"Submitted batch job (\d+)", first_log)
    assert submitted, first_log
    second_id = int(submitted.group(1))
    log = _assert_completed(cluster, tmp_path, second_id, workdir, steps=LONG_STEPS)
    _assert_resumed(workdir, first_log + log, LONG_STEPS)


def test_scancel_checkpoints_exits_143_and_the_cancel_sticks(cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id, workdir = _submit(cluster, tmp_path, [*LONG, "log.wandb=offline"], env={"WANDB_MODE": "offline"})
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any(r["step"] >= 3 for r in _records(workdir, "step")):
        assert time.monotonic() < deadline, f"no training steps after {JOB_TIMEOUT_S} s\n{_job_log(tmp_path, job_id)}"
        assert cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), _job_log(tmp_path, job_id)
        time.sleep(0.2)
    cluster.scancel(job_id)  # SIGTERM to the batch shell, srun and every task's process tree, then SIGKILL
    fields = cluster.wait_final(job_id, JOB_TIMEOUT_S)
    assert fields["JobState"] == "CANCELLED", fields
    deadline = time.monotonic() + 30  # the ranks have KillWait (10 s here) to finish the step and save
    while not _records(workdir, "end") and time.monotonic() < deadline:
        time.sleep(0.2)
    log = _job_log(tmp_path, job_id)
    ends = _records(workdir, "end")
    assert [e["status"] for e in ends] == ["terminated"], f"{ends}\n{log}"
    assert (workdir / "checkpoints" / f"ckpt_e0000_s{ends[0]['step']:08d}.pt").exists() or \
        sorted(workdir.glob(f"checkpoints/ckpt_e*_s{ends[0]['step']:08d}.pt")), sorted(workdir.glob("checkpoints/*"))
    time.sleep(5)  # a requeue would show up by now
    after = cluster.job(job_id)
    assert after["JobState"] == "CANCELLED" and after.get("Restarts", "0") == "0", after
    assert "requeueing" not in log and "Submitted batch job" not in log, log
    # sacct does not show what scontrol shows: the cancel on the job line with exit 0:0; the steps as they
    # ended: by themselves within KillWait (FAILED 15:0), or killed after it (CANCELLED 0:9) on a loaded host
    acct = cluster.sacct(job_id)
    print(f"sacct after scancel: {acct}; scontrol: {after['JobState']} {after['ExitCode']}")
    assert acct[str(job_id)] == ("CANCELLED by 0", "0:0"), acct
    assert acct[f"{job_id}.0"] in (("FAILED", "15:0"), ("CANCELLED", "0:9")), acct


def test_a_killed_rank_ends_the_job_with_rank_0s_code_not_the_kill(cluster: SlurmCluster, tmp_path: Path) -> None:
    """Rank 1 SIGKILLed (the OOM killer, a lost node): srun reports the signal (137), rank 0 recorded
    ``failed``, 1 ("rank 1 was lost"): the job ends FAILED 1:0, as the run decided."""
    job_id, workdir = _submit(cluster, tmp_path, LONG)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any(r["step"] >= 3 for r in _records(workdir, "step")):
        assert time.monotonic() < deadline, f"no training steps after {JOB_TIMEOUT_S} s\n{_job_log(tmp_path, job_id)}"
        time.sleep(0.2)
    victims = task_pids(job_id, rank=1)
    assert victims, f"no process of rank 1 of job {job_id}"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    fields = cluster.wait_final(job_id, JOB_TIMEOUT_S)
    log = _job_log(tmp_path, job_id)
    ends = _records(workdir, "end")
    assert [(e["status"], e["exit_code"]) for e in ends] == [("failed", 1)] and "rank 1 was lost" in ends[0]["cause"]
    assert "ranks exited with status 137" in log and "exit code 1, as the end record decided" in log, log
    assert (fields["JobState"], fields["ExitCode"]) == ("FAILED", "1:0"), f"{fields}\n{log}"
    acct = cluster.sacct(job_id)
    print(f"sacct after a SIGKILLed rank: {acct}")
    assert acct[str(job_id)] == ("FAILED", "1:0"), acct


def test_a_job_cancelled_while_pending_is_reported_as_such(cluster: SlurmCluster, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Held, then cancelled: no job log, no metrics; the study's status says it was cancelled before it
    started, not "the trainer did not start; see the job log"."""
    from tsm_dist.scheduler.submit import JobSpec, refresh_status

    script = tmp_path / "job.sh"
    script.write_text(render_job("slurm", 1, 0, CONFIG, ranks_per_node=2, cpus_per_rank=1, time="00:10",
                                 workdir=str(tmp_path / "run"), job_name="pending",
                                 overrides=[*TINY, "data.num_samples=16"],
                                 python=sys.executable))
    job_id = cluster.sbatch(script, cwd=tmp_path, env={"SBATCH_HOLD": "1"})
    assert cluster.job(job_id)["JobState"] == "PENDING"
    cluster.scancel(job_id)
    fields = cluster.wait_final(job_id, 30)
    assert (fields["JobState"], fields["ExitCode"]) == ("CANCELLED", "0:0"), fields
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    run = JobSpec(tag="pending", config="c.yaml", workdir="run", job_id=str(job_id), status="submitted")
    refresh_status([run], tmp_path, "slurm")
    assert run.status == "cancelled before it started (while pending: no metrics.jsonl, no job log)", run.status
    acct = cluster.sacct(job_id)
    print(f"sacct after a cancel while pending: {acct}")
    assert acct[str(job_id)] == ("CANCELLED by 0", "0:0"), acct


def test_mpi_job_trains_on_two_srun_ranks(cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id, workdir = _submit(cluster, tmp_path, ["data.num_samples=16", "train.epochs=1"], controller="mpi")
    log = _assert_completed(cluster, tmp_path, job_id, workdir, steps=2)
    assert "controller mpi" in log, log
    assert "--mpi=pmix" in (tmp_path / "job.sh").read_text()


def test_a_job_preempted_under_preemptmode_requeue_is_not_sent_to_be_resubmitted(
        cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """A job preempted under PreemptMode=REQUEUE goes back to the queue and its log does not ask the user to
    resubmit it (a second copy would train into the same workdir). With the partition's GraceTime the ranks
    checkpoint and the job ends before Slurm kills it, and Slurm then ends it FAILED instead of requeueing
    it (found here): the script requeues it."""
    with SlurmCluster(tmp_path_factory.mktemp("slurm_preempt"), preempt_requeue=True) as preempting:
        job_id, workdir = _submit(preempting, tmp_path, LONG)
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not any(r["step"] >= 3 for r in _records(workdir, "step")):
            assert time.monotonic() < deadline, f"no training steps\n{_job_log(tmp_path, job_id)}"
            time.sleep(0.2)
        urgent = tmp_path / "urgent.sh"  # needs the node's 2 CPUs, in the higher-priority partition
        urgent.write_text(f"#!/bin/bash\n#SBATCH --partition={URGENT}\n#SBATCH --ntasks=2\n"
                          f"#SBATCH --output=urgent-%j.out\nsleep 1\n")
        preempting.sbatch(urgent, cwd=tmp_path)
        preempting.wait(job_id, lambda f: int(f.get("Restarts", 0)) >= 1, JOB_TIMEOUT_S)
        deadline = time.monotonic() + 30
        while "ranks exited with status" not in _job_log(tmp_path, job_id) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)  # the script's last lines after the ranks
        log = _job_log(tmp_path, job_id)
    assert [e["status"] for e in _records(workdir, "end")][:1] == ["terminated"], log
    assert "ranks exited with status 143" in log, log
    assert "preempted by Slurm (PreemptMode=REQUEUE): checkpoint written; requeueing job" in log, log
    assert "resubmit" not in log.split("ranks exited with status 143")[1], log

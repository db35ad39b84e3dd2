"""The scaling sweep from one command to its table on a real Slurm: two nodes (two slurmd on this host,
tests/slurm_cluster.py), one CPU rank each.

``scaling_sweep --scheduler slurm --nodes 1,2 --gpus-per-node 0 ... --submit`` renders and sbatches one job
per node count; the 2-node job also runs the allreduce microbenchmark on its allocation under
``srun --mpi=none`` (the engine's benchmark runs, mpi4py is skipped with one line); ``collect --wait``
waits for the jobs and writes the table: every run with its status, measured clips/s, scalability and the
links the projection used. A job whose ranks are killed shows up as failed, with its exit code.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, task_pids, trainer_cluster
from tsm_dist.runlog.records import read_last_run

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SWEEP = [sys.executable, "-m", "tsm_dist.scaling_sweep"]
# a tiny TSM on random clips: the test is about the path from one command to the table, not the numbers
TINY = ["--set", "data.backend=random", "--set", "data.num_samples=64", "--set", "model.depth=18",
        "--set", "model.width=8", "--set", "model.num_frames=4", "--set", "data.crop_size=32"]
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with trainer_cluster(tmp_path_factory.mktemp("slurm2"), cpus=1, nodes=2) as c:
        yield c


def _sweep(cluster: SlurmCluster, out: Path, *extra: str, nodes: str = "1,2") -> subprocess.CompletedProcess:
    argv = [*SWEEP, "--scheduler", "slurm", "--config", "configs/synthetic_tsm.yaml", "--nodes", nodes,
            "--gpus-per-node", "0", "--ranks-per-node", "1", "--cpus-per-rank", "1", "--per-gpu-batch", "2",
            "--steps", "3", "--warmup-steps", "1", "--time", "00:10", "--dataset-size", "64", *TINY,
            "--out", str(out), "--submit", *extra]
    return subprocess.run(argv, env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=120)


def _collect(cluster: SlurmCluster, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*SWEEP, "collect", str(out), "--wait", str(JOB_TIMEOUT_S)], env=cluster.env, cwd=REPO,
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S + 120)


def _job_log(out: Path, job: dict) -> str:
    logs = sorted(out.glob(f"{job['tag']}-{job['job_id']}.out"))
    return logs[0].read_text(errors="replace") if logs else f"(no job log for {job['tag']} in {out})"


def test_sweep_submits_waits_and_collects_on_two_nodes(cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    submitted = _sweep(cluster, out)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    plan = json.loads((out / "sweep.json").read_text())
    assert [(j["nodes"], j["status"]) for j in plan["jobs"]] == [(1, "submitted"), (2, "submitted")]
    assert all(j["job_id"].isdigit() for j in plan["jobs"]), plan["jobs"]
    for job in plan["jobs"]:  # a CPU job: no GRES request a CPU partition would reject
        script = (out / job["script"]).read_text()
        requests = [line for line in script.splitlines() if line.startswith("#SBATCH")]
        assert not [r for r in requests if "gpu" in r or "gres" in r] and "#SBATCH --cpus-per-task=1" in requests
        assert f"#SBATCH --nodes={job['nodes']}\n" in script and "--gpus none" in script

    collected = _collect(cluster, out)
    logs = "\n".join(_job_log(out, j) for j in plan["jobs"])
    assert collected.returncode == 0, f"{collected.stdout}\n{collected.stderr}\n{logs}\n{cluster.logs()}"
    with open(out / "results.csv") as fh:
        rows = {int(r["nodes"]): r for r in csv.DictReader(fh)}
    assert sorted(rows) == [1, 2]
    for nodes, row in rows.items():
        assert row["status"] == "completed" and int(row["timed_steps"]) == 3, (row, logs)
        assert float(row["clips_per_sec"]) > 0 and int(row["global_batch"]) == 2 * nodes
        assert float(row["projected_clips_per_sec"]) > 0
    assert 0 < float(rows[2]["scalability"]) < 2 and float(rows[1]["scalability"]) == pytest.approx(1.0)
    # the projection's links and why: inter-node measured on the 2-node allocation by the engine's benchmark
    # (mpi4py skipped under srun --mpi=none, in one line), intra-node from the profile (one rank per node)
    links = rows[2]["projection_links"]
    two = out / plan["jobs"][1]["workdir"]
    assert (two / "allreduce_engine.json").is_file() and not (two / "allreduce_mpi4py.json").exists()
    bench = json.loads((two / "allreduce_engine.json").read_text())
    assert bench["world_size"] == 2 and bench["nodes"] == 2 and len(bench["times_s"]) == 8
    inter = links.split("inter: ")[1]
    if bench["alpha_s"] is not None:
        assert inter.startswith("measured, horovod allreduce microbenchmark, 2 ranks on 2 node(s)"), links
    else:  # timings too disturbed to fit (a loaded machine): the fallback names the file and why
        assert inter.startswith("fallback to the machine profile") and bench["fit_error"] in inter, links
    assert "intra: fallback to the machine profile" in links and "a node runs one rank" in links, links
    log2 = _job_log(out, plan["jobs"][1])
    assert log2.count("skipping mpi4py") == 1, log2
    assert "tsm_dist.studies.scaling.allreduce_bench exited with status 0" in log2, log2
    # the batch log says where the run's record is and how it ended
    assert f"run record: {two / 'metrics.jsonl'}: completed at step 4" in log2, log2
    md = (out / "results.md").read_text()
    assert "| horovod | tsm8f_r50 | 2 | 2 | 4 |" in md and md.count("| completed |") == 2, md
    assert "#Rank" in md and "1 rank(s) per node" in md, md


def test_a_run_whose_ranks_are_killed_is_failed_with_its_exit_code(cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    # long enough to be killed mid-run: 2000 steps
    submitted = _sweep(cluster, out, "--set", "data.num_samples=4000", "--steps", "2000", "--no-bench", nodes="2")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    plan = json.loads((out / "sweep.json").read_text())
    job = plan["jobs"][0]
    metrics = out / job["workdir"] / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.is_file() and metrics.read_text().count('"type": "step"') >= 2):
        assert time.monotonic() < deadline, _job_log(out, job)
        time.sleep(0.5)
    # rank 0, the one that writes the records, is killed (OOM killer, a node lost): no end record
    victims = task_pids(job["job_id"], rank=0)
    assert victims, f"no process of rank 0 of job {job['job_id']} found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    collected = _collect(cluster, out)
    log = _job_log(out, job)
    end = read_last_run(metrics).end
    assert end and end["status"] == "failed", f"{end}\n{log}"
    assert "ranks exited with status" in end["cause"] and "recorded by the job script" in end["cause"], end
    with open(out / "results.csv") as fh:
        row = next(r for r in csv.DictReader(fh) if r["nodes"] == "2")
    assert row["status"].startswith("failed: job ") and "ranks exited with status" in row["status"], row
    assert "run record:" in log and ": failed (job " in log, log
    assert collected.returncode in (0, 1), collected.stderr
    fields = cluster.job(int(job["job_id"]))  # what scontrol/sacct show of it (docs/launch.md's table)
    assert (fields["JobState"], fields["ExitCode"]) == ("FAILED", "137:0"), fields

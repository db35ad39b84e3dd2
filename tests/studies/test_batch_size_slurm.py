"""The batch-size study from one command to its table on a real Slurm: two nodes (two slurmd on this host,
tests/slurm_cluster.py), one CPU rank each. ``--quick --scheduler slurm --max-nodes 2 --submit``, run from
outside the repository with a relative ``--out``, sbatches one job per run through the studies' job path; ``collect --wait`` waits for them and writes the table, the
batch of 8 simulated (2 nodes x 2 clips x K=2)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, ensure_installed
from tsm_dist.runlog.records import read_last_run

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STUDY = [sys.executable, "-m", "tsm_dist.batch_study"]
JOB_TIMEOUT_S = 400


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    reason = ensure_installed()
    if reason:
        pytest.skip(f"no local Slurm cluster: {reason}")
    pytest.importorskip("horovod.torch", reason="the trainer's Horovod engine is not installed")
    with SlurmCluster(tmp_path_factory.mktemp("slurm_batch"), cpus=1, nodes=2) as c:
        yield c


def test_batch_study_submits_waits_and_collects_on_two_nodes(cluster: SlurmCluster, tmp_path: Path) -> None:
    # submitted from a directory that is not the repository's, with a relative --out (as its default is):
    # sbatch runs in another directory, so the scripts must hold absolute paths
    out = tmp_path / "study"
    submitted = subprocess.run(
        [*STUDY, "--quick", "--batches", "2,8", "--scheduler", "slurm", "--gpus-per-node", "0", "--ranks-per-node", "1",
         "--cpus-per-rank", "1", "--max-nodes", "2", "--time", "00:10", "--out", "study", "--submit"],
        env=cluster.env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert [(r["batch"], r["nodes"], r["accumulate"]) for r in plan["runs"]] == [(2, 1, 1), (8, 2, 2)]
    assert all(j["status"] == "submitted" and j["job_id"].isdigit() for j in plan["jobs"].values()), plan["jobs"]
    collected = subprocess.run([*STUDY, "collect", "study", "--wait", str(JOB_TIMEOUT_S)], env=cluster.env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=JOB_TIMEOUT_S + 120)
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(out.glob("*.out")))
    assert collected.returncode == 0, f"{collected.stdout}\n{collected.stderr}\n{logs}\n{cluster.logs()}"
    assert "| sgd | 1 | 2 | 16 |" in collected.stdout and "| sgd | 4* | 8* | 64 |" in collected.stdout, \
        f"{collected.stdout}\n{logs}"
    assert collected.stdout.count("| completed |") == 2, f"{collected.stdout}\n{logs}"
    for tag, world in (("sgd_b00002_s0", 1), ("sgd_b00008_s0", 2)):
        run = read_last_run(out / "runs" / tag / "metrics.jsonl")
        assert run.status == "completed" and run.header["world_size"] == world
    assert json.loads((out / "plan.json").read_text())["jobs"]["sgd_b00008_s0"]["status"] == "completed"

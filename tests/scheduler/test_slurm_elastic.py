"""Elastic job scripts (``engine.elastic: true``) on a real single-host Slurm cluster (tests/slurm_cluster.py).

The rendered script starts the real trainer on 2 CPU ranks with ``python -m tsm_dist.ranks.elastic_run``
(horovodrun --gloo, elastic) and ``launch/discover_hosts.sh`` reading the job's ``SLURM_JOB_NODELIST``:

- the job trains to the end through horovodrun and the discovery script;
- the time-limit warning as ``#SBATCH --signal=B:USR1@T`` sends it (``scancel --batch --signal=USR1``: the
  batch shell only): the shell passes it to the ranks, they checkpoint and exit 75, horovodrun exits 1, the
  script requeues on the end record's 75 and the requeued job resumes; every step runs once;
- a plain ``scancel`` (SIGTERM to every process of the job, horovodrun included): the ranks checkpoint and
  write their ``end`` record, the cancel sticks.

On two Slurm nodes whose names resolve to this host (so horovodrun starts their ranks without ssh, as it
would on a real node pair with ssh), one rank per node:

- the job trains across both hosts of the allocation;
- one node's rank is SIGKILLed (``engine.elastic_min_ranks=1``): horovodrun blacklists that host, the other
  rank rolls back to its last commit and the job completes on 1 rank, every step trained;
- one node is written into the exclude file: the discovery script drops it and the job completes on 1 rank;
- three nodes, 2 ranks (one node spare): a rank is SIGKILLed and the spare node takes its place.

Run them one session at a time: ``flock /work/slurm.lock pytest tests/scheduler/test_slurm_elastic.py``.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, job_log, job_pids, job_records, trainer_cluster
from tsm_dist.scheduler.render import render_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "synthetic_tsm.yaml")
TINY = ["data.backend=random", "data.batch_size=4", "data.crop_size=32", "model.width=8", "model.num_frames=4",
        "log.wandb=disabled", "log.interval=1", "log.progress=false", "train.eval_every_epochs=0",
        "engine.elastic=true"]
JOB_TIMEOUT_S = 240
# 800 clips / (2 ranks x 4) = 100 steps per epoch, 200 in all: long enough to be signalled mid-run
LONG, LONG_STEPS = ["data.num_samples=800", "train.epochs=2"], 200


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with trainer_cluster(tmp_path_factory.mktemp("slurm_elastic")) as c:
        yield c


def _submit(cluster: SlurmCluster, tmp_path: Path, settings: list[str], nodes: int = 1) -> tuple[int, Path]:
    """One node: 2 ranks on it; several: one rank per node, Gloo on loopback (every node is this host)."""
    workdir = tmp_path / "run"
    script = tmp_path / "job.sh"
    script.write_text(render_job("slurm", nodes, 0, CONFIG, ranks_per_node=2 if nodes == 1 else 1, cpus_per_rank=1,
                                 time="00:10", workdir=str(workdir), job_name="elastic", overrides=TINY + settings,
                                 warn_seconds=60, python=sys.executable, network_interface="lo" if nodes > 1 else None))
    return cluster.sbatch(script, cwd=tmp_path), workdir


def _log(tmp_path: Path, job_id: int) -> str:
    return job_log(tmp_path, "elastic", job_id)


_records = job_records


def _wait_for_step(cluster: SlurmCluster, tmp_path: Path, job_id: int, workdir: Path, step: int) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any(r["step"] >= step for r in _records(workdir, "step")):
        assert time.monotonic() < deadline, f"no step {step} after {JOB_TIMEOUT_S} s\n{_log(tmp_path, job_id)}"
        assert cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), _log(tmp_path, job_id)
        time.sleep(0.2)


def test_elastic_job_trains_through_horovodrun_and_host_discovery(cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id, workdir = _submit(cluster, tmp_path, ["data.num_samples=32", "train.epochs=2"])  # 4 steps per epoch
    fields = cluster.wait_final(job_id, JOB_TIMEOUT_S)
    log = _log(tmp_path, job_id)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), f"{fields}\n{log}\n{cluster.logs()}"
    assert "elastic: 2 of 2 slot(s) at start, never fewer than 2 rank(s); hosts now: localhost:2" in log, log
    assert "tsm-dist launch: horovodrun, 2 rank(s)" in log and "controller none" in log, log
    headers, ends = _records(workdir, "header"), _records(workdir, "end")
    assert headers and all(h["world_size"] == 2 for h in headers), headers
    assert ends[-1]["status"] == "completed" and ends[-1]["step"] == 8, ends
    assert [r["step"] for r in _records(workdir, "step")] == list(range(1, 9))


def test_the_warning_to_the_batch_shell_reaches_the_ranks_and_the_job_resumes(cluster: SlurmCluster,
                                                                               tmp_path: Path) -> None:
    job_id, workdir = _submit(cluster, tmp_path, LONG)
    _wait_for_step(cluster, tmp_path, job_id, workdir, 3)
    # what '#SBATCH --signal=B:USR1@T' sends before the time limit: the batch shell alone
    cluster._run(["scancel", "--batch", "--signal=USR1", str(job_id)])
    cluster.wait(job_id, lambda f: int(f.get("Restarts", 0)) >= 1, JOB_TIMEOUT_S)
    cluster.release_now(job_id)
    fields = cluster.wait_final(job_id, JOB_TIMEOUT_S)
    log = _log(tmp_path, job_id)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), f"{fields}\n{log}"
    assert "exit code 75, as the end record decided (the launcher's: 1)" in log and "preempted: requeueing job" in log
    ends = _records(workdir, "end")
    assert [e["status"] for e in ends] == ["preempted", "completed"], ends
    assert 3 <= ends[0]["step"] < LONG_STEPS and ends[1]["step"] == LONG_STEPS, ends
    headers = _records(workdir, "header")
    assert len(headers) == 2 and f"_s{ends[0]['step']:08d}.pt" in (headers[1]["resumed_from"] or ""), headers
    steps = [r["step"] for r in _records(workdir, "step")]
    assert steps == list(range(1, LONG_STEPS + 1)), steps[:5] + ["..."] + steps[-5:]


def test_scancel_reaches_horovodrun_and_the_ranks_still_checkpoint(cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id, workdir = _submit(cluster, tmp_path, LONG)
    _wait_for_step(cluster, tmp_path, job_id, workdir, 3)
    cluster.scancel(job_id)  # SIGTERM to every process of the job, horovodrun included; SIGKILL after KillWait
    fields = cluster.wait_final(job_id, JOB_TIMEOUT_S)
    deadline = time.monotonic() + 30
    while not _records(workdir, "end") and time.monotonic() < deadline:
        time.sleep(0.2)
    log = _log(tmp_path, job_id)
    ends = _records(workdir, "end")
    assert fields["JobState"] == "CANCELLED" and [e["status"] for e in ends] == ["terminated"], f"{ends}\n{log}"
    assert sorted(workdir.glob(f"checkpoints/ckpt_e*_s{ends[0]['step']:08d}.pt")), sorted(workdir.glob("checkpoints/*"))
    assert "SIGTERM received: the ranks checkpoint and stop by themselves" in log, log
    time.sleep(5)  # a requeue would show up by now
    after = cluster.job(job_id)
    assert after["JobState"] == "CANCELLED" and after.get("Restarts", "0") == "0", after
    assert "requeueing" not in log and "Submitted batch job" not in log, log


# ------------------------------------------------------------------ two nodes (names of this host)
def local_names() -> tuple[str, ...]:
    """Names in /etc/hosts besides ``localhost`` that resolve to an address of this machine, as Horovod tests it
    (Slurm takes ``localhost`` for this host's own name and refuses a second node beside it)."""
    from horovod.runner.util import network

    local = network.get_local_host_addresses()
    names = {n for line in Path("/etc/hosts").read_text().splitlines() if not line.lstrip().startswith("#")
             for n in line.split()[1:]}
    found = []
    for name in sorted(names - {"localhost"}):
        try:
            if socket.gethostbyname(name) in local:
                found.append(name)
        except OSError:
            continue
    return tuple(found)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory):
    names = local_names()[:2]
    if len(names) < 2:
        pytest.skip(f"two names of this host are needed in /etc/hosts, found {names}")
    with trainer_cluster(tmp_path_factory.mktemp("slurm_elastic2"), node_names=names) as c:
        yield c


def test_elastic_job_trains_across_two_hosts(two_nodes: SlurmCluster, tmp_path: Path) -> None:
    job_id, workdir = _submit(two_nodes, tmp_path, ["data.num_samples=32", "train.epochs=2"], nodes=2)
    fields = two_nodes.wait_final(job_id, JOB_TIMEOUT_S)
    log = _log(tmp_path, job_id)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), f"{fields}\n{log}\n{two_nodes.logs()}"
    first, second = two_nodes.nodes
    assert f"hosts now: {first}:1 {second}:1 " in log, log
    headers, ends = _records(workdir, "header"), _records(workdir, "end")
    assert headers and all(h["world_size"] == 2 for h in headers), headers
    assert ends[-1]["status"] == "completed" and ends[-1]["step"] == 8, ends


def _rank_pids_on(job_id: int, host: str) -> list[int]:
    """The rank processes that horovodrun started for ``host`` in job ``job_id``."""
    return job_pids(job_id, {"HOROVOD_HOSTNAME": host}, "tsm_dist.ranks.start")


# 960 clips / (2 ranks x 4) = 120 steps per epoch, 240 in all; a commit every 5 steps. The steps take about 25 ms
# here at low load: a run of 40 steps ended 1 s after it started, before horovodrun's discovery (polled every
# second) saw a host written into the exclude file after step 7 (a CI run at load 1.5); 240 leave seconds.
SHORT, SHORT_STEPS = ["data.num_samples=960", "train.epochs=2", "engine.commit_every=5",
                      "engine.elastic_min_ranks=1"], 240


def _assert_went_on_with_one_rank(cluster: SlurmCluster, tmp_path: Path, job_id: int, workdir: Path) -> None:
    fields = cluster.wait_final(job_id, JOB_TIMEOUT_S)
    log = _log(tmp_path, job_id)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), f"{fields}\n{log}"
    ends = _records(workdir, "end")
    assert [(e["status"], e["step"]) for e in ends] == [("completed", SHORT_STEPS)], f"{ends}\n{log}"
    changes = _records(workdir, "membership")
    assert [(m["old_world"], m["new_world"]) for m in changes] == [(2, 1)], f"{changes}\n{log}"
    # every step trained (one rolled back and done again is written twice), the last ones on the one rank left
    steps = {r["step"]: r for r in _records(workdir, "step")}
    assert sorted(steps) == list(range(1, SHORT_STEPS + 1)), sorted(steps)
    assert steps[SHORT_STEPS]["world_size"] == 1, steps[SHORT_STEPS]


def test_a_rank_killed_on_one_node_leaves_the_job_training_on_the_other(two_nodes: SlurmCluster,
                                                                       tmp_path: Path) -> None:
    job_id, workdir = _submit(two_nodes, tmp_path, SHORT, nodes=2)
    _wait_for_step(two_nodes, tmp_path, job_id, workdir, 7)
    victims = _rank_pids_on(job_id, two_nodes.nodes[1])
    assert victims, f"no rank of job {job_id} on {two_nodes.nodes[1]}"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)  # the node's rank is gone: horovodrun blacklists the host
    _assert_went_on_with_one_rank(two_nodes, tmp_path, job_id, workdir)


def test_a_node_written_into_the_exclude_file_leaves_the_job(two_nodes: SlurmCluster, tmp_path: Path) -> None:
    job_id, workdir = _submit(two_nodes, tmp_path, SHORT, nodes=2)
    _wait_for_step(two_nodes, tmp_path, job_id, workdir, 7)
    (workdir / "exclude_hosts").write_text(f"{two_nodes.nodes[1]}  # the health check found it bad\n")
    _assert_went_on_with_one_rank(two_nodes, tmp_path, job_id, workdir)


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory: pytest.TempPathFactory):
    names = ("127.0.0.1", *local_names()[:2])  # an address is a node name Slurm accepts, and it is local
    if len(names) < 3:
        pytest.skip(f"two names of this host are needed in /etc/hosts, found {names[1:]}")
    with trainer_cluster(tmp_path_factory.mktemp("slurm_elastic3"), node_names=names) as c:
        yield c


def test_a_spare_node_replaces_a_lost_one(three_nodes: SlurmCluster, tmp_path: Path) -> None:
    """3 nodes, 2 ranks (engine.elastic_max_ranks=2): the third node waits; the second node's rank is killed,
    horovodrun blacklists that host and starts a rank on the spare, which gets the state by broadcast."""
    job_id, workdir = _submit(three_nodes, tmp_path, [*SHORT[:3], "engine.elastic_max_ranks=2"], nodes=3)
    _wait_for_step(three_nodes, tmp_path, job_id, workdir, 7)
    # which node stays spare is Horovod's choice (its first host order is a set's)
    busy = [n for n in three_nodes.nodes if _rank_pids_on(job_id, n)]
    assert len(busy) == 2, f"ranks on {busy}, expected 2 of {three_nodes.nodes}"
    killed_at = time.time()
    for pid in _rank_pids_on(job_id, busy[1]):
        os.kill(pid, signal.SIGKILL)
    fields = three_nodes.wait_final(job_id, JOB_TIMEOUT_S)
    log = _log(tmp_path, job_id)
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), f"{fields}\n{log}"
    assert "2 of 3 slot(s) at start, 1 slot(s) spare, never fewer than 2 rank(s)" in log, log
    ends, changes = _records(workdir, "end"), _records(workdir, "membership")
    assert [(e["status"], e["step"]) for e in ends] == [("completed", SHORT_STEPS)], f"{ends}\n{log}"
    assert changes and all(m["new_world"] == 2 for m in changes), f"{changes}\n{log}"
    steps = {r["step"]: r for r in _records(workdir, "step")}
    assert sorted(steps) == list(range(1, SHORT_STEPS + 1)) and steps[SHORT_STEPS]["world_size"] == 2, sorted(steps)
    again = min(r["time"] for r in _records(workdir, "step") if r["time"] > changes[0]["time"])
    print(f"spare node: rank SIGKILLed -> membership record {changes[0]['time'] - killed_at:.1f} s, -> first step "
          f"after it {again - killed_at:.1f} s (load {os.getloadavg()[0]:.1f})")

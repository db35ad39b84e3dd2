"""The per-rank wrapper: its plan for each launcher, its command line, exit codes, and a real 2-rank
Horovod start over Gloo with the rendezvous it hosts (as under plain ``srun``, without Slurm)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port
from test_layout import load_env
from tsm_dist.ranks import rendezvous
from tsm_dist.ranks.layout import LayoutError, detect_layout
from tsm_dist.ranks.start import plan_launch

REPO = Path(__file__).resolve().parents[2]
NO_GPUS = dict(node_gpus=0, affinity=2, cpu_count=2)


def test_srun_without_mpi_plans_a_gloo_rendezvous() -> None:
    plan = plan_launch(load_env("slurm_none_1"), **NO_GPUS)
    assert plan.controller == "gloo" and not plan.serve_rendezvous  # local rank 1 waits for local rank 0
    addr, port = plan.rendezvous
    assert addr == "localhost" and plan.env["HOROVOD_GLOO_RENDEZVOUS_PORT"] == str(port)
    assert (plan.env["MASTER_ADDR"], plan.env["MASTER_PORT"]) == ("localhost", str(port + 1))
    first = plan_launch(load_env("slurm_none_1", SLURM_PROCID="0", SLURM_LOCALID="0"), **NO_GPUS)
    assert first.serve_rendezvous and first.rendezvous == plan.rendezvous
    assert plan.env["OMP_NUM_THREADS"] == "1"  # SLURM_CPUS_PER_TASK is unset, 2 CPUs for 2 ranks


@pytest.mark.parametrize("name, controller", [
    ("slurm_pmix_1", "mpi"), ("slurm_pmi2_1", "mpi"), ("openmpi_1", "mpi"), ("jsrun_per_gpu_7", "mpi"),
    ("hydra_3", "mpi"), ("horovodrun_1", "none"),
])
def test_mpi_launchers_use_the_mpi_controller(name: str, controller: str) -> None:
    plan = plan_launch(load_env(name), **NO_GPUS)
    assert plan.controller == controller and plan.rendezvous is None and not plan.serve_rendezvous
    assert "HOROVOD_RANK" not in plan.env


def test_jsrun_rank_gets_its_gpu_and_cores() -> None:
    plan = plan_launch(load_env("jsrun_per_node_9"), cpus_per_rank=7, affinity=168, cpu_count=168)
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "3" and plan.env["TSM_DIST_GPU"] == "3"
    assert plan.env["OMP_NUM_THREADS"] == "7" and plan.env["RANK"] == "9" and plan.env["LOCAL_RANK"] == "3"
    assert "MASTER_ADDR" not in plan.env  # several nodes and no node list: the torch engine needs one set


def test_controller_choice_can_be_forced_but_not_faked() -> None:
    env = load_env("slurm_pmix_1")
    assert plan_launch(env, controller="gloo", **NO_GPUS).controller == "gloo"
    assert plan_launch({**env, "HOROVOD_CONTROLLER": "gloo"}, **NO_GPUS).controller == "gloo"
    with pytest.raises(LayoutError, match="--controller mpi, but slurm started this rank without an MPI runtime"):
        plan_launch(load_env("slurm_none_1"), controller="mpi", **NO_GPUS)


def test_rendezvous_port_is_shared_by_a_step_and_differs_between_steps() -> None:
    ports = {rendezvous.rendezvous_port(detect_layout(load_env("slurm_none_1", SLURM_PROCID=p, SLURM_LOCALID=p)),
                                        {}) for p in ("0", "1")}
    assert len(ports) == 1
    port = ports.pop()
    other_step = rendezvous.rendezvous_port(detect_layout(load_env("slurm_none_1", SLURM_STEP_ID="1")), {})
    assert other_step != port
    assert all(rendezvous.PORT_BASE <= p < rendezvous.PORT_BASE + rendezvous.PORT_SPAN for p in (port, other_step))
    layout = detect_layout(load_env("slurm_none_1"))
    assert rendezvous.rendezvous_port(layout, {rendezvous.PORT_VAR: "31000"}) == 31000
    assert rendezvous.rendezvous_addr(layout, {rendezvous.ADDR_VAR: "10.0.0.7"}) == "10.0.0.7"
    # mpirun on one host: the rendezvous is local; several hosts without a node list: use MPI
    assert rendezvous.rendezvous_addr(detect_layout(load_env("openmpi_1")), {}) == "127.0.0.1"
    with pytest.raises(LayoutError, match="jsrun: Horovod over Gloo needs the job's node list"):
        plan_launch(load_env("jsrun_per_gpu_7"), controller="gloo", **NO_GPUS)


def test_one_task_srun_step_still_gets_gloo() -> None:
    env = load_env("slurm_none_1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS="1",
                   SLURM_STEP_TASKS_PER_NODE="1")
    plan = plan_launch(env, **NO_GPUS)
    assert plan.controller == "gloo" and plan.serve_rendezvous
    assert plan_launch({"HOME": "/root"}, **NO_GPUS).controller == "none"  # no launcher at all


def _wrapper(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    paths = [str(REPO)] + [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p]
    full = {"PATH": os.environ["PATH"], "PYTHONPATH": os.pathsep.join(paths), "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run([sys.executable, "-m", "tsm_dist.ranks.start", *args], env=full, capture_output=True,
                          text=True, timeout=timeout)


def test_print_env() -> None:
    proc = _wrapper(["--cpus-per-rank", "3", "--print-env"], load_env("slurm_none_1"))
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split("=", 1) for line in proc.stdout.splitlines() if not line.startswith("#"))
    assert lines["HOROVOD_RANK"] == "1" and lines["HOROVOD_SIZE"] == "2" and lines["OMP_NUM_THREADS"] == "3"
    assert proc.stdout.startswith("# slurm: rank 1/2, local 1/2 on 1 node(s), controller gloo")


def test_layout_error_is_reported_with_exit_code_2() -> None:
    proc = _wrapper(["--print-env"], load_env("slurm_none_1", SLURM_STEP_TASKS_PER_NODE="3"))
    assert proc.returncode == 2 and "SLURM_STEP_TASKS_PER_NODE='3' sums to 3 tasks" in proc.stderr


def test_trainer_exit_code_and_arguments_pass_through(tmp_path: Path) -> None:
    (tmp_path / "fake_trainer.py").write_text(
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'omp': os.environ['OMP_NUM_THREADS']}, open(sys.argv[-1], 'w'))\n"
        "raise SystemExit(75)\n")
    out = tmp_path / "seen.json"
    proc = _wrapper(["--module", "fake_trainer", "--cpus-per-rank", "2", "--", "--config", "c.yaml", str(out)],
                    {"PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 75, proc.stderr
    assert json.loads(out.read_text()) == {"argv": ["--config", "c.yaml", str(out)], "omp": "2"}
    assert "tsm-dist launch: single, 1 rank(s)" in proc.stderr


def test_missing_rendezvous_times_out_with_a_clear_error() -> None:
    port = free_port()  # a port nobody listens on
    proc = _wrapper(["--rendezvous-timeout", "1", "--module", "json"],
                    load_env("slurm_none_1", TSM_DIST_RENDEZVOUS_PORT=str(port)))
    assert proc.returncode == 2
    assert f"rank 1: the Gloo rendezvous at localhost:{port} did not answer" in proc.stderr


def test_busy_rendezvous_port_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        proc = _wrapper(["--module", "json"], load_env("slurm_none_1", SLURM_PROCID="0", SLURM_LOCALID="0",
                                                       TSM_DIST_RENDEZVOUS_PORT=str(s.getsockname()[1])))
    assert proc.returncode == 2 and "cannot listen on rendezvous port" in proc.stderr


PROBE = """
import json, sys
import torch
import horovod.torch as hvd
hvd.init()
total = hvd.allreduce(torch.tensor([float(hvd.rank() + 1)]), op=hvd.Sum).item()
json.dump({"rank": hvd.rank(), "size": hvd.size(), "local_size": hvd.local_size(), "sum": total,
           "gloo": hvd.gloo_enabled(), "mpi": hvd.mpi_enabled()}, open(f"{sys.argv[1]}/rank{hvd.rank()}.json", "w"))
hvd.shutdown()
"""


@pytest.mark.multirank
def test_two_ranks_start_horovod_over_the_hosted_gloo_rendezvous(tmp_path: Path) -> None:
    pytest.importorskip("horovod.torch")
    (tmp_path / "hvd_probe.py").write_text(PROBE)
    with socket.socket() as s:
        s.bind(("", 0))
        port = str(s.getsockname()[1])
    procs = []
    for r in ("1", "0"):  # the waiting rank first: it must hold off until the rendezvous is up
        env = load_env("slurm_none_1", SLURM_PROCID=r, SLURM_LOCALID=r, TSM_DIST_RENDEZVOUS_PORT=port)
        env.update(PATH=os.environ["PATH"], PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}", CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, "-m", "tsm_dist.ranks.start", "--module", "hvd_probe", "--",
                                       str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    for r in (0, 1):
        seen = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert seen == {"rank": r, "size": 2, "local_size": 2, "sum": 3.0, "gloo": True, "mpi": False}


@pytest.mark.multirank
def test_mpirun_wrapper_starts_horovod_over_mpi(tmp_path: Path) -> None:
    pytest.importorskip("horovod.torch")
    (tmp_path / "hvd_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMIX_", "HOROVOD_"))}
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}", TSM_DIST_PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="",
               OMPI_MCA_btl_tcp_if_include="lo", OMPI_MCA_oob_tcp_if_include="lo")
    proc = subprocess.run([str(REPO / "launch" / "mpirun.sh"), "2", "--module", "hvd_probe", "--", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tsm-dist launch: openmpi, 2 rank(s), 2 per node, controller mpi" in proc.stderr
    for r in (0, 1):
        seen = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert seen == {"rank": r, "size": 2, "local_size": 2, "sum": 3.0, "gloo": False, "mpi": True}

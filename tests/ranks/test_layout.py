"""Rank layout from launcher environments: recorded ones (Slurm 22.05 srun with --mpi=none/pmix/pmi2,
the batch script itself, OpenMPI mpirun, horovodrun) and ones constructed from the jsrun and MPICH
documentation (tests/ranks/envs/*.env say which is which)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tsm_dist.ranks.layout import LayoutError, detect_layout, expand_counts, expand_hostlist

ENVS = Path(__file__).parent / "envs"


def load_env(name: str, **changes: str) -> dict[str, str]:
    env = {}
    for line in (ENVS / f"{name}.env").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    env.update(changes)
    return env


@pytest.mark.parametrize("name, launcher, rank, size, local_rank, local_size, mpi", [
    ("slurm_none_1", "slurm", 1, 2, 1, 2, False),
    ("slurm_pmix_1", "slurm", 1, 2, 1, 2, True),
    ("slurm_pmi2_1", "slurm", 1, 2, 1, 2, True),
    ("openmpi_1", "openmpi", 1, 2, 1, 2, True),
    ("horovodrun_1", "horovodrun", 1, 2, 1, 2, False),
    ("jsrun_per_gpu_7", "jsrun", 7, 12, 1, 6, True),
    ("jsrun_per_node_9", "jsrun", 9, 12, 3, 6, True),
    ("hydra_3", "pmi", 3, 4, 1, 2, True),
])
def test_recorded_environments(name, launcher, rank, size, local_rank, local_size, mpi) -> None:
    layout = detect_layout(load_env(name))
    assert (layout.launcher, layout.rank, layout.size, layout.local_rank, layout.local_size, layout.mpi) == \
        (launcher, rank, size, local_rank, local_size, mpi)


def test_slurm_step_knows_its_nodes_and_job() -> None:
    layout = detect_layout(load_env("slurm_none_1"))
    assert layout.nodes == ("localhost",) and layout.tasks_per_node == (2,)
    assert layout.node_index == 0 and layout.hostname == "localhost"
    assert layout.job_id == "1" and layout.step_id == "0"


def test_batch_script_is_not_a_rank() -> None:
    # sbatch sets SLURM_PROCID=0 in the batch script; only srun tasks (with a step id) are ranks
    assert detect_layout(load_env("slurm_batch")).launcher == "single"


def test_inner_launcher_wins_over_the_batch_script() -> None:
    # mpirun / horovodrun started inside an sbatch script inherit its SLURM_* variables
    inside = {**load_env("slurm_batch"), **load_env("openmpi_1")}
    assert detect_layout(inside).launcher == "openmpi"
    inside = {**load_env("slurm_none_1"), **load_env("horovodrun_1")}
    assert detect_layout(inside).launcher == "horovodrun"


def test_torchrun_workers_inside_a_slurm_step() -> None:
    torchrun = {"TORCHELASTIC_RUN_ID": "r7", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}
    layout = detect_layout({**load_env("slurm_none_1"), **torchrun})  # torchrun started by srun: innermost
    assert (layout.launcher, layout.rank, layout.size, layout.local_rank, layout.local_size, layout.mpi) == \
        ("torchrun", 5, 8, 1, 4, False)
    assert layout.job_id == "r7" and layout.sources["local_size"] == "LOCAL_WORLD_SIZE"
    alone = detect_layout({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})  # no LOCAL_WORLD_SIZE: one node
    assert (alone.launcher, alone.local_size) == ("torchrun", 2)
    with pytest.raises(LayoutError, match="RANK is not set"):
        detect_layout({"TORCHELASTIC_RUN_ID": "r7", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_jsrun_wins_over_its_own_ompi_variables() -> None:
    assert detect_layout(load_env("jsrun_per_gpu_7")).job_id == "123456"


def test_no_launcher_is_a_single_process() -> None:
    layout = detect_layout({"HOME": "/root"})
    assert (layout.launcher, layout.rank, layout.size, layout.local_rank, layout.local_size) == ("single", 0, 1, 0, 1)


def multi_node_slurm(node_id: int, local_id: int, proc_id: int) -> dict[str, str]:
    """The recorded srun task, moved to a 3-node step with 4, 4 and 2 tasks (uneven last node)."""
    return load_env("slurm_none_1", SLURM_STEP_NODELIST="gpu[07-08],login-a1", SLURM_STEP_NUM_NODES="3",
                    SLURM_STEP_NUM_TASKS="10", SLURM_STEP_TASKS_PER_NODE="4(x2),2", SLURM_NODEID=str(node_id),
                    SLURM_LOCALID=str(local_id), SLURM_PROCID=str(proc_id),
                    SLURMD_NODENAME=["gpu07", "gpu08", "login-a1"][node_id])


def test_multi_node_slurm_layout_and_cross_ranks() -> None:
    layout = detect_layout(multi_node_slurm(node_id=2, local_id=1, proc_id=9))
    assert layout.nodes == ("gpu07", "gpu08", "login-a1") and layout.tasks_per_node == (4, 4, 2)
    assert (layout.rank, layout.size, layout.local_rank, layout.local_size) == (9, 10, 1, 2)
    assert layout.hostname == "login-a1"
    # local rank 1 exists on all three nodes; this node is the third of them
    assert (layout.cross_rank, layout.cross_size) == (2, 3)
    # local rank 3 exists only on the two 4-task nodes
    layout = detect_layout(multi_node_slurm(node_id=1, local_id=3, proc_id=7))
    assert (layout.cross_rank, layout.cross_size) == (1, 2)


def test_cross_rank_without_node_list_assumes_packed_nodes() -> None:
    layout = detect_layout(load_env("jsrun_per_gpu_7"))
    assert (layout.cross_rank, layout.cross_size) == (1, 2)


@pytest.mark.parametrize("expr, hosts", [
    ("localhost", ["localhost"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("gpu[08-10,12]", ["gpu08", "gpu09", "gpu10", "gpu12"]),
    ("a[1-2]b,c", ["a1b", "a2b", "c"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
    ("h001,g[2,4]", ["h001", "g2", "g4"]),
])
def test_expand_hostlist(expr: str, hosts: list[str]) -> None:
    assert expand_hostlist(expr) == hosts


@pytest.mark.parametrize("expr, counts", [("2", [2]), ("2(x3),1", [2, 2, 2, 1]), ("6(x2)", [6, 6]), ("1,3", [1, 3])])
def test_expand_counts(expr: str, counts: list[int]) -> None:
    assert expand_counts(expr) == counts


@pytest.mark.parametrize("env, culprit", [
    (load_env("slurm_none_1", SLURM_STEP_TASKS_PER_NODE="3"), "SLURM_STEP_TASKS_PER_NODE"),
    (load_env("slurm_none_1", SLURM_STEP_NODELIST="n[1-2]"), "SLURM_STEP_NODELIST"),
    (load_env("slurm_none_1", SLURM_NODEID="4"), "SLURM_NODEID=4"),
    (load_env("slurm_none_1", SLURM_STEP_NODELIST="n[1-"), "hostlist"),
    (load_env("openmpi_1", OMPI_COMM_WORLD_RANK="two"), "OMPI_COMM_WORLD_RANK='two'"),
    (load_env("openmpi_1", OMPI_COMM_WORLD_RANK="2"), "OMPI_COMM_WORLD_RANK"),
    (load_env("jsrun_per_gpu_7", JSM_NAMESPACE_LOCAL_RANK="6"), "JSM_NAMESPACE_LOCAL_RANK"),
    ({k: v for k, v in load_env("jsrun_per_gpu_7").items() if k != "JSM_NAMESPACE_SIZE"}, "JSM_NAMESPACE_SIZE"),
    ({"PMI_RANK": "1", "PMI_SIZE": "4"}, "MPI_LOCALRANKID"),
])
def test_inconsistent_environment_names_the_variable(env: dict[str, str], culprit: str) -> None:
    with pytest.raises(LayoutError, match=culprit.replace("[", r"\[").replace("(", r"\(")):
        detect_layout(env)

"""GPU binding, thread counts and the communication environment of one rank."""
from __future__ import annotations

from pathlib import Path

import pytest

from test_layout import load_env
from tsm_dist.ranks.binding import bind_gpu, comm_env, count_node_gpus, thread_env, threads_per_rank
from tsm_dist.ranks.layout import LayoutError, detect_layout


def test_scheduler_narrowed_gpu_is_kept() -> None:
    # jsrun -g1 (one resource set per GPU) shows each rank only its own GPU
    env = load_env("jsrun_per_gpu_7")
    gpu = bind_gpu(detect_layout(env), env)
    assert gpu.device == "1" and gpu.narrowed_by_scheduler and gpu.env == {"CUDA_VISIBLE_DEVICES": "1"}


def test_whole_node_gpus_are_split_by_local_rank() -> None:
    # one resource set per node: all six GPUs visible, local rank 3 takes the fourth
    env = load_env("jsrun_per_node_9")
    gpu = bind_gpu(detect_layout(env), env)
    assert gpu.device == "3" and not gpu.narrowed_by_scheduler and gpu.env == {"CUDA_VISIBLE_DEVICES": "3"}
    # ids are the scheduler's (e.g. Slurm's cgroup-mapped list), not positions
    env = load_env("jsrun_per_node_9", CUDA_VISIBLE_DEVICES="4,5,6,7,0,1")
    assert bind_gpu(detect_layout(env), env).env == {"CUDA_VISIBLE_DEVICES": "7"}


def test_gpus_found_by_the_driver_when_nothing_is_narrowed() -> None:
    env = load_env("slurm_none_1")  # local rank 1 of 2
    gpu = bind_gpu(detect_layout(env), env, node_gpus=4)
    assert gpu.device == "1" and gpu.env == {"CUDA_VISIBLE_DEVICES": "1"}


def test_no_gpus_leaves_the_environment_alone() -> None:
    env = load_env("slurm_none_1")
    gpu = bind_gpu(detect_layout(env), env, node_gpus=0)
    assert gpu.device is None and gpu.env == {}
    gpu = bind_gpu(detect_layout(env), {**env, "CUDA_VISIBLE_DEVICES": ""})
    assert gpu.device is None and gpu.env == {}


def test_cpu_mode_hides_gpus() -> None:
    env = load_env("jsrun_per_node_9")
    gpu = bind_gpu(detect_layout(env), env, mode="none")
    assert gpu.device is None and gpu.env == {"CUDA_VISIBLE_DEVICES": ""}


def test_more_ranks_than_gpus_is_an_error_naming_the_rank() -> None:
    env = load_env("jsrun_per_node_9", CUDA_VISIBLE_DEVICES="0,1")
    with pytest.raises(LayoutError, match=r"rank 9: 6 ranks .* only 2 GPU\(s\) .*CUDA_VISIBLE_DEVICES: 0,1"):
        bind_gpu(detect_layout(env), env)


def test_count_node_gpus_reads_the_driver(tmp_path: Path) -> None:
    for bus in ("0000:04:00.0", "0000:05:00.0"):
        (tmp_path / bus).mkdir()
    assert count_node_gpus(tmp_path) == 2
    assert count_node_gpus(tmp_path / "missing") == 0


@pytest.mark.parametrize("env_name, extra, kwargs, expected", [
    ("jsrun_per_gpu_7", {}, dict(cpus_per_rank=7, affinity=168, cpu_count=168), (7, "--cpus-per-rank")),
    ("slurm_none_1", {"SLURM_CPUS_PER_TASK": "3"}, dict(affinity=64, cpu_count=64), (3, "SLURM_CPUS_PER_TASK")),
    # srun/jsrun bound the rank to 7 cores of a 168-thread node: the mask is the rank's
    ("jsrun_per_gpu_7", {}, dict(affinity=7, cpu_count=168), (7, "CPU affinity mask")),
    # srun without -c in an exclusive allocation: the node's CPUs shared by its 2 ranks
    ("slurm_none_1", {"SLURM_CPUS_PER_TASK": "", "SLURM_CPUS_ON_NODE": "48"}, dict(affinity=64, cpu_count=64),
     (24, "SLURM_CPUS_ON_NODE / local ranks")),
    ("openmpi_1", {}, dict(affinity=16, cpu_count=16), (8, "node CPUs / local ranks")),
    # two ranks on a one-CPU machine still get one thread each
    ("openmpi_1", {}, dict(affinity=1, cpu_count=1), (1, "node CPUs / local ranks")),
])
def test_threads_per_rank(env_name, extra, kwargs, expected) -> None:
    env = load_env(env_name, **extra)
    assert threads_per_rank(detect_layout(env), env, **kwargs) == expected


def test_thread_env_keeps_a_users_choice() -> None:
    assert thread_env({}, 7) == {"OMP_NUM_THREADS": "7", "MKL_NUM_THREADS": "7"}
    assert thread_env({"OMP_NUM_THREADS": "2"}, 7) == {"MKL_NUM_THREADS": "7"}


def test_gloo_environment_is_what_horovodrun_would_set() -> None:
    # our own Slurm task, set up for Gloo, must match horovodrun's variables for the same layout
    env = load_env("slurm_none_1")
    out = comm_env(detect_layout(env), env, "gloo", rendezvous=("localhost", 20007))
    recorded = load_env("horovodrun_1")
    for key in ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE", "HOROVOD_CROSS_RANK",
                "HOROVOD_CROSS_SIZE", "HOROVOD_CONTROLLER", "HOROVOD_CPU_OPERATIONS", "HOROVOD_HOSTNAME"):
        assert out[key] == recorded[key], key
    assert (out["HOROVOD_GLOO_RENDEZVOUS_ADDR"], out["HOROVOD_GLOO_RENDEZVOUS_PORT"]) == ("localhost", "20007")


def test_layout_facts_override_stale_values_but_tunables_are_the_users() -> None:
    env = load_env("openmpi_1", RANK="0", NCCL_DEBUG="INFO")  # RANK exported by the batch script: stale
    out = comm_env(detect_layout(env), env, "mpi", master=("127.0.0.1", 29500))
    assert out["RANK"] == "1" and out["WORLD_SIZE"] == "2" and out["LOCAL_RANK"] == "1"
    assert "NCCL_DEBUG" not in out and out["MASTER_PORT"] == "29500"
    assert not any(k.startswith("HOROVOD_") for k in out)  # MPI: Horovod asks MPI, not the environment


def test_gloo_without_rendezvous_is_refused() -> None:
    env = load_env("slurm_none_1")
    with pytest.raises(ValueError, match="rendezvous"):
        comm_env(detect_layout(env), env, "gloo")


def test_jsrun_resource_set_per_socket_is_accepted() -> None:
    # 'jsrun --rs_per_host 2 --tasks_per_rs 3 --gpu_per_rs 3' on a 6-GPU node: local rank 4 is the second
    # task of the second set, which sees GPUs 3,4,5
    env = load_env("jsrun_per_node_9", JSM_NAMESPACE_LOCAL_RANK="4", OMPI_COMM_WORLD_LOCAL_RANK="4",
                   CUDA_VISIBLE_DEVICES="3,4,5")
    gpu = bind_gpu(detect_layout(env), env, node_gpus=6)
    assert gpu.device == "4" and gpu.env == {"CUDA_VISIBLE_DEVICES": "4"}
    # the same sets on a node with only 3 GPUs would put two ranks on each: refused
    with pytest.raises(LayoutError, match=r"6 ranks .* only 3 GPU\(s\)"):
        bind_gpu(detect_layout(env), env, node_gpus=3)

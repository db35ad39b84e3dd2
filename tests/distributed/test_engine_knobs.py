"""The engine's communication settings and thread rule: what Horovod and MPI are told on CPU vs GPU ranks.

The mechanism behind these defaults (OpenMPI's busy poll and Horovod's yield loop taking the compute
core) is measured in docs/studies.md; here the rules themselves are checked without a launcher.
"""
from __future__ import annotations

import pytest

from tsm_dist.config import EngineConfig
from tsm_dist.distributed.engine import horovod_env
from tsm_dist.ranks.cpu_policy import CPU_CYCLE_TIME_MS, compute_threads, cpu_mpi_env


def test_cpu_ranks_get_the_yielding_mpi_and_the_cpu_cycle_time():
    knobs = horovod_env(EngineConfig(), on_gpu=False, env={})
    assert knobs["OMPI_MCA_mpi_yield_when_idle"] == "1"
    assert knobs["HOROVOD_CYCLE_TIME"] == f"{CPU_CYCLE_TIME_MS:g}"
    assert knobs["HOROVOD_FUSION_THRESHOLD"] == str(64 * 1024 * 1024)


def test_gpu_ranks_keep_horovods_own_defaults():
    knobs = horovod_env(EngineConfig(), on_gpu=True, env={})
    assert "HOROVOD_CYCLE_TIME" not in knobs  # Horovod's 1 ms
    assert not any(k.startswith("OMPI_MCA_") for k in knobs)
    assert cpu_mpi_env({}, on_gpu=True) == {}


def test_the_config_wins_and_the_users_environment_beats_cpu_defaults():
    cfg = EngineConfig(cycle_time_ms=2.5)
    assert horovod_env(cfg, on_gpu=True, env={})["HOROVOD_CYCLE_TIME"] == "2.5"
    assert horovod_env(cfg, on_gpu=False, env={"HOROVOD_CYCLE_TIME": "9"})["HOROVOD_CYCLE_TIME"] == "2.5"
    user = {"HOROVOD_CYCLE_TIME": "9", "OMPI_MCA_mpi_yield_when_idle": "0"}
    knobs = horovod_env(EngineConfig(), on_gpu=False, env=user)
    assert "HOROVOD_CYCLE_TIME" not in knobs and "OMPI_MCA_mpi_yield_when_idle" not in knobs


@pytest.mark.parametrize("env, cores, expected", [
    ({"OMP_NUM_THREADS": "2"}, 1, 1),   # mpirun --bind-to core: 1 core, whatever the launcher exported
    ({"OMP_NUM_THREADS": "2"}, 4, 2),   # the job's choice within the mask
    ({"OMP_NUM_THREADS": "8"}, 4, 4),
    ({}, 1, 1),                         # alone: node CPUs / local ranks, capped by a 1-core mask
])
def test_compute_threads_never_exceed_the_cores_of_the_mask(env, cores, expected):
    assert compute_threads(env, affinity=cores) == expected

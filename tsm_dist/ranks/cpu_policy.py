"""What CPU ranks need from their environment: compute threads per rank, and the MPI/Horovod settings
under which Horovod's background thread does not take the compute cores (docs/studies.md, "Scaling on
CPU ranks", has the measurements). GPU ranks keep Horovod's own defaults: NCCL moves the data there and
the cores are free. The user's own environment always wins."""
from __future__ import annotations

import os
from typing import Mapping

from tsm_dist.ranks.binding import threads_per_rank
from tsm_dist.ranks.layout import detect_layout

# OpenMPI busy-polls in a blocking call unless told to yield; a 5 ms Horovod cycle took the least CPU.
CPU_CYCLE_TIME_MS = 5.0
CPU_MPI_ENV = {"OMPI_MCA_mpi_yield_when_idle": "1"}


def compute_threads(env: Mapping[str, str] | None = None, affinity: int | None = None) -> int:
    """Compute threads per rank: OMP_NUM_THREADS when the job (or tsm_dist.ranks.start) set it, else the
    launch layer's rule (cpus per task, CPU mask, node CPUs shared by the node's ranks); never more than
    the cores in this process's CPU mask (more threads than cores only time-slice one core)."""
    env = os.environ if env is None else env
    cores = affinity if affinity is not None else len(os.sched_getaffinity(0))
    pinned = env.get("OMP_NUM_THREADS", "")
    if pinned.isdigit() and int(pinned) > 0:
        return max(1, min(int(pinned), cores))
    return max(1, min(threads_per_rank(detect_layout(env), env)[0], cores))


def cpu_mpi_env(env: Mapping[str, str], on_gpu: bool | None = None) -> dict[str, str]:
    """MPI settings of CPU ranks not already in ``env`` (the user's wins); none where a GPU computes."""
    if on_gpu is None:
        import torch

        on_gpu = torch.cuda.is_available()
    if on_gpu:
        return {}
    return {k: v for k, v in CPU_MPI_ENV.items() if k not in env}

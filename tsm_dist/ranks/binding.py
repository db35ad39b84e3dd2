"""Per-rank resources: which GPU a rank uses, how many CPU threads it may run, and the communication
library settings it starts with. Pure functions of (layout, environment) returning the variables
to set, so each case is tested without the hardware.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from tsm_dist.ranks.layout import LayoutError, RankLayout

NO_GPU_VALUES = {"", "-1", "none", "nodevfiles", "void"}


@dataclass(frozen=True)
class GpuBinding:
    device: str | None  # the device id this rank uses (as the scheduler names it), None = CPU
    visible: tuple[str, ...]  # what CUDA_VISIBLE_DEVICES listed (or the probe found) before binding
    narrowed_by_scheduler: bool  # the scheduler already gave this rank exactly one GPU
    env: dict[str, str]  # variables to set


def count_node_gpus(proc_dir: Path = Path("/proc/driver/nvidia/gpus")) -> int:
    """GPUs the NVIDIA driver exposes on this node; no CUDA initialisation (children must not inherit one)."""
    try:
        return sum(1 for _ in proc_dir.iterdir())
    except OSError:
        return 0


def bind_gpu(layout: RankLayout, env: Mapping[str, str], mode: str = "auto",
             node_gpus: int | None = None) -> GpuBinding:
    """Give this rank one GPU, by local rank, through ``CUDA_VISIBLE_DEVICES``.

    A scheduler that already narrowed the visible set to one GPU (``srun --gpus-per-task=1``,
    ``jsrun -g1``) is respected as is. Otherwise the rank keeps only ``visible[local_rank]``, so the
    trainer always uses ``cuda:0``. ``mode="none"`` hides every GPU (CPU jobs on GPU nodes).
    """
    if mode not in ("auto", "none"):
        raise ValueError(f"GPU mode must be 'auto' or 'none', got {mode!r}")
    raw = env.get("CUDA_VISIBLE_DEVICES")
    if raw is not None:
        visible = () if raw.strip().lower() in NO_GPU_VALUES else tuple(d.strip() for d in raw.split(","))
    else:
        visible = tuple(str(i) for i in range(count_node_gpus() if node_gpus is None else node_gpus))
    if mode == "none":
        return GpuBinding(None, visible, False, {"CUDA_VISIBLE_DEVICES": ""})
    if not visible:
        return GpuBinding(None, visible, False, {})
    if len(visible) == 1:
        return GpuBinding(visible[0], visible, raw is not None, {"CUDA_VISIBLE_DEVICES": visible[0]})
    if layout.local_size > len(visible) and _per_resource_set(layout, raw, len(visible), node_gpus):
        # jsrun with one resource set per socket: each set's ranks see its GPUs, ranks packed in order
        device = visible[layout.local_rank % len(visible)]
        return GpuBinding(device, visible, True, {"CUDA_VISIBLE_DEVICES": device})
    if layout.local_size > len(visible):
        shown = raw if raw is not None else f"{len(visible)} GPU(s) found by the driver"
        raise LayoutError(
            f"rank {layout.rank}: {layout.local_size} ranks share node {layout.hostname or '(this node)'} but "
            f"only {len(visible)} GPU(s) are visible (CUDA_VISIBLE_DEVICES: {shown}); start one rank per GPU "
            f"or pass --gpus none for a CPU run")
    device = visible[layout.local_rank]
    return GpuBinding(device, visible, False, {"CUDA_VISIBLE_DEVICES": device})


def _per_resource_set(layout: RankLayout, raw: str | None, visible: int, node_gpus: int | None) -> bool:
    """A jsrun layout with several resource sets per node (e.g. ``-n2 -a3 -g3`` per socket on a 6-GPU
    node): the ranks of a node are whole sets of ``visible`` ranks, and the node has a GPU for each. A set
    given more ranks than GPUs would pass here too; the engine's shared-GPU check stops that one."""
    node = count_node_gpus() if node_gpus is None else node_gpus
    return (layout.launcher == "jsrun" and raw is not None and layout.local_size % visible == 0
            and node >= layout.local_size)


def threads_per_rank(layout: RankLayout, env: Mapping[str, str], cpus_per_rank: int | None = None,
                     affinity: int | None = None, cpu_count: int | None = None) -> tuple[int, str]:
    """CPU threads for one rank and where the number came from.

    Order: an explicit ``cpus_per_rank`` (the job script knows its resource set), Slurm's
    ``SLURM_CPUS_PER_TASK``, a CPU mask the launcher narrowed for this process, then the node's
    CPUs shared by its ranks.
    """
    if cpus_per_rank is not None:
        if cpus_per_rank < 1:
            raise LayoutError(f"--cpus-per-rank must be >= 1, got {cpus_per_rank}")
        return cpus_per_rank, "--cpus-per-rank"
    if layout.launcher == "slurm" and env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(env["SLURM_CPUS_PER_TASK"])), "SLURM_CPUS_PER_TASK"
    total = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    mask = affinity if affinity is not None else len(os.sched_getaffinity(0))
    if mask < total:  # the launcher bound this process to a subset: that subset is ours
        return max(1, mask), "CPU affinity mask"
    if layout.launcher == "slurm" and env.get("SLURM_CPUS_ON_NODE", "").isdigit():
        return max(1, int(env["SLURM_CPUS_ON_NODE"]) // layout.local_size), "SLURM_CPUS_ON_NODE / local ranks"
    return max(1, total // layout.local_size), "node CPUs / local ranks"


def thread_env(env: Mapping[str, str], threads: int) -> dict[str, str]:
    """OMP/MKL thread counts, unless the user pinned them already (their choice wins)."""
    return {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k not in env}


def comm_env(layout: RankLayout, env: Mapping[str, str], controller: str,
             rendezvous: tuple[str, int] | None = None, master: tuple[str, int] | None = None) -> dict[str, str]:
    """Variables every rank starts with.

    Layout facts are always written (a ``RANK`` exported into the batch script would be stale on
    every other rank); tunables already in the environment are the user's and are kept.

    - torch.distributed's ``env://`` variables, so ``engine.name: torch`` runs under the same wrapper;
    - for Horovod's Gloo controller (no MPI in this process) the full layout, as horovodrun sets it;
    - NCCL warnings on, so a hang or a fallback to sockets is visible in the job log.
    """
    facts = {"RANK": str(layout.rank), "WORLD_SIZE": str(layout.size),
             "LOCAL_RANK": str(layout.local_rank), "LOCAL_WORLD_SIZE": str(layout.local_size)}
    tunables = {
        "NCCL_DEBUG": "WARN",
        "PYTHONUNBUFFERED": "1",  # rank output reaches the job log before a kill, not lost in a buffer
    }
    if master is not None:
        tunables["MASTER_ADDR"], tunables["MASTER_PORT"] = master[0], str(master[1])
    if controller == "gloo":
        if rendezvous is None:
            raise ValueError("the gloo controller needs a rendezvous (address, port)")
        facts.update({
            "HOROVOD_GLOO_RENDEZVOUS_ADDR": rendezvous[0], "HOROVOD_GLOO_RENDEZVOUS_PORT": str(rendezvous[1]),
            "HOROVOD_CONTROLLER": "gloo", "HOROVOD_CPU_OPERATIONS": "gloo",
            "HOROVOD_RANK": str(layout.rank), "HOROVOD_SIZE": str(layout.size),
            "HOROVOD_LOCAL_RANK": str(layout.local_rank), "HOROVOD_LOCAL_SIZE": str(layout.local_size),
            "HOROVOD_CROSS_RANK": str(layout.cross_rank), "HOROVOD_CROSS_SIZE": str(layout.cross_size),
            # names the rendezvous scope of the node-local communicator: equal on a node, unique across
            "HOROVOD_HOSTNAME": layout.hostname or "localhost",
        })
        # ranks reach the rendezvous at different times on big jobs; Horovod's default is 30 s
        tunables["HOROVOD_GLOO_TIMEOUT_SECONDS"] = "300"
    return {**{k: v for k, v in tunables.items() if k not in env}, **facts}

"""Where this process sits in the job: rank, world size, local rank/size and node, read from the
environment that the launcher (jsrun, mpirun, srun, MPICH/Intel hydra, horovodrun, torchrun) sets.

Pure functions of an environment mapping, so every launcher is tested with recorded environments.
Precedence matters because launchers nest: mpirun or horovodrun started inside a Slurm batch script
still sees the batch script's ``SLURM_PROCID=0``, so the innermost launcher's variables win.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Mapping


class LayoutError(ValueError):
    """The launcher's environment is inconsistent or incomplete; the message names the variables."""


@dataclass(frozen=True)
class RankLayout:
    launcher: str  # "horovodrun" | "torchrun" | "jsrun" | "openmpi" | "slurm" | "pmi" | "single"
    rank: int
    size: int
    local_rank: int
    local_size: int
    # True when an MPI runtime is wired into this process (mpirun, jsrun, srun --mpi=pmix|pmi2),
    # i.e. MPI_Init (and Horovod's MPI controller) will find its peers.
    mpi: bool = False
    node_index: int | None = None
    # Known for Slurm steps: node names in step order and the number of tasks on each.
    nodes: tuple[str, ...] = ()
    tasks_per_node: tuple[int, ...] = ()
    hostname: str | None = None
    job_id: str | None = None
    step_id: str | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False)  # field -> variable it came from

    @property
    def cross_size(self) -> int:
        """Number of nodes that have a rank with this local rank (Horovod's cross communicator)."""
        if not self.tasks_per_node:
            return self.size // self.local_size if self.size % self.local_size == 0 else 1
        return sum(1 for n in self.tasks_per_node if n > self.local_rank)

    @property
    def cross_rank(self) -> int:
        if not self.tasks_per_node or self.node_index is None:
            return self.rank // self.local_size if self.size % self.local_size == 0 else 0
        return sum(1 for n in self.tasks_per_node[: self.node_index] if n > self.local_rank)

    def describe(self) -> str:
        where = f" on {len(self.nodes)} node(s)" if self.nodes else ""
        return f"{self.launcher}: rank {self.rank}/{self.size}, local {self.local_rank}/{self.local_size}{where}"


def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None:
        raise LayoutError(f"launcher variable {name} is not set")
    try:
        return int(value.strip())
    except ValueError:
        raise LayoutError(f"launcher variable {name}={value!r} is not an integer") from None


def _first(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        if env.get(name):
            return name
    return None


def expand_hostlist(expr: str) -> list[str]:
    """Expand a Slurm hostlist such as ``gpu[01-03,07],login-[a-b]x`` into host names.

    Zero padding of ranges is kept (``n[08-10]`` -> n08 n09 n10); several bracket groups in one
    name expand as a product, like Slurm does.
    """
    hosts: list[str] = []
    for item in _split_top_level(expr.strip()):
        if item:
            hosts.extend(_expand_item(item, expr))
    return hosts


def _split_top_level(expr: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(expr):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(expr[start:i])
            start = i + 1
    items.append(expr[start:])
    return items


def _expand_item(item: str, whole: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", item)
    if m is None:
        if "[" in item or "]" in item:
            raise LayoutError(f"unbalanced brackets in hostlist {whole!r}")
        return [item]
    head, tail = item[: m.start()], item[m.end():]
    out = []
    for part in m.group(1).split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LayoutError(f"bad range {part!r} in hostlist {whole!r}")
        width = len(lo)
        for n in range(int(lo), int(hi if sep else lo) + 1):
            out.extend(_expand_item(f"{head}{n:0{width}d}{tail}", whole))
    return out


def expand_counts(expr: str) -> list[int]:
    """Expand Slurm's compressed per-node counts such as ``2(x3),1`` into [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in expr.strip().split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise LayoutError(f"bad per-node count {part!r} in {expr!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def _check(layout: RankLayout) -> RankLayout:
    src = layout.sources
    if layout.size < 1:
        raise LayoutError(f"world size {layout.size} (from {src.get('size')}) must be >= 1")
    if not 0 <= layout.rank < layout.size:
        raise LayoutError(f"rank {layout.rank} (from {src.get('rank')}) is outside [0, {layout.size})")
    if not 0 <= layout.local_rank < layout.local_size:
        raise LayoutError(f"rank {layout.rank}: local rank {layout.local_rank} (from {src.get('local_rank')}) "
                          f"is outside [0, {layout.local_size}) (local size from {src.get('local_size')})")
    if layout.local_size > layout.size:
        raise LayoutError(f"rank {layout.rank}: local size {layout.local_size} exceeds world size {layout.size}")
    return layout


def _slurm(env: Mapping[str, str], mpi: bool) -> RankLayout:
    nodelist_var = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    tasks_var = _first(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    size_var = _first(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    if nodelist_var is None or tasks_var is None or size_var is None:
        raise LayoutError("Slurm step environment lacks SLURM_STEP_NODELIST / SLURM_STEP_TASKS_PER_NODE / "
                          "SLURM_STEP_NUM_TASKS (and their job-level fallbacks)")
    nodes = tuple(expand_hostlist(env[nodelist_var]))
    tasks = tuple(expand_counts(env[tasks_var]))
    size = _int(env, size_var)
    if len(nodes) != len(tasks):
        raise LayoutError(f"{nodelist_var}={env[nodelist_var]!r} names {len(nodes)} node(s) but "
                          f"{tasks_var}={env[tasks_var]!r} gives counts for {len(tasks)}")
    if sum(tasks) != size:
        raise LayoutError(f"{tasks_var}={env[tasks_var]!r} sums to {sum(tasks)} tasks but {size_var}={size}")
    node_index = _int(env, "SLURM_NODEID")
    if not 0 <= node_index < len(nodes):
        raise LayoutError(f"SLURM_NODEID={node_index} is outside the {len(nodes)} node(s) of {nodelist_var}")
    return RankLayout(
        launcher="slurm", rank=_int(env, "SLURM_PROCID"), size=size, local_rank=_int(env, "SLURM_LOCALID"),
        local_size=tasks[node_index], mpi=mpi, node_index=node_index, nodes=nodes, tasks_per_node=tasks,
        hostname=env.get("SLURMD_NODENAME") or nodes[node_index], job_id=env.get("SLURM_JOB_ID"),
        step_id=env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID"),
        sources={"rank": "SLURM_PROCID", "size": size_var, "local_rank": "SLURM_LOCALID",
                 "local_size": f"{tasks_var}[SLURM_NODEID]"})


def _simple(env: Mapping[str, str], launcher: str, names: tuple[str, str, str, str], mpi: bool,
            job_var: str | None = None) -> RankLayout:
    rank_v, size_v, lrank_v, lsize_v = names
    return RankLayout(
        launcher=launcher, rank=_int(env, rank_v), size=_int(env, size_v), local_rank=_int(env, lrank_v),
        local_size=_int(env, lsize_v), mpi=mpi, job_id=env.get(job_var) if job_var else None,
        sources={"rank": rank_v, "size": size_v, "local_rank": lrank_v, "local_size": lsize_v})


def detect_layout(env: Mapping[str, str]) -> RankLayout:
    """The rank layout of this process, from the innermost launcher whose variables are present."""
    if "HOROVOD_RANK" in env and "HOROVOD_SIZE" in env:
        # horovodrun (Gloo mode), or this wrapper already ran: the layout is spelled out in full.
        return _check(_simple(env, "horovodrun", ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK",
                                                  "HOROVOD_LOCAL_SIZE"), mpi="OMPI_COMM_WORLD_SIZE" in env))
    if "TORCHELASTIC_RUN_ID" in env or {"RANK", "WORLD_SIZE", "LOCAL_RANK"} <= set(env):
        # torchrun's workers (also when torchrun itself was started by srun, mpirun or jsrun)
        local_size = "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in env else "WORLD_SIZE"  # one node
        return _check(_simple(env, "torchrun", ("RANK", "WORLD_SIZE", "LOCAL_RANK", local_size), mpi=False,
                              job_var="TORCHELASTIC_RUN_ID"))
    if "JSM_NAMESPACE_RANK" in env:
        return _check(_simple(env, "jsrun", ("JSM_NAMESPACE_RANK", "JSM_NAMESPACE_SIZE",
                                             "JSM_NAMESPACE_LOCAL_RANK", "JSM_NAMESPACE_LOCAL_SIZE"),
                              mpi=True, job_var="LSB_JOBID"))
    if "OMPI_COMM_WORLD_RANK" in env:
        return _check(_simple(env, "openmpi", ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                               "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
                              mpi=True))
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        # A task of an srun step (the batch script itself has SLURM_PROCID=0 but no step id).
        return _check(_slurm(env, mpi="PMIX_RANK" in env or "PMI_RANK" in env or "PMI_FD" in env))
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        # MPICH / Intel MPI hydra (mpiexec): local rank variables come from the hydra proxy.
        if "MPI_LOCALRANKID" not in env and _int(env, "PMI_SIZE") > 1:
            raise LayoutError("PMI_RANK/PMI_SIZE are set but MPI_LOCALRANKID/MPI_LOCALNRANKS are not: "
                              "cannot tell ranks on the same node apart")
        names = ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
        if "MPI_LOCALRANKID" not in env:
            return _check(RankLayout("pmi", _int(env, "PMI_RANK"), 1, 0, 1, mpi=True))
        return _check(_simple(env, "pmi", names, mpi=True))
    return RankLayout("single", 0, 1, 0, 1, mpi=False, sources={"rank": "(no launcher)"})


def launcher_layout(env: Mapping[str, str] | None = None) -> tuple[int, int, int, int]:
    """(rank, size, local_rank, local_size) as the launcher announced it (torchrun included); (0, 1, 0, 1)
    when alone. Used before any engine starts (so only rank 0 prints a config error) and by the ``torch``
    engine, which has no launcher of its own outside torchrun."""
    layout = detect_layout(os.environ if env is None else env)
    return layout.rank, layout.size, layout.local_rank, layout.local_size

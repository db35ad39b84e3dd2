"""The sweep plan: which (engine, model, node count) runs exist, where they write, and how they ran.

Written as ``OUT/sweep.json`` when the sweep is planned, read back by ``collect``; it is the only thing
the two steps share, so a sweep submitted today can be collected from another login next week.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PLAN_FILE = "sweep.json"


@dataclass
class JobSpec:
    """One training run of the sweep.

    A simulated run stands for ``nodes`` nodes but runs on ``run_nodes`` with ``accumulate`` K so that
    its effective batch is the one ``nodes`` nodes would have (paper, Table 12's *).
    """

    tag: str
    engine: str
    model: str
    nodes: int
    run_nodes: int
    accumulate: int
    workdir: str  # relative to the sweep directory
    config: str  # relative to the sweep directory
    script: str = ""  # job script (lsf/slurm) relative to the sweep directory, "" for local runs
    job_id: str = ""  # filled by --submit
    status: str = "planned"  # planned | submitted | completed | failed[: cause] | timeout | running

    @property
    def simulated(self) -> bool:
        return self.nodes != self.run_nodes


@dataclass
class SweepPlan:
    """``gpus_per_node`` 0: CPU ranks, ``ranks_per_node`` of them per node (otherwise one rank per GPU)."""

    scheduler: str
    machine: str
    gpus_per_node: int
    per_gpu_batch: int
    steps: int
    warmup_steps: int
    dataset_size: int
    epochs: int
    base_config: str
    command: list[str] = field(default_factory=list)
    jobs: list[JobSpec] = field(default_factory=list)
    ranks_per_node: int = 0  # 0: gpus_per_node (plans written before CPU sweeps)

    def __post_init__(self) -> None:
        self.ranks_per_node = self.ranks_per_node or self.gpus_per_node

    @property
    def rank_word(self) -> str:
        """What one rank holds, for tables: "GPU", or "rank" on CPU nodes."""
        return "GPU" if self.gpus_per_node > 0 else "rank"

    def save(self, out_dir: Path) -> Path:
        path = Path(out_dir) / PLAN_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, out_dir: Path) -> "SweepPlan":
        path = Path(out_dir) / PLAN_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no sweep plan here; run 'tsm-dist sweep "
                                    f"... --out {out_dir}' first")
        data: dict[str, Any] = json.loads(path.read_text())
        try:
            jobs = [JobSpec(**job) for job in data.pop("jobs")]
            return cls(**data, jobs=jobs)
        except TypeError as err:
            raise ValueError(f"{path}: not a sweep plan of this version ({err})") from err

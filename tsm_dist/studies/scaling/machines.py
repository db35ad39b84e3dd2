"""Machine profiles (configs/machines/*.yaml): GPUs per node, scheduler and nominal link costs.

The projection uses a profile's links only where nothing was measured on the allocation itself, and
says so in its output.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from tsm_dist import package_files
from tsm_dist.studies.scaling.costmodel import LinkCost

MACHINES_DIR = package_files.MACHINES
SCHEDULERS = ("lsf", "slurm", "local")


@dataclass(frozen=True)
class Link:
    name: str
    latency_us: float
    bandwidth_gb_per_s: float  # 1 GB = 1e9 bytes, per direction

    def cost(self, source: str) -> LinkCost:
        return LinkCost(self.latency_us * 1e-6, self.bandwidth_gb_per_s * 1e9, source=source)


@dataclass(frozen=True)
class MachineProfile:
    name: str
    scheduler: str  # lsf | slurm | local | any
    gpus_per_node: int  # 0: CPU nodes
    gpu: str
    max_nodes: int
    intra_node: Link
    inter_node: Link
    description: str = ""

    def intra_cost(self) -> LinkCost:
        return self.intra_node.cost(f"profile {self.name}: {self.intra_node.name}")

    def inter_cost(self) -> LinkCost:
        return self.inter_node.cost(f"profile {self.name}: {self.inter_node.name}")


def _check_keys(data: Any, cls: type, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    missing = [n for n in known if n not in data and known[n].default is MISSING]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    return data


def _number(value: Any, where: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{where}: must be {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)


def _link(data: Any, where: str) -> Link:
    data = _check_keys(data, Link, where)
    return Link(name=str(data["name"]),
                latency_us=_number(data["latency_us"], f"{where}.latency_us", positive=False),
                bandwidth_gb_per_s=_number(data["bandwidth_gb_per_s"], f"{where}.bandwidth_gb_per_s",
                                           positive=True))


def list_machines() -> list[str]:
    """The names of the shipped profiles (``configs/machines/*.yaml``)."""
    return sorted(p.stem for p in MACHINES_DIR.glob("*.yaml"))


def load_machine(name_or_path: str | Path) -> MachineProfile:
    """Load a profile by name (``summit`` -> configs/machines/summit.yaml) or by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = MACHINES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"machine profile {str(name_or_path)!r} not found ({path}); known: "
                                f"{', '.join(list_machines())}")
    data = _check_keys(yaml.safe_load(path.read_text()), MachineProfile, str(path))
    scheduler = data["scheduler"]
    if scheduler not in SCHEDULERS + ("any",):
        raise ValueError(f"{path}: scheduler must be one of {SCHEDULERS} or 'any', got {scheduler!r}")
    for key, least in (("gpus_per_node", 0), ("max_nodes", 1)):
        if isinstance(data[key], bool) or not isinstance(data[key], int) or data[key] < least:
            raise ValueError(f"{path}: {key} must be an integer >= {least}, got {data[key]!r}")
    return MachineProfile(name=str(data["name"]), scheduler=scheduler, gpus_per_node=data["gpus_per_node"],
                          gpu=str(data["gpu"]), max_nodes=data["max_nodes"],
                          intra_node=_link(data["intra_node"], f"{path}: intra_node"),
                          inter_node=_link(data["inter_node"], f"{path}: inter_node"),
                          description=str(data.get("description", "")))

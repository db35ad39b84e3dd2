"""Facts about a run for the header of ``metrics.jsonl``: git commit, package versions, hardware."""
from __future__ import annotations

import os
import platform
import socket
from importlib import metadata
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

# (key, module, distributions): the header is written before the loaders import DALI and before wandb
# starts, so the versions come from what is installed (a module already imported answers first)
OPTIONAL = (("horovod", "horovod", ("horovod",)),
            ("dali", "nvidia.dali", ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110")),
            ("wandb", "wandb", ("wandb",)))


def _installed(module: str, dists: tuple[str, ...]) -> str | None:
    """The version of ``module`` if imported, else of the first of ``dists`` installed; None if none is."""
    version = getattr(sys.modules.get(module), "__version__", None)
    for dist in dists:
        if version is not None:
            break
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return version


def git_commit(cwd: str | Path | None = None) -> str | None:
    cwd = cwd or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str | None]:
    import numpy

    found: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                    "numpy": numpy.__version__, "cuda": torch.version.cuda}
    for name, module, dists in OPTIONAL:
        found[name] = _installed(module, dists)
    from tsm_dist import __version__

    found["tsm_dist"] = __version__
    return found


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"host": socket.gethostname(), "platform": platform.platform(),
                            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpus"] = torch.cuda.device_count()
        info["gpu_name"] = torch.cuda.get_device_name(0)
    return info

"""Facts about a run for the header of ``metrics.jsonl``: git commit, package versions, hardware."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

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
    for name, module in (("horovod", "horovod"), ("dali", "nvidia.dali"), ("wandb", "wandb")):
        mod = sys.modules.get(module)  # only report what this run actually imported
        found[name] = getattr(mod, "__version__", None) if mod else None
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

"""Checkpoint files: atomic writes, keep the last N plus the best, find the newest for ``--resume auto``.

Only rank 0 calls the writers. A checkpoint is written to a temporary file in the same directory,
fsynced and renamed over the final name, so a job killed mid-write never leaves a truncated
``ckpt_*.pt`` behind for the next ``--resume auto`` to choke on.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_DIR = "checkpoints"
BEST_NAME = "best.pt"
_PATTERN = re.compile(r"^ckpt_e(\d{4,})_s(\d{8,})\.pt$")


def checkpoint_name(epoch: int, step: int) -> str:
    return f"ckpt_e{epoch:04d}_s{step:08d}.pt"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Regular checkpoints in ``directory``, oldest first (by step, then epoch)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _PATTERN.match(p.name)
        if m:
            found.append(((int(m.group(2)), int(m.group(1))), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def save_checkpoint(directory: str | Path, state: dict[str, Any], *, epoch: int, step: int,
                    keep_last: int, is_best: bool = False) -> Path:
    """Write ``state`` as ``ckpt_e{epoch}_s{step}.pt``; drop regular checkpoints beyond the last
    ``keep_last``; also write ``best.pt`` when ``is_best``."""
    directory = Path(directory)
    path = atomic_save(state, directory / checkpoint_name(epoch, step))
    if is_best:
        atomic_save(state, directory / BEST_NAME)
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # torch raises several types for truncated/corrupt archives
        raise RuntimeError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise RuntimeError(f"checkpoint {path} is not a tsm_dist checkpoint (no 'model' entry)")
    return state


def resolve_resume(resume: str | None, workdir: str | Path) -> Path | None:
    """``auto`` -> newest checkpoint in the workdir (None for a fresh run); otherwise the given path."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(Path(workdir) / CHECKPOINT_DIR)
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint file")
    return path

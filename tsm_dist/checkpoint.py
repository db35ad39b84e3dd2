"""Checkpoint files: atomic writes, keep the last N plus the best, find the newest for ``--resume auto``.

Only rank 0 calls the writers. A checkpoint is written to a temporary file in the same directory,
fsynced and renamed over the final name, so a job killed mid-write never leaves a truncated
``ckpt_*.pt`` behind for the next ``--resume auto`` to choke on; the temporary files such a kill
leaves are removed by :func:`remove_stale_temporaries` when the next run starts. ``--resume auto``
still skips a newest checkpoint that cannot be read (a file system that lost its tail) with one
warning and takes the one before it. A checkpoint records its model; :func:`check_model` refuses to
load it into a differently configured model (name, classes, depth, width, frames), naming both.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from tsm_dist.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
BEST_NAME = "best.pt"
_PATTERN = re.compile(r"^ckpt_e(\d{4,})_s(\d{8,})\.pt$")
# what atomic_save's mkstemp names its temporary files: ".<final name>.<random>.tmp"
_TEMPORARY = re.compile(r"^\.(?:ckpt_e\d{4,}_s\d{8,}\.pt|best\.pt)\..+\.tmp$")
# the model settings a checkpoint must share with the config that loads it
MODEL_KEYS = ("name", "num_classes", "depth", "width", "num_frames")


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


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files of writes that a kill interrupted; return what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in sorted(directory.iterdir()):
        if _TEMPORARY.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's state; :class:`CheckpointError` naming the file if it is missing or unreadable."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file") from None
    except Exception as exc:  # torch raises several types for truncated/corrupt archives
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a tsm_dist checkpoint (no 'model' entry)")
    return state


def _effective(model: Mapping[str, Any]) -> dict[str, Any]:
    """The MODEL_KEYS of a config's model section; an unset frame count is the model's own."""
    found = {k: model.get(k) for k in MODEL_KEYS}
    if found["num_frames"] is None and found["name"]:
        try:
            from tsm_dist.models.registry import _entry

            found["num_frames"] = _entry(found["name"]).spec.num_frames
        except (ImportError, ValueError):
            pass
    return found


def check_model(state: Mapping[str, Any], model: Mapping[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint whose model differs from the config's ``model`` section, naming both.

    Shapes alone cannot tell TSM from TSN (the shift has no weights) or 8 frames from 16, so the
    checkpoint's recorded config is compared; a checkpoint without one is accepted.
    """
    saved_cfg = state.get("config")
    if not isinstance(saved_cfg, Mapping) or not isinstance(saved_cfg.get("model"), Mapping):
        return
    saved, wanted = _effective(saved_cfg["model"]), _effective(model)
    diff = [k for k in MODEL_KEYS if saved[k] is not None and wanted[k] is not None and saved[k] != wanted[k]]
    if diff:
        def show(values: dict[str, Any]) -> str:
            return ", ".join(f"{k}={values[k]}" for k in diff)

        raise CheckpointError(f"checkpoint {path} is for another model: it has {show(saved)}, the config asks "
                              f"for {show(wanted)} (evaluate it with the config it was trained with)")


def load_model_state(module: torch.nn.Module, state: Mapping[str, Any], path: str | Path) -> None:
    """``module.load_state_dict(state['model'])`` with a one-line :class:`CheckpointError` on mismatch."""
    try:
        module.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise CheckpointError(f"checkpoint {path} does not fit the configured model: {first}") from None


def resolve_resume(resume: str | None, workdir: str | Path) -> Path | None:
    """``auto`` -> newest checkpoint in the workdir (None for a fresh run); otherwise the given path."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(Path(workdir) / CHECKPOINT_DIR)
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume {resume}: no such checkpoint file")
    return path


def load_resume(resume: str | None, workdir: str | Path,
                warn: Callable[[str], None] | None = None) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint ``--resume`` names, loaded: (path, state), or (None, None) for a fresh run.

    With ``auto``, an unreadable newest checkpoint is skipped with one warning and the previous one
    is taken; if none of several is readable, that is an error (starting over would silently lose
    the run).
    """
    if resume != "auto":
        path = resolve_resume(resume, workdir)
        return (path, load_checkpoint(path)) if path is not None else (None, None)
    warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
    candidates = list_checkpoints(Path(workdir) / CHECKPOINT_DIR)
    failures = []
    for path in reversed(candidates):
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            failures.append(str(exc))
            continue
        if failures:
            warn(f"warning: --resume auto: skipped {len(failures)} unreadable newer checkpoint(s), "
                 f"resuming from {path.name}: {failures[0]}")
        return path, state
    if failures:
        raise CheckpointError(f"--resume auto: none of the {len(failures)} checkpoint(s) in "
                              f"{Path(workdir) / CHECKPOINT_DIR} can be read; newest: {failures[0]}")
    return None, None

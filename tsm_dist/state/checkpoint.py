"""Checkpoint files: atomic writes, keep the last N plus the best, find the newest for ``--resume auto``.

Only rank 0 calls the writers. A checkpoint is written to a temporary file in the same directory,
fsynced and renamed over the final name, so a job killed mid-write never leaves a truncated
``ckpt_*.pt`` behind for the next ``--resume auto`` to choke on; the temporary files such a kill
leaves are removed by :func:`remove_stale_temporaries` when the next run starts. ``--resume auto``
still skips a newest checkpoint that cannot be read (a file system that lost its tail) with one
warning and takes the one before it. A checkpoint records its model; :func:`check_model` refuses to
load it into a differently configured model, naming both. The identity is every resolved model option
(name, classes, frames, depth, width, fold_div, shift_place, online, ... and any option added later)
except the few in :data:`NOT_IDENTITY` that only change how a model starts or trains.

Checkpoints are created with the permissions the umask gives new files (``mkstemp`` alone would make them
0600, unreadable for collaborators on a shared project directory).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from tsm_dist.commands.exit_codes import CheckpointError, StorageError, storage_problem

CHECKPOINT_DIR = "checkpoints"
BEST_NAME = "best.pt"
_PATTERN = re.compile(r"^ckpt_e(\d{4,})_s(\d{8,})\.pt$")
# what atomic_save's mkstemp names its temporary files: ".<final name>.<random>.tmp"
_TEMPORARY = re.compile(r"^\.(?:ckpt_e\d{4,}_s\d{8,}\.pt|best\.pt)\..+\.tmp$")
# model options that change how a model starts (its initial weights) or trains, not what it computes
NOT_IDENTITY = ("pretrained", "dropout", "classifier_init")


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


class _WriteErrors:
    """A file whose first failed write (full disk, quota) is kept: ``torch.save`` swallows it and raises
    ``RuntimeError: ... unexpected pos`` instead, which names neither the file nor the cause."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.file.flush()


def _save(obj: Any, file: Any) -> None:
    recorder = _WriteErrors(file)
    try:
        torch.save(obj, recorder)
    except Exception:
        if recorder.error is not None:
            raise recorder.error from None
        raise


def atomic_save(obj: Any, path: str | Path, then: Callable[[], None] | None = None) -> Path:
    """Write ``obj`` to ``path`` through a fsynced temporary file and a rename; ``then`` runs right after
    the rename, before anything else can delay it (the directory's fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            _save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if then is not None:
        then()
    _fsync_dir(path.parent)
    return path


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once
    os.umask(mask)
    return mask


def check_storage(workdir: str | Path, need_bytes: int = 0) -> None:
    """Before training (rank 0): the workdir (or its checkpoint directory, when there is one) can be created
    and written, and holds room for one more checkpoint of ``need_bytes`` (0: unknown); :class:`StorageError`
    naming the path otherwise."""
    directory = Path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        directory = Path(workdir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StorageError(storage_problem(exc, exc.filename or directory)) from None
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise StorageError(f"cannot write {directory}: {free / 2**20:.0f} MiB free, one checkpoint needs about "
                           f"{need_bytes / 2**20:.0f} MiB (No space left on device)")


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
                    keep_last: int, is_best: bool = False, then: Callable[[], None] | None = None) -> Path:
    """Write ``state`` as ``ckpt_e{epoch}_s{step}.pt``; drop regular checkpoints beyond the last
    ``keep_last``; also write ``best.pt`` when ``is_best``; ``then`` runs as soon as the checkpoint is in
    place (the trainer's ``end`` record of a stop).

    ``best.pt`` comes first: a kill during its write leaves no checkpoint of this epoch either, so the
    resumed run redoes the epoch and its evaluation and writes ``best.pt`` then. The other order left a
    checkpoint that already counted the evaluation as the best, and no ``best.pt`` ever after.
    """
    directory = Path(directory)
    if is_best:
        atomic_save(state, directory / BEST_NAME)
    path = atomic_save(state, directory / checkpoint_name(epoch, step), then=then)
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


def _unreadable(path: Path, exc: Exception) -> str:
    """Why: a file that is no archive at all says so (pickle's own error reads a byte of text as an opcode)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        return "not a PyTorch checkpoint: no zip archive"
    text = str(exc).splitlines()[0].split(". ")[0] if str(exc) else ""
    return f"a damaged or truncated archive; {type(exc).__name__}: {text}"


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
        raise CheckpointError(f"checkpoint {path} cannot be read ({_unreadable(path, exc)})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a tsm_dist checkpoint (no 'model' entry)")
    return state


def model_identity(model: Mapping[str, Any]) -> dict[str, Any]:
    """What a config's ``model`` section builds: every option but :data:`NOT_IDENTITY`, those left unset
    (None, or absent in an older checkpoint) taken as the model's own default from the registry."""
    found = {k: v for k, v in model.items() if k not in NOT_IDENTITY}
    try:
        from tsm_dist.models.registry import model_defaults

        defaults = model_defaults(str(found.get("name")))
    except (ImportError, ValueError):
        defaults = {}
    for key, default in defaults.items():
        if key not in NOT_IDENTITY and found.get(key) is None:
            found[key] = default
    return found


def check_model(state: Mapping[str, Any], model: Mapping[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint whose model differs from the config's ``model`` section, naming both.

    Shapes alone cannot tell TSM from TSN (the shift has no weights) or 8 frames from 16, so the
    checkpoint's recorded config is compared; a checkpoint without one is accepted.
    """
    saved_cfg = state.get("config")
    if not isinstance(saved_cfg, Mapping) or not isinstance(saved_cfg.get("model"), Mapping):
        return
    saved, wanted = model_identity(saved_cfg["model"]), model_identity(model)
    diff = [k for k in dict.fromkeys([*saved, *wanted])
            if saved.get(k) is not None and wanted.get(k) is not None and saved[k] != wanted[k]]
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

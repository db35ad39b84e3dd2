"""What a training checkpoint holds to continue a run where it stopped, and how rank 0 writes and loads it.

The trainer (:mod:`tsm_dist.training.train`) decides *when* a checkpoint is written (an epoch's end, a stop) and
shares the state between ranks; this module knows *what* it holds: the loop :class:`Position`, the model,
optimizer and GradScaler state, every rank's random state, the batch plan and the run id. Files, retention
and atomic writes are :mod:`tsm_dist.state.checkpoint`; where a resumed run continues under a changed batch plan
is :mod:`tsm_dist.state.resume`.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from tsm_dist.state import checkpoint as ckpt
from tsm_dist.config import Config
from tsm_dist.training.batch_plan import BatchPlan
from tsm_dist.commands.exit_codes import CheckpointError
from tsm_dist.state.failure import clear_notes
from tsm_dist.state.identity import claim_workdir

# what a checkpoint must hold to continue the loop where it stopped
POSITION_KEYS = ("epoch", "step", "batch_in_epoch", "best_top1", "rng", "scaler", "world_size")
# what it may hold besides (older checkpoints: derived, see tsm_dist.state.resume)
PLAN_KEYS = ("epoch_end_pending", "per_gpu_batch", "accumulate", "global_batch", "run_id")


@dataclass
class Position:
    """Where the loop stands; saved in checkpoints and broadcast on resume."""

    epoch: int = 0
    step: int = 0
    batch_in_epoch: int = 0
    best_top1: float = -math.inf
    # a stop on an epoch's last step came before that epoch's evaluation: the resumed run does it first
    epoch_end_pending: bool = False


def seed(value: int) -> None:
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write(workdir: Path, *, model: nn.Module, optimizer: Any, scaler: torch.amp.GradScaler, pos: Position,
          rngs: list[dict[str, Any]], cfg: Config, engine_name: str, plan: BatchPlan, run_id: str,
          is_best: bool, then: Callable[[], None] | None = None) -> None:
    """Rank 0: the checkpoint of the run at ``pos`` (``rngs``: every rank's random state, by rank); ``then``
    runs as soon as it is in place."""
    ckpt.save_checkpoint(workdir / ckpt.CHECKPOINT_DIR, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "epoch": pos.epoch, "step": pos.step, "batch_in_epoch": pos.batch_in_epoch, "best_top1": pos.best_top1,
        "rng": rngs, "epoch_end_pending": pos.epoch_end_pending,
        "config": cfg.to_dict(), "engine": engine_name, "world_size": plan.world_size,
        "global_batch": plan.global_batch, "accumulate": plan.accumulate, "per_gpu_batch": plan.per_gpu_batch,
        "run_id": run_id},
        epoch=pos.epoch, step=pos.step, keep_last=cfg.train.keep_last, is_best=is_best, then=then)


def _checkpoint_bytes(model: nn.Module, resume: str | None, workdir: Path) -> int:
    """About one checkpoint's size: the one resumed from, else weights and buffers plus the momentum."""
    path = ckpt.resolve_resume(resume, workdir) if resume else None
    if path is not None and path.is_file():
        return path.stat().st_size
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.parameters(), *model.buffers()])


def load(resume: str | None, workdir: Path, *, start_over: bool, model: nn.Module, optimizer: Any,
         model_config: Mapping[str, Any], say: Callable[[str], None]) -> tuple[Path | None, dict[str, Any] | None]:
    """Rank 0: clean up after killed writes, then load the checkpoint to resume into ``model`` and ``optimizer``.

    Returns its path and state, or (None, None) for a fresh run, which must not take over another run's
    workdir (:func:`tsm_dist.state.identity.claim_workdir`). ``say`` prints one line for the user.
    """
    directory = workdir / ckpt.CHECKPOINT_DIR
    clear_notes(workdir)  # before any rank can fail on its own: the trainer's broadcast waits for this
    if not resume:
        moved = claim_workdir(workdir, start_over=start_over)
        if moved:
            say(moved)
    ckpt.check_storage(workdir, _checkpoint_bytes(model, resume, workdir))
    removed = ckpt.remove_stale_temporaries(directory)
    if removed:
        say(f"removed {len(removed)} temporary file(s) of interrupted checkpoint writes in {directory}")
    path, state = ckpt.load_resume(resume, workdir, warn=say)
    if state is None:
        return None, None
    ckpt.check_model(state, model_config, path)
    missing = [key for key in POSITION_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path}: not a training checkpoint of this version "
                              f"(no {', '.join(missing)})")
    ckpt.load_model_state(model, state, path)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: its optimizer state does not fit ({exc})") from None
    return path, state


def position_of(state: Mapping[str, Any], path: Path, workdir: Path,
                say: Callable[[str], None]) -> dict[str, Any]:
    """What rank 0 broadcasts of a loaded checkpoint: the loop position, the saved batch plan, its path.

    A run that has evaluated has a ``best.pt``; when it is missing (deleted, or lost by an older version to
    a kill during its write) the best accuracy is forgotten, so that the next evaluation writes one.
    """
    position = {**{key: state[key] for key in POSITION_KEYS},
                **{key: state[key] for key in PLAN_KEYS if key in state}, "path": str(path)}
    best = workdir / ckpt.CHECKPOINT_DIR / ckpt.BEST_NAME
    if math.isfinite(position["best_top1"]) and not best.is_file():
        say(f"warning: {best} is missing although the run has evaluated (best top-1 "
            f"{position['best_top1']:.2f} %); the next evaluation writes it")
        position["best_top1"] = -math.inf
    return position

"""A workdir belongs to one run: every run has an id (header record and checkpoints), and a fresh run
refuses a workdir that holds another run's checkpoints, so that neither is overwritten nor continued by
mistake by a later ``--resume auto``.

The choices the refusal names: ``--resume auto`` (continue that run), another ``--workdir``, or
``--start-over``, which moves the old run's checkpoints and records aside into ``previous/<its run id>/``
and says so in one line; nothing is deleted.
"""
from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

from tsm_dist.state import checkpoint as ckpt
from tsm_dist.runlog.records import METRICS_FILE

PREVIOUS_DIR = "previous"
START_OVER_FLAG = "--start-over"


class WorkdirInUse(Exception):
    """A fresh run in a workdir that holds another run's checkpoints."""


def new_run_id() -> str:
    """Sortable by start time and unique across concurrent jobs: ``YYYYmmdd-HHMMSS-<6 hex>``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def previous_run_id(workdir: Path) -> str:
    """The id recorded in the newest checkpoint of ``workdir`` (older runs had none: its file name)."""
    newest = ckpt.latest_checkpoint(workdir / ckpt.CHECKPOINT_DIR)
    if newest is None:
        return "unknown"
    try:
        state = ckpt.load_checkpoint(newest)
    except ckpt.CheckpointError:
        return newest.stem
    return str(state.get("run_id") or newest.stem)


def claim_workdir(workdir: Path, *, start_over: bool) -> str | None:
    """Before a fresh run: refuse (:class:`WorkdirInUse`) a workdir with another run's checkpoints, or with
    ``start_over`` move that run aside; returns the line saying what was moved (None: nothing)."""
    newest = ckpt.latest_checkpoint(workdir / ckpt.CHECKPOINT_DIR)
    if newest is None:
        return None
    if not start_over:
        raise WorkdirInUse(
            f"workdir {workdir} holds another run's checkpoints (newest {newest}); continue that run with "
            f"--resume auto, use another --workdir, or {START_OVER_FLAG} (moves that run into "
            f"{workdir / PREVIOUS_DIR}/)")
    target = workdir / PREVIOUS_DIR / previous_run_id(workdir)
    while target.exists():
        target = target.with_name(target.name + "+")
    target.mkdir(parents=True)
    moved = []
    for name in (ckpt.CHECKPOINT_DIR, METRICS_FILE, "config.yaml"):
        if (workdir / name).exists():
            shutil.move(os.fspath(workdir / name), os.fspath(target / name))
            moved.append(name)
    return f"--start-over: moved the previous run's {', '.join(moved)} to {target}"

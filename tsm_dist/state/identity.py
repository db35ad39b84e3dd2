"""A workdir belongs to one run: every run has an id (header record and checkpoints), and a fresh run
refuses a workdir that holds any file of another run (a checkpoint, ``best.pt``, ``metrics.jsonl``,
``config.yaml``, its wandb files), so that neither is overwritten, appended to nor continued by mistake
by a later ``--resume auto``.

The choices the refusal names: ``--resume auto`` (continue that run), another ``--workdir``, or
``--start-over``, which moves every file of the old run aside into ``previous/<its run id>/`` (the wandb
id with them, so the new run starts a wandb run of its own) and says so in one line; nothing is deleted.
"""
from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

from tsm_dist.runlog.records import METRICS_FILE, MetricsError, read_records
from tsm_dist.state import checkpoint as ckpt

PREVIOUS_DIR = "previous"
START_OVER_FLAG = "--start-over"
# what a run writes into its workdir besides its checkpoints (tsm_dist.runlog.account, tsm_dist.runlog.wandb_run)
RUN_FILES = (METRICS_FILE, "config.yaml", "wandb_id", "wandb")


class WorkdirInUse(Exception):
    """A fresh run in a workdir that holds another run's files."""


def new_run_id() -> str:
    """Sortable by start time and unique across concurrent jobs: ``YYYYmmdd-HHMMSS-<6 hex>``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def run_files(workdir: Path) -> list[str]:
    """The files of a run in ``workdir`` (relative names; the newest checkpoint stands for all of them)."""
    directory = workdir / ckpt.CHECKPOINT_DIR
    newest = ckpt.latest_checkpoint(directory)
    found = [f"{ckpt.CHECKPOINT_DIR}/{newest.name}"] if newest is not None else []
    if (directory / ckpt.BEST_NAME).exists():
        found.append(f"{ckpt.CHECKPOINT_DIR}/{ckpt.BEST_NAME}")
    return found + [name for name in RUN_FILES if (workdir / name).exists()]


def previous_run_id(workdir: Path) -> str:
    """The id recorded in the newest checkpoint of ``workdir``, else in ``best.pt``, else in the last header
    of its metrics file (older runs had none: the newest checkpoint's file name, or "unknown")."""
    newest = ckpt.latest_checkpoint(workdir / ckpt.CHECKPOINT_DIR)
    for path in (newest, workdir / ckpt.CHECKPOINT_DIR / ckpt.BEST_NAME):
        if path is not None and path.is_file():
            try:
                found = ckpt.load_checkpoint(path).get("run_id")
            except ckpt.CheckpointError:
                found = None
            if found:
                return str(found)
    try:
        headers = [r for r in read_records(workdir / METRICS_FILE) if r["type"] == "header"]
    except (OSError, MetricsError):
        headers = []
    if headers and headers[-1].get("run_id"):
        return str(headers[-1]["run_id"])
    return newest.stem if newest is not None else "unknown"


def claim_workdir(workdir: Path, *, start_over: bool) -> str | None:
    """Before a fresh run: refuse (:class:`WorkdirInUse`) a workdir with another run's files, or with
    ``start_over`` move that run aside; returns the line saying what was moved (None: nothing)."""
    found = run_files(workdir)
    if not found:
        return None
    if not start_over:
        raise WorkdirInUse(
            f"workdir {workdir} holds another run ({', '.join(found)}); continue that run with "
            f"--resume auto, use another --workdir, or {START_OVER_FLAG} (moves that run into "
            f"{workdir / PREVIOUS_DIR}/)")
    target = workdir / PREVIOUS_DIR / previous_run_id(workdir)
    while target.exists():
        target = target.with_name(target.name + "+")
    target.mkdir(parents=True)
    moved = []
    for name in (ckpt.CHECKPOINT_DIR, *RUN_FILES):
        if (workdir / name).exists():
            shutil.move(os.fspath(workdir / name), os.fspath(target / name))
            moved.append(name)
    return f"--start-over: moved the previous run's {', '.join(moved)} to {target}"

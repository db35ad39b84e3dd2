"""The wandb run of rank 0 (offline by default, as on HPC compute nodes); it never takes training down."""
from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any, Callable

class WandbRun:
    """wandb in ``offline`` (default), ``online`` or ``disabled`` mode; files under ``workdir/wandb``.

    The run id is kept in ``workdir/wandb_id`` so a resumed job continues the same wandb run.
    Offline runs are uploaded later from a login node with ``wandb sync workdir/wandb/offline-run-*``.

    A logger must never take training down: any failure of wandb (its service process ``wandb-core``
    killed by the scheduler's SIGTERM with the rest of the job, a full disk, a network timeout) is
    reported once as a warning, and from then on this object does nothing; ``metrics.jsonl`` keeps
    every record. wandb's own exit hook is disarmed then, so a dead service cannot print a traceback
    or block the process at exit either.
    """

    def __init__(self, mode: str, project: str, workdir: str | Path, config: dict[str, Any],
                 warn: Callable[[str], None] | None = None) -> None:
        self._run: Any = None
        self._warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
        self.failure: str | None = None
        if mode == "disabled":
            return
        try:
            import wandb

            workdir = Path(workdir)
            id_file = workdir / "wandb_id"
            if id_file.exists():
                run_id = id_file.read_text().strip()
            else:
                run_id = uuid.uuid4().hex[:12]
                id_file.write_text(run_id + "\n")
            self._run = wandb.init(mode=mode, project=project, dir=str(workdir), id=run_id, name=workdir.name,
                                   resume="allow", config=config,
                                   settings=wandb.Settings(silent=True, console="off"))
        except Exception as exc:  # wandb.init raises its own types, timeouts, OSError
            self._give_up("init", exc)

    def _give_up(self, where: str, exc: BaseException) -> None:
        self.failure = f"{type(exc).__name__}: {exc}".strip()
        # no "training continues": a failure in finish, or in log after SIGTERM killed wandb's service, comes
        # while the run stops
        self._warn(f"warning: wandb failed in {where} ({self.failure}); wandb is off for the rest of this run, "
                   f"metrics.jsonl keeps every record")
        self._run = None
        self._disarm()

    @staticmethod
    def _disarm() -> None:
        """Tear down wandb's connection to its (possibly dead) service without raising, so that its
        atexit hook is unregistered and prints nothing."""
        wandb = sys.modules.get("wandb")
        if wandb is None:
            return
        try:
            wandb.teardown()
        except BaseException:  # a dead service: the connection is closed either way
            pass

    def log(self, values: dict[str, Any], step: int) -> None:
        if self._run is None:
            return
        try:
            self._run.log(values, step=step)
        except Exception as exc:
            self._give_up("log", exc)

    def finish(self, exit_code: int = 0) -> None:
        if self._run is None:
            return
        run, self._run = self._run, None
        try:
            run.finish(exit_code=exit_code)
        except Exception as exc:
            self._run = run
            self._give_up("finish", exc)

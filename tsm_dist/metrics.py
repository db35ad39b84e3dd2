"""What rank 0 records: top-k counts, the wandb run, the progress line, the run header's facts.

Accuracy is computed from *counts* (valid samples, correct at 1, correct at 5) so that ranks can sum
them with one allreduce; padded samples (label -1) are not counted. Only rank 0 constructs the
writers below; other ranks never touch the workdir's logs. ``metrics.jsonl`` is :mod:`tsm_dist.records`.
"""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, TextIO

import torch

TOPK = (1, 5)


def topk_counts(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = TOPK) -> torch.Tensor:
    """float64 tensor [num_valid, correct@k for k in ks]; samples with label < 0 are padding."""
    valid = labels >= 0
    logits, labels = logits[valid], labels[valid]
    counts = [float(labels.numel())]
    if labels.numel():
        kmax = min(max(ks), logits.shape[1])
        top = logits.topk(kmax, dim=1).indices
        hit = top.eq(labels.unsqueeze(1))
        counts += [float(hit[:, :min(k, kmax)].any(dim=1).sum()) for k in ks]
    else:
        counts += [0.0] * len(ks)
    return torch.tensor(counts, dtype=torch.float64)


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

    @property
    def active(self) -> bool:
        return self._run is not None

    def _give_up(self, where: str, exc: BaseException) -> None:
        self.failure = f"{type(exc).__name__}: {exc}".strip()
        self._warn(f"warning: wandb failed in {where} ({self.failure}); training continues without wandb, "
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


class Progress:
    """The training progress bar (tqdm) on stderr; rank 0 alone builds one.

    ``enabled`` is ``log.progress``: None (auto) shows it on a terminal only, so batch jobs' logs stay
    clean; True shows it in non-interactive logs too; False never.
    """

    def __init__(self, total_steps: int, enabled: bool | None = None, stream: TextIO | None = None,
                 initial: int = 0) -> None:
        stream = stream or sys.stderr
        self._bar = None
        if stream.isatty() if enabled is None else enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial, file=stream, unit="step", dynamic_ncols=True)

    def update(self, step: int, epoch: int, **values: float) -> None:
        if self._bar is None:
            return
        self._bar.set_description(f"epoch {epoch}", refresh=False)
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


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

"""Preemption: turn SIGTERM / SIGUSR1 into a flag the train loop acts on at a step boundary.

Schedulers warn a job before killing it: Slurm with ``--signal=USR1@120`` (or SIGTERM on
``scancel``/time limit, then SIGKILL after ``KillWait``), LSF with ``bsub -wa USR1 -wt 5``. The handler
only records the request; every step the ranks allreduce the flag, so all of them stop after the same
step, rank 0 writes a checkpoint, and every rank exits with :data:`PREEMPTED_EXIT_CODE` so the job
script can requeue and continue with ``--resume auto``.
"""
from __future__ import annotations

import signal
from types import FrameType
from typing import Any

# EX_TEMPFAIL from sysexits.h: "temporary failure, try again" -- the job scripts requeue on it.
PREEMPTED_EXIT_CODE = 75

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Records that a preemption signal arrived; use as a context manager to install the handlers."""

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def __enter__(self) -> "PreemptionFlag":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

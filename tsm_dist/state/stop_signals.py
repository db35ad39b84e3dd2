"""Stop signals: turn the scheduler's signals into a flag the train loop acts on at a step boundary.

The contract (README "When things go wrong", docs/training.md):

=====================================  =============================  ====  ==========================
signal                                 sent by                        exit  the job script then
=====================================  =============================  ====  ==========================
SIGUSR1 (time-limit warning)           Slurm ``--signal=USR1@T``,     75    requeues the job
                                       LSF ``bsub -wa USR1 -wt M``          (``scontrol requeue`` /
                                                                            ``brequeue``) or resubmits
SIGTERM / SIGINT (cancel, preemption)  ``scancel``, ``bkill``,        143   nothing: a cancel sticks;
                                       Slurm/LSF preemption, Ctrl-C         the scheduler requeues
                                                                            preempted jobs itself
                                                                            (PreemptMode=REQUEUE)
=====================================  =============================  ====  ==========================

In both cases every rank stops after the same optimizer step (the flags travel in the step's metric
allreduce), rank 0 writes a checkpoint and the ``end`` record, and every rank exits with the same
code. If one rank saw SIGTERM and another only SIGUSR1, SIGTERM wins: a cancel must stick.

The handler only records the signal; nothing else runs inside it (a second Ctrl-C raises
KeyboardInterrupt: whoever presses it twice does not want to wait for the checkpoint). Once the trainer has decided how
to exit, :meth:`StopSignals.exit_on_signal` makes any further SIGTERM (``horovodrun``/``mpirun``
terminate the remaining ranks as soon as one rank has exited) end the process with the decided
code instead of the default 143, so that all ranks report the same code.
"""
from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any

from tsm_dist.commands.exit_codes import EXIT_CRASH, EXIT_PREEMPTED, EXIT_TERMINATED, exit_code

PREEMPTED_EXIT_CODE = EXIT_PREEMPTED  # the time-limit warning: the job script requeues on it
TERMINATED_EXIT_CODE = EXIT_TERMINATED  # cancel/preemption: checkpointed, the job script does not requeue

WARNING_SIGNALS = (signal.SIGUSR1,)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SIGNALS = WARNING_SIGNALS + STOP_SIGNALS

# The rendered job script tells the trainer what it will do after exit code 75, so the trainer's
# message says what really happens: "requeue", "resubmit" or "none".
REQUEUE_ENV = "TSM_DIST_ON_PREEMPT"


class StopSignals:
    """Records stop signals; use as a context manager to install the handlers.

    ``level`` is what the ranks allreduce (with max): 0 nothing, 1 the warning (USR1), 2 a stop
    (TERM/INT).
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._level = 0
        self._previous: dict[signal.Signals, Any] = {}
        self._exit_code: int | None = None

    @property
    def level(self) -> int:
        return self._level

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._exit_code is not None:  # the outcome is decided and written: leave with it
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(self._exit_code)
        sig = signal.Signals(signum)
        if sig == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user does not want to wait for the checkpoint
        level = 1 if sig in WARNING_SIGNALS else 2
        if level >= self._level:
            self._level, self.received = level, sig

    def exit_on_signal(self, code: int) -> None:
        """From now on a stop signal ends the process at once with ``code`` (call it only when
        everything worth keeping is written)."""
        self._exit_code = code

    def __enter__(self) -> "StopSignals":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None and self._exit_code is None:
            code = exit_code(exc)
            if code != EXIT_CRASH:  # a known error every rank raises: the code is decided too
                self._exit_code = code
        if self._exit_code is not None:
            return  # keep exiting with the decided code until the process is gone
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def exit_code_for(level: int) -> int:
    """The exit code every rank uses for the allreduced stop ``level`` (1 warning, 2 stop)."""
    return PREEMPTED_EXIT_CODE if level < 2 else TERMINATED_EXIT_CODE


def stop_message(level: int, step: int, env: dict[str, str] | None = None) -> str:
    """What rank 0 prints after the stop checkpoint: the code and what happens next, as it is."""
    env = dict(os.environ if env is None else env)
    code = exit_code_for(level)
    if level >= 2:
        return (f"stopped by SIGTERM/SIGINT (cancel or preemption); checkpoint at step {step}, exiting with "
                f"{code}: not requeued by the job script (a cancel sticks; under Slurm's PreemptMode=REQUEUE a "
                f"preempted job is requeued, by Slurm or by our job script; otherwise resubmit, --resume auto "
                f"continues)")
    action = env.get(REQUEUE_ENV, "")
    if action == "requeue":
        what = "the job script requeues the job"
    elif action == "resubmit":
        what = "the job script resubmits the job"
    else:
        what = "not requeued (no job script said it would; resubmit, --resume auto continues)"
    done = {"requeue": "requeued", "resubmit": "resubmitted"}.get(action, "")
    head = f"preempted by the time-limit warning; checkpoint at step {step}, exiting with {code}"
    return f"{head}: {done} ({what})" if done else f"{head}: {what}"

"""``horovodrun`` for elastic job scripts: ``python -m tsm_dist.ranks.elastic_run <horovodrun arguments>``.

It is Horovod's own launcher (horovod.runner.launch) with two changes. Under LSF (``LSB_JOBID`` set)
horovodrun 0.28.1 skips its network interface detection and then fails in its elastic mode (``TypeError``
in ``get_driver_ip(None)``) even when ``--network-interface`` was given: here the given interfaces are used.
And: Slurm and LSF signal every process of a job on cancel or preemption, horovodrun included, and horovodrun 0.28.1 answers SIGTERM/SIGINT by
terminating its ranks and killing them 5 s later (safe_shell_exec.GRACEFUL_TERMINATION_TIME_S, fixed): too
short for the ranks' checkpoint; SIGUSR1 (the time-limit warning, where it reaches every process) would
kill it outright. Here horovodrun leaves the stopping to the ranks, which got the same signal (or the job
script's forwarded copy) and agree on the step to stop after; the scheduler's own SIGKILL after its grace
period still ends whatever is left. A failed run ends with one line, not a traceback.
"""
from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any, Callable


def _shutdown_event() -> threading.Event:
    """Replaces horovod.runner.gloo_run.register_shutdown_event: an event that no signal sets."""
    def note(signum: int, frame: FrameType | None) -> None:
        print(f"tsm-dist elastic: {signal.Signals(signum).name} received: the ranks checkpoint and stop by "
              f"themselves", file=sys.stderr, flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, note)
    return threading.Event()


def _given_interfaces_under_lsf(find: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps horovod.runner.driver.driver_service.get_common_interfaces, which answers None under LSF."""
    def common_interfaces(settings: Any, *args: Any, **kwargs: Any) -> Any:
        found = find(settings, *args, **kwargs)
        return found if found is not None else settings.nics
    return common_interfaces


def main(argv: list[str] | None = None) -> int:
    from horovod.runner import gloo_run, launch

    gloo_run.register_shutdown_event = _shutdown_event
    gloo_run.driver_service.get_common_interfaces = _given_interfaces_under_lsf(
        gloo_run.driver_service.get_common_interfaces)
    sys.argv = ["horovodrun", *(sys.argv[1:] if argv is None else argv)]
    try:
        launch.run_commandline()
    except (RuntimeError, ValueError) as err:  # worker failures, timeouts, bad arguments: Horovod's message
        print(f"tsm-dist elastic: horovodrun: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

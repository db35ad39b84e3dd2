"""tsm_dist: distributed training of TSM and I3D video recognition models on HPC clusters."""
import os as _os
import signal as _signal
import sys as _sys

__version__ = "0.1.0"

# launchers' rank variables: only rank 0 (or a process without one) says why it stopped
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def _debug() -> bool:
    return _os.environ.get("TSM_DIST_DEBUG", "") not in ("", "0") or "--debug" in _sys.argv


def _quiet_interrupt(kind, value, tb):  # type: ignore[no-untyped-def]
    """A KeyboardInterrupt that reaches the top outside :func:`tsm_dist.commands.exit_codes.run_main`: one line, not a
    traceback."""
    if issubclass(kind, KeyboardInterrupt) and not _debug():
        print("tsm-dist: interrupted", file=_sys.stderr)
        return
    _previous_hook(kind, value, tb)


def _importing(frame) -> bool:  # type: ignore[no-untyped-def]
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _on_stop_signal(signum, frame):  # type: ignore[no-untyped-def]
    """SIGINT/SIGTERM before a command installs its own handling. During an import (a command's first
    second imports torch and numpy; later ones import Horovod, onnxruntime, ...) a KeyboardInterrupt is not
    safe: a library's import that catches everything swallowed it half-way through numpy's import, and the
    command crashed later on the half-imported module (``numpy has no attribute 'matrix'``). So there, and
    for SIGTERM anywhere, it is one line and exit 130/143 at once; elsewhere Ctrl-C is the usual
    KeyboardInterrupt, which the command's edge turns into cleanup, one line and 130."""
    if signum == _signal.SIGINT and not _importing(frame):
        raise KeyboardInterrupt
    if _os.getpid() != _COMMAND_PID:  # a forked worker: stop as it would have without this handler
        _signal.signal(signum, _signal.SIG_DFL)
        _os.kill(_os.getpid(), signum)
        return
    if all(_os.environ.get(name, "0") == "0" for name in _RANK_VARS):
        what = "interrupted" if signum == _signal.SIGINT else "terminated (SIGTERM)"
        _os.write(2, f"tsm-dist: {what}\n".encode())
    _os._exit(128 + signum)


def outcome_decided() -> None:
    """A command's exit code is decided (:func:`tsm_dist.commands.exit_codes.run_main` returns): a stop signal
    from now on (a launcher ending the job's other ranks, a late Ctrl-C) must neither add a line nor turn the
    code into a death by signal, so SIGINT and SIGTERM are ignored while the process exits. Ignored at the C
    level on purpose: Python's finalization resets Python-level handlers to the default action, which is
    how a signal in that window used to kill the process (-15 / -2 instead of the decided code). A hung exit
    still ends with the scheduler's or the launcher's SIGKILL."""
    if _os.getpid() == globals().get("_COMMAND_PID") and not _debug():
        for sig in (_signal.SIGINT, _signal.SIGTERM):
            _signal.signal(sig, _signal.SIG_IGN)


def _spawned_child() -> bool:
    """A process that multiprocessing's spawn started (pack's workers, for one): it runs with its parent's argv, but
    the command's line is its parent's to say; a stop signal ends it as it would without us."""
    process = _sys.modules.get("multiprocessing.process")  # the child's name is set before it imports its parent's
    return process is not None and process.current_process().name != "MainProcess"  # __main__, which imports us


# only for our commands (python -m tsm_dist.<module> imports this package while argv[0] is still "-m";
# the console script is tsm-dist), never for a program that imports tsm_dist as a library, nor for a worker
# process it spawned (a scheduler's SIGTERM to the whole group gave one "terminated" line per pack worker)
if _sys.argv and _os.path.basename(_sys.argv[0]) in ("-m", "tsm-dist") and not _spawned_child():
    _previous_hook = _sys.excepthook
    _sys.excepthook = _quiet_interrupt
    _COMMAND_PID = _os.getpid()
    if not _debug():
        try:
            for _sig in (_signal.SIGINT, _signal.SIGTERM):
                if _signal.getsignal(_sig) in (_signal.default_int_handler, _signal.SIG_DFL):
                    _signal.signal(_sig, _on_stop_signal)
        except ValueError:  # not the main thread: leave signals alone
            pass

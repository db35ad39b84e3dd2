"""Exit codes and the one place that turns an exception into an exit code and one line of text.

Every command's ``main`` runs through :func:`run_main` (``tsm-dist <command>`` via ``cli.py``, and
``python -m tsm_dist.<module>`` via the modules' ``__main__`` blocks, which is how ``launch/rank.sh``
and the tests start the trainer). Known errors print one line naming the culprit, without a Python
traceback; ``--debug`` or ``TSM_DIST_DEBUG=1`` prints the traceback instead (on every rank).

Which rank prints: an error every rank meets the same way (config, file list, checkpoint: the
trainer agrees on them with a collective first) is printed by rank 0 alone; an error only one rank
can see (a video in its shard that fails to decode mid-epoch) is printed by that rank, prefixed with
its rank. A rank that stops because a *peer* died (Horovod/Gloo/MPI connection errors) exits quietly
with :data:`EXIT_CRASH`: the peer printed the reason.

=====  ==========================================================================================
code   meaning
=====  ==========================================================================================
0      done
1      crash (a bug: traceback printed), or this rank stopped because another rank failed
2      configuration or usage error (config key, value, model name, option; a fresh run in a workdir
       that holds another run's checkpoints)
3      the loss became NaN/Inf (every rank stops after the same step)
4      data error: file list missing or malformed, label out of range, missing/empty/corrupt video
5      checkpoint error: ``--resume`` file missing, unreadable, or for another model than the config
6      storage error: the workdir (or an output directory) cannot be written: permission, read-only
       file system, full disk or quota, at start or when a checkpoint is written
75     stopped by the time-limit warning (SIGUSR1): checkpoint written, the job script requeues
143    stopped by SIGTERM/SIGINT (cancel, preemption, ``bkill``): checkpoint written, not requeued
=====  ==========================================================================================
"""
from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable, Sequence

from tsm_dist import outcome_decided
from tsm_dist.config import ConfigError
from tsm_dist.data.errors import DataError, VideoError
from tsm_dist.ranks.layout import launcher_layout

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_DATA = 4
EXIT_CHECKPOINT = 5
EXIT_STORAGE = 6
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): "try again" -- the job scripts requeue on it
EXIT_TERMINATED = 128 + 15  # what a shell reports for SIGTERM: the job was cancelled or preempted

DEBUG_ENV = "TSM_DIST_DEBUG"
# the commands that read videos through a config, where data.skip_corrupt is the way past a bad one
_CONFIGURED = ("tsm-dist train", "tsm-dist eval", "tsm-dist check-data")


class CheckpointError(Exception):
    """A checkpoint cannot be used: missing, unreadable, or made for another model."""


class StorageError(Exception):
    """An output cannot be written (permission, read-only file system, full disk, quota); names the path."""


# OSErrors that say where we write is unusable, not that the program is wrong
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


def storage_problem(exc: OSError, path: object = None) -> str:
    """One line for a failed write: the path and the cause (``No space left on device``, ...)."""
    where = path if path is not None else (exc.filename or "the workdir")
    return f"cannot write {where}: {exc.strerror or exc}"


class UsageError(Exception):
    """Bad command-line usage that argparse cannot see (e.g. a required combination of options)."""


class CoordinatedError(Exception):
    """An error all ranks agreed on (through a collective): every rank raises it, rank 0 prints it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# Exceptions that mean "another rank went away": this rank has nothing useful to add.
_PEER_FAILURES = ("HorovodInternalError", "HostsUpdatedInterrupt", "DistBackendError", "DistNetworkError")
_PEER_MESSAGES = ("connection closed by peer", "connection reset by peer", "broken pipe", "read error",
                  "horovod has been shut down")


def exit_code(exc: BaseException) -> int:
    """The exit code for an exception that reached the command's edge."""
    if isinstance(exc, CoordinatedError):
        return exc.code
    if isinstance(exc, (ConfigError, UsageError)):
        return EXIT_CONFIG
    if isinstance(exc, DataError):
        return EXIT_DATA
    if isinstance(exc, CheckpointError):
        return EXIT_CHECKPOINT
    if isinstance(exc, StorageError) or (isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS):
        return EXIT_STORAGE
    return EXIT_CRASH


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says a collective failed because another process died."""
    for cls in type(exc).__mro__:
        if cls.__name__ in _PEER_FAILURES:
            return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, ConnectionError)) and any(m in text for m in _PEER_MESSAGES)


def is_rank_local(exc: BaseException) -> bool:
    """Errors only this rank can see (a video of its own shard); the others are the same on every rank."""
    return isinstance(exc, VideoError) or (isinstance(exc, DataError) and getattr(exc, "rank_local", False))


def debug_enabled(argv: Sequence[str] = ()) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def launcher_rank() -> tuple[int, int]:
    """(rank, size) from the launcher's environment, without starting any engine; (0, 1) if unknown."""
    try:
        rank, size, _, _ = launcher_layout()
        return rank, size
    except Exception:  # an inconsistent environment: better every rank than none
        return 0, 1


def report(prog: str, exc: BaseException, *, rank: int | None = None, size: int | None = None) -> int:
    """Print the one line for ``exc`` (if this rank should) and return its exit code."""
    if rank is None or size is None:
        rank, size = launcher_rank()
    code = exit_code(exc)
    if (code == EXIT_CRASH and is_peer_failure(exc)) or getattr(exc, "quiet", False):
        return code  # quiet: the rank that failed first said why
    if code == EXIT_CRASH and not isinstance(exc, CoordinatedError):
        # a bug: the traceback is the useful part, from every rank that hits it
        prefix = f"rank {rank}: " if size > 1 else ""
        print(f"{prog}: {prefix}internal error (exit 1), traceback follows; please report it", file=sys.stderr)
        traceback.print_exception(type(exc), exc, exc.__traceback__)
        return code
    local = is_rank_local(exc)
    if rank == 0 or local:
        prefix = f"rank {rank}: " if local and size > 1 else ""
        kind = {EXIT_CONFIG: "config error", EXIT_DATA: "data error",
                EXIT_CHECKPOINT: "checkpoint error", EXIT_STORAGE: "storage error"}.get(code, "error")
        text = storage_problem(exc) if isinstance(exc, OSError) else str(exc)
        if isinstance(exc, VideoError) and "skip_corrupt" not in text and prog in _CONFIGURED:
            text += "; data.skip_corrupt=true skips bad videos"
        print(f"{prog}: {kind}: {prefix}{text}", file=sys.stderr, flush=True)
    return code


def run_main(prog: str, main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a command's ``main(argv)`` and map what escapes it to an exit code (see the table above).

    ``--debug`` (anywhere before a ``--``) is taken out of ``argv`` and turns on tracebacks.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argv[: argv.index("--")] if "--" in argv else argv
    debug = debug_enabled(own)
    if "--debug" in own:
        argv.remove("--debug")
        os.environ[DEBUG_ENV] = "1"  # for code below that asks (e.g. the trainer's own reports)
    try:
        return int(main(argv) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
            return exit_code(exc)
        return report(prog, exc)
    finally:
        outcome_decided()

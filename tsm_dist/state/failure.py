"""A run that fails says so in its record: the ``end`` record ``failed`` with the cause and the exit code.

Errors every rank meets together (a checkpoint write that failed, a diverged model) reach the trainer on
every rank; errors only one rank sees (a video of its shard that fails to decode, a killed rank) reach the
others as a failed collective ("connection closed by peer", Horovod shut down), which names no rank and no
cause. So a rank that fails on its own leaves a note, ``<workdir>/.rank_failures/rank<k>.json`` with its
code and line (the workdir is shared by the job's ranks, as the checkpoints are), and a survivor of a
failed collective reads the notes: rank 0 records and prints which rank failed and why ("rank 1 failed:
data error: ..."), or that a rank was lost without a word (killed, out of memory, node failure); every
survivor exits with the failed rank's code, so the step's exit code does not depend on which rank exited
first. When rank 0 itself died, the job script records the end (jobs/).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tsm_dist.runlog import records
from tsm_dist.commands.exit_codes import (
    EXIT_CRASH, CoordinatedError, exit_code, is_peer_failure, is_rank_local, storage_problem,
)

NOTES_DIR = ".rank_failures"
# how long a survivor waits for the failed rank's note: it writes it before exiting, survivors notice
# the failure when the launcher or the collective reports the exit, which is later
NOTE_WAIT_S = 3.0


class PeerFailed(CoordinatedError):
    """This rank stopped because another rank failed; ``code`` is that rank's (1 when unknown). ``quiet``:
    the failed rank printed its own line, the survivors add none."""

    def __init__(self, message: str, code: int, quiet: bool = False) -> None:
        super().__init__(message, code)
        self.quiet = quiet


def describe(exc: BaseException) -> str:
    """The one line that says why ``exc`` stopped the run."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C twice)"
    if isinstance(exc, OSError) and exc.filename:
        return storage_problem(exc)
    text = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, CoordinatedError) or exit_code(exc) != EXIT_CRASH:
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text.split('. ')[0]}"  # a library's first sentence says what failed


def clear_notes(workdir: Path) -> None:
    """At a run's start (rank 0): notes of an earlier attempt are not this run's."""
    directory = workdir / NOTES_DIR
    if directory.is_dir():
        for note in [*directory.glob("rank*.json"), *directory.glob("alive*.json")]:
            note.unlink(missing_ok=True)


def leave_note(workdir: Path, rank: int, exc: BaseException) -> None:
    """A rank that fails on its own: its code and line for the survivors (best effort)."""
    directory = workdir / NOTES_DIR
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".rank{rank}.json.tmp"
        tmp.write_text(json.dumps({"rank": rank, "code": exit_code(exc), "cause": describe(exc)}))
        os.replace(tmp, directory / f"rank{rank}.json")
    except OSError:
        pass


def _read(directory: Path, pattern: str) -> list[dict[str, Any]]:
    found = []
    for note in sorted(directory.glob(pattern)):
        try:
            found.append(json.loads(note.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda n: n["rank"])


def noted_failure(workdir: Path) -> PeerFailed | None:
    """The failure a rank noted before it exited (its own error, not a kill), if any: an elastic run stops on it
    instead of going on without that rank (its error would meet the ranks its work moves to)."""
    failed = _read(workdir / NOTES_DIR, "rank*.json")
    if not failed:
        return None
    first = failed[0]
    return PeerFailed(f"rank {first['rank']} failed: {first['cause']}", int(first["code"]), quiet=True)


def peer_failure(workdir: Path, exc: BaseException, rank: int, size: int,
                 wait: float = NOTE_WAIT_S) -> PeerFailed:
    """What a survivor of a failed collective says and exits with: the failed rank's note, or (none came
    within ``wait``) the ranks that did not report themselves alive either: the lost ones."""
    directory = workdir / NOTES_DIR
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"alive{rank}.json").write_text(json.dumps({"rank": rank}))
    except OSError:
        pass
    deadline = time.monotonic() + wait
    while True:
        noted = noted_failure(workdir)
        if noted is not None:
            return noted
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    alive = {n["rank"] for n in _read(directory, "alive*.json")}
    lost = [r for r in range(size) if r not in alive]
    who = f"rank {', '.join(map(str, lost))}" if lost else "another rank"
    return PeerFailed(f"{who} was lost without a word (killed, out of memory or its node failed); this run "
                      f"stopped (the collective reported: {describe(exc)})", EXIT_CRASH)


def record_failure(log: records.MetricsLog | None, exc: BaseException, pos: Any, *, workdir: Path,
                   rank: int, size: int) -> BaseException:
    """After ``exc`` stopped this rank's training: leave a note if only this rank knows why; on rank 0
    (``log`` open) write the ``end`` record ``failed``. Returns the exception to raise (a failed peer
    becomes :class:`PeerFailed`)."""
    if is_rank_local(exc):
        leave_note(workdir, rank, exc)
    if is_peer_failure(exc) and size > 1:
        exc = peer_failure(workdir, exc, rank, size)
    if log is not None and not log.closed:  # closed: this run's end record is already written
        try:
            log.write(records.end_record(status="failed", step=pos.step, epoch=pos.epoch,
                                         cause=describe(exc), exit_code=exit_code(exc)))
            log.close()
        except OSError:
            pass  # the disk that failed the run may fail this too: the exit code still says it
    return exc

"""Starting launchers from Python: find a tool of this environment, run a command in a session of its own.

A launcher (horovodrun, mpirun, srun) starts ranks that start helpers; a timeout or Ctrl-C must end all of
them, so every command runs as the leader of a new session and is stopped by killing its process group.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Callable, Mapping, Sequence


def find_tool(name: str) -> str:
    """A launcher from this Python's environment first (horovodrun lives in the venv), else PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found (looked beside {sys.executable} and on PATH; ./install.sh "
                                f"installs horovodrun)")
    return found


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process group that ``proc`` leads (the launcher and every rank it started)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass
    proc.wait()


def run_session(command: Sequence[str], *, timeout: float, env: Mapping[str, str] | None = None,
                stdout: IO[str] | None = None, on_line: Callable[[str], None] | None = None,
                cwd: str | Path | None = None) -> int:
    """Run ``command`` in a new session; return its exit code.

    Output (stderr too) goes to ``stdout`` (a file; default: ours), or line by line to ``on_line``. On a
    timeout (``subprocess.TimeoutExpired`` is raised) or any interruption the whole session is killed.
    """
    proc = subprocess.Popen(list(command), stdout=subprocess.PIPE if on_line else stdout,
                            stderr=subprocess.STDOUT, text=True, env=None if env is None else dict(env),
                            cwd=cwd, start_new_session=True)
    pump = None
    if on_line is not None:
        pump = threading.Thread(target=lambda: [on_line(line) for line in proc.stdout], daemon=True)
        pump.start()
    try:
        return proc.wait(timeout=timeout)
    except BaseException:
        kill_session(proc)
        raise
    finally:
        if pump is not None:
            pump.join(timeout=10)

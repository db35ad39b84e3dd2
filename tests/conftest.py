"""Shared test helpers: bounded multi-process launches that always clean up after themselves."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PYTHON = sys.executable
_TAG = "TSM_DIST_TEST_TAG"


def launcher_env(**extra: str) -> dict[str, str]:
    """Environment for horovodrun/mpirun children: root-safe OpenMPI, one thread per rank, venv first."""
    env = dict(os.environ)
    env.update(
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        # Loopback only: avoids OpenMPI probing (and waiting on) other interfaces in containers.
        OMPI_MCA_btl_tcp_if_include="lo",
        OMPI_MCA_oob_tcp_if_include="lo",
        HOROVOD_GLOO_IFACE="lo",
        OMP_NUM_THREADS="1",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        WANDB_MODE="offline",
    )
    env.update(extra)
    return env


def _kill_tagged(tag: str) -> None:
    """Kill every process that carries our tag in its environment (launchers may re-parent ranks)."""
    needle = f"{_TAG}={tag}".encode()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            if needle in (pid_dir / "environ").read_bytes():
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def run_bounded(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None,
                cwd: str | Path | None = None) -> subprocess.CompletedProcess:
    """Run cmd (and everything it starts) for at most `timeout` seconds; leave no process behind.

    On timeout the test fails with the command's output so far, instead of hanging CI.
    """
    tag = uuid.uuid4().hex
    env = dict(launcher_env() if env is None else env)
    env[_TAG] = tag
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        _kill_tagged(tag)
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}")
    finally:
        # Ranks that outlive their launcher (a crash path) must not leak into later tests.
        time.sleep(0.05)
        _kill_tagged(tag)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def horovodrun(np: int, *args: str) -> list[str]:
    return [str(VENV_BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo", *args]


def mpirun(np: int, *args: str) -> list[str]:
    return ["mpirun", "-np", str(np), "--oversubscribe", "--bind-to", "none", *args]

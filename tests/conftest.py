"""Shared test helpers: bounded multi-process launches that always clean up after themselves, a free port,
the synthetic data set, and a loader with the tests' small defaults."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tsm_dist.commands.processes import run_session

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
    lines: list[str] = []
    try:
        code = run_session(cmd, timeout=timeout, env=env, cwd=cwd, on_line=lines.append)
    except subprocess.TimeoutExpired:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{''.join(lines)[-4000:]}")
    finally:
        # Ranks that outlive their launcher (a crash path) must not leak into later tests.
        time.sleep(0.05)
        _kill_tagged(tag)
    return subprocess.CompletedProcess(cmd, code, "".join(lines), "")


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Any:
    """The synthetic temporal-order set (4 classes, 5 videos each, 16 frames of 32x32), made once per run."""
    from tsm_dist.data.synthetic import make_synthetic

    return make_synthetic(str(tmp_path_factory.mktemp("syn")), videos_per_class=5, frames=16, size=32, seed=1)


def video_loader(source: Any, root: Any, **options: Any) -> Any:
    """``build_video_loader`` with the tests' small defaults (8 frames, 32x32 crops, training, 2 threads)."""
    from tsm_dist.data.video_loader import build_video_loader

    defaults = dict(num_frames=8, batch_size=4, crop_size=32, train=True, num_threads=2)
    return build_video_loader(source, None if root is None else str(root), **{**defaults, **options})


def logged_steps(metrics: Path) -> list[dict]:
    """The step records a running trainer has written so far."""
    from tsm_dist.runlog.records import MetricsError, read_records

    try:
        return [r for r in read_records(metrics) if r["type"] == "step"]
    except (FileNotFoundError, MetricsError):  # not written yet / a line being written
        return []


def wait_for_steps(proc: subprocess.Popen, metrics: Path, count: int, timeout: float = 150) -> None:
    """Wait until a running trainer has logged ``count`` steps; fail with its output if it ended first."""
    deadline = time.monotonic() + timeout
    while len(logged_steps(metrics)) < count:
        assert proc.poll() is None, proc.stdout.read()[-3000:] if proc.stdout else proc.returncode
        assert time.monotonic() < deadline, f"no {count} training steps within {timeout} s"
        time.sleep(0.05)


def horovodrun(np: int, *args: str) -> list[str]:
    return [str(VENV_BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo", *args]


def mpirun(np: int, *args: str) -> list[str]:
    return ["mpirun", "-np", str(np), "--oversubscribe", "--bind-to", "none", *args]


def kill_after_first_step(cmd: list[str], metrics: Path, victims: Any, *, env: dict[str, str],
                          cwd: str | Path | None = None, timeout: float = 150) -> tuple[int, str]:
    """Run ``cmd`` in its own session until ``metrics`` holds a step record, SIGKILL the one process that
    ``victims()`` names (a rank), then let the rest end; return (exit code, output). Leaves nothing behind."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not (metrics.exists() and '"step"' in metrics.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "no step was taken"
            time.sleep(0.5)
        found = victims()
        assert len(found) == 1, found
        os.kill(found[0], signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, output

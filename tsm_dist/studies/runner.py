"""Start N ranks of a Python module here (mpirun, horovodrun, or srun inside an allocation).

The local scaling sweep and the I/O study run the trainer this way; each command's output goes to a log
file and a run that fails or overruns its time is reported with the log's last lines, never hidden.
"""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from tsm_dist.commands.processes import find_tool, run_session

LAUNCHERS = ("mpirun", "horovodrun", "srun")


def launch_prefix(launcher: str, ranks: int, core_per_rank: bool = False) -> list[str]:
    """Launcher command for ``ranks`` ranks on this host.

    ``core_per_rank``: pin every rank to its own core (mpirun, when there are enough cores), so that a
    rank standing in for a node has the same resources however many "nodes" run; otherwise one rank
    alone would get every core and the 1-"node" baseline of a scaling sweep would be inflated.
    """
    if launcher == "horovodrun":
        return [find_tool("horovodrun"), "-np", str(ranks), "-H", f"localhost:{ranks}", "--gloo"]
    if launcher == "srun":
        return [find_tool("srun"), "--ntasks", str(ranks)]
    if launcher == "mpirun":
        if core_per_rank and ranks <= (os.cpu_count() or 1):
            return [find_tool("mpirun"), "-np", str(ranks), "--map-by", "core", "--bind-to", "core"]
        return [find_tool("mpirun"), "-np", str(ranks), "--oversubscribe", "--bind-to", "none"]
    raise ValueError(f"unknown launcher {launcher!r}; choose from {', '.join(LAUNCHERS)}")


def rank_env(ranks: int, single_host: bool = True) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # containers and CI run as root; OpenMPI refuses that unless told it is deliberate
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    if single_host:
        # every rank is on this host: keep MPI and Gloo on loopback instead of probing (and waiting on)
        # the interfaces of a container, and meet for the torch engine's rendezvous here too
        env.setdefault("OMPI_MCA_btl_tcp_if_include", "lo")
        env.setdefault("OMPI_MCA_oob_tcp_if_include", "lo")
        env.setdefault("HOROVOD_GLOO_IFACE", "lo")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in env:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                env["MASTER_PORT"] = str(sock.getsockname()[1])
    return env


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_logged(command: list[str], ranks: int, log: Path, timeout: float) -> str:
    """Run ``command`` with the rank environment; return "" on success, else why it failed."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = rank_env(ranks, single_host=not command[0].endswith("srun"))
    with open(log, "w") as fh:
        try:  # a session of its own: a timeout (or Ctrl-C) ends the launcher and every rank it started
            code = run_session(command, timeout=timeout, env=env, stdout=fh)
        except subprocess.TimeoutExpired:
            return f"timeout ({timeout:.0f} s, {log.name})"
    return "" if code == 0 else f"failed (exit {code}, {log.name})"

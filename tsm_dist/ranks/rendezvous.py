"""Horovod's Gloo rendezvous for ranks that srun started without MPI.

horovodrun normally runs the rendezvous HTTP server in its own launcher process. Under ``srun``
there is no such process, so the first task of the step's first node hosts Horovod's own
``RendezvousHTTPServer`` (from horovod.runner, the launcher half of Horovod; the training half stays
in tsm_dist.distributed.engine) on a port every rank derives from the job and step ids, and the other ranks
wait until it answers before they let ``hvd.init()`` start (Horovod's HTTP client gives up after
three attempts 0.5 s apart).
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Mapping

from tsm_dist.ranks.layout import LayoutError, RankLayout

PORT_BASE, PORT_SPAN = 20000, 10000  # below Linux's ephemeral range (32768+), where Gloo's own sockets live
ADDR_VAR, PORT_VAR = "TSM_DIST_RENDEZVOUS_ADDR", "TSM_DIST_RENDEZVOUS_PORT"


def rendezvous_port(layout: RankLayout, env: Mapping[str, str]) -> int:
    """Same on every rank of a step, different for the steps and jobs that may share a node."""
    if env.get(PORT_VAR):
        return int(env[PORT_VAR])
    try:
        job, step = int(layout.job_id or 0), int(layout.step_id or 0)
    except ValueError:
        raise LayoutError(f"cannot derive a rendezvous port from job id {layout.job_id!r} / step id "
                          f"{layout.step_id!r}; set {PORT_VAR}") from None
    return PORT_BASE + (job * 7 + step) % PORT_SPAN


def rendezvous_addr(layout: RankLayout, env: Mapping[str, str]) -> str:
    if not layout.nodes and layout.local_size != layout.size:
        # Without every node's name and task count the server cannot size the node-local and cross
        # scopes, and would clear them before all members read them.
        raise LayoutError(f"{layout.launcher}: Horovod over Gloo needs the job's node list, which only a Slurm step "
                          f"provides here; start the ranks with MPI (--controller mpi)")
    if env.get(ADDR_VAR):
        return env[ADDR_VAR]
    return layout.nodes[0] if layout.nodes else "127.0.0.1"  # no node list: every rank is on this host


def hosts_rendezvous(layout: RankLayout) -> bool:
    """The first task on the step's first node serves (it exists whatever the task distribution);
    without a node list, rank 0."""
    if layout.node_index is None:
        return layout.rank == 0
    return layout.node_index == 0 and layout.local_rank == 0


def serve(layout: RankLayout, port: int) -> threading.Thread:
    """Start Horovod's rendezvous server for this layout on ``port`` in a daemon thread."""
    from horovod.runner.common.util.hosts import HostInfo, get_host_assignments
    from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer

    try:
        server = RendezvousHTTPServer(("", port), RendezvousHandler, False)
    except OSError as err:
        raise LayoutError(f"rank {layout.rank}: cannot listen on rendezvous port {port} ({err}); another job "
                          f"on this node may use it: set {PORT_VAR} to a free port") from None
    nodes = layout.nodes or (layout.hostname or "localhost",)
    tasks = layout.tasks_per_node or (layout.local_size,)
    # The plan only sizes the scopes (global, local_<host>, cross_<local rank>) so the server can
    # clear each once all its members finished; rank numbering does not enter it.
    server.init(get_host_assignments([HostInfo(h, n) for h, n in zip(nodes, tasks)], layout.size))
    thread = threading.Thread(target=server.serve_forever, name="gloo-rendezvous", daemon=True)
    thread.start()
    return thread


def wait_until_reachable(addr: str, port: int, timeout_s: float, rank: int) -> None:
    deadline = time.monotonic() + timeout_s
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=2):
                return
        except OSError as err:
            last = err
            time.sleep(0.2)
    raise LayoutError(f"rank {rank}: the Gloo rendezvous at {addr}:{port} did not answer within {timeout_s:.0f} s "
                      f"({last}); check that the first node's name resolves from here, or set {ADDR_VAR}")

"""`tsm-dist check`: what the installed stack is, and whether 2 local ranks can train in sync.

The one-line summary is also what ./install.sh prints last, so users can paste it into bug reports.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from tsm_dist.procs import find_tool


def mpi_flavour() -> str:
    try:
        out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.splitlines()[0].strip() if out else "unknown MPI"
    except (OSError, subprocess.TimeoutExpired):
        return "no mpirun on PATH"


def stack_summary() -> str:
    import horovod
    import horovod.torch as hvd
    import nvidia.dali as dali
    import torch
    from mpi4py import MPI

    if torch.version.cuda:
        device = f"cuda {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)"
    else:
        device = "cpu"
    controllers = [n for n, ok in (("MPI", hvd.mpi_built()), ("Gloo", hvd.gloo_built())) if ok]
    ops = [n for n, ok in (("NCCL", hvd.nccl_built()), ("MPI", hvd.mpi_built()), ("Gloo", hvd.gloo_built())) if ok]
    major, minor = MPI.Get_version()
    return (f"tsm_dist stack: torch {torch.__version__} ({device}) | horovod {horovod.__version__} "
            f"controllers={'+'.join(controllers)} ops={'+'.join(ops)} | MPI: {mpi_flavour()} "
            f"(MPI-{major}.{minor}, mpi4py {__import__('mpi4py').__version__}) | DALI {dali.__version__}")


def _worker() -> int:
    """Each rank: engine init, broadcast from rank 0, one averaged reduction; rank 0 reports."""
    import torch

    from tsm_dist.config import EngineConfig
    from tsm_dist.engine import started

    with started(EngineConfig(name="horovod")) as engine:
        value = float(engine.allreduce_mean(torch.tensor([float(engine.rank)])))
        expected = (engine.size - 1) / 2
        ok = abs(value - expected) < 1e-6
        if engine.rank == 0:
            print(f"{'OK' if ok else 'FAILED'}: {engine.size} Horovod ranks, mean of ranks = {value} "
                  f"(expected {expected})", flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tsm-dist check", description=__doc__)
    parser.add_argument("--summary", action="store_true", help="print the stack summary line only")
    parser.add_argument("--ranks", type=int, default=2, help="local Horovod ranks for the live check")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker()
    print(stack_summary(), flush=True)
    if args.summary:
        return 0
    try:
        horovodrun = find_tool("horovodrun")
    except FileNotFoundError as exc:
        print(f"tsm-dist check: {exc}", file=sys.stderr)
        return 1
    cmd = [horovodrun, "-np", str(args.ranks), "-H", f"localhost:{args.ranks}", "--gloo",
           sys.executable, "-m", "tsm_dist.selfcheck", "--worker"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run(cmd, env=env, timeout=300).returncode


if __name__ == "__main__":
    raise SystemExit(main())

"""`tsm-dist check`: what the installed stack is, and whether 2 local ranks can train in sync.

The one-line summary is also what ./install.sh prints last, so users can paste it into bug reports.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Callable

from tsm_dist.commands.processes import find_tool


def mpi_flavour() -> str:
    try:
        out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.splitlines()[0].strip() if out else "unknown MPI"
    except (OSError, subprocess.TimeoutExpired):
        return "no mpirun on PATH"


def _horovod() -> str:
    try:
        import horovod
        import horovod.torch as hvd
    except ImportError as err:
        return f"horovod not installed ({err})"
    controllers = [n for n, ok in (("MPI", hvd.mpi_built()), ("Gloo", hvd.gloo_built())) if ok]
    ops = [n for n, ok in (("NCCL", hvd.nccl_built()), ("MPI", hvd.mpi_built()), ("Gloo", hvd.gloo_built())) if ok]
    return f"horovod {horovod.__version__} controllers={'+'.join(controllers)} ops={'+'.join(ops)}"


def _mpi() -> str:
    try:
        import mpi4py
        from mpi4py import MPI
    except ImportError:
        return f"MPI: {mpi_flavour()} (no mpi4py)"
    major, minor = MPI.Get_version()
    return f"MPI: {mpi_flavour()} (MPI-{major}.{minor}, mpi4py {mpi4py.__version__})"


def _dali() -> str:
    try:
        import nvidia.dali as dali
    except ImportError:
        return "DALI not installed"
    return f"DALI {dali.__version__}"


def _shift_ops() -> str:
    try:
        from tsm_dist.models import shift_native
    except ImportError as exc:  # a torch without the parts the models need (install.sh's tests fake one)
        return f"shift ops: not checked ({exc})"
    return shift_native.summary()


def libcuda_problem(load: "Callable[[str], object] | None" = None) -> str:
    """One line when a CUDA torch cannot use Horovod's GPU allreduce for lack of the *unversioned*
    ``libcuda.so`` (its fused-buffer kernels open the driver by that name; a node often has only the
    ``libcuda.so.1`` the driver installs); empty when fine or when there is no driver at all."""
    import ctypes

    load = load or ctypes.CDLL
    try:
        load("libcuda.so")
        return ""
    except OSError:
        pass
    try:
        load("libcuda.so.1")
    except OSError:
        return ""  # no NVIDIA driver here (a CPU node): nothing a GPU collective could use anyway
    return ("libcuda.so (unversioned) not found, only libcuda.so.1: Horovod's fused GPU allreduce loads it by "
            "that name; make a link named libcuda.so to libcuda.so.1 in a directory on LD_LIBRARY_PATH")


def stack_summary() -> str:
    """Every component on its own: a missing one is named, the others are still reported."""
    import torch

    if torch.version.cuda:
        device = f"cuda {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)"
        problem = libcuda_problem()
        device += f"; {problem}" if problem else ""
    else:
        device = "cpu"
    return (f"tsm_dist stack: torch {torch.__version__} ({device}) | {_horovod()} | {_mpi()} | {_dali()} | "
            f"{_shift_ops()}")


def _worker() -> int:
    """Each rank: engine init, broadcast from rank 0, one averaged reduction; rank 0 reports."""
    import torch

    from tsm_dist.config import EngineConfig
    from tsm_dist.distributed.engine import started

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
           sys.executable, "-m", "tsm_dist.commands.selfcheck", "--worker"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.run(cmd, env=env, timeout=300).returncode


if __name__ == "__main__":
    raise SystemExit(main())

"""Per-rank entry point that jsrun / srun / mpirun start: ``python -m tsm_dist.ranks.start [options] --
<trainer args>``.

It reads the rank layout from the launcher's environment, binds the rank's GPU, sets thread counts
and the communication settings, prepares Horovod's Gloo rendezvous when no MPI runtime is wired in
(plain ``srun``), then runs the trainer module in this same process, so signals sent to the task
(scancel --signal, LSF's warning action) reach the trainer directly and its exit code (75 after a
preemption checkpoint) becomes the task's exit code.
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
from dataclasses import dataclass
from typing import Mapping

from tsm_dist.ranks import rendezvous
from tsm_dist.ranks.binding import bind_gpu, comm_env, thread_env, threads_per_rank
from tsm_dist.ranks.layout import LayoutError, RankLayout, detect_layout

CONTROLLERS = ("auto", "mpi", "gloo", "none")


@dataclass(frozen=True)
class LaunchPlan:
    layout: RankLayout
    controller: str  # "mpi" | "gloo" | "none" (already set up by horovodrun, or a single process)
    env: dict[str, str]  # variables to set before the trainer starts
    rendezvous: tuple[str, int] | None  # Gloo rendezvous address, when this job needs one
    serve_rendezvous: bool
    summary: str


def choose_controller(layout: RankLayout, env: Mapping[str, str], requested: str) -> str:
    if requested not in CONTROLLERS:
        raise ValueError(f"--controller must be one of {CONTROLLERS}, got {requested!r}")
    if requested != "auto":
        if requested == "mpi" and not layout.mpi and layout.size > 1:
            raise LayoutError(f"--controller mpi, but {layout.launcher} started this rank without an MPI runtime "
                              f"(for srun use --mpi=pmix)")
        return requested
    if layout.launcher in ("horovodrun", "single"):  # horovodrun set everything; alone, nothing to set up
        return "none"
    user = env.get("HOROVOD_CONTROLLER", "").lower()
    if user in ("mpi", "gloo"):
        return user
    # Even a one-task srun step needs Gloo: MPI_Init in a task that srun started without PMIx aborts.
    return "mpi" if layout.mpi else "gloo"


def plan_launch(env: Mapping[str, str], *, controller: str = "auto", gpus: str = "auto",
                cpus_per_rank: int | None = None, node_gpus: int | None = None,
                affinity: int | None = None, cpu_count: int | None = None) -> LaunchPlan:
    """Everything this rank needs, computed from the environment alone (no side effects)."""
    layout = detect_layout(env)
    chosen = choose_controller(layout, env, controller)
    gpu = bind_gpu(layout, env, gpus, node_gpus=node_gpus)
    threads, threads_from = threads_per_rank(layout, env, cpus_per_rank, affinity=affinity, cpu_count=cpu_count)
    rdv: tuple[str, int] | None = None
    if chosen == "gloo":
        rdv = (rendezvous.rendezvous_addr(layout, env), rendezvous.rendezvous_port(layout, env))
    master = (rdv[0], rdv[1] + 1) if rdv else ("127.0.0.1", 29500) if layout.local_size == layout.size else None
    new_env = {**gpu.env, **thread_env(env, threads), **comm_env(layout, env, chosen, rendezvous=rdv, master=master)}
    if gpu.device is not None:
        new_env["TSM_DIST_GPU"] = gpu.device
    gpu_text = (f"GPU {gpu.device}" + (" (narrowed by the scheduler)" if gpu.narrowed_by_scheduler else
                                       f" of {','.join(gpu.visible)}")) if gpu.device is not None else "no GPU"
    where = f" on {len(layout.nodes)} node(s) {','.join(layout.nodes[:4])}" if layout.nodes else ""
    rdv_text = f" (rendezvous {rdv[0]}:{rdv[1]})" if rdv else ""
    summary = (f"tsm-dist launch: {layout.launcher}, {layout.size} rank(s){where}, {layout.local_size} per node, "
               f"controller {chosen}{rdv_text}; rank 0: {gpu_text}, {threads} thread(s) ({threads_from})")
    return LaunchPlan(layout, chosen, new_env, rdv,
                      serve_rendezvous=chosen == "gloo" and rendezvous.hosts_rendezvous(layout), summary=summary)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tsm_dist.ranks.start",
        description="Per-rank wrapper for jsrun/srun/mpirun: sets up the rank's GPU, threads and Horovod "
                    "environment, then runs the trainer. Arguments after '--' go to the trainer.")
    p.add_argument("--controller", choices=CONTROLLERS, default="auto",
                   help="Horovod controller: mpi when the launcher wired MPI in (jsrun, mpirun, srun "
                        "--mpi=pmix), gloo with a rendezvous hosted by the first task otherwise (default: auto)")
    p.add_argument("--gpus", choices=("auto", "none"), default="auto",
                   help="auto: one GPU per rank by local rank when GPUs are visible; none: hide all GPUs")
    p.add_argument("--cpus-per-rank", type=int, default=None,
                   help="CPU cores of this rank (OMP_NUM_THREADS); default from the launcher")
    p.add_argument("--module", default="tsm_dist.training.train", help="module to run (default: tsm_dist.training.train)")
    p.add_argument("--rendezvous-timeout", type=float, default=600.0,
                   help="seconds a rank waits for the Gloo rendezvous server (default: 600)")
    p.add_argument("--print-env", action="store_true",
                   help="print the variables this rank would set, as KEY=VALUE lines, and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = _parser().parse_args(own)
    try:
        plan = plan_launch(os.environ, controller=args.controller, gpus=args.gpus, cpus_per_rank=args.cpus_per_rank)
    except (LayoutError, ValueError) as err:
        print(f"tsm-dist launch: error: {err}", file=sys.stderr)
        return 2
    if args.print_env:
        print(f"# {plan.layout.describe()}, controller {plan.controller}, serves rendezvous: {plan.serve_rendezvous}")
        print("\n".join(f"{k}={v}" for k, v in sorted(plan.env.items())))
        return 0
    os.environ.update(plan.env)
    try:
        if plan.serve_rendezvous:
            rendezvous.serve(plan.layout, plan.rendezvous[1])
        elif plan.rendezvous is not None:
            rendezvous.wait_until_reachable(*plan.rendezvous, timeout_s=args.rendezvous_timeout,
                                            rank=plan.layout.rank)
    except LayoutError as err:
        print(f"tsm-dist launch: error: {err}", file=sys.stderr)
        return 2
    if plan.layout.rank == 0:
        print(plan.summary, file=sys.stderr, flush=True)
    sys.argv = [args.module, *rest]
    try:
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    except SystemExit as done:  # the trainer's exit code (75 = preempted) must become the task's
        code = done.code
        if code is None or isinstance(code, int):
            return int(code or 0)
        print(code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``tsm-dist render-job``: one template (jobs/job.sh.tmpl) renders every LSF/jsrun and Slurm/srun job
script, GPU and CPU variants.

This module owns the arithmetic (jsrun resource sets, tasks and CPUs per node) and the checks; the
template owns the shell. A template line may start with ``[cond ...]``: it is kept only when every
condition holds (a scheduler name, ``gpu``/``cpu``, or a context key that is set; ``!`` negates).
``{{name}}`` is replaced by a context value; an unknown name is an error, never an empty string.

LSF targets Summit-like nodes: 6 GPUs and 42 usable cores (2 sockets x 21), with either one
resource set per GPU (1 GPU, 7 cores, 1 rank) or one per node (6 GPUs, 42 cores, 6 ranks).
"""
from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tsm_dist import package_files

REPO = package_files.ROOT  # the checkout, or the package's installed copy of jobs/, configs/ and launch/
TEMPLATE = package_files.JOB_TEMPLATE
SCHEDULERS = ("lsf", "slurm")
RESOURCE_SETS = ("per-gpu", "per-node")
LSF_NODE_GPUS, LSF_NODE_CORES = 6, 42  # Summit: 6 V100, 2 x 21 usable POWER9 cores
DEFAULT_TIME = "02:00"
DEFAULT_WARN_SECONDS = 180  # signal before the time limit: enough to finish a step and write a checkpoint


class RenderError(ValueError):
    """Bad render-job input; the message names the option."""


@dataclass(frozen=True)
class JsrunLayout:
    """One ``jsrun`` line: ``nrs`` resource sets, ``rs_per_host`` of them per node, each with
    ``tasks_per_rs`` ranks, ``cpu_per_rs`` cores and ``gpu_per_rs`` GPUs; ranks bound to
    ``cores_per_rank`` packed cores."""
    nrs: int
    rs_per_host: int
    tasks_per_rs: int
    cpu_per_rs: int
    gpu_per_rs: int
    cores_per_rank: int

    @property
    def ranks(self) -> int:
        return self.nrs * self.tasks_per_rs

    def args(self) -> str:
        return (f"--nrs {self.nrs} --rs_per_host {self.rs_per_host} --tasks_per_rs {self.tasks_per_rs} "
                f"--cpu_per_rs {self.cpu_per_rs} --gpu_per_rs {self.gpu_per_rs} --bind packed:{self.cores_per_rank}")


def jsrun_layout(nodes: int, gpus_per_node: int, resource_sets: str = "per-gpu", ranks_per_node: int | None = None,
                 node_gpus: int = LSF_NODE_GPUS, node_cores: int = LSF_NODE_CORES) -> JsrunLayout:
    """Resource sets for ``nodes`` nodes; GPU jobs run one rank per GPU, CPU jobs ``ranks_per_node``."""
    if nodes < 1:
        raise RenderError(f"--nodes must be >= 1, got {nodes}")
    if resource_sets not in RESOURCE_SETS:
        raise RenderError(f"--resource-sets must be one of {RESOURCE_SETS}, got {resource_sets!r}")
    if gpus_per_node < 0 or gpus_per_node > node_gpus:
        raise RenderError(f"--gpus-per-node {gpus_per_node}: an LSF (Summit) node has {node_gpus} GPUs; "
                          f"use 1..{node_gpus}, or 0 for a CPU job")
    cores_per_gpu = node_cores // node_gpus  # 7: a GPU's share of its socket's cores
    if gpus_per_node == 0:
        ranks = ranks_per_node or 1
        if resource_sets != "per-node":
            raise RenderError("--gpus-per-node 0 (CPU job) has no GPUs to make resource sets of: "
                              "use --resource-sets per-node")
        if node_cores % ranks:
            raise RenderError(f"--ranks-per-node {ranks} does not divide the {node_cores} cores of a node")
        return JsrunLayout(nodes, 1, ranks, node_cores, 0, node_cores // ranks)
    if ranks_per_node not in (None, gpus_per_node):
        raise RenderError(f"--ranks-per-node {ranks_per_node} != --gpus-per-node {gpus_per_node}: "
                          f"GPU jobs run one rank per GPU")
    if resource_sets == "per-gpu":
        return JsrunLayout(nodes * gpus_per_node, gpus_per_node, 1, cores_per_gpu, 1, cores_per_gpu)
    if gpus_per_node != node_gpus:
        raise RenderError(f"--resource-sets per-node takes the whole node ({node_gpus} GPUs, {node_cores} cores), "
                          f"but --gpus-per-node is {gpus_per_node}: use --resource-sets per-gpu for part of a node")
    return JsrunLayout(nodes, 1, gpus_per_node, node_cores, gpus_per_node, cores_per_gpu)


def parse_time(value: str | None) -> tuple[str, int]:
    """``HH:MM`` (hours may exceed 24) -> (normalised text, minutes)."""
    text = DEFAULT_TIME if value is None else value
    m = re.fullmatch(r"(\d{1,3}):([0-5]\d)", text.strip())
    if m is None:
        raise RenderError(f"--time {text!r}: expected HH:MM, e.g. 02:00")
    minutes = int(m.group(1)) * 60 + int(m.group(2))
    if minutes < 1:
        raise RenderError(f"--time {text!r} must be at least one minute")
    return f"{int(m.group(1)):02d}:{m.group(2)}", minutes


def _check_config(config: str, overrides: Sequence[str]) -> Any:
    """The config must exist and load (typos surface here, not hours later in the queue)."""
    from tsm_dist.config import ConfigError, load_config

    if not Path(config).is_file():
        raise RenderError(f"--config {config}: no such file")
    try:
        return load_config(config, list(overrides))
    except ConfigError as err:
        raise RenderError(f"--config {config}: {err}") from None


def _elastic_launch(engine: Any, scheduler: str, nodes: int, ranks_node: int, launcher_args: str,
                    network_interface: str | None) -> dict[str, Any]:
    """Template context of an elastic launch (``engine.elastic``): horovodrun's arguments and the host
    discovery script's. The job starts ``-np`` ranks; the slots beyond ``elastic_max_ranks``
    stay free as spares, which horovodrun uses when a host is blacklisted."""
    slots = nodes * ranks_node
    low, high = engine.elastic_min_ranks, engine.elastic_max_ranks
    start = min(high or slots, slots)
    low = low or start
    if low > start:
        raise RenderError(f"engine.elastic_min_ranks={low} exceeds the {start} rank(s) this job starts with "
                          f"({nodes} node(s) x {ranks_node})")
    nic = network_interface or ("lo" if nodes == 1 else None)  # one node: every rank is local
    if scheduler == "lsf" and nic is None:
        raise RenderError("engine.elastic on LSF needs --network-interface (e.g. ib0): horovodrun skips its "
                          "interface detection under LSF")
    args = (f"--gloo -np {start} --min-np {low} --max-np {max(high, start)}" +
            (f" --network-interface {shlex.quote(nic)}" if nic else "") + (f" {launcher_args}" if launcher_args else ""))
    spare = f", {slots - start} slot(s) spare" if slots > start else ""
    return {"horovodrun_args": args, "discover_args": f"--slots {ranks_node}",
            "elastic_summary": f"{start} of {slots} slot(s) at start{spare}, never fewer than {low} rank(s)"}


def render_template(template: str, context: dict[str, Any], flags: set[str]) -> str:
    """Keep the lines whose ``[conditions]`` hold, then fill ``{{name}}`` from ``context``."""
    out = []
    for lineno, line in enumerate(template.splitlines(), 1):
        m = re.match(r"\[(!?[a-z_]+(?: !?[a-z_]+)*)\] ?(.*)$", line)
        if m:
            conds = m.group(1).split()
            if not all((c[1:] not in flags) if c.startswith("!") else (c in flags) for c in conds):
                continue
            line = m.group(2)

        def fill(name_match: re.Match) -> str:
            name = name_match.group(1)
            if name not in context:
                raise RenderError(f"template line {lineno}: unknown placeholder {{{{{name}}}}}")
            return str(context[name])

        out.append(re.sub(r"\{\{(\w+)\}\}", fill, line))
    return "\n".join(out) + "\n"


def _lsf_launch(model: str, nodes: int, gpus_per_node: int, controller: str | None, cpus_per_rank: int | None,
                resource_sets: str, ranks_per_node: int | None,
                launcher_args: str) -> tuple[str, int, int | None, dict[str, Any]]:
    """(controller, ranks per node, cores per rank, template context) of a jsrun launch."""
    if (controller or "mpi") != "mpi":
        raise RenderError(f"--controller {controller}: LSF jobs start ranks with jsrun and Spectrum MPI "
                          f"(--controller mpi)")
    if cpus_per_rank is not None:
        raise RenderError("--cpus-per-rank is fixed by the LSF resource sets (7 cores per GPU); leave it out")
    gpu = gpus_per_node > 0
    js = jsrun_layout(nodes, gpus_per_node, resource_sets, ranks_per_node)
    ranks_node = js.ranks // nodes
    # Spectrum MPI's CUDA hooks expect CUDA-aware MPI; Horovod moves GPU data with NCCL instead.
    smpi = ' --smpiargs="-disable_gpu_hooks"' if gpu else ""
    ctx = {"jsrun_args": js.args() + smpi + (f" {launcher_args}" if launcher_args else ""),
           "description": (f"{model}: {nodes} node(s) x {gpus_per_node} GPU(s), jsrun {resource_sets} resource "
                           f"sets" if gpu else f"{model}: {nodes} node(s) x {ranks_node} CPU rank(s)")}
    return "mpi", ranks_node, js.cores_per_rank, ctx


def _slurm_launch(model: str, nodes: int, gpus_per_node: int, controller: str | None, cpus_per_rank: int | None,
                  ranks_per_node: int | None, launcher_args: str) -> tuple[str, int, int | None, dict[str, Any]]:
    """(controller, ranks per node, CPUs per rank, template context) of an srun launch."""
    chosen = controller or "gloo"
    if chosen not in ("gloo", "mpi"):
        raise RenderError(f"--controller must be gloo or mpi for Slurm, got {controller!r}")
    gpu = gpus_per_node > 0
    if gpu and ranks_per_node not in (None, gpus_per_node):
        raise RenderError(f"--ranks-per-node {ranks_per_node} != --gpus-per-node {gpus_per_node}: "
                          f"GPU jobs run one rank per GPU")
    ranks_node = gpus_per_node if gpu else (ranks_per_node or 1)
    if ranks_node < 1:
        raise RenderError(f"--ranks-per-node must be >= 1, got {ranks_node}")
    # gloo: Horovod's controller needs no MPI, the wrapper hosts the rendezvous; mpi: OpenMPI
    # direct launch through Slurm's PMIx plugin.
    srun_mpi = "pmix" if chosen == "mpi" else "none"
    ctx = {"srun_args": (f"--nodes={nodes} --ntasks-per-node={ranks_node} --cpus-per-task=\"$CPUS_PER_RANK\" "
                         f"--mpi={srun_mpi} --kill-on-bad-exit=0" + (f" {launcher_args}" if launcher_args else "")),
           "description": (f"{model}: {nodes} node(s) x {gpus_per_node} GPU(s), srun, Horovod over {chosen}"
                           if gpu else f"{model}: {nodes} node(s) x {ranks_node} CPU rank(s), srun, Horovod "
                                       f"over {chosen}")}
    return chosen, ranks_node, cpus_per_rank, ctx


def _check_options(scheduler: str, nodes: int, gpus_per_node: int, accumulate: int | None,
                   cpus_per_rank: int | None, time: str | None, requeue: bool, warn_seconds: int,
                   env: Sequence[str]) -> str:
    """The options that need no config; returns the normalised ``--time``."""
    if scheduler not in SCHEDULERS:
        raise RenderError(f"--scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if nodes < 1:
        raise RenderError(f"--nodes must be >= 1, got {nodes}")
    if gpus_per_node < 0:
        raise RenderError(f"--gpus-per-node must be >= 0, got {gpus_per_node}")
    if accumulate is not None and accumulate < 1:
        raise RenderError(f"--accumulate must be >= 1, got {accumulate}")
    if cpus_per_rank is not None and cpus_per_rank < 1:
        raise RenderError(f"--cpus-per-rank must be >= 1, got {cpus_per_rank}")
    time_text, minutes = parse_time(time)
    if requeue and warn_seconds >= minutes * 60:
        raise RenderError(f"the preemption warning ({warn_seconds} s before the limit) does not fit in "
                          f"--time {time_text}")
    bad_env = [e for e in env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", e)]
    if bad_env:
        raise RenderError(f"--env {bad_env[0]!r}: expected NAME=VALUE")
    return time_text


def render_job(scheduler: str, nodes: int, gpus_per_node: int, config: str, *, project: str | None = None,
               time: str | None = None, accumulate: int | None = None, job_name: str | None = None,
               workdir: str | None = None, overrides: Sequence[str] = (), ranks_per_node: int | None = None,
               cpus_per_rank: int | None = None, resource_sets: str = "per-gpu", controller: str | None = None,
               queue: str | None = None, requeue: bool = True, warn_seconds: int = DEFAULT_WARN_SECONDS,
               alloc_flags: str = "smt4", env: Sequence[str] = (), launcher_args: str = "",
               python: str | None = None, repo: str | None = None, check_config: bool = True,
               network_interface: str | None = None,
               template: str | Path | None = None, command: str | None = None,
               then_module: str | None = None, then_args: Sequence[str] = (), then_why: str = "") -> str:
    """The job script text. Raises :class:`RenderError` naming the bad option.

    ``then_module``: a second per-rank program (``python -m then_module then_args``) started with the
    same launcher and resource sets after training succeeded, e.g. the scaling sweep's allreduce
    microbenchmark, which must measure the allocation the training ran on.
    """
    from tsm_dist.state.stop_signals import PREEMPTED_EXIT_CODE, TERMINATED_EXIT_CODE
    from tsm_dist.runlog.records import METRICS_FILE

    time_text = _check_options(scheduler, nodes, gpus_per_node, accumulate, cpus_per_rank, time, requeue,
                               warn_seconds, env)
    cfg = _check_config(config, overrides) if check_config else None
    model = cfg.model.name if cfg is not None else Path(config).stem
    elastic = cfg is not None and cfg.engine.elastic
    if elastic and then_module:
        raise RenderError(f"engine.elastic: {then_module} after training needs the fixed allocation of a "
                          f"non-elastic job")
    gpu = gpus_per_node > 0
    if scheduler == "lsf":
        if not project:
            raise RenderError("--project is required for LSF (#BSUB -P): the allocation to charge, e.g. ABC123")
        chosen, ranks_node, cpus, ctx = _lsf_launch(model, nodes, gpus_per_node, None if elastic else controller,
                                                    cpus_per_rank, resource_sets, ranks_per_node, launcher_args)
    else:
        chosen, ranks_node, cpus, ctx = _slurm_launch(model, nodes, gpus_per_node, controller, cpus_per_rank,
                                                      ranks_per_node, launcher_args)
    name = job_name or f"{Path(config).stem}-{nodes}n" + (f"{gpus_per_node}g" if gpu else f"{ranks_node}r")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise RenderError(f"--job-name {name!r}: use letters, digits and . _ + - only")
    if elastic:  # horovodrun (Gloo) sets every rank's Horovod environment
        chosen = "none"
        ctx.update(_elastic_launch(cfg.engine, scheduler, nodes, ranks_node, launcher_args, network_interface))
        ctx["description"] = (f"{model}: {nodes} node(s) x " + (f"{gpus_per_node} GPU(s)" if gpu else
                              f"{ranks_node} CPU rank(s)") + f", elastic: horovodrun --gloo, {ctx['elastic_summary']}")
    rank_args = [f"--controller {chosen}"] + ([] if gpu else ["--gpus none"])
    train = [f"--accumulate {accumulate}"] if accumulate else []
    train += [f"--set {shlex.quote(o)}" for o in overrides]
    ctx.update(
        project=project or "", queue=queue or "", job_name=name, time=time_text, nodes=nodes,
        gpus_per_node=gpus_per_node, ranks_per_node=ranks_node, ranks=ranks_node * nodes,
        cpus_per_rank=cpus or "", fixed_cpus="1" if cpus else "",
        warn_seconds=warn_seconds, warn_minutes=max(1, math.ceil(warn_seconds / 60)), alloc_flags=alloc_flags,
        repo=shlex.quote(str(repo or REPO)), python=shlex.quote(python or sys.executable),
        exports="\n".join(f"export {e.split('=', 1)[0]}={shlex.quote(e.split('=', 1)[1])}" for e in env),
        config=shlex.quote(config), workdir=shlex.quote(workdir or f"runs/{name}"),
        preempted_exit_code=PREEMPTED_EXIT_CODE, terminated_exit_code=TERMINATED_EXIT_CODE,
        rank_args=" ".join(rank_args),
        train_args="".join(" " + a for a in train),
        submit_hint="the repository root" if not Path(config).is_absolute() else "any directory",
        command=command or "tsm_dist.scheduler.render.render_job(...)",
        then_module=then_module or "", then_args=shlex.join(then_args), then_why=then_why or "then",
        metrics_file=METRICS_FILE,
    )
    flags = {scheduler, "gpu" if gpu else "cpu"} | {k for k in ("project", "queue", "alloc_flags", "exports",
                                                               "fixed_cpus") if ctx[k]}
    if requeue:
        flags.add("requeue")
    if then_module:
        flags.add("then")
    if elastic:
        flags.add("elastic")
    text = Path(template or TEMPLATE).read_text()
    return render_template(text, ctx, flags)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tsm-dist render-job", description=(
        "Render an LSF (jsrun) or Slurm (srun) job script that trains with one rank per GPU (or CPU ranks) "
        "and requeues itself when the trainer stops at the time-limit warning (exit code 75; after SIGTERM, "
        "exit 143, it does not: a cancel sticks). With engine.elastic: true in the config, horovodrun's elastic "
        "mode starts the ranks on the hosts of the allocation instead (docs/launch.md#elastic-training)."))
    p.add_argument("--scheduler", required=True, choices=SCHEDULERS)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="0 renders the CPU variant")
    p.add_argument("--config", required=True, help="trainer config (configs/*.yaml)")
    p.add_argument("--project", help="allocation/account (#BSUB -P, required for LSF; #SBATCH --account)")
    p.add_argument("--time", help=f"wall time HH:MM (default {DEFAULT_TIME})")
    p.add_argument("--accumulate", type=int, help="gradient accumulation steps passed to the trainer")
    p.add_argument("-o", "--output", help="write the script here (default: stdout)")
    p.add_argument("--job-name", help="default: <config>-<nodes>n<gpus>g")
    p.add_argument("--workdir", help="run directory, stable across requeues (default: runs/<job name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override passed to the trainer (repeatable)")
    p.add_argument("--ranks-per-node", type=int, help="CPU jobs: ranks per node (default 1)")
    p.add_argument("--cpus-per-rank", type=int,
                   help="Slurm: CPUs per rank (default: the whole node shared by its ranks, --exclusive)")
    p.add_argument("--resource-sets", choices=RESOURCE_SETS, default="per-gpu",
                   help="LSF: one jsrun resource set per GPU (1 GPU, 7 cores) or per node (6 GPUs, 42 cores)")
    p.add_argument("--controller", choices=("gloo", "mpi"),
                   help="Horovod controller: Slurm default gloo (srun --mpi=none), mpi = srun --mpi=pmix; LSF: mpi")
    p.add_argument("--queue", help="LSF queue (#BSUB -q) / Slurm partition (#SBATCH --partition)")
    p.add_argument("--no-requeue", dest="requeue", action="store_false",
                   help="do not requeue on preemption (resubmit by hand; --resume auto continues)")
    p.add_argument("--warn-seconds", type=int, default=DEFAULT_WARN_SECONDS,
                   help="send USR1 this long before the time limit so the trainer can checkpoint")
    p.add_argument("--alloc-flags", default="smt4", help="LSF -alloc_flags (default smt4; e.g. 'smt4 nvme')")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="export this in the job (site NCCL settings, ...); repeatable")
    p.add_argument("--launcher-args", default="", help="extra arguments for jsrun / srun (elastic: horovodrun)")
    p.add_argument("--network-interface",
                   help="elastic jobs: horovodrun --network-interface (e.g. ib0); default: detected by horovodrun "
                        "across the hosts, lo on one node")
    p.add_argument("--python", help="interpreter on the compute nodes (default: this one)")
    p.add_argument("--repo", help="tsm_dist checkout on the compute nodes (default: this one)")
    return p


def _without_output(argv: list[str]) -> list[str]:
    """The command line minus ``-o FILE``: the script records how to render it, not where it went."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("-o", "--output"):
            skip = True
        elif not a.startswith("--output="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        text = render_job(
            args.scheduler, args.nodes, args.gpus_per_node, args.config, project=args.project, time=args.time,
            accumulate=args.accumulate, job_name=args.job_name, workdir=args.workdir, overrides=args.overrides,
            ranks_per_node=args.ranks_per_node, cpus_per_rank=args.cpus_per_rank,
            resource_sets=args.resource_sets, controller=args.controller, queue=args.queue,
            requeue=args.requeue, warn_seconds=args.warn_seconds, alloc_flags=args.alloc_flags, env=args.env,
            launcher_args=args.launcher_args, python=args.python, repo=args.repo,
            network_interface=args.network_interface,
            command="tsm-dist render-job " + " ".join(shlex.quote(a) for a in _without_output(argv)))
    except RenderError as err:
        print(f"tsm-dist render-job: error: {err}", file=sys.stderr)
        return 2
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.chmod(0o755)
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

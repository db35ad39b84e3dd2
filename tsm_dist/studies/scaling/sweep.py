r"""The scaling study (paper, "Scalability in distributed training"; Table 12, Fig. 9c, Fig. 12).

Plans one training run per (engine, model, node count), renders and submits it as an LSF/Slurm job or runs
it here with MPI ranks standing in for nodes, and collects clips/s, scalability, batch sizes, epoch times
and a cost-model projection into a CSV, a Markdown table and two plots (``tsm-dist sweep`` is
``python -m tsm_dist.scaling_sweep``):

    tsm-dist sweep --scheduler lsf --config configs/tsm8f_r50_kinetics400.yaml \
        --nodes 1,2,4,8,16,32,64,128,256 --gpus-per-node 6 --models tsm8f_r50,i3d3x3x3_r50,i3d3x1x1_r50 \
        --per-gpu-batch 8 --steps 50 --warmup-steps 10 --simulate-nodes 512,1024 --out runs/summit --submit
    tsm-dist sweep collect runs/summit
    tsm-dist sweep project --machine summit --step-time 0.72 --per-gpu-batch 16

``project`` needs no allocation: it projects from a given single-node step time with the machine
profile's nominal links (clearly labelled as a projection).

Node counts in --simulate-nodes run on the largest real count with gradient accumulation, so their
effective batch is the one they stand for (the paper's 512* and 1024*).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tsm_dist.commands.arguments import choice_list, count_list, name_list
from tsm_dist.runlog.records import METRICS_FILE
from tsm_dist.scheduler.render import RenderError
from tsm_dist.studies.scaling.collect import BENCH_FILES, collect
from tsm_dist.scheduler.submit import JobOptions, SubmitError, render_jobs, submit_jobs, wait_for_jobs
from tsm_dist.studies.scaling.machines import SCHEDULERS, load_machine
from tsm_dist.studies.runconfig import measurement_overrides, model_config_item, write_run_config
from tsm_dist.studies.scaling.runs import PLAN_FILE, JobSpec, SweepPlan
from tsm_dist.studies.runner import LAUNCHERS, launch_prefix, run_logged, tail

if TYPE_CHECKING:
    from tsm_dist.config import Config

ENGINES = ("horovod", "torch")
DEFAULT_MACHINE = {"lsf": "summit", "slurm": "p100_cluster", "local": "localhost"}
CPU_MACHINE = "cpu_nodes"  # the default of a CPU sweep (--gpus-per-node 0) on LSF or Slurm: no GPU links


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsm-dist sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scheduler", required=True, choices=SCHEDULERS)
    parser.add_argument("--config", required=True, type=Path, help="base training config (YAML)")
    parser.add_argument("--nodes", required=True, type=count_list,
                        help="real node counts, e.g. 1,2,4,8 (local: groups of --gpus-per-node ranks)")
    parser.add_argument("--gpus-per-node", type=int,
                        help="default: the machine profile's; 0: CPU nodes (no GPU request), --ranks-per-node ranks")
    parser.add_argument("--ranks-per-node", type=int,
                        help="CPU nodes (--gpus-per-node 0): ranks per node (default 1); GPU nodes run one per GPU")
    parser.add_argument("--cpus-per-rank", type=int,
                        help="Slurm: CPUs per rank (default: the whole node shared by its ranks, --exclusive)")
    parser.add_argument("--models", type=name_list, help="comma list (default: the config's model.name)")
    parser.add_argument("--engines", type=choice_list(ENGINES), default=["horovod"],
                        help="comma list of horovod, torch (default horovod); both are compared in one table")
    parser.add_argument("--per-gpu-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=5, help="untimed optimizer steps first")
    parser.add_argument("--simulate-nodes", type=count_list, default=[],
                        help="node counts run on max(--nodes) with gradient accumulation (marked *)")
    parser.add_argument("--out", required=True, type=Path, help="sweep directory")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--submit", action="store_true", help="lsf/slurm: submit the jobs with bsub/sbatch")
    mode.add_argument("--dry-run", action="store_true", help="plan and render only; run or submit nothing")
    parser.add_argument("--machine", help="machine profile name or YAML (default: summit for lsf, "
                        f"p100_cluster for slurm, {CPU_MACHINE} for either with --gpus-per-node 0, localhost "
                        "for local)")
    parser.add_argument("--model-config", action="append", default=[], type=model_config_item,
                        metavar="MODEL=CONFIG",
                        help="base config for one model instead of --config (e.g. i3d3x1x1_r50="
                             "configs/i3d3x1x1_r50_kinetics400.yaml: its frames, sampling); repeatable")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable)")
    parser.add_argument("--dataset-size", type=int, help="clips per epoch for the time columns (default: "
                        "lines of data.train_list, or data.num_samples with the random backend)")
    parser.add_argument("--epochs", type=int, help="epochs for the projected training time (default train.epochs)")
    parser.add_argument("--project", help="LSF project / Slurm account")
    parser.add_argument("--time", default="00:30", help="job time limit HH:MM (default 00:30)")
    parser.add_argument("--queue", help="LSF queue / Slurm partition")
    parser.add_argument("--controller", choices=("gloo", "mpi"),
                        help="Slurm: Horovod controller (default gloo, srun --mpi=none); mpi (srun --mpi=pmix) "
                             "also lets the microbenchmark time MPI_Allreduce through mpi4py")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="mpirun",
                        help="local runs: how ranks start (srun: inside a Slurm allocation); the "
                             "microbenchmark needs an MPI launcher and uses mpirun unless this is srun")
    parser.add_argument("--timeout", type=float, default=1800.0, help="local runs: seconds per run")
    parser.add_argument("--no-bench", action="store_true", help="skip the allreduce microbenchmark")
    return parser


@dataclass(frozen=True)
class SweepOptions:
    """A sweep as its command line asks for it (checked by :func:`parse_args`)."""

    scheduler: str
    config: Path
    nodes: list[int]
    out: Path
    gpus_per_node: int | None = None
    ranks_per_node: int | None = None
    cpus_per_rank: int | None = None
    models: list[str] | None = None
    engines: list[str] = field(default_factory=lambda: ["horovod"])
    per_gpu_batch: int = 8
    steps: int = 20
    warmup_steps: int = 5
    simulate_nodes: list[int] = field(default_factory=list)
    submit: bool = False
    dry_run: bool = False
    machine: str | None = None
    model_configs: dict[str, Path] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    dataset_size: int | None = None
    epochs: int | None = None
    project: str | None = None
    time: str = "00:30"
    queue: str | None = None
    controller: str | None = None
    launcher: str = "mpirun"
    timeout: float = 1800.0
    no_bench: bool = False


def parse_args(argv: list[str] | None) -> SweepOptions:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("per_gpu_batch", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps must be >= 0")
    if args.gpus_per_node is not None and args.gpus_per_node < 0:
        parser.error("--gpus-per-node must be >= 0 (0: CPU nodes)")
    for flag in ("ranks_per_node", "cpus_per_rank"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.ranks_per_node is not None and args.gpus_per_node != 0:
        parser.error("--ranks-per-node is for CPU nodes (--gpus-per-node 0); GPU nodes run one rank per GPU")
    largest = args.nodes[-1]
    for sim in args.simulate_nodes:
        if sim <= largest or sim % largest:
            parser.error(f"--simulate-nodes {sim}: must be a multiple of the largest real count {largest} "
                         f"and larger than it (it runs on {largest} nodes with accumulation {sim}/{largest})")
    args.model_configs = dict(args.model_config)
    if args.scheduler == "lsf" and not args.project:
        parser.error("--scheduler lsf needs --project (#BSUB -P: the allocation to charge)")
    if args.scheduler == "local" and args.submit:
        parser.error("--submit is for lsf/slurm; a local sweep runs directly (or --dry-run)")
    if args.scheduler != "local" and not (args.submit or args.dry_run):
        parser.error(f"--scheduler {args.scheduler}: choose --submit (bsub/sbatch the jobs) or --dry-run "
                     f"(render them only)")
    return SweepOptions(**{f.name: getattr(args, f.name) for f in fields(SweepOptions)})


# Training clips of the data sets the paper's configs are written for (Kinetics-400 as the paper counts it),
# for planning where the file list is not on this machine (a login node, a laptop); keys are matched against
# the config's file name and data.train_list with case, '-' and '_' ignored.
KNOWN_DATASETS = {("kinetics400", "k400"): ("Kinetics-400", 240_436),
                  ("somethingv2", "somethingsomethingv2", "sthv2", "ssv2"): ("Something-Something v2", 168_913)}


def _known_dataset(cfg: "Config", config_path: Path) -> tuple[str, int] | None:
    text = f"{config_path.name} {cfg.data.train_list}".lower().replace("-", "").replace("_", "")
    return next((known for keys, known in KNOWN_DATASETS.items() if any(k in text for k in keys)), None)


def _dataset_size(cfg: "Config", config_path: Path) -> int:
    """Clips per epoch for the time columns: the random backend's, the train list's lines, else (and said
    so on stderr) the known size of the config's data set or data.num_samples."""
    if cfg.data.backend in ("random", "procedural"):
        return cfg.data.num_samples
    from tsm_dist.training.build import resolve_list

    from tsm_dist.data.pack.format import is_packed, read_meta

    train_list = Path(resolve_list(cfg, "train_list") or "")  # the trainer's rule, so both read one file
    if train_list.is_file():
        return sum(1 for line in train_list.read_text().splitlines() if line.strip())
    if is_packed(train_list):  # a tsm-dist pack directory: its index's video count
        return int(read_meta(str(train_list))["videos"])
    known = _known_dataset(cfg, config_path)
    if known is not None:
        size, source = known[1], f"the {known[0]} training set size"
    elif cfg.data.num_samples > 0:
        size, source = cfg.data.num_samples, "data.num_samples"
    else:
        raise FileNotFoundError(f"{config_path}: data.train_list {cfg.data.train_list!r} not found; pass "
                                f"--dataset-size (or set data.num_samples) to size the epoch-time columns")
    print(f"scaling_sweep: data.train_list {cfg.data.train_list!r} is not on this machine; the time columns "
          f"use {source}, {size:,} clips (--dataset-size sets it)", file=sys.stderr)
    return size


def _tag(engine: str, model: str, nodes: int, simulated: bool) -> str:
    return f"{engine}_{model}_n{nodes:04d}{'_sim' if simulated else ''}"


def plan_sweep(args: SweepOptions, argv: list[str]) -> SweepPlan:
    """Validate every run's config and write it under OUT/jobs/<tag>/; return the plan (not yet saved)."""
    from tsm_dist.config import load_config

    cpu = args.gpus_per_node == 0 and args.scheduler != "local"
    machine = load_machine(args.machine or (CPU_MACHINE if cpu else DEFAULT_MACHINE[args.scheduler]))
    gpus_per_node = machine.gpus_per_node if args.gpus_per_node is None else args.gpus_per_node
    base = load_config(args.config, args.overrides)
    models = args.models or [base.model.name]
    unused = sorted(set(args.model_configs) - set(models))
    if unused:
        raise ValueError(f"--model-config for {unused}, which are not in --models {models}")
    dataset_size = args.dataset_size if args.dataset_size is not None else _dataset_size(base, args.config)
    out = args.out
    largest = args.nodes[-1]
    plan = SweepPlan(scheduler=args.scheduler, machine=machine.name, gpus_per_node=gpus_per_node,
                     per_gpu_batch=args.per_gpu_batch, steps=args.steps, warmup_steps=args.warmup_steps,
                     dataset_size=dataset_size, epochs=args.epochs or base.train.epochs,
                     base_config=str(args.config), command=["python", "-m", "tsm_dist.scaling_sweep", *argv],
                     ranks_per_node=gpus_per_node or args.ranks_per_node or 1)
    counts = [(n, n) for n in args.nodes] + [(n, largest) for n in args.simulate_nodes]
    for model in models:
        config = args.model_configs.get(model, args.config)
        for engine in args.engines:
            for nodes, run_nodes in counts:
                accumulate = nodes // run_nodes
                tag = _tag(engine, model, nodes, nodes != run_nodes)
                overrides = [*args.overrides, f"engine.name={engine}", f"data.batch_size={args.per_gpu_batch}",
                             f"train.accumulate={accumulate}", "train.global_batch=0",
                             *measurement_overrides(args.warmup_steps + args.steps)]
                # named after the run: the job script describes itself by its config's name
                write_run_config(config, model, overrides, out / "jobs" / tag / f"{tag}.yaml")
                plan.jobs.append(JobSpec(tag=tag, engine=engine, model=model, nodes=nodes, run_nodes=run_nodes,
                                         accumulate=accumulate, workdir=f"runs/{tag}",
                                         config=f"jobs/{tag}/{tag}.yaml"))
    return plan


def local_commands(job: JobSpec, plan: SweepPlan, out: Path, launcher: str, bench: bool) -> list[list[str]]:
    """Commands of one local run: training, then (multi-rank only) the allreduce microbenchmark."""
    ranks = job.run_nodes * plan.ranks_per_node
    workdir = out / job.workdir
    commands = [launch_prefix(launcher, ranks, core_per_rank=True) + [
        sys.executable, "-m", "tsm_dist.training.train", "--config", str(out / job.config), "--workdir", str(workdir)]]
    if bench and ranks > 1 and not job.simulated:
        # mpi4py needs an MPI launcher (horovodrun --gloo starts ranks that are not one MPI world)
        bench_launcher = "srun" if launcher == "srun" else "mpirun"
        commands.append(launch_prefix(bench_launcher, ranks, core_per_rank=True) + bench_args(job, workdir, out))
    return commands


def bench_args(job: JobSpec, workdir: Path | str, out: Path) -> list[str]:
    """The microbenchmark after a run: messages up to that run's gradient size, its engine settings."""
    return [sys.executable, "-m", "tsm_dist.studies.scaling.allreduce_bench", "--method", "mpi4py,engine",
            "--engine", job.engine, "--config", str(out / job.config),
            "--max-bytes-from", str(Path(workdir) / METRICS_FILE), "--nodes", str(job.run_nodes), "--out", str(workdir)]


def run_local(plan: SweepPlan, out: Path, launcher: str, timeout: float, bench: bool) -> None:
    """Run every job one after another; a failed run is recorded in the plan and the sweep goes on."""
    for job in plan.jobs:
        workdir = out / job.workdir
        ranks = job.run_nodes * plan.ranks_per_node
        started = time.monotonic()
        # a rerun into the same directory measures afresh; stale files would be collected as its results
        for stale in (METRICS_FILE, *BENCH_FILES.values()):
            (workdir / stale).unlink(missing_ok=True)
        job.status = "completed"
        for i, command in enumerate(local_commands(job, plan, out, launcher, bench)):
            log = workdir / ("train.log" if i == 0 else "bench.log")
            error = run_logged(command, ranks, log, timeout)
            if error:
                job.status = error
                print(f"[{job.tag}] {error}; last lines of {log}:\n{tail(log)}", file=sys.stderr)
                break
        print(f"[{job.tag}] {ranks} rank(s), accumulate {job.accumulate}: {job.status} "
              f"in {time.monotonic() - started:.0f} s", flush=True)
        plan.save(out)


def job_options(args: SweepOptions, plan: SweepPlan) -> JobOptions:
    return JobOptions(scheduler=plan.scheduler, gpus_per_node=plan.gpus_per_node,
                      ranks_per_node=args.ranks_per_node if plan.gpus_per_node == 0 else None,
                      cpus_per_rank=args.cpus_per_rank, project=args.project, queue=args.queue, time=args.time,
                      controller=args.controller)


def render_sweep_jobs(plan: SweepPlan, out: Path, args: SweepOptions) -> None:
    """One job script per run (studies.jobs: jobs/job.sh.tmpl); accumulation is in each run's YAML."""
    render_jobs(plan.jobs, out, job_options(args, plan), command=shlex.join(plan.command),
                extra=lambda job: microbenchmark_step(args, plan, job, out / job.workdir, out))


def microbenchmark_step(args: SweepOptions, plan: SweepPlan, job: JobSpec, workdir: Path,
                        out: Path) -> dict[str, object]:
    """render_job options that run the allreduce microbenchmark after a successful multi-rank run."""
    if args.no_bench or job.simulated or job.run_nodes * plan.ranks_per_node <= 1:
        return {}
    return {"then_module": "tsm_dist.studies.scaling.allreduce_bench", "then_args": bench_args(job, workdir, out)[3:],
            "then_why": "allreduce latency/bandwidth of this allocation, for the projection"}


def describe(plan: SweepPlan, out: Path, launcher: str, bench: bool) -> str:
    unit = plan.rank_word
    lines = [f"sweep {out}: {len(plan.jobs)} run(s), scheduler {plan.scheduler}, machine {plan.machine}, "
             f"{plan.ranks_per_node} {unit}(s)/node, {plan.per_gpu_batch} clips/{unit}, "
             f"{plan.warmup_steps}+{plan.steps} steps"]
    for job in plan.jobs:
        ranks = job.nodes * plan.ranks_per_node
        sim = f" (simulated on {job.run_nodes} nodes, accumulate {job.accumulate})" if job.simulated else ""
        lines.append(f"  {job.tag}: {job.nodes} node(s), {ranks} {unit}(s), batch {ranks * plan.per_gpu_batch}{sim}")
        if plan.scheduler == "local":
            lines += [f"    $ {shlex.join(c)}" for c in local_commands(job, plan, out, launcher, bench)]
        else:
            lines.append(f"    script: {out / job.script}")
    return "\n".join(lines)


def run_sweep(argv: list[str]) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    args = replace(args, out=out)
    try:
        plan = plan_sweep(args, argv)
        if plan.scheduler != "local":
            render_sweep_jobs(plan, out, args)
    except (ValueError, RenderError, FileNotFoundError) as err:  # ConfigError is a ValueError
        print(f"scaling_sweep: error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out)
    print(describe(plan, out, args.launcher, not args.no_bench), flush=True)
    if args.dry_run:
        return 0
    if plan.scheduler != "local":
        try:
            submit_jobs(plan.jobs, out, plan.scheduler, on_submitted=lambda job: plan.save(out))
        except SubmitError as err:  # the jobs queued before it keep their ids in sweep.json
            print(f"scaling_sweep: error: {err}", file=sys.stderr)
            return 2
        print(f"submitted; when the jobs are done: tsm-dist sweep collect {out} "
              f"(--wait SECONDS waits for them)")
        return 0
    run_local(plan, out, args.launcher, args.timeout, not args.no_bench)
    code = collect_main([str(out)])
    return code or int(any(job.status != "completed" for job in plan.jobs))


def collect_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tsm-dist sweep collect",
                                     description="Tabulate and plot a finished sweep directory.")
    parser.add_argument("out", type=Path, help="the sweep's --out directory")
    parser.add_argument("--machine", help="machine profile for unmeasured links (default: the sweep's)")
    parser.add_argument("--wait", type=float, metavar="SECONDS",
                        help="lsf/slurm: first wait up to this long for the sweep's jobs to finish")
    args = parser.parse_args(argv)
    if args.wait and (args.out / PLAN_FILE).is_file():
        plan = SweepPlan.load(args.out)
        try:
            wait_for_jobs(plan.jobs, plan.scheduler, args.wait)
        except (SubmitError, TimeoutError) as err:  # collect what is there; the table shows the rest as running
            print(f"scaling_sweep collect: {err}", file=sys.stderr)
    try:
        outputs = collect(args.out, args.machine)
    except (FileNotFoundError, ValueError) as err:  # no plan, a bad profile; MetricsError is a ValueError
        print(f"scaling_sweep collect: error: {err}", file=sys.stderr)
        return 2
    missing = [r for r in outputs.rows if r.timed_steps == 0 or r.status != "completed"]
    print(outputs.markdown.read_text())
    for path in (outputs.csv, outputs.speed_png, outputs.scalability_png):
        print(f"wrote {path}")
    if missing:
        print(f"{len(missing)} run(s) without a completed measurement: "
              + ", ".join(f"{r.engine}/{r.model}/{r.nodes} ({r.status})" for r in missing), file=sys.stderr)
    measured = [r for r in outputs.rows if r.timed_steps > 0]
    return 0 if measured else 1


def project_main(argv: list[str]) -> int:
    from tsm_dist.studies.scaling.collect import plot_scalability, plot_speed
    from tsm_dist.studies.scaling.projection import model_sizes, parse_step_times, project_rows, projection_table

    parser = argparse.ArgumentParser(
        prog="tsm-dist sweep project",
        description="Project speed and scalability on a machine profile from a single-node step time, with "
                    "the ring-allreduce cost model and the profile's nominal links (nothing is run).")
    parser.add_argument("--machine", default="summit", help="machine profile name or YAML (default summit)")
    parser.add_argument("--models", type=name_list, default=["tsm8f_r50", "i3d3x3x3_r50", "i3d3x1x1_r50"])
    parser.add_argument("--step-time", required=True,
                        help="single-node step time in s: one value, or MODEL=S,MODEL=S per model")
    parser.add_argument("--nodes", type=count_list, default=[2 ** i for i in range(11)])
    parser.add_argument("--per-gpu-batch", type=int, default=8)
    parser.add_argument("--fp16-compression", action="store_true", help="halve the gradient bytes")
    parser.add_argument("--dataset-size", type=int, default=0, help="clips per epoch for the time columns")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--unmodelled-ms", type=float, default=0.0,
                        help="per-step time beyond the link model on more than one node, e.g. the 'calibrated' "
                             "term a sweep's results.md reports (contention, stragglers); default 0")
    parser.add_argument("--out", type=Path, help="also write projection.md and the two plots here")
    args = parser.parse_args(argv)
    try:
        machine = load_machine(args.machine)
        step_times = parse_step_times(args.step_time, args.models)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if machine.gpus_per_node == 0:
        parser.error(f"--machine {args.machine}: a profile of CPU nodes (gpus_per_node 0) has no ranks per node "
                     f"to project with; run a CPU sweep (--gpus-per-node 0 --ranks-per-node N) instead")
    sizes = {m: model_sizes(m) for m in args.models}
    rows = project_rows(machine, step_times, args.nodes, per_gpu_batch=args.per_gpu_batch,
                        num_frames={m: frames for m, (_, frames) in sizes.items()},
                        params={m: params for m, (params, _) in sizes.items()},
                        fp16_compression=args.fp16_compression, dataset_size=args.dataset_size, epochs=args.epochs,
                        overhead_s=args.unmodelled_ms / 1e3)
    text = projection_table(rows, machine, args.epochs, args.unmodelled_ms / 1e3)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "projection.md").write_text(text)
        plot_speed(rows, args.out / "projection_speed_vs_gpus.png")
        plot_scalability(rows, args.out / "projection_scalability_vs_nodes.png")
        print(f"wrote {args.out / 'projection.md'} and the projection_*.png plots")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "collect":
        return collect_main(argv[1:])
    if argv and argv[0] == "project":
        return project_main(argv[1:])
    return run_sweep(argv)


if __name__ == "__main__":
    raise SystemExit(main())

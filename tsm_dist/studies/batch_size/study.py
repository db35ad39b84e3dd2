"""The batch-size study (paper, Table 12, Fig. 11, Fig. 13): accuracy against the effective batch.

One config, a list of effective batches, the same epochs for each: the learning rate follows the
linear scaling rule (LAMB: square root) from ``optim.base_batch`` with the config's warmup
(:mod:`tsm_dist.training.lr_schedule`), and
a batch larger than the ranks can hold is simulated by gradient accumulation, K = batch / (ranks x
per-rank batch), marked ``*`` as the paper's 512- and 1024-node rows. Every micro-batch is normalized
by its own batch-norm statistics, exactly as on as many real ranks (tests/studies/test_batch_size_multirank.py).
Each (optimizer, batch, seed) is one training run; its accuracy is the mean of its last
``eval.last_n`` checkpoints' validation top-1, and a row reports the mean and standard deviation of that
over the seeds::

    python -m tsm_dist.batch_study          # configs/batch_study.yaml, batches 16..1024, sgd and lars, 3 seeds
    python -m tsm_dist.batch_study --config configs/synthetic_hard_tsm.yaml --batches 8,32,128,512 \\
        --optimizers sgd,lars --seeds 3 --out runs/batch_hard
    python -m tsm_dist.batch_study collect runs/batch_study      # the table and figures again

``--quick`` is a reduced study (64 rendered clips, or a tiny hard set for a config that reads files, two
batches, two epochs, SGD) for CI. Outputs in ``--out``:
``table.md``, ``table.csv``, ``fig11_accuracy_vs_batch.png``, ``fig13_curves.png``, and one run directory
(config.yaml, metrics.jsonl, train.log) per run; a failed run stays in the table with its status.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tsm_dist.commands.arguments import choice_list, count_list
from tsm_dist.scheduler.submit import JobOptions
from tsm_dist.studies.batch_size.runs import (DEFAULT_BATCHES, DEFAULT_OPTIMIZERS, OPTIMIZERS, PLAN_FILE, StudyOptions,
                                         StudyRun, ensure_data, plan_study, run_overrides)
from tsm_dist.studies.runner import LAUNCHERS, launch_prefix, run_logged, tail

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tsm_dist.batch_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="training config (default: configs/batch_study.yaml)")
    parser.add_argument("--batches", type=count_list, help=f"effective batches (default {DEFAULT_BATCHES})")
    parser.add_argument("--nodes", type=count_list,
                        help="node counts as the paper counts them: batch = nodes x --gpus-per-node x data.batch_size")
    parser.add_argument("--gpus-per-node", type=int, default=1, help="with --nodes (default 1)")
    parser.add_argument("--optimizers", type=choice_list(OPTIMIZERS),
                        help=f"comma list of sgd, lars, lamb (default {','.join(DEFAULT_OPTIMIZERS)}; --quick: sgd), "
                        "compared in one table and figure")
    parser.add_argument("--seeds", type=int, help="runs per batch and optimizer, train.seed 0..N-1 (default 3)")
    parser.add_argument("--epochs", type=int, help="epochs of every run (default: the config's train.epochs)")
    parser.add_argument("--ranks", type=int, default=2, help="local ranks (default 2)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="horovodrun")
    parser.add_argument("--data", type=Path, help="data root of a config that reads files (default: its data.root; "
                        "the hard set is made there if it is missing)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for every run")
    parser.add_argument("--out", type=Path, default=Path("runs/batch_study"))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per run")
    parser.add_argument("--quick", action="store_true", help="reduced study for CI (tiny set, 2 batches, 2 epochs)")
    jobs = parser.add_argument_group("LSF/Slurm jobs (--scheduler lsf|slurm)")
    jobs.add_argument("--scheduler", choices=("local", "lsf", "slurm"), default="local",
                      help="local: ranks on this machine (default); lsf/slurm: one job per run")
    jobs.add_argument("--max-nodes", type=int, default=1,
                      help="nodes a job may allocate; larger batches are simulated on that many (default 1)")
    jobs.add_argument("--ranks-per-node", type=int, help="CPU nodes (--gpus-per-node 0): ranks per node")
    jobs.add_argument("--cpus-per-rank", type=int, help="CPU nodes: CPUs per rank")
    jobs.add_argument("--project", help="LSF allocation to charge (#BSUB -P)")
    jobs.add_argument("--queue", help="LSF queue / Slurm partition")
    jobs.add_argument("--time", default="00:30", help="wall time per job, HH:MM (default 00:30)")
    jobs.add_argument("--controller", choices=("gloo", "mpi"), help="Horovod controller in the job")
    jobs.add_argument("--submit", action="store_true", help="submit the rendered jobs (bsub/sbatch)")
    return parser


def run_local(plan: dict[str, Any], out: Path, timeout: float) -> None:
    """Every run of ``plan`` with its ranks on this machine; a run that completed before is kept."""
    from tqdm import tqdm

    from tsm_dist.config import dump_config, load_config
    from tsm_dist.runlog.records import METRICS_FILE, read_last_run

    runs = [StudyRun(**r) for r in plan["runs"]]
    bar = tqdm(runs, unit="run", file=sys.stderr, dynamic_ncols=True)
    for run in bar:
        bar.set_description(f"{run.optimizer} batch {run.batch}{'*' if run.simulated else ''} seed {run.seed}")
        workdir = out / "runs" / run.tag
        metrics = workdir / METRICS_FILE
        if metrics.is_file() and read_last_run(metrics).status == "completed":
            continue
        # a run that did not complete starts again from scratch: its records and checkpoints move aside
        again = ["--start-over"] if metrics.is_file() or (workdir / "checkpoints").is_dir() else []
        config = workdir / "run_config.yaml"
        workdir.mkdir(parents=True, exist_ok=True)
        dump_config(load_config(plan["config"], [*plan["overrides"], *run_overrides(run)]), config)
        command = [*launch_prefix(plan["launcher"], run.ranks), sys.executable, "-m", "tsm_dist.training.train",
                   "--config", str(config), "--workdir", str(workdir), *again]
        started = time.perf_counter()
        error = run_logged(command, run.ranks, workdir / "train.log", timeout)
        (workdir / "study_run.json").write_text(json.dumps(
            {"error": error, "wall_s": time.perf_counter() - started, "command": command}))
        if error:
            bar.write(f"{run.tag}: {error}\n{tail(workdir / 'train.log', 5)}")


def parse_args(argv: list[str]) -> tuple[StudyOptions, Path, float, JobOptions | None, bool]:
    """(the study's options, the output directory, the per-run timeout, the job options of a scheduler
    study or None, whether to submit)."""
    args = build_parser().parse_args(argv)
    options = StudyOptions(config=args.config, batches=args.batches, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                           optimizers=args.optimizers, seeds=args.seeds, epochs=args.epochs, ranks=args.ranks,
                           launcher=args.launcher, data=args.data, overrides=args.overrides, quick=args.quick,
                           scheduler=args.scheduler, max_nodes=args.max_nodes, ranks_per_node=args.ranks_per_node)
    jobs = None if args.scheduler == "local" else JobOptions(
        scheduler=args.scheduler, gpus_per_node=args.gpus_per_node, ranks_per_node=args.ranks_per_node,
        cpus_per_rank=args.cpus_per_rank, project=args.project, queue=args.queue, time=args.time,
        controller=args.controller)
    # absolute: the job scripts hold its paths, and sbatch/bsub run them from another directory
    return options, args.out.resolve(), args.timeout, jobs, args.submit


def run_study(argv: list[str]) -> int:
    import shlex

    from tsm_dist.scheduler.render import RenderError
    from tsm_dist.studies.batch_size.submit import render_and_submit
    from tsm_dist.studies.batch_size.report import report
    from tsm_dist.scheduler.submit import SubmitError

    options, out, timeout, jobs, submit = parse_args(argv)
    if out.exists() and not out.is_dir():
        print(f"batch-study: --out {out} is a file; --out names the study's directory", file=sys.stderr)
        return 2
    try:
        plan = plan_study(options)
    except ValueError as exc:
        print(f"batch-study: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN_FILE).write_text(json.dumps(plan, indent=2))
    ensure_data(Path(plan["data"]) if plan["data"] else None, options.quick)
    where = f"{options.ranks} local ranks" if jobs is None else f"{options.scheduler} jobs"
    print(f"batch study: {len(plan['runs'])} runs of {plan['epochs']} epochs on {where} -> {out}", flush=True)
    if jobs is not None:
        try:  # RenderError and SubmitError name the option or quote the scheduler: one line
            print(render_and_submit(plan, out, jobs, "python -m tsm_dist.batch_study " + shlex.join(argv), submit))
        except (RenderError, SubmitError) as exc:
            print(f"batch-study: {exc}", file=sys.stderr)
            return 2
        return 0
    run_local(plan, out, timeout)
    print(report(out))
    return 0


def collect_main(argv: list[str]) -> int:
    from tsm_dist.studies.batch_size.report import report

    parser = argparse.ArgumentParser(prog="python -m tsm_dist.batch_study collect",
                                     description="rebuild the table and figures of a study directory")
    parser.add_argument("out", type=Path)
    parser.add_argument("--last-n", type=int, help="checkpoints per run to average (default: the study's eval.last_n)")
    parser.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                        help="scheduler studies: wait up to this long for the jobs first (default: do not wait)")
    args = parser.parse_args(argv)
    if not (args.out / PLAN_FILE).is_file():
        print(f"batch-study collect: {args.out / PLAN_FILE} is missing (not a study directory)", file=sys.stderr)
        return 2
    from tsm_dist.studies.batch_size.submit import refresh

    try:
        plan = json.loads((args.out / PLAN_FILE).read_text())
    except (ValueError, OSError) as exc:
        print(f"batch-study collect: {args.out / PLAN_FILE} cannot be read as a study plan ({exc})", file=sys.stderr)
        return 2
    refresh(plan, args.out.resolve(), args.wait)
    print(report(args.out, last_n=args.last_n))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["collect"]:
        return collect_main(argv[1:])
    return run_study(argv)

"""Study runs as LSF/Slurm jobs: render, submit, wait, read back (one job source for every study).

The scaling sweep and the batch-size study plan their runs, then hand them to this module, which renders
one job script per run from ``jobs/job.sh.tmpl`` (through :func:`tsm_dist.scheduler.render.render_job`),
submits it with ``bsub``/``sbatch``, waits for the jobs and reads each run's outcome from its
``metrics.jsonl``. Paths of a run (config, workdir, script) are relative to the study directory ``out``::

    runs = [JobSpec(tag="b64", config="jobs/b64/b64.yaml", workdir="runs/b64", run_nodes=2)]
    opts = JobOptions(scheduler="slurm", gpus_per_node=0, ranks_per_node=2, cpus_per_rank=1, time="00:20")
    render_jobs(runs, out, opts, command="python -m tsm_dist.batch_study ...")  # out/jobs/<tag>/job.sbatch
    submit_jobs(runs, out, opts.scheduler, on_submitted=lambda run: plan.save(out))
    wait_for_jobs(runs, opts.scheduler, timeout_s=3600)  # until no job is pending or running
    refresh_status(runs, out, opts.scheduler)            # completed / failed: cause / running / ...

Any object with the attributes of :class:`StudyRun` works (the sweep's ``JobSpec`` is one), so a study
keeps its own plan file and records ``script``, ``job_id`` and ``status`` in it.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

from tsm_dist.runlog.records import METRICS_FILE, MetricsError, read_last_run

SUBMIT = {"lsf": "bsub", "slurm": "sbatch"}
SCRIPT_SUFFIX = {"lsf": "lsf", "slurm": "sbatch"}
# scheduler states of a job that has not finished yet (Slurm squeue %T, LSF bjobs STAT)
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "PEND", "RUN", "PSUSP", "USUSP",
                 "SSUSP", "WAIT", "PROV"}


class StudyRun(Protocol):
    """What this module needs of a planned run (paths relative to the study directory)."""

    tag: str  # job name and directory name: letters, digits, . _ + -
    config: str  # the run's resolved trainer config
    workdir: str  # the trainer's --workdir (metrics.jsonl, checkpoints)
    run_nodes: int  # nodes the job allocates
    script: str  # filled by render_jobs
    job_id: str  # filled by submit_jobs
    status: str  # planned | submitted | completed | failed... (see refresh_status)


@dataclass
class JobSpec:
    """A plain :class:`StudyRun`, with trainer overrides and an optional program to run after training
    on the same allocation (``python -m then_module then_args``, e.g. an evaluation)."""

    tag: str
    config: str
    workdir: str
    run_nodes: int = 1
    overrides: list[str] = field(default_factory=list)
    then_module: str = ""
    then_args: list[str] = field(default_factory=list)
    script: str = ""
    job_id: str = ""
    status: str = "planned"


@dataclass(frozen=True)
class JobOptions:
    """What every job of a study shares: the scheduler and the per-node layout of its allocation.

    ``gpus_per_node`` 0 renders CPU jobs (no GRES request) with ``ranks_per_node`` ranks of
    ``cpus_per_rank`` CPUs each (Slurm; default: the whole node shared by its ranks).
    """

    scheduler: str  # lsf | slurm
    gpus_per_node: int
    ranks_per_node: int | None = None
    cpus_per_rank: int | None = None
    project: str | None = None
    queue: str | None = None
    time: str = "00:30"
    controller: str | None = None
    resource_sets: str | None = None  # LSF; default per-gpu for GPU jobs, per-node for CPU jobs
    python: str | None = None  # interpreter on the compute nodes (default: this one)

def render_jobs(runs: Sequence[StudyRun], out: Path, options: JobOptions, command: str = "",
                extra: Callable[[StudyRun], dict] | None = None) -> None:
    """Write ``out/jobs/<tag>/job.<lsf|sbatch>`` for every run and set ``run.script``.

    ``command`` is recorded in each script (how to re-render it); ``extra(run)`` adds
    :func:`~tsm_dist.scheduler.render.render_job` options for one run (the sweep's microbenchmark step).
    Raises :class:`~tsm_dist.scheduler.render.RenderError` naming a bad option.
    """
    from tsm_dist.scheduler.render import render_job

    out = Path(out)
    resource_sets = options.resource_sets or ("per-gpu" if options.gpus_per_node > 0 else "per-node")
    for run in runs:
        script = out / "jobs" / run.tag / f"job.{SCRIPT_SUFFIX[options.scheduler]}"
        then = {"then_module": run.then_module, "then_args": run.then_args} if getattr(run, "then_module", "") else {}
        text = render_job(options.scheduler, run.run_nodes, options.gpus_per_node, str(out / run.config),
                          project=options.project, time=options.time, job_name=run.tag,
                          workdir=str(out / run.workdir), overrides=list(getattr(run, "overrides", ())),
                          ranks_per_node=options.ranks_per_node, cpus_per_rank=options.cpus_per_rank,
                          resource_sets=resource_sets, controller=options.controller, queue=options.queue,
                          python=options.python, command=command or None, check_config=False,
                          **{**then, **(extra(run) if extra else {})})
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(text)
        script.chmod(0o755)
        run.script = str(script.relative_to(out))


class SubmitError(RuntimeError):
    """bsub/sbatch refused a job; the message names the script and quotes the scheduler."""


def parse_job_id(scheduler: str, stdout: str) -> str:
    """The job id in ``sbatch --parsable`` ("123" or "123;cluster") or ``bsub`` ("Job <123> is submitted")."""
    text = stdout.strip()
    m = re.search(r"Job <(\d+)>", text) if scheduler == "lsf" else re.match(r"(\d+)", text.splitlines()[-1] if text else "")
    if m is None:
        raise SubmitError(f"{SUBMIT[scheduler]} printed no job id: {text!r}")
    return m.group(1)


def submit_job(scheduler: str, script: Path, cwd: Path) -> str:
    """Submit one script from ``cwd`` (where its relative paths and log files go); return the job id."""
    tool = shutil.which(SUBMIT[scheduler])
    if tool is None:
        raise SubmitError(f"{SUBMIT[scheduler]} not found on PATH: submit from a login node of the cluster")
    if scheduler == "lsf":  # bsub reads the #BSUB lines only from a script given on stdin
        with open(script) as stdin:
            result = subprocess.run([tool], stdin=stdin, capture_output=True, text=True, cwd=cwd)
    else:
        result = subprocess.run([tool, "--parsable", str(script)], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        raise SubmitError(f"{SUBMIT[scheduler]} {script} failed (exit {result.returncode}): "
                          f"{result.stderr.strip() or result.stdout.strip()}")
    return parse_job_id(scheduler, result.stdout)


def submit_jobs(runs: Sequence[StudyRun], out: Path, scheduler: str,
                on_submitted: Callable[[StudyRun], None] | None = None) -> None:
    """Submit every rendered run from ``out``; ``on_submitted(run)`` after each (save the plan there, so a
    failure half-way leaves the ids of the jobs already queued). Raises :class:`SubmitError`."""
    for run in runs:
        run.job_id = submit_job(scheduler, Path(out) / run.script, Path(out))
        run.status = "submitted"
        print(f"[{run.tag}] job {run.job_id}", flush=True)
        if on_submitted is not None:
            on_submitted(run)


def job_states(scheduler: str, job_ids: Iterable[str]) -> dict[str, str] | None:
    """Scheduler state of each job it still knows (``RUNNING``, ``COMPLETED``, ``DONE``, ...); a job
    missing from the answer has left the scheduler's memory (finished). None: no scheduler to ask."""
    ids = [i for i in job_ids if i]
    if not ids:
        return {}
    if scheduler == "slurm":
        command = ["squeue", "-h", "-t", "all", "-o", "%i %T", "-j", ",".join(ids)]
    elif scheduler == "lsf":
        command = ["bjobs", "-noheader", "-a", "-o", "jobid stat", *ids]
    else:
        return None
    if shutil.which(command[0]) is None:
        return None
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    states = {}
    for line in result.stdout.splitlines():  # squeue exits 1 when every id is gone: then none is listed
        parts = line.split()
        if len(parts) == 2 and parts[0] in ids:
            states[parts[0]] = parts[1].upper()
    return states


def wait_for_jobs(runs: Sequence[StudyRun], scheduler: str, timeout_s: float, poll_s: float = 5.0) -> None:
    """Block until no job of ``runs`` is pending or running (a requeued job counts as pending)."""
    deadline = time.monotonic() + timeout_s
    ids = [run.job_id for run in runs if run.job_id]
    while True:
        states = job_states(scheduler, ids)
        if states is None:
            raise SubmitError(f"cannot ask {scheduler} about jobs {', '.join(ids)}: squeue/bjobs not found")
        active = {i: s for i, s in states.items() if s in ACTIVE_STATES}
        if not active:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs still active after {timeout_s:.0f} s: "
                               + ", ".join(f"{i} {s}" for i, s in sorted(active.items())))
        time.sleep(poll_s)


def job_log(scheduler: str, tag: str, job_id: str) -> str:
    """The job's log file, relative to the directory it was submitted from (the template's ``-o``/``--output``)."""
    return f"{tag}.{job_id}.out" if scheduler == "lsf" else f"{tag}-{job_id}.out"


def run_outcome(metrics: Path, job_active: bool | None, state: str = "", log: Path | None = None) -> str:
    """A run's status from its metrics file: the ``end`` record's (``failed: cause`` when it names one);
    without an end record ``running`` while its job is active, else ``failed`` (the job is over and no
    rank said how it ended). ``job_active`` None: unknown (no scheduler to ask); ``state``: the
    scheduler's (``CANCELLED``, ...) when it still knows the job; ``log``: the job's log file, which a job
    that never ran does not have."""
    if not metrics.is_file():
        if job_active is False:
            return _never_wrote(metrics, state, log)
        return "running" if job_active else "no metrics"
    try:
        run = read_last_run(metrics)
    except MetricsError as err:
        return f"unusable metrics: {err}"
    if run.end is not None:
        cause = run.end.get("cause") or run.end.get("error")
        return f"{run.status}: {cause}" if cause and run.status != "completed" else run.status
    if job_active is False:
        return "failed: the job ended without an end record (ranks killed?)"
    return "running"


def _never_wrote(metrics: Path, state: str, log: Path | None) -> str:
    """A job that is over without a metrics file: cancelled before it started, or a trainer that did not."""
    has_log = log is not None and log.exists()
    if state.startswith("CANCELLED"):
        return (f"cancelled before the trainer started (see the job log {log.name})" if has_log else
                f"cancelled before it started (while pending: no {metrics.name}" +
                (", no job log)" if log is not None else ")"))
    if log is not None and not has_log:
        return (f"failed: no {metrics.name} and no job log {log.name} (the job never ran: cancelled while "
                f"pending, or its log went elsewhere)")
    return f"failed: no {metrics.name} (the trainer did not start; see the job log{f' {log.name}' if log else ''})"


def refresh_status(runs: Sequence[StudyRun], out: Path, scheduler: str) -> None:
    """Set every submitted run's ``status`` from its metrics file and the scheduler's view of its job."""
    states = job_states(scheduler, [run.job_id for run in runs])
    for run in runs:
        if not run.job_id:
            continue
        state = (states or {}).get(run.job_id, "")
        active = None if states is None else state in ACTIVE_STATES
        run.status = run_outcome(Path(out) / run.workdir / METRICS_FILE, active, state,
                                 Path(out) / job_log(scheduler, run.tag, run.job_id))

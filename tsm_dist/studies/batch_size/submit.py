"""The batch-size study as LSF/Slurm jobs: one job per run through the studies' one job path
(:mod:`tsm_dist.scheduler.submit`: ``jobs/job.sh.tmpl`` rendered by ``tsm_dist.scheduler.render``, then
``bsub``/``sbatch``). Each run's resolved config is ``OUT/jobs/<tag>/<tag>.yaml``, its trainer writes
``OUT/runs/<tag>/metrics.jsonl`` as a local run does, and ``plan.json`` records each job's script, id and
status under ``"jobs"``, so ``collect`` reads a scheduler study like a local one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from tsm_dist.studies.batch_size.runs import PLAN_FILE, StudyRun, run_overrides
from tsm_dist.scheduler.submit import JobOptions, JobSpec, refresh_status, render_jobs, submit_jobs, wait_for_jobs


def job_specs(plan: dict[str, Any], out: Path) -> list[JobSpec]:
    """Write every run's config and return its job spec (paths relative to ``out``)."""
    from tsm_dist.config import dump_config, load_config

    specs = []
    for entry in plan["runs"]:
        run = StudyRun(**entry)
        config = Path("jobs") / run.tag / f"{run.tag}.yaml"
        if not (out / config).is_file():  # written once, when the jobs are rendered
            (out / config).parent.mkdir(parents=True, exist_ok=True)
            dump_config(load_config(plan["config"], [*plan["overrides"], *run_overrides(run)]), out / config)
        recorded = plan.get("jobs", {}).get(run.tag, {})
        specs.append(JobSpec(tag=run.tag, config=str(config), workdir=f"runs/{run.tag}", run_nodes=run.nodes,
                             script=recorded.get("script", ""), job_id=recorded.get("job_id", ""),
                             status=recorded.get("status", "planned")))
    return specs


def save_jobs(plan: dict[str, Any], specs: Sequence[JobSpec], out: Path) -> None:
    plan["jobs"] = {s.tag: {"script": s.script, "job_id": s.job_id, "status": s.status} for s in specs}
    (out / PLAN_FILE).write_text(json.dumps(plan, indent=2))


def render_and_submit(plan: dict[str, Any], out: Path, options: JobOptions, command: str, submit: bool) -> str:
    """Render one job script per run (and submit them); returns what to run next."""
    specs = job_specs(plan, out)
    render_jobs(specs, out, options, command=command)
    save_jobs(plan, specs, out)
    if not submit:
        return f"{len(specs)} job scripts in {out / 'jobs'}; submit them with --submit (or by hand)"
    submit_jobs(specs, out, options.scheduler, on_submitted=lambda _: save_jobs(plan, specs, out))
    return f"{len(specs)} jobs submitted; then: python -m tsm_dist.batch_study collect {out} [--wait]"


def refresh(plan: dict[str, Any], out: Path, wait_s: float) -> None:
    """Wait up to ``wait_s`` for the study's jobs (0: not at all), then record each run's status."""
    specs = job_specs(plan, out) if plan.get("jobs") else []
    if not specs:
        return
    if wait_s:
        wait_for_jobs(specs, plan["scheduler"], wait_s)
    refresh_status(specs, out, plan["scheduler"])
    save_jobs(plan, specs, out)

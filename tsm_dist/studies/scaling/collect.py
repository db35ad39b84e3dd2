"""Collect a scaling sweep: per-run measurements -> CSV, Markdown table and the two plots.

Measured numbers come from each run's ``metrics.jsonl`` (trainer contract) after its warm-up steps.
Projected numbers come from the ring-allreduce cost model fed with the measured single-node step time and
the allreduce latency/bandwidth fitted from the microbenchmark run on the sweep's own allocation (or, where
nothing was measured, the machine profile's nominal links). Every projected figure is labelled as such.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import mean
from typing import Any

from tsm_dist.runlog.records import METRICS_FILE, MetricsError, read_last_run
from tsm_dist.studies.scaling.costmodel import (STEP_SMALL_COLLECTIVES, LinkCost, gradient_bytes, project_step_time,
                                        unmodelled_overhead)
from tsm_dist.scheduler.submit import ACTIVE_STATES, job_log, job_states, run_outcome
from tsm_dist.studies.scaling.machines import MachineProfile, load_machine
from tsm_dist.studies.scaling.runs import JobSpec, SweepPlan
from tsm_dist.studies.tables import pyplot, write_csv

BENCH_FILES = {"engine": "allreduce_engine.json", "mpi4py": "allreduce_mpi4py.json"}


@dataclass
class RunSummary:
    """What one run's metrics.jsonl says after its warm-up steps."""

    engine: str
    model: str
    world_size: int
    per_gpu_batch: int
    accumulate: int
    global_batch: int
    num_frames: int
    params: int
    fp16_compression: bool
    status: str
    timed_steps: int
    step_time_s: float
    data_time_s: float
    compute_time_s: float
    sync_time_s: float

    @property
    def clips_per_sec(self) -> float:
        return self.global_batch / self.step_time_s

    @property
    def grad_bytes(self) -> float:
        return gradient_bytes(self.params, self.fp16_compression)


@dataclass
class BenchResult:
    method: str
    world_size: int
    nodes: int
    link: LinkCost | None
    note: str = ""


@dataclass
class Row:
    """One line of the results table: a node count of one (engine, model)."""

    engine: str
    model: str
    nodes: int
    gpus: int
    simulated: bool
    run_nodes: int
    accumulate: int
    global_batch: int
    frames_per_batch: int
    status: str
    timed_steps: int = 0
    step_time_s: float = math.nan
    data_time_s: float = math.nan
    compute_time_s: float = math.nan
    sync_time_s: float = math.nan
    clips_per_sec: float = math.nan  # measured; for a simulated row, on run_nodes with accumulation
    ideal_clips_per_sec: float = math.nan
    # the 1-node run the ideal comes from, when it did not complete (its speed is from the steps before its end)
    ideal_from: str = ""
    scalability: float = math.nan
    projected_clips_per_sec: float = math.nan
    projected_scalability: float = math.nan
    projection_links: str = ""
    # the link model vs the measurement (points of scalability, projected - measured), and the projection
    # calibrated with what the widest real run took beyond the model (costmodel.unmodelled_overhead)
    projection_error_points: float = math.nan
    unmodelled_s: float = math.nan
    calibrated_clips_per_sec: float = math.nan
    calibrated_scalability: float = math.nan
    epoch_time_s: float = math.nan
    train_time_s: float = math.nan
    time_basis: str = ""  # "measured" or "projected"


def _need(record: dict[str, Any], key: str, path: Path) -> Any:
    if key not in record:
        raise MetricsError(f"{path}: {record['type']} record lacks key {key!r}")
    return record[key]


def summarize_run(path: Path, warmup_steps: int) -> RunSummary:
    """Average the step records of ``path`` after the first ``warmup_steps`` optimizer steps."""
    run = read_last_run(path)  # the file is appended to: only the last run in it is the measurement
    header = run.header
    if run.membership:  # an elastic run that lost or gained ranks timed more than one world
        raise MetricsError(f"{path}: the run's ranks changed ({run.world_sizes()}): its steps are not a "
                           f"measurement at one world size")
    timed = run.steps[warmup_steps:]
    if not timed:
        raise MetricsError(f"{path}: {len(run.steps)} step record(s), none after the {warmup_steps} warm-up "
                           f"step(s); was log.interval > 1 or the run cut short?")
    engine_cfg = header["config"].get("engine") or {}

    def avg(key: str) -> float:
        return mean(float(_need(r, key, path)) for r in timed)

    return RunSummary(
        engine=str(header["engine"]), model=str(header["model"]), world_size=int(header["world_size"]),
        per_gpu_batch=int(header["per_gpu_batch"]), accumulate=int(header["accumulate"]),
        global_batch=int(header["global_batch"]), num_frames=int(header["num_frames"]),
        params=int(header["params"]), fp16_compression=bool(engine_cfg.get("fp16_compression", False)),
        status=run.status,
        timed_steps=len(timed), step_time_s=avg("step_time"), data_time_s=avg("data_time"),
        compute_time_s=avg("compute_time"), sync_time_s=avg("sync_time"))


def read_bench(path: Path) -> BenchResult:
    """An allreduce_bench result; ``link`` is None where its timings could not be fitted (reason in note)."""
    try:
        data = json.loads(path.read_text())
        p, nodes = int(data["world_size"]), int(data["nodes"])
        source = f"{data['method']} allreduce microbenchmark, {p} ranks on {nodes} node(s)"
        alpha, bandwidth = data["alpha_s"], data["bandwidth_bytes_per_s"]
        link = None if alpha is None else LinkCost(float(alpha), float(bandwidth), source=source)
        return BenchResult(method=str(data["method"]), world_size=p, nodes=nodes, link=link,
                           note=str(data.get("fit_error", "")))
    except KeyError as err:
        raise MetricsError(f"{path}: allreduce benchmark result lacks key {err}") from err
    except (TypeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise MetricsError(f"{path}: not an allreduce benchmark result ({err})") from err


def _check_against_plan(summary: RunSummary, job: JobSpec, plan: SweepPlan) -> None:
    batch = job.nodes * plan.ranks_per_node * plan.per_gpu_batch
    if summary.engine != job.engine or summary.model != job.model:
        raise MetricsError(f"{job.workdir}: metrics.jsonl is from {summary.engine}/{summary.model}, the plan "
                           f"expects {job.engine}/{job.model}")
    if summary.global_batch != batch:
        raise MetricsError(f"{job.workdir}: global batch {summary.global_batch} in metrics.jsonl, but the plan "
                           f"expects {batch} ({job.nodes} nodes x {plan.ranks_per_node} {plan.rank_word}s x "
                           f"{plan.per_gpu_batch} clips)")


def _job_row(plan: SweepPlan, job: JobSpec, summary: RunSummary | None, status: str) -> Row:
    gpus = job.nodes * plan.ranks_per_node
    row = Row(engine=job.engine, model=job.model, nodes=job.nodes, gpus=gpus, simulated=job.simulated,
              run_nodes=job.run_nodes, accumulate=job.accumulate, global_batch=gpus * plan.per_gpu_batch,
              frames_per_batch=0, status=status)
    if summary is not None:
        row.frames_per_batch = summary.global_batch * summary.num_frames
        row.timed_steps = summary.timed_steps
        row.step_time_s, row.data_time_s = summary.step_time_s, summary.data_time_s
        row.compute_time_s, row.sync_time_s = summary.compute_time_s, summary.sync_time_s
        row.clips_per_sec = summary.clips_per_sec
    return row


def _links(plan: SweepPlan, jobs: list[JobSpec], out_dir: Path, machine: MachineProfile
           ) -> tuple[LinkCost, LinkCost, list[BenchResult]]:
    """Intra- and inter-node links for one (engine, model): measured where possible, else the profile's,
    each labelled with where it came from and, for the profile's, why nothing measured was used."""
    benches: list[BenchResult] = []
    measured: dict[str, LinkCost] = {}
    failures: dict[str, list[str]] = {"intra": [], "inter": []}
    # the widest real allocation is the best stand-in for larger ones; engine timings beat mpi4py's
    for job in sorted((j for j in jobs if not j.simulated), key=lambda j: j.run_nodes):
        scope = "intra" if job.run_nodes == 1 else "inter"
        for method in ("mpi4py", "engine"):
            path = out_dir / job.workdir / BENCH_FILES[method]
            if not path.is_file():
                continue
            try:
                bench = read_bench(path)
            except MetricsError as err:
                bench = BenchResult(method, 0, job.run_nodes, link=None, note=str(err))
            benches.append(bench)
            if bench.link is None:
                failures[scope].append(f"{job.workdir}/{path.name}: {bench.note or 'not fitted'}")
            else:
                measured[scope] = replace(bench.link, source=f"measured, {bench.link.source} ({job.workdir})")
    profile = {"intra": machine.intra_cost(), "inter": machine.inter_cost()}
    if plan.gpus_per_node == 0 and machine.gpus_per_node > 0:  # say so, rather than let NVLink pass for CPU ranks
        profile = {k: replace(v, source=f"{v.source}, a GPU link: this sweep ran CPU ranks") for k, v in profile.items()}
    links = {}
    for scope in ("intra", "inter"):
        if scope in measured:
            links[scope] = measured[scope]
            continue
        why = "; ".join(failures[scope]) or _no_bench_reason(plan, jobs, scope)
        links[scope] = replace(profile[scope], source=f"fallback to the machine profile ({profile[scope].source}, "
                                                      f"nominal) because {why}")
    return links["intra"], links["inter"], benches


def _no_bench_reason(plan: SweepPlan, jobs: list[JobSpec], scope: str) -> str:
    real = [j for j in jobs if not j.simulated and (j.run_nodes == 1) == (scope == "intra")]
    if not real:
        return "the sweep has no " + ("1-node run" if scope == "intra" else "multi-node run")
    if scope == "intra" and plan.ranks_per_node == 1:
        return "a node runs one rank: no intra-node allreduce to measure"
    return "no microbenchmark result (the run failed, or its benchmark step did not run: see its job log)"


def _job_active(plan: SweepPlan, job: JobSpec, states: dict[str, str] | None) -> bool | None:
    """Whether the run may still write its metrics (None: cannot tell)."""
    if plan.scheduler == "local":  # a local sweep ran its jobs to their end before collecting
        return None if job.status in ("planned", "submitted") else False
    if not job.job_id or states is None:
        return None
    return states.get(job.job_id) in ACTIVE_STATES


def build_rows(plan: SweepPlan, out_dir: Path, machine: MachineProfile,
               states: dict[str, str] | None = None) -> tuple[list[Row], list[BenchResult]]:
    """The table's rows; ``states``: the scheduler's job states (:func:`tsm_dist.scheduler.submit.job_states`),
    so that a run whose job is over without an ``end`` record is called failed, not running."""
    rows: list[Row] = []
    all_benches: list[BenchResult] = []
    groups: dict[tuple[str, str], list[JobSpec]] = {}
    for job in plan.jobs:
        groups.setdefault((job.engine, job.model), []).append(job)
    for (engine, model), jobs in groups.items():
        summaries: dict[str, RunSummary] = {}
        group_rows = []
        for job in sorted(jobs, key=lambda j: j.nodes):
            path = out_dir / job.workdir / METRICS_FILE
            state = (states or {}).get(job.job_id, "") if job.job_id else ""
            log = out_dir / job_log(plan.scheduler, job.tag, job.job_id) if job.job_id and plan.scheduler != "local" \
                else None
            status = run_outcome(path, _job_active(plan, job, states), state, log)
            summary = None
            if status == "no metrics":
                status = f"no metrics ({job.status})"
            elif path.is_file():
                try:  # one bad run is reported in its row; the rest of the sweep is still tabulated
                    summary = summarize_run(path, plan.warmup_steps)
                    _check_against_plan(summary, job, plan)
                except MetricsError as err:  # a failed run's cause says more than its missing steps
                    summary, status = None, status if status.startswith("failed") else f"unusable metrics: {err}"
                else:
                    summaries[job.tag] = summary
            group_rows.append(_job_row(plan, job, summary, status))
        intra, inter, benches = _links(plan, jobs, out_dir, machine)
        all_benches += benches
        single_job = next((j for j in jobs if j.nodes == 1 and j.tag in summaries), None)
        single = summaries[single_job.tag] if single_job else None
        for row in group_rows:
            _fill_speeds(row, single, plan, intra, inter)
            if single is not None and single.status != "completed":
                row.ideal_from = (f"{single_job.workdir}, which ended {single.status} after {single.timed_steps} "
                                  f"timed step(s)")
        _calibrate(group_rows, jobs, summaries, single, plan, intra, inter)
        rows += group_rows
    rows.sort(key=lambda r: (r.model, r.nodes, r.engine))
    return rows, all_benches


def _calibrate(rows: list[Row], jobs: list[JobSpec], summaries: dict[str, RunSummary],
               single: RunSummary | None, plan: SweepPlan, intra: LinkCost, inter: LinkCost) -> None:
    """Projection calibrated at the widest real multi-node run of this (engine, model)."""
    widest = max((j for j in jobs if not j.simulated and j.nodes > 1 and j.tag in summaries),
                 key=lambda j: j.nodes, default=None)
    if single is None or widest is None:
        return
    measured = summaries[widest.tag]
    overhead = unmodelled_overhead(single.step_time_s, measured.step_time_s, widest.nodes, plan.ranks_per_node,
                                   single.grad_bytes, intra=intra, inter=inter, accumulate=widest.accumulate,
                                   small_collectives=STEP_SMALL_COLLECTIVES)
    for row in rows:
        step = project_step_time(single.step_time_s, row.nodes, plan.ranks_per_node, single.grad_bytes,
                                 intra=intra, inter=inter, overhead_s=overhead,
                                 small_collectives=STEP_SMALL_COLLECTIVES)
        row.unmodelled_s = overhead
        row.calibrated_clips_per_sec = row.global_batch / step
        row.calibrated_scalability = row.calibrated_clips_per_sec / row.ideal_clips_per_sec


def _fill_speeds(row: Row, single: RunSummary | None, plan: SweepPlan, intra: LinkCost, inter: LinkCost) -> None:
    if single is not None:
        single_speed = single.clips_per_sec
        row.ideal_clips_per_sec = single_speed * row.nodes
        if not row.simulated and not math.isnan(row.clips_per_sec):
            row.scalability = row.clips_per_sec / row.ideal_clips_per_sec
        step = project_step_time(single.step_time_s, row.nodes, plan.ranks_per_node, single.grad_bytes,
                                 intra=intra, inter=inter, small_collectives=STEP_SMALL_COLLECTIVES)
        row.projected_clips_per_sec = row.global_batch / step
        row.projected_scalability = row.projected_clips_per_sec / row.ideal_clips_per_sec
        row.projection_links = f"intra: {intra.source}; inter: {inter.source}"
        if not math.isnan(row.scalability):
            row.projection_error_points = 100 * (row.projected_scalability - row.scalability)
    measured = not row.simulated and not math.isnan(row.clips_per_sec)
    speed = row.clips_per_sec if measured else row.projected_clips_per_sec
    if not math.isnan(speed) and plan.dataset_size > 0:
        row.epoch_time_s = plan.dataset_size / speed
        row.train_time_s = row.epoch_time_s * plan.epochs
        row.time_basis = "measured" if measured else "projected"


def format_duration(seconds: float) -> str:
    """Table 12 style: '49h 55m', '55m 56s', '14m 13s'."""
    if math.isnan(seconds):
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _num(value: float, fmt: str = "{:,.1f}") -> str:
    return "-" if math.isnan(value) else fmt.format(value)


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}%"


def markdown_table(rows: list[Row], plan: SweepPlan, benches: list[BenchResult]) -> str:
    epochs = plan.epochs
    lines = [
        f"# Scaling sweep ({plan.scheduler}, machine profile {plan.machine}, {plan.ranks_per_node} "
        f"{plan.rank_word}(s) per node, {plan.per_gpu_batch} clips per {plan.rank_word}, {plan.steps} timed steps "
        f"after {plan.warmup_steps} warm-up)",
        "",
        f"| Engine | Model | #Node | #{'GPU' if plan.gpus_per_node else 'Rank'} | Batch | #Frames | Clips/s (measured) | "
        f"Ideal clips/s | Scalability (measured) | Clips/s (projected) | Scalability (projected) | "
        f"Projected - measured | Scalability (calibrated) | Time/epoch | Time, {epochs} epochs | Status |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        star = "*" if r.simulated else ""
        measured = _num(r.clips_per_sec) if not r.simulated else "-"
        time_mark = " (proj.)" if r.time_basis == "projected" else ""
        frames = f"{r.frames_per_batch:,}" if r.frames_per_batch else "-"  # unknown without the run's header
        lines.append(
            f"| {r.engine} | {r.model} | {r.nodes}{star} | {r.gpus}{star} | {r.global_batch:,} | "
            f"{frames} | {measured} | {_num(r.ideal_clips_per_sec)}{'†' if r.ideal_from else ''} | "
            f"{_pct(r.scalability)} | "
            f"{_num(r.projected_clips_per_sec)} | {_pct(r.projected_scalability)} | "
            f"{_num(r.projection_error_points, '{:+.1f} pts')} | {_pct(r.calibrated_scalability)} | "
            f"{format_duration(r.epoch_time_s)}{time_mark} | {format_duration(r.train_time_s)}{time_mark} | "
            f"{r.status.replace('|', '/')} |")
    lines += ["", f"Data set: {plan.dataset_size:,} clips; time/epoch = data set size / clips/s (measured speed "
              f"where measured, else projected, marked '(proj.)').",
              "Ideal = single-node clips/s x nodes; scalability = clips/s / ideal."]
    lines += [f"† Ideal from a 1-node run that did not complete: {src} (its speed, not a finished run's)."
              for src in sorted({f"{r.engine}/{r.model}: {r.ideal_from}" for r in rows if r.ideal_from})]
    simulated = [r for r in rows if r.simulated]
    if simulated:
        sims = ", ".join(f"{r.engine}/{r.model} {r.nodes}* on {r.run_nodes} nodes x {r.accumulate} accumulation "
                         f"({_num(r.clips_per_sec)} clips/s measured there)" for r in simulated)
        lines.append(f"\\* Simulated (as in the paper's Table 12): the effective batch of that node count is run on "
                     f"the largest real allocation with gradient accumulation; its speed columns are projections. "
                     f"{sims}.")
    links = sorted({f"{r.engine}/{r.model}: {r.projection_links}" for r in rows if r.projection_links})
    lines += ["", "**Projection** (cost model, not a measurement): step(n) = step(1) - allreduce(1 node) + "
              "allreduce(n nodes), allreduce(p ranks) = 2(p-1)·α + 2(p-1)/p·N/B, N = gradient bytes, plus the "
              "trainer's per-step metrics allreduce (a tree, 2·ceil(log2 p)·α), "
              "no compute/communication overlap assumed. 'Projected - measured' compares it with the "
              "measurement (points of scalability). 'Calibrated' adds, for n > 1 nodes, what the widest real run "
              "took per step beyond the model (contention of communication with compute on CPU ranks, "
              "stragglers; assumed constant per step as nodes are added)"
              + "".join(f"; {e}/{m}: {s * 1e3:+.1f} ms" for (e, m), s in sorted(_unmodelled(rows).items()))
              + ". Links used:"]
    lines += [f"- {link}" for link in links] or ["- none (no single-node measurement)"]
    if benches:
        lines += ["", "Allreduce microbenchmarks (fitted to the ring model):", "",
                  "| Method | Ranks | Nodes | α (µs) | B (GB/s) |", "|---|--:|--:|--:|--:|"]
        for b in benches:
            fit = (f"{b.link.alpha_s * 1e6:.1f} | {b.link.bandwidth_bytes_per_s / 1e9:.3f}" if b.link
                   else f"not fitted: {b.note} | -")
            lines.append(f"| {b.method} | {b.world_size} | {b.nodes} | {fit} |")
    return "\n".join(lines) + "\n"


def _unmodelled(rows: list[Row]) -> dict[tuple[str, str], float]:
    return {(r.engine, r.model): r.unmodelled_s for r in rows if not math.isnan(r.unmodelled_s)}


def _series(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    series: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        series.setdefault((r.model, r.engine), []).append(r)
    return series


def _log2_ticks(ax, values: list[int]) -> None:
    """Log2 axis labelled with the node/GPU counts themselves (1, 2, 4, ... rather than 2^k)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(values)
    ax.set_xticklabels([str(v) for v in values], rotation=45 if len(values) > 8 else 0)
    ax.minorticks_off()


def _mark_simulated(ax, points: list[tuple[float, float]]) -> None:
    for x, y in points:
        if not math.isnan(y):
            ax.annotate("*", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=12)


def _save(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(f"{xlabel} (* simulated with gradient accumulation)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def plot_speed(rows: list[Row], path: Path, unit: str = "GPUs") -> None:
    """Fig. 12: training speed vs number of GPUs (``unit``: what ``Row.gpus`` counts, "ranks" on CPU nodes)
    for every model, with the ideal line (marked when its 1-node run did not complete)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((model, engine), rs) in enumerate(sorted(_series(rows).items())):
        color = colors[i % len(colors)]
        label = f"{model} ({engine})"
        real = [r for r in rs if not r.simulated and not math.isnan(r.clips_per_sec)]
        if real:
            ax.plot([r.gpus for r in real], [r.clips_per_sec for r in real], "o-", color=color,
                    label=f"{label} measured")
        proj = [r for r in rs if not math.isnan(r.projected_clips_per_sec)]
        if proj:
            ax.plot([r.gpus for r in proj], [r.projected_clips_per_sec for r in proj], "s:", color=color,
                    mfc="none", label=f"{label} projected")
        ideal = [r for r in rs if not math.isnan(r.ideal_clips_per_sec)]
        if ideal:
            unfinished = " (from an unfinished 1-node run)" if any(r.ideal_from for r in ideal) else ""
            ax.plot([r.gpus for r in ideal], [r.ideal_clips_per_sec for r in ideal], "--", color=color,
                    alpha=0.5, label=f"{label} ideal{unfinished}")
    _log2_ticks(ax, sorted({r.gpus for r in rows}))
    ax.set_yscale("log")
    _mark_simulated(ax, [(r.gpus, r.projected_clips_per_sec) for r in rows if r.simulated])
    _save(fig, ax, path, f"Number of {unit}", "Training speed (clips/s)",
          f"Training speed vs {unit} (measured, projected, ideal)")


def plot_scalability(rows: list[Row], path: Path) -> None:
    """Fig. 9c: scalability (actual / ideal speed) vs number of nodes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((model, engine), rs) in enumerate(sorted(_series(rows).items())):
        color = colors[i % len(colors)]
        real = [r for r in rs if not math.isnan(r.scalability)]
        if real:
            ax.plot([r.nodes for r in real], [100 * r.scalability for r in real], "o-", color=color,
                    label=f"{model} ({engine}) measured")
        proj = [r for r in rs if not math.isnan(r.projected_scalability)]
        if proj:
            ax.plot([r.nodes for r in proj], [100 * r.projected_scalability for r in proj], "s:", color=color,
                    mfc="none", label=f"{model} ({engine}) projected")
    ax.axhline(100, color="gray", lw=0.8, ls="--")
    _log2_ticks(ax, sorted({r.nodes for r in rows}))
    ax.set_ylim(0, 110)
    _mark_simulated(ax, [(r.nodes, 100 * r.projected_scalability) for r in rows if r.simulated])
    _save(fig, ax, path, "Number of nodes", "Scalability (% of ideal)", "Scalability vs nodes (measured and projected)")


@dataclass
class CollectOutputs:
    csv: Path
    markdown: Path
    speed_png: Path
    scalability_png: Path
    rows: list[Row]


def collect(out_dir: Path | str, machine: str | None = None) -> CollectOutputs:
    """Read every run of the sweep in ``out_dir`` and write results.csv, results.md and the two PNGs."""
    out = Path(out_dir)
    plan = SweepPlan.load(out)
    profile = load_machine(machine or plan.machine)
    states = job_states(plan.scheduler, [job.job_id for job in plan.jobs])
    rows, benches = build_rows(plan, out, profile, states)
    outputs = CollectOutputs(csv=out / "results.csv", markdown=out / "results.md",
                             speed_png=out / "speed_vs_gpus.png", scalability_png=out / "scalability_vs_nodes.png",
                             rows=rows)
    write_csv(rows, Row, outputs.csv)
    outputs.markdown.write_text(markdown_table(rows, plan, benches))
    plot_speed(rows, outputs.speed_png, "GPUs" if plan.gpus_per_node else "CPU ranks")
    plot_scalability(rows, outputs.scalability_png)
    return outputs

"""The batch-size study's results: Table 12's columns (Markdown, CSV), Fig. 11 and Fig. 13 (PNG).

A run's accuracy is the mean of its last ``last_n`` validation evaluations: the trainer evaluates at the
end of every epoch and then saves that epoch's checkpoint from the same weights and rank 0's BN
statistics, so these are the numbers ``tsm-dist eval --last-n`` gives for the study's 1 clip x 1 crop.
A row is one (optimizer, batch): mean and standard deviation over its seeds of those run accuracies.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tsm_dist.training.evaluate import mean_std
from tsm_dist.runlog.records import METRICS_FILE, MetricsError, read_records
from tsm_dist.studies.batch_size.runs import PLAN_FILE, StudyRun
from tsm_dist.studies.tables import pyplot, write_csv

NAN = float("nan")


@dataclass
class RunResult:
    optimizer: str
    batch: int
    seed: int
    accumulate: int
    status: str  # completed, or why not
    top1: float = NAN  # mean of the last-n evaluations
    top1_ckpt_std: float = NAN
    steps: int = 0  # optimizer steps done
    steps_per_epoch: int = 0  # from the run's header: the mechanism of the batch's effect
    warmup_steps: int = 0
    peak_lr: float = NAN
    wall_s: float = NAN
    curve: list[tuple[float, float, float, float]] = field(default_factory=list)  # (epoch, step, top1, train loss)


@dataclass
class BatchRow:
    """One line of the table (Table 12's columns, plus the optimizer and each row's status)."""

    optimizer: str
    gpus: int  # ranks the batch needs without accumulation (the paper's "GPUs")
    ranks: int  # ranks it ran on
    accumulate: int
    simulated: bool
    batch: int
    frames_per_batch: int
    top1_mean: float
    top1_std: float  # over seeds
    top1_ckpt_std: float  # mean over seeds of the spread of the last-n checkpoints
    seeds_ok: int
    seeds: int
    steps: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    peak_lr: float
    wall_s: float
    status: str


def _epoch_losses(records: list[dict[str, Any]]) -> dict[int, float]:
    """Mean training loss of the step records of each epoch (epoch e: steps in (e-1, e])."""
    by_epoch: dict[int, list[float]] = {}
    for r in records:
        if r["type"] == "step" and math.isfinite(r["loss"]):
            by_epoch.setdefault(max(1, math.ceil(r["epoch"] - 1e-9)), []).append(r["loss"])
    return {e: sum(v) / len(v) for e, v in by_epoch.items()}


def read_run(workdir: Path, run: dict[str, Any], last_n: int, job_status: str = "") -> RunResult:
    """One run's result from its records; ``job_status``: the scheduler study's record of its job."""
    result = RunResult(run["optimizer"], run["batch"], run["seed"], run["accumulate"], "not run")
    info_file = workdir / "study_run.json"  # local runs: the launcher's outcome and wall time
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    try:
        records = read_records(workdir / METRICS_FILE)
    except (OSError, MetricsError):
        result.status = info.get("error") or job_status or "not run"
        return result
    evals = {r["epoch"]: r for r in records if r["type"] == "eval"}  # a resumed epoch's last evaluation
    ends = [r for r in records if r["type"] == "end"]
    headers = [r for r in records if r["type"] == "header"]
    result.wall_s = info.get("wall_s", ends[-1]["time"] - headers[0]["time"] if ends and headers else NAN)
    result.status = info.get("error") or (ends[-1]["status"] if ends else "running or killed")
    result.steps = max([r["step"] for r in records if r["type"] == "step"], default=0)
    if headers:
        header = headers[-1]
        result.steps_per_epoch = header.get("steps_per_epoch", 0)
        result.warmup_steps = header.get("warmup_steps", 0)
        result.peak_lr = header.get("peak_lr", NAN)
    losses = _epoch_losses(records)
    result.curve = [(e, evals[e]["step"], evals[e]["top1"], losses.get(e, NAN)) for e in sorted(evals)]
    if result.status == "completed" and evals:
        result.top1, result.top1_ckpt_std = mean_std([evals[e]["top1"] for e in sorted(evals)[-last_n:]])
    return result


def read_results(out: Path, last_n: int | None = None) -> tuple[dict[str, Any], list[RunResult]]:
    """The plan and every run's result; ``last_n`` replaces the plan's checkpoints per run."""
    plan = json.loads((out / PLAN_FILE).read_text())
    plan["last_n"] = last_n or plan["last_n"]
    jobs = plan.get("jobs", {})
    results = [read_run(out / "runs" / StudyRun(**r).tag, r, plan["last_n"],
                        jobs.get(StudyRun(**r).tag, {}).get("status", "")) for r in plan["runs"]]
    return plan, results


def build_rows(plan: dict[str, Any], results: list[RunResult]) -> list[BatchRow]:
    rows = []
    keys = sorted({(r.optimizer, r.batch) for r in results}, key=lambda k: (plan_order(plan, k[0]), k[1]))
    for optimizer, batch in keys:
        group = [r for r in results if (r.optimizer, r.batch) == (optimizer, batch)]
        spec = next(s for s in plan["runs"] if (s["optimizer"], s["batch"]) == (optimizer, batch))
        ok = [r for r in group if r.status == "completed" and math.isfinite(r.top1)]
        mean, std = mean_std([r.top1 for r in ok]) if ok else (NAN, NAN)
        std = std if len(ok) > 1 else NAN  # one seed has no spread: "-", not "+- 0.0"
        failed = sorted({r.status for r in group if r not in ok})
        rows.append(BatchRow(
            optimizer=optimizer, gpus=batch // spec["per_rank_batch"], ranks=spec["ranks"],
            accumulate=spec["accumulate"], simulated=spec["accumulate"] > 1, batch=batch,
            frames_per_batch=batch * plan["num_frames"], top1_mean=mean, top1_std=std,
            top1_ckpt_std=mean_std([r.top1_ckpt_std for r in ok])[0] if ok else NAN,
            seeds_ok=len(ok), seeds=len(group), steps=max((r.steps for r in group), default=0),
            steps_per_epoch=max((r.steps_per_epoch for r in group), default=0),
            total_steps=max((r.steps_per_epoch for r in group), default=0) * plan["epochs"],
            warmup_steps=max((r.warmup_steps for r in group), default=0),
            peak_lr=next((r.peak_lr for r in group if math.isfinite(r.peak_lr)), NAN),
            wall_s=mean_std([r.wall_s for r in group if math.isfinite(r.wall_s)])[0]
            if any(math.isfinite(r.wall_s) for r in group) else NAN,
            status=_status(len(ok), len(group), failed)))
    return rows


def _status(ok: int, seeds: int, failed: list[str]) -> str:
    """"completed", or what the row's numbers stand on: "1/3 seeds (the rest: not run)" in a partial study."""
    if not failed:
        return "completed"
    return f"{ok}/{seeds} seeds (the rest: {'; '.join(failed)})" if ok else "; ".join(failed)


def plan_order(plan: dict[str, Any], optimizer: str) -> int:
    names = list(dict.fromkeys(r["optimizer"] for r in plan["runs"]))
    return names.index(optimizer) if optimizer in names else len(names)


def _cell(value: float, fmt: str) -> str:
    return fmt.format(value) if math.isfinite(value) else ("" if fmt.startswith(" +-") else "-")


def markdown_table(plan: dict[str, Any], rows: list[BatchRow]) -> str:
    floor = f" (at least {plan['warmup_min_steps']} steps)" if plan.get("warmup_min_steps") else ""
    lines = [f"Batch-size study: {plan['model']}, {plan['epochs']} epochs per run, the LR scaled from "
             f"{plan['base_lr']:g} at batch {plan['base_batch']} (linear; LAMB: square root), warmup "
             f"{plan['warmup_epochs']:g} epoch(s){floor}; top-1 = mean +- std over seeds of each run's last "
             f"{plan['last_n']} checkpoints' mean.",
             "", "| optimizer | GPUs | batch | frames/batch | steps/epoch | steps | warmup steps | peak lr | top-1 (%) "
             "| ckpt std | seeds | wall (s) | status |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        gpus = f"{r.gpus}*" if r.simulated else str(r.gpus)
        lines.append(
            f"| {r.optimizer} | {gpus} | {r.batch:,}{'*' if r.simulated else ''} | {r.frames_per_batch:,} | "
            f"{r.steps_per_epoch:,} | {r.steps:,} | {r.warmup_steps:,} | {_cell(r.peak_lr, '{:.3g}')} | "
            f"{_cell(r.top1_mean, '{:.1f}')}{_cell(r.top1_std, ' +- {:.1f}')} | {_cell(r.top1_ckpt_std, '{:.1f}')} | "
            f"{r.seeds_ok}/{r.seeds} | {_cell(r.wall_s, '{:.0f}')} | {r.status} |")
    lines += ["", f"`*`: simulated: {rows[0].ranks if rows else '?'} ranks with gradient accumulation (K micro-batches "
              "per step, each with its own batch-norm statistics), as the paper's 512* and 1024* nodes."]
    return "\n".join(lines) + "\n"


def plot_accuracy(plan: dict[str, Any], rows: list[BatchRow], path: Path) -> None:
    """Fig. 11: top-1 against the batch (log axis), error bars over seeds, the smallest batch's band."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = next((r for r in rows if math.isfinite(r.top1_mean)), None)
    if base is not None:
        spread = base.top1_std if math.isfinite(base.top1_std) else 0.0
        ax.axhspan(base.top1_mean - spread, base.top1_mean + spread, color="gray", alpha=0.25,
                   label=f"baseline ({base.optimizer}, batch {base.batch}) +- std")
        ax.axhline(base.top1_mean - 2, color="gray", linestyle=":", label="baseline - 2 points")
    for optimizer in dict.fromkeys(r.optimizer for r in rows):
        mine = [r for r in rows if r.optimizer == optimizer and math.isfinite(r.top1_mean)]
        if not mine:
            continue
        ax.errorbar([r.batch for r in mine], [r.top1_mean for r in mine], yerr=[r.top1_std for r in mine],
                    marker="o", capsize=4, label=optimizer)
        for r in mine:
            if r.simulated:
                ax.annotate("*", (r.batch, r.top1_mean), textcoords="offset points", xytext=(5, 5))
    ax.set_xscale("log", base=2)
    batches = sorted({r.batch for r in rows})
    ax.set_xticks(batches, [f"{b:,}" for b in batches])
    ax.set(xlabel="effective batch (* simulated by accumulation)", ylabel="validation top-1 (%)",
           title=f"Accuracy vs batch ({plan['model']}, {plan['epochs']} epochs, scaled LR + warmup)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(plan: dict[str, Any], results: list[RunResult], path: Path) -> None:
    """Fig. 13: validation top-1 and training loss against the epoch, one line per batch (seed means);
    a third panel puts the accuracy against optimizer steps, which tells a batch that learns less per
    epoch because it takes fewer steps from one that learns less per step."""
    plt = pyplot()
    optimizers = list(dict.fromkeys(r.optimizer for r in results))
    fig, axes = plt.subplots(len(optimizers), 3, figsize=(15, 3.8 * len(optimizers)), squeeze=False)
    for row, optimizer in zip(axes, optimizers):
        for batch in sorted({r.batch for r in results}):
            curves = [r.curve for r in results if (r.optimizer, r.batch) == (optimizer, batch) and r.curve]
            if not curves:
                continue
            epochs = sorted({p[0] for c in curves for p in c})
            steps = [min(p[1] for c in curves for p in c if p[0] == e) for e in epochs]
            for column, index, x in ((0, 2, epochs), (1, 3, epochs), (2, 2, steps)):
                values = [[p[index] for c in curves for p in c if p[0] == e] for e in epochs]
                means = [sum(v) / len(v) if v else NAN for v in values]
                row[column].plot(x, means, marker="o", markersize=3, label=f"batch {batch}")
        row[0].set(xlabel="epoch", ylabel="validation top-1 (%)", title=f"{optimizer}: accuracy")
        row[1].set(xlabel="epoch", ylabel="training loss", title=f"{optimizer}: loss", yscale="log")
        row[2].set(xlabel="optimizer step", ylabel="validation top-1 (%)", title=f"{optimizer}: accuracy per step",
                   xscale="log")
        for ax in row:
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # a study whose runs have not written anything yet has none
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(out: Path, last_n: int | None = None) -> str:
    """Write table.md, table.csv and both figures into ``out``; return the Markdown table."""
    plan, results = read_results(out, last_n)
    rows = build_rows(plan, results)
    text = markdown_table(plan, rows)
    (out / "table.md").write_text(text)
    write_csv(rows, BatchRow, out / "table.csv")
    plot_accuracy(plan, rows, out / "fig11_accuracy_vs_batch.png")
    plot_curves(plan, results, out / "fig13_curves.png")
    return text + f"\nfigures: {out / 'fig11_accuracy_vs_batch.png'}, {out / 'fig13_curves.png'}"

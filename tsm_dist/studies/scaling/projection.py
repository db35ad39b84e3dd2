"""Projection without a sweep: scalability on a machine profile from a single-node step time.

For planning before an allocation exists (or beyond it): the ring-allreduce cost model with the
profile's nominal links and the model's gradient size from the models' profiler. Every number is a
projection; run the sweep to measure.
"""
from __future__ import annotations

import math
from typing import Sequence

from tsm_dist.studies.scaling.collect import Row
from tsm_dist.studies.scaling.costmodel import STEP_SMALL_COLLECTIVES, gradient_bytes, project_step_time
from tsm_dist.studies.scaling.machines import MachineProfile


def model_sizes(name: str) -> tuple[int, int]:
    """(parameters, frames per clip) of the full-size model, counted on the meta device by the profiler."""
    from tsm_dist.models.profiler import model_stats

    stats = model_stats(name)
    return stats.params, stats.frames


def project_rows(machine: MachineProfile, step_times: dict[str, float], nodes: Sequence[int], *,
                 per_gpu_batch: int, num_frames: dict[str, int], params: dict[str, int],
                 fp16_compression: bool = False, dataset_size: int = 0, epochs: int = 0,
                 overhead_s: float = 0.0) -> list[Row]:
    """One projected Row per (model, node count); measured columns stay empty (NaN). ``overhead_s``: per-step
    time beyond the link model on more than one node (a sweep's calibration term, see collect)."""
    rows = []
    g = machine.gpus_per_node
    for model, step_1 in step_times.items():
        grad_bytes = gradient_bytes(params[model], fp16_compression)
        speed_1 = g * per_gpu_batch / step_1
        for n in nodes:
            batch = n * g * per_gpu_batch
            step_n = project_step_time(step_1, n, g, grad_bytes, intra=machine.intra_cost(),
                                       inter=machine.inter_cost(), overhead_s=overhead_s,
                                       small_collectives=STEP_SMALL_COLLECTIVES)
            row = Row(engine="projection", model=model, nodes=n, gpus=n * g, simulated=False, run_nodes=n,
                      accumulate=1, global_batch=batch, frames_per_batch=batch * num_frames[model],
                      status="projected", ideal_clips_per_sec=speed_1 * n,
                      projected_clips_per_sec=batch / step_n, projected_scalability=step_1 / step_n,
                      projection_links=f"intra: {machine.intra_cost().source}; inter: {machine.inter_cost().source}")
            if dataset_size:
                row.epoch_time_s = dataset_size / row.projected_clips_per_sec
                row.train_time_s = row.epoch_time_s * epochs
                row.time_basis = "projected"
            rows.append(row)
    return rows


def projection_table(rows: list[Row], machine: MachineProfile, epochs: int, overhead_s: float = 0.0) -> str:
    from tsm_dist.studies.scaling.collect import format_duration

    lines = [f"# PROJECTION (cost model, nothing measured): {machine.name}, {machine.gpus_per_node} "
             f"{machine.gpu} per node, intra-node {machine.intra_node.name} "
             f"({machine.intra_node.latency_us:g} us, {machine.intra_node.bandwidth_gb_per_s:g} GB/s), "
             f"inter-node {machine.inter_node.name} ({machine.inter_node.latency_us:g} us, "
             f"{machine.inter_node.bandwidth_gb_per_s:g} GB/s)", "",
             f"| Model | #Node | #GPU | Batch | #Frames | Projected clips/s | Ideal clips/s | Projected scalability "
             f"| Projected time/epoch | Projected time, {epochs} epochs |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.nodes} | {r.gpus} | {r.global_batch:,} | {r.frames_per_batch:,} | "
                     f"{r.projected_clips_per_sec:,.1f} | {r.ideal_clips_per_sec:,.1f} | "
                     f"{100 * r.projected_scalability:.1f}% | {format_duration(r.epoch_time_s)} | "
                     f"{format_duration(r.train_time_s)} |")
    lines += ["", "step(n) = step(1) - allreduce(1 node) + allreduce(n nodes); allreduce(p) = 2(p-1)·α + "
              "2(p-1)/p·N/B with N = fp32 gradient bytes, plus the trainer's per-step metrics allreduce "
              "(2·ceil(log2 p)·α); no overlap of communication with backward"
              + (f"; plus {overhead_s * 1e3:g} ms per step on more than one node (--unmodelled-ms, a sweep's "
                 f"calibration term)." if overhead_s else ".")]
    return "\n".join(lines) + "\n"


def parse_step_times(text: str, models: Sequence[str]) -> dict[str, float]:
    """``0.7`` (every model) or ``tsm8f_r50=0.7,i3d3x3x3_r50=1.1``."""
    if "=" not in text:
        value = float(text)
        times = {m: value for m in models}
    else:
        times = {}
        for item in text.split(","):
            model, _, value = item.partition("=")
            times[model.strip()] = float(value)
    missing = [m for m in models if m not in times]
    if missing:
        raise ValueError(f"--step-time: no single-node step time for {missing}")
    bad = [m for m, t in times.items() if not t > 0 or math.isinf(t)]
    if bad:
        raise ValueError(f"--step-time: step times must be > 0 s, see {bad}")
    return {m: times[m] for m in models}

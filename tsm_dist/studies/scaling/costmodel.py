"""Ring-allreduce cost model and the scalability projection built on it.

A ring allreduce over p participants moves 2(p-1)/p of the message through every link and takes
2(p-1) latency-bound steps (reduce-scatter, then allgather):

    t(p, N) = 2(p-1)·α + 2(p-1)/p · N/B

α is the per-step latency in seconds, B the bandwidth of the slowest link of the ring in bytes/s, N the
message size in bytes. Across nodes the slowest link is the node's injection bandwidth: however many
rings NCCL builds, each node sends 2(p-1)/p·N bytes out of its NICs in total.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import median
from typing import Sequence


# The trainer's latency-bound allreduces per optimizer step besides the gradients': one (loss, data/compute/
# sync/step times, NaN and stop flags, tsm_dist.training.train). The sweep's projections count it.
STEP_SMALL_COLLECTIVES = 1


@dataclass(frozen=True)
class LinkCost:
    """Latency/bandwidth pair of one link class, with where the numbers came from."""

    alpha_s: float
    bandwidth_bytes_per_s: float
    source: str = ""

    def __post_init__(self) -> None:
        if self.alpha_s < 0:
            raise ValueError(f"latency must be >= 0 s, got {self.alpha_s} ({self.source or 'link'})")
        if self.bandwidth_bytes_per_s <= 0:
            raise ValueError(f"bandwidth must be > 0 B/s, got {self.bandwidth_bytes_per_s} "
                             f"({self.source or 'link'})")


def ring_allreduce_time(p: int, nbytes: float, link: LinkCost) -> float:
    """Seconds for a ring allreduce of ``nbytes`` over ``p`` participants (0 for one participant)."""
    if p < 1:
        raise ValueError(f"participants must be >= 1, got {p}")
    if nbytes < 0:
        raise ValueError(f"message size must be >= 0 bytes, got {nbytes}")
    if p == 1:
        return 0.0
    return 2 * (p - 1) * link.alpha_s + 2 * (p - 1) / p * nbytes / link.bandwidth_bytes_per_s


def fit_ring_link(p: int, sizes: Sequence[float], times: Sequence[float], source: str = "") -> LinkCost:
    """Recover α and B from allreduce timings measured over ``p`` participants.

    t = a + b·N with a = 2(p-1)·α and b = 2(p-1)/(p·B), fitted in two regimes as Hockney-style models
    usually are: the slope b (bandwidth) on the larger half of the messages, where bandwidth rules and
    caches no longer flatter it; the intercept a (latency) on the smaller half, where latency rules.
    With fewer than 4 sizes one line serves both. Lines are robust (Theil-Sen) fits; a negative
    intercept is clipped to zero latency.
    """
    if p < 2:
        raise ValueError(f"fitting needs >= 2 participants (one rank does not communicate), got {p}")
    if len(sizes) != len(times) or len(sizes) < 2:
        raise ValueError(f"need >= 2 (size, time) pairs of equal length, got {len(sizes)} and {len(times)}")
    points = sorted(zip(sizes, times))
    half = len(points) // 2 if len(points) >= 4 else 0
    slope, _ = _robust_line(points[half:])
    _, intercept = _robust_line(points[:half] or points)
    if slope <= 0:
        raise ValueError(f"allreduce time does not grow with message size (slope {slope:.3g} s/B); "
                         f"the measurement is too noisy to fit a bandwidth ({source or 'fit'})")
    return LinkCost(alpha_s=max(intercept, 0.0) / (2 * (p - 1)),
                    bandwidth_bytes_per_s=2 * (p - 1) / (p * slope), source=source)


def _robust_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(slope, intercept) by Theil-Sen: medians of pairwise slopes and of intercepts, so that one
    disturbed timing (another process took the core) does not bend the line."""
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points) for x2, y2 in points[i + 1:] if x2 != x1]
    if not slopes:
        raise ValueError("need at least two different message sizes to fit bandwidth")
    slope = median(slopes)
    return slope, median(y - slope * x for x, y in points)


def gradient_bytes(params: int, fp16_compression: bool = False) -> float:
    """Bytes one allreduce of a model's gradients moves: fp32, or fp16 with Horovod-style compression."""
    return params * (2 if fp16_compression else 4)


def small_allreduce_time(p: int, link: LinkCost) -> float:
    """A latency-bound allreduce of a few numbers over ``p`` ranks: a tree (reduce, then broadcast), as MPI,
    Gloo and NCCL run small messages, 2·ceil(log2 p)·α."""
    return 2 * math.ceil(math.log2(p)) * link.alpha_s if p > 1 else 0.0


def allreduce_time_on_nodes(nodes: int, gpus_per_node: int, nbytes: float, *, intra: LinkCost,
                            inter: LinkCost, small_collectives: int = 0) -> float:
    """Allreduce over ``nodes`` × ``gpus_per_node`` ranks: intra-node links on one node, else the network;
    plus ``small_collectives`` latency-bound ones (the trainer's per-step metrics allreduce)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"nodes and gpus_per_node must be >= 1, got {nodes} and {gpus_per_node}")
    link = intra if nodes == 1 else inter
    p = nodes * gpus_per_node
    return ring_allreduce_time(p, nbytes, link) + small_collectives * small_allreduce_time(p, link)


def project_step_time(single_node_step_s: float, nodes: int, gpus_per_node: int, grad_bytes: float, *,
                      intra: LinkCost, inter: LinkCost, accumulate: int = 1, overhead_s: float = 0.0,
                      small_collectives: int = 0) -> float:
    """Step time on ``nodes`` nodes from the measured single-node step time.

    The single-node step already paid the intra-node allreduce once; going to n nodes replaces it by the
    allreduce over the network. No overlap of communication with backward is assumed, so the projection
    is a lower bound on scalability. ``accumulate`` K micro-batches share one allreduce. ``overhead_s``:
    what a multi-node step costs beyond the link model (see :func:`unmodelled_overhead`), added for n > 1.
    ``small_collectives``: latency-bound allreduces per step besides the gradients' (the trainer has one:
    loss, timings and stop flags, :data:`STEP_SMALL_COLLECTIVES`).
    """
    if single_node_step_s <= 0:
        raise ValueError(f"single-node step time must be > 0 s, got {single_node_step_s}")
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")
    comm_1 = allreduce_time_on_nodes(1, gpus_per_node, grad_bytes, intra=intra, inter=inter,
                                     small_collectives=small_collectives)
    comm_n = allreduce_time_on_nodes(nodes, gpus_per_node, grad_bytes, intra=intra, inter=inter,
                                     small_collectives=small_collectives)
    compute = max(single_node_step_s - comm_1, 0.0)
    return accumulate * compute + comm_n + (overhead_s if nodes > 1 else 0.0)


def unmodelled_overhead(single_node_step_s: float, measured_step_s: float, measured_nodes: int,
                        gpus_per_node: int, grad_bytes: float, *, intra: LinkCost, inter: LinkCost,
                        accumulate: int = 1, small_collectives: int = 0) -> float:
    """Seconds per step a measured multi-node run took beyond the link model: the calibration term.

    It holds what the ring model leaves out: on CPU ranks, communication that runs on the cores that
    compute (a background thread polling, the reduction's memory traffic: compute/communication
    contention), and anywhere, stragglers and synchronisation jitter. Calibrating a projection with it
    assumes it stays constant per step as nodes are added: every rank of a ring sends and receives
    ~2N bytes whatever p is, so its per-rank communication work, and the contention, do not grow with p.
    Negative when the model is pessimistic (communication overlapped with compute).
    """
    modelled = project_step_time(single_node_step_s, measured_nodes, gpus_per_node, grad_bytes,
                                 intra=intra, inter=inter, accumulate=accumulate,
                                 small_collectives=small_collectives)
    return measured_step_s - modelled

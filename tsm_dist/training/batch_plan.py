"""The batch plan: how the configured batch maps onto the world (per-rank batch x ranks x accumulate), one
half of "large batch" (the other is the learning-rate schedule, lr_schedule.py, beside this file).

Gradient accumulation simulates a large batch on fewer ranks (the paper's 512 and 1024 nodes): K
micro-batches are forwarded and backpropagated before one allreduce and one optimizer step
(``backward_passes_per_step`` in the engine), so a step sees ``per_gpu_batch x world_size x K`` clips.
``train.global_batch`` names the effective batch to reach and K follows from the world size;
``train.accumulate`` (or ``--accumulate``) names K directly.
"""
from __future__ import annotations

from dataclasses import dataclass

from tsm_dist.config import Config, ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """How the configured batch maps onto the world: the numbers the LR rule and the logs use."""

    per_gpu_batch: int
    world_size: int
    accumulate: int

    @property
    def global_batch(self) -> int:
        return self.per_gpu_batch * self.world_size * self.accumulate

    def __str__(self) -> str:
        return (f"{self.world_size} rank(s) x batch {self.per_gpu_batch} x accumulate {self.accumulate} "
                f"= {self.global_batch} clips per step")


def plan_batch(cfg: Config, world_size: int) -> BatchPlan:
    """Resolve accumulation for ``world_size`` ranks; an effective batch that does not fit is an error."""
    per_gpu = cfg.data.batch_size
    accumulate = cfg.train.accumulate
    target = cfg.train.global_batch
    if target:
        per_step = per_gpu * world_size
        if target % per_step:
            raise ConfigError(
                f"train.global_batch={target} does not fit the world: data.batch_size={per_gpu} x "
                f"{world_size} ranks = {per_step} clips per pass, and {target} is not a multiple of it")
        derived = target // per_step
        if accumulate not in (1, derived):
            raise ConfigError(
                f"train.global_batch={target} needs accumulate={derived} on {world_size} ranks, "
                f"but train.accumulate={accumulate}; set only one of them")
        accumulate = derived
    return BatchPlan(per_gpu_batch=per_gpu, world_size=world_size, accumulate=accumulate)


def plan_for_world(base: BatchPlan, world_size: int, on_resize: str) -> BatchPlan:
    """The plan of an elastic run (``engine.on_resize``) on ``world_size`` ranks, from the plan it started with.

    ``keep_global_batch``: the per-rank batch stays and accumulation K absorbs the new world, so every step
    still sees ``base.global_batch`` clips (and the LR schedule is unchanged). ``keep_rank_batch``: the per-rank
    batch and K stay, the global batch follows the world (the LR schedule of the new plan scales with it).
    """
    if on_resize == "keep_rank_batch":
        return BatchPlan(per_gpu_batch=base.per_gpu_batch, world_size=world_size, accumulate=base.accumulate)
    per_pass = base.per_gpu_batch * world_size
    if base.global_batch % per_pass:
        raise ConfigError(
            f"engine.on_resize=keep_global_batch: the global batch {base.global_batch} is not a multiple of "
            f"data.batch_size={base.per_gpu_batch} x {world_size} ranks = {per_pass}; choose a global batch that "
            "every world size between engine.elastic_min_ranks and engine.elastic_max_ranks divides, or "
            "engine.on_resize=keep_rank_batch")
    return BatchPlan(per_gpu_batch=base.per_gpu_batch, world_size=world_size, accumulate=base.global_batch // per_pass)


def elastic_world_sizes(min_ranks: int, max_ranks: int, start: int) -> range:
    """The world sizes an elastic run may take (the config's bounds; 0: the starting world size)."""
    return range(min_ranks or start, (max_ranks or start) + 1)

"""A run resolved once: (config, world size) -> the frozen description every part of a run receives.

The config arrives with every model option filled in (:func:`tsm_dist.config.load_config` resolves them
once, through the registry); this adds what depends on the world: the batch plan (per-rank batch, ranks,
accumulation K) and, once the loader knows how many steps an epoch has, the learning-rate schedule. The
trainer, the checkpoint (which stores the resolved config and the plan) and the identity check on resume
read these values; nothing downstream re-derives them. What a resume compares of the model is
:func:`tsm_dist.state.checkpoint.model_identity`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from tsm_dist.config import Config
from tsm_dist.training.batch_plan import BatchPlan, plan_batch
from tsm_dist.training.lr_schedule import LRSchedule

@dataclass(frozen=True)
class RunSpec:
    """The resolved run. ``config`` is a private copy: callers read it and never change it."""

    config: Config
    batch: BatchPlan

    @property
    def accumulate(self) -> int:
        return self.batch.accumulate

    def lr_schedule(self, steps_per_epoch: int) -> LRSchedule:
        """The schedule of this plan: linear scaling to the plan's global batch, warmup and decay per epoch."""
        return LRSchedule.from_config(self.config.optim, global_batch=self.batch.global_batch,
                                      steps_per_epoch=steps_per_epoch, epochs=self.config.train.epochs)


def resolve_run(cfg: Config, world_size: int) -> RunSpec:
    """The one step from a loaded config and the world it runs on to the run's description."""
    return RunSpec(config=copy.deepcopy(cfg), batch=plan_batch(cfg, world_size))

"""Learning rate per optimizer step: linear scaling rule, gradual warmup, then step or cosine decay.

Goyal et al., "Accurate, Large Minibatch SGD": the peak rate is ``base_lr * global_batch / base_batch``
(LAMB's paper: ``base_lr * sqrt(global_batch / base_batch)``, ``optim.lr_scaling``);
warmup starts from the rate of the base batch and grows by a constant amount every iteration until the
peak at ``warmup_epochs`` (at least ``warmup_min_steps`` steps). The paper's Kinetics recipe is base_lr
0.01 at batch 64, x0.1 at epochs 40 and 80 of 100.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tsm_dist.config import OptimConfig


def lr_scaling(optim: OptimConfig) -> str:
    """``optim.lr_scaling`` resolved: ``auto`` is the rule of the optimizer's paper (LAMB: square root)."""
    if optim.lr_scaling != "auto":
        return optim.lr_scaling
    return "sqrt" if optim.name == "lamb" else "linear"


@dataclass(frozen=True)
class LRSchedule:
    base_lr: float
    base_batch: int
    global_batch: int
    steps_per_epoch: int  # optimizer steps (not micro-batches) per epoch
    epochs: int
    warmup_epochs: float = 0.0
    schedule: str = "step"
    warmup_min_steps: int = 0
    lr_scaling: str = "linear"  # or "sqrt"
    decay_epochs: tuple[float, ...] = (40.0, 80.0)
    decay_factor: float = 0.1

    @classmethod
    def from_config(cls, optim: OptimConfig, *, global_batch: int, steps_per_epoch: int,
                    epochs: int) -> "LRSchedule":
        return cls(base_lr=optim.base_lr, base_batch=optim.base_batch, global_batch=global_batch,
                   steps_per_epoch=steps_per_epoch, epochs=epochs, warmup_epochs=optim.warmup_epochs,
                   schedule=optim.schedule, decay_epochs=tuple(optim.decay_epochs),
                   decay_factor=optim.decay_factor, warmup_min_steps=optim.warmup_min_steps,
                   lr_scaling=lr_scaling(optim))

    @property
    def peak_lr(self) -> float:
        ratio = self.global_batch / self.base_batch
        return self.base_lr * (math.sqrt(ratio) if self.lr_scaling == "sqrt" else ratio)

    @property
    def warmup_steps(self) -> int:
        """``warmup_epochs`` in steps, at least ``warmup_min_steps`` (when there is a warmup) but at most
        half the run: an epoch is a few steps at a large batch, and the rate must not jump to its peak."""
        steps = int(round(self.warmup_epochs * self.steps_per_epoch))
        if steps == 0 or steps >= self.warmup_min_steps:
            return steps
        return max(steps, min(self.warmup_min_steps, self.total_steps // 2))

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def __call__(self, step: int) -> float:
        """The learning rate for optimizer step ``step`` (0-based, counted over all epochs)."""
        peak = self.peak_lr
        warmup = self.warmup_steps
        if step < warmup:
            start = min(self.base_lr, peak)
            return start + (peak - start) * step / warmup
        if self.schedule == "cosine":
            span = max(1, self.total_steps - warmup)
            progress = min(1.0, (step - warmup) / span)
            return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
        passed = sum(1 for e in self.decay_epochs if step >= e * self.steps_per_epoch)
        return peak * self.decay_factor ** passed

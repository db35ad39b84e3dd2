"""Where a resumed run continues when its batch plan changed (other ranks, per-rank batch or accumulate).

A scheduler requeues a job onto another allocation, a user doubles the nodes: the checkpoint's optimizer
step counts steps of the *old* plan, so counting steps again under the new plan would end the run at
once or skip epochs. What carries over is the position in the data: the epoch, and how many clips of it
(all ranks together) were trained. The resumed run continues at that position and numbers its steps as
the new plan would have (``step = epoch * steps_per_epoch + steps into the epoch``), so the LR schedule
is the new plan's at the same point of training.

At an epoch boundary this is always exact. Mid-epoch it is exact when the clips already trained are a
whole number of new optimizer steps and the new ranks' shards start right after them: with the
interleaved partition (file lists, the random backend) the clips of an epoch are taken in the epoch's
global order, so any plan has trained the same prefix after the same number of clips; with the
contiguous partition (packed sets) each rank owns a block, which changes with the number of ranks.
Otherwise the resume is refused with one line saying how to continue exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from tsm_dist.training.batch_plan import BatchPlan
from tsm_dist.commands.exit_codes import CheckpointError


@dataclass(frozen=True)
class Continuation:
    """Where the loop continues under the new plan; ``note`` is the one line that says so (None: same plan)."""

    epoch: int
    step: int
    batch_in_epoch: int
    epoch_end_pending: bool
    note: str | None = None


def saved_plan(state: Mapping[str, Any]) -> BatchPlan:
    """The plan a checkpoint was trained with (checkpoints before ``per_gpu_batch`` was saved: derived)."""
    world, accumulate = int(state["world_size"]), int(state.get("accumulate", 1))
    per_gpu = state.get("per_gpu_batch")
    if per_gpu is None:
        per_gpu = int(state.get("global_batch", 0)) // max(1, world * accumulate)
    return BatchPlan(per_gpu_batch=int(per_gpu), world_size=world, accumulate=accumulate)


def continue_under(state: Mapping[str, Any], new: BatchPlan, steps_per_epoch: int, *, ordered_prefix: bool,
                   path: object = "the checkpoint") -> Continuation:
    """The loop position of checkpoint ``state`` (epoch, step, batch_in_epoch, ...) under plan ``new``.

    ``ordered_prefix``: the training loader takes each epoch's clips in one global order whatever the
    number of ranks (the interleaved partition). Raises :class:`CheckpointError` when it cannot be exact.
    """
    epoch, pending = int(state["epoch"]), bool(state.get("epoch_end_pending", False))
    old = saved_plan(state)
    if old == new or old.per_gpu_batch <= 0:
        return Continuation(epoch, int(state["step"]), int(state["batch_in_epoch"]), pending)
    clips = int(state["batch_in_epoch"]) * old.per_gpu_batch * old.world_size
    steps_in = 0
    if clips:
        why = None
        if old.world_size != new.world_size and not ordered_prefix:
            why = "the packed set's contiguous shards change with the number of ranks"
        elif clips % new.global_batch:
            why = f"{clips} clips are not a whole number of the new plan's steps"
        if why:
            raise CheckpointError(
                f"checkpoint {path} stopped {clips} clips into epoch {epoch} under {old}; it cannot continue "
                f"exactly under {new} ({why}): resume with the old plan until the epoch's end, or from an "
                "epoch-boundary checkpoint")
        steps_in = clips // new.global_batch
    if steps_in >= steps_per_epoch:  # the new plan's epoch is shorter: this one is done
        epoch, steps_in, pending = epoch + 1, 0, True
    step = epoch * steps_per_epoch + steps_in
    note = (f"resuming under a new batch plan: {new} (was {old}); epoch {epoch}, {clips} clips into it: "
            f"optimizer step {state['step']} of the old plan is step {step} of the new one, whose LR schedule "
            "applies" + ("; data order and random state differ from the original run"
                         if old.world_size != new.world_size else ""))
    return Continuation(epoch, step, steps_in * new.accumulate, pending, note)

"""Elastic training (``engine.elastic``): ranks that leave or join a running job, on Horovod's elastic mode.

Horovod runs the training inside its elastic loop (:meth:`tsm_dist.distributed.engine.Engine.elastic_run`).
The trainer commits every ``engine.commit_every`` optimizer steps and at every epoch end; a commit is an
in-memory copy on every rank of what the loop needs to go on (:class:`Commit`: model, optimizer, GradScaler,
the loop :class:`~tsm_dist.state.train_state.Position` and the batch plan it counts in, the random state).
When a rank dies, the survivors' next collective fails: they restore the last commit, Horovod renumbers
the ranks that are left, and rank 0 sends its state to every rank (:meth:`Elastic.sync`). When hosts are
added, every rank learns it at the next commit and the new ranks receive the state by the same sync.

Then the run fits the new world (:meth:`Elastic.fit_world`): the batch plan of ``engine.on_resize``
(:func:`tsm_dist.training.batch_plan.plan_for_world`), the data position carried over by the rule a resume
under a new plan follows (:func:`tsm_dist.state.resume.continue_under`: the same clip of the same epoch,
the rest of the epoch re-sharded over the new ranks), loaders rebuilt for the new shard count (a DALI
pipeline cannot change its shard), the LR schedule of the new plan, and one ``membership`` record. A
position that cannot continue exactly mid-epoch (``keep_rank_batch`` with a step size that does not divide
the clips trained, a packed set's contiguous shards) rolls back to the last epoch-end commit instead.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from tsm_dist.commands.exit_codes import CheckpointError, CoordinatedError, EXIT_CONFIG
from tsm_dist.config import ConfigError
from tsm_dist.runlog import records
from tsm_dist.state import train_state
from tsm_dist.state.failure import noted_failure
from tsm_dist.state.resume import continue_under
from tsm_dist.state.train_state import Position
from tsm_dist.training.batch_plan import BatchPlan, elastic_world_sizes, plan_for_world

if TYPE_CHECKING:
    from tsm_dist.training.train import Trainer


@dataclass(frozen=True)
class Commit:
    """One rank's copy of the run at a commit; ``plan``: the batch plan ``pos`` counts steps in."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    pos: Position
    plan: BatchPlan
    rng: dict[str, Any]
    world: int
    started: bool
    time: float


def capture(model: torch.nn.Module, optimizer: Any, scaler: torch.amp.GradScaler, pos: Position, plan: BatchPlan,
            *, world: int, started: bool) -> Commit:
    """This rank's copy of the run, what a commit costs: each tensor copied where it lives (on a GPU: one more
    model and optimizer state in GPU memory, as Horovod's TorchState keeps)."""
    return Commit(model={k: v.detach().clone() for k, v in model.state_dict().items()},
                  optimizer=copy.deepcopy(optimizer.state_dict()), scaler=copy.deepcopy(scaler.state_dict()),
                  pos=dataclasses.replace(pos), plan=plan, rng=train_state.rng_state(), world=world,
                  started=started, time=time.time())


def check_world_sizes(base: BatchPlan, min_ranks: int, max_ranks: int) -> None:
    """Every world size the config allows must have a batch plan: refused at start, in one line, not when a
    rank is lost hours later."""
    for size in elastic_world_sizes(min_ranks, max_ranks, base.world_size):
        try:
            plan_for_world(base, size, "keep_global_batch")
        except ConfigError as exc:
            raise CoordinatedError(f"{exc} (it fails on {size} ranks)", EXIT_CONFIG) from None


class Elastic:
    """The trainer's elastic side: what a commit holds, how the ranks agree after a change, the records."""

    def __init__(self, trainer: "Trainer") -> None:
        self.trainer = trainer
        cfg = trainer.cfg.engine
        self.every, self.on_resize = cfg.commit_every, cfg.on_resize
        self.base = trainer.plan  # the plan the run started with (rank 0's, after a sync)
        if self.on_resize == "keep_global_batch":
            check_world_sizes(self.base, cfg.elastic_min_ranks, cfg.elastic_max_ranks)
        self.pos_plan = trainer.plan  # the plan trainer.pos counts steps in
        self.last: Commit | None = None
        self.boundary: Commit | None = None  # the last commit at an epoch's end: always exact to continue from
        self.started = False  # the start (data check, resume, logs) is done; joiners receive it as done
        self.reached: int | None = None  # the step a failure was met at (survivors, until the next fit)
        self.changed = False  # the ranks changed since the world was last fitted
        self.rolled_to = trainer.pos
        self.commit_seconds: list[float] = []
        self.state = trainer.engine.elastic_state(self)

    # ---------------------------------------------------------------------------- the loop
    def run(self, start: Callable[[], None], epochs: Callable[[Any], None], stop: Any) -> None:
        """``start()`` once (data check, resume, logs), then ``epochs(stop)``, under Horovod's elastic loop."""

        def body(_state: Any, stop: Any) -> None:
            self.fit_world()
            if not self.started:
                start()
                self.pos_plan, self.started = self.trainer.plan, True
                self.commit()
            epochs(stop)

        self.trainer.engine.elastic_run(body, self.state, stop)
        if self.trainer.root and self.commit_seconds:  # what a commit costs here, to choose commit_every by
            seconds = sorted(self.commit_seconds)
            print(f"tsm-dist train: elastic: {len(seconds)} commits, median {1e3 * seconds[len(seconds) // 2]:.1f} ms "
                  f"each (rank 0; engine.commit_every={self.every})", file=sys.stderr, flush=True)

    def after_step(self) -> None:
        """Every ``commit_every`` steps; not on an epoch's last step (its end commits after evaluating)."""
        pos = self.trainer.pos
        if pos.batch_in_epoch and pos.step % self.every == 0:
            self.commit()

    def commit(self) -> None:
        """On every rank at the same step: save, then learn of added or removed hosts (Horovod's check)."""
        started = time.perf_counter()
        self.state.commit()
        self.commit_seconds.append(time.perf_counter() - started)

    # ---------------------------------------------------------------- Horovod's callbacks
    def save(self) -> None:
        tr = self.trainer
        self.last = capture(tr.model, tr.optimizer, tr.scaler, tr.pos, self.pos_plan, world=tr.engine.size,
                            started=self.started)
        if tr.pos.batch_in_epoch == 0:
            self.boundary = self.last

    def restore(self) -> None:
        """A collective failed (a rank was lost): back to the last commit. A rank that failed on an error of its
        own (it left a note: data, storage) stops the job as without elastic; a rank lost without a word is what
        an elastic run recovers from."""
        noted = noted_failure(self.trainer.workdir)
        if noted is not None:
            raise noted
        self.reached = self.trainer.pos.step
        if self.last is not None:
            self._load(self.last)

    def _load(self, commit: Commit) -> None:
        tr = self.trainer
        tr.model.load_state_dict(commit.model)
        tr.optimizer.load_state_dict(copy.deepcopy(commit.optimizer))
        tr.scaler.load_state_dict(commit.scaler)
        _assign(tr.pos, commit.pos)
        self.pos_plan, self.started = commit.plan, commit.started
        train_state.set_rng_state(commit.rng)

    def reset(self) -> None:
        """After Horovod re-initialized with the new set of ranks (survivors only; joiners start fresh)."""
        self.trainer.root, self.changed = self.trainer.engine.is_root, True

    def sync(self) -> None:
        """Rank 0's model, optimizer state and loop position to every rank (new ranks included); each rank's
        commit is then that state, so a failure before the next commit comes back to it."""
        tr, engine = self.trainer, self.trainer.engine
        if self.last is None:
            self.save()
        engine.broadcast_state(tr.model, tr.optimizer)
        shared = engine.broadcast_object(self._shared() if engine.is_root else None)
        tr.scaler.load_state_dict(shared["scaler"])
        _assign(tr.pos, shared["pos"])
        self.changed = self.changed or (shared["started"] and not self.started)  # a new rank joins a running job
        self.pos_plan, self.base, self.started = shared["pos_plan"], shared["base"], shared["started"]
        tr.run_id = shared["run_id"]
        world = shared["world"]
        self.save()
        self.last = dataclasses.replace(self.last, world=world)  # the world of the commit, for the record

    def _shared(self) -> dict[str, Any]:
        tr = self.trainer
        return {"scaler": tr.scaler.state_dict(), "pos": dataclasses.replace(tr.pos), "pos_plan": self.pos_plan,
                "base": self.base, "started": self.started, "run_id": tr.run_id,
                "world": self.last.world if self.last is not None else tr.engine.size}

    # --------------------------------------------------------------------- the new world
    def fit_world(self) -> None:
        """Every rank, each time Horovod (re)enters the training: the plan, position, loaders and schedule of
        this world; after a change, every rank's new random state and rank 0's membership record."""
        tr, engine = self.trainer, self.trainer.engine
        tr.root = engine.is_root
        plan = plan_for_world(self.base, engine.size, self.on_resize)
        if not self.changed and plan == tr.plan == self.pos_plan:
            return
        old_world = self.last.world if self.last is not None else engine.size
        self.rolled_to = self.last.pos if self.last is not None else dataclasses.replace(tr.pos)
        if plan != tr.plan or tr.loader_world != (engine.rank, engine.size):
            tr.fit_plan(plan)
        note = self._continue(plan)
        # the seeds a resume on a new world takes (tsm_dist.training.train.Trainer.resume)
        train_state.seed(tr.cfg.train.seed * 1000003 + engine.rank)
        if self.started and self.changed:
            tr.open_logs_if_root()  # rank 0 died: the new rank 0 keeps the run's account from here
            self._record(old_world, self.rolled_to, note)
        self.reached, self.changed = None, False
        self.save()

    def _continue(self, plan: BatchPlan) -> str | None:
        """Carry the position over to ``plan``; a mid-epoch position that cannot be exact falls back to the
        epoch-end commit. Every rank decides alike: the position is rank 0's, and so is the fallback."""
        tr, engine = self.trainer, self.trainer.engine
        note = None
        try:
            where = continue_under(self._position(), plan, tr.steps_per_epoch, ordered_prefix=tr.ordered_prefix,
                                   path="the last commit")
        except CheckpointError as exc:
            if not engine.broadcast_object(self.boundary is not None if engine.is_root else None):
                raise CoordinatedError(f"elastic: {exc}", EXIT_CONFIG) from None
            if engine.is_root:
                self._load(self.boundary)
            self.sync()  # joiners hold no epoch-end commit: rank 0's goes to every rank
            self.rolled_to = dataclasses.replace(tr.pos)
            note = "rolled back to the epoch's start: " + str(exc).split(" (", 1)[-1].split(")", 1)[0]
            where = continue_under(self._position(), plan, tr.steps_per_epoch, ordered_prefix=tr.ordered_prefix)
        tr.pos.epoch, tr.pos.step, tr.pos.batch_in_epoch = where.epoch, where.step, where.batch_in_epoch
        tr.pos.epoch_end_pending = where.epoch_end_pending
        self.pos_plan = plan
        return note

    def _position(self) -> dict[str, Any]:
        pos, plan = self.trainer.pos, self.pos_plan
        return {"epoch": pos.epoch, "step": pos.step, "batch_in_epoch": pos.batch_in_epoch,
                "epoch_end_pending": pos.epoch_end_pending, "world_size": plan.world_size,
                "per_gpu_batch": plan.per_gpu_batch, "accumulate": plan.accumulate}

    def _record(self, old_world: int, rolled_to: Position, note: str | None) -> None:
        tr, pos = self.trainer, self.trainer.pos
        lost = max(0, self.reached - rolled_to.step) if self.reached is not None else 0
        record = records.membership_record(
            old_world=old_world, new_world=tr.engine.size,
            cause="rank lost" if self.reached is not None else ("hosts added" if tr.engine.size > old_world
                                                                 else "hosts removed"),
            rolled_back_to={"step": rolled_to.step, "epoch": rolled_to.epoch,
                            "batch_in_epoch": rolled_to.batch_in_epoch},
            steps_lost=lost, continues_at={"step": pos.step, "epoch": pos.epoch, "batch_in_epoch": pos.batch_in_epoch},
            plan=str(tr.plan), on_resize=self.on_resize, peak_lr=tr.schedule.peak_lr, note=note)
        tr.log.membership(record, tr.total_steps)


def _assign(pos: Position, source: Position) -> None:
    """Copy ``source`` into ``pos`` in place (the trainer and its callers hold ``pos``)."""
    for field in dataclasses.fields(Position):
        setattr(pos, field.name, getattr(source, field.name))

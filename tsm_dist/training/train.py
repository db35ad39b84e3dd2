"""``tsm-dist train``: synchronous data-parallel SGD, started once per rank (horovodrun, mpirun, jsrun, srun).

The recipe reads top to bottom: :func:`train` drives a :class:`Trainer` through

- **setup**: start the engine and pin the device by local rank -> sharded loaders -> model and optimizer ->
  distributed optimizer with K backward passes per allreduce -> resume on rank 0 and broadcast parameters,
  optimizer state and the loop position -> rank-0 logs;
- **loop**: epochs of optimizer steps, each epoch ended by evaluation and a rank-0 checkpoint;
- **step**: LR from the warmup / decay schedule, K micro-batches, one gradient allreduce, clip, step, then
  one small allreduce of the metrics that also carries the stop flags;
- **stop**: every early stop (a stop signal, a non-finite loss or model) is a :class:`Stopped` raised on every
  rank after the same step and turned into the outcome in one place, :meth:`Trainer.loop`; then
  :meth:`Trainer.finish` writes the ``end`` record and every rank leaves with the same exit code.

Config -> model / loader glue lives in :mod:`tsm_dist.training.build`; what a checkpoint holds, and loading it to
resume, in :mod:`tsm_dist.state.train_state`.

Exit codes (the table is in :mod:`tsm_dist.commands.exit_codes`): 0 done, 1 crash, 2 configuration error, 3 non-finite
loss, 4 data error, 5 checkpoint error, 75 stopped by the time-limit warning (the job script requeues),
143 stopped by SIGTERM (cancel or preemption: not requeued by the job script). After a coordinated stop
(75, 143, 3) every rank exits with the same code.
"""
from __future__ import annotations

import argparse
import functools
import gc
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from tsm_dist.runlog import records
from tsm_dist.state import train_state
from tsm_dist.state.checkpoint import CHECKPOINT_DIR
from tsm_dist.training.build import (LoaderBuilder, ModelBuilder, amp_dtype, build_loader_from_config,
                            build_model_from_config, has_val_set)
from tsm_dist.config import Config, ConfigError, load_config
from tsm_dist.commands.check_data import check_file_lists, preflight
from tsm_dist.distributed.engine import Engine, started
from tsm_dist.commands.exit_codes import (
    EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DATA, EXIT_NONFINITE, EXIT_OK, EXIT_STORAGE, CheckpointError,
    CoordinatedError, StorageError, UsageError, run_main, storage_problem,
)
from tsm_dist.training.evaluate import evaluate
from tsm_dist.training.memory_format import to_memory_format
from tsm_dist.training.optim import build_optimizer
from tsm_dist.runlog.header import git_commit, hardware, versions
from tsm_dist.state.stop_signals import StopSignals, exit_code_for, stop_message
from tsm_dist.state.resume import continue_under
from tsm_dist.state.failure import record_failure
from tsm_dist.runlog.account import RunLog
from tsm_dist.state.identity import START_OVER_FLAG, WorkdirInUse, new_run_id
from tsm_dist.training.run_spec import RunSpec, resolve_run
from tsm_dist.training.batch_plan import BatchPlan
from tsm_dist.training.elastic import Elastic
from tsm_dist.state.train_state import Position


# ---------------------------------------------------------------------------------- the recipe
def train(cfg: Config, workdir: str | Path, *, resume: str | None = None, start_over: bool = False,
          model_builder: ModelBuilder | None = None, loader_builder: LoaderBuilder | None = None) -> int:
    """Train on every rank of the launched job; returns the process exit code.

    Errors that every rank meets (config, file lists, the checkpoint to resume) raise on every rank and
    reach the command's edge (:func:`tsm_dist.commands.exit_codes.run_main`), which prints one line from rank 0.
    """
    # The stop signals are caught from the start: a cancel during start-up stops after the first step.
    with StopSignals() as stop, started(cfg.engine) as engine:  # 1. one process per GPU; shut down on any exit
        # the run resolved once for this world: the batch plan, and every consumer gets these values
        trainer = Trainer(resolve_run(cfg, engine.size), engine, Path(workdir), model_builder, loader_builder)
        try:
            start = functools.partial(trainer.start, resume, start_over)
            if trainer.elastic is None:
                start()
            status, code = trainer.loop(stop, start)
            return trainer.finish(status, code, stop)
        except (Exception, KeyboardInterrupt) as exc:
            stopped = record_failure(trainer.log.metrics, exc, trainer.pos, workdir=trainer.workdir,
                                     rank=engine.rank, size=engine.size)
            if stopped is exc:
                raise
            raise stopped from None
        finally:
            trainer.release()  # before the engine shuts down


class Stopped(Exception):
    """Training ends early, on every rank after the same step: ``status`` and ``code`` for the ``end`` record
    and the exit, the message for rank 0's one line."""

    def __init__(self, status: str, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class Diverged(Stopped):
    """The loss, the validation loss or the model's weights are not finite: no checkpoint, no ``best.pt``, exit 3."""

    def __init__(self, what: str, pos: Position) -> None:
        super().__init__("failed", EXIT_NONFINITE, f"{what} at optimizer step {pos.step} (epoch {pos.epoch}); "
                         "training stopped, no checkpoint written from it")


class Trainer:
    """One rank's part of a run: built from the config, then :meth:`resume`, :meth:`loop`, :meth:`finish`."""

    # ------------------------------------------------------------------------------ setup
    def __init__(self, run: RunSpec, engine: Engine, workdir: Path, model_builder: ModelBuilder | None = None,
                 loader_builder: LoaderBuilder | None = None) -> None:
        self.run, self.cfg, self.plan = run, run.config, run.batch
        cfg = self.cfg
        self.engine, self.workdir = engine, workdir
        self.device, self.root = engine.device, engine.is_root
        if cfg.data.device == "gpu" and self.device.type != "cuda":
            raise ConfigError("data.device=gpu needs a CUDA device; set data.device=cpu on this machine")
        self.K = self.plan.accumulate
        self.pos = Position()
        self.resume_path: Path | None = None
        self.run_id = new_run_id()  # rank 0's is the run's; a resumed run keeps its checkpoint's
        self.log = RunLog()  # metrics.jsonl, wandb, progress: opened on rank 0 only
        check_file_lists(cfg)  # a missing list: one line with the resolved path and how to make the set
        self._loader_builder = loader_builder
        self._build_data(loader_builder)
        if not cfg.engine.elastic:  # elastic: in start(), the first collective Horovod's elastic loop runs
            self._check_data()
        self._build_model(model_builder)
        self._clips_at = (0, 0)  # (epoch, clips of it before the step being taken), for elastic step records
        self.elastic = Elastic(self) if cfg.engine.elastic else None

    def _build_data(self, loader_builder: LoaderBuilder | None) -> None:
        # 2. sharded loaders: rank r reads shard r of size; every shard has the same number of batches
        cfg, plan, K = self.cfg, self.plan, self.K
        self.train_loader = build_loader_from_config(cfg, self.engine, train=True, builder=loader_builder)
        self.loader_world = (self.engine.rank, self.engine.size)  # the shard the loaders read
        self.val_loader = (build_loader_from_config(cfg, self.engine, train=False, builder=loader_builder)
                           if cfg.train.eval_every_epochs and has_val_set(cfg) else None)
        self.steps_per_epoch = len(self.train_loader) // K
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"data.batch_size={plan.per_gpu_batch} x {self.engine.size} ranks x accumulate {K} = "
                f"{plan.global_batch} clips per step does not fit the training set "
                f"({len(self.train_loader)} batches per rank per epoch)")
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.schedule = self.run.lr_schedule(self.steps_per_epoch)

    def _check_data(self) -> None:
        """Before the long wait: every rank probes its shard of the validation set and stats its share of
        the training set; the ranks agree on the outcome, and rank 0 names the first bad video."""
        problems = preflight(self.train_loader, self.val_loader, rank=self.engine.rank, size=self.engine.size)
        found = [p for shard in self.engine.allgather_object(problems) for p in shard]
        if found:
            more = (f" (and {len(found) - 1} more; 'tsm-dist check-data --config C' lists them all)"
                    if len(found) > 1 else "")
            raise CoordinatedError(f"{found[0]}{more}; data.skip_corrupt=true skips bad videos", EXIT_DATA)

    def _build_model(self, model_builder: ModelBuilder | None) -> None:
        # 3. model, optimizer, AMP; the seed alone decides rank 0's initial weights
        cfg, device = self.cfg, self.device
        train_state.seed(cfg.train.seed)
        model = build_model_from_config(cfg, model_builder).to(device)
        torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed-size clips: autotune each conv once
        # channels-last (2D or 3D: the model's own) on every device, CPU included; the header records it
        model, self.memory_format = to_memory_format(model, cfg.train.channels_last)
        optimizer = build_optimizer(model, cfg.optim, lr=self.schedule(0))
        self.model = model
        self.amp_dtype = amp_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
        self.criterion = nn.CrossEntropyLoss(ignore_index=-1)
        # 4. distributed optimizer: K backward passes, then one allreduce. Before loading a checkpoint:
        # Horovod's wrapper is a new optimizer over the same parameter groups, without their state
        self.train_model, self.optimizer = self.engine.distribute(model, optimizer, accumulate=self.K)

    def start(self, resume: str | None, start_over: bool = False) -> None:
        """5. resume and open the logs (an elastic run checks its data here too: its first collectives)."""
        if self.elastic is not None:
            self._check_data()
        self.resume(resume, start_over=start_over)
        self.open_logs()

    def fit_plan(self, plan: BatchPlan) -> None:
        """An elastic run's new world: this plan's loaders (rebuilt for the new shard count: a DALI pipeline
        cannot change its shard), K, steps per epoch and LR schedule."""
        self.run, self.plan, self.K = RunSpec(config=self.cfg, batch=plan), plan, plan.accumulate
        self.train_loader = self.val_loader = None
        gc.collect()  # the old pipelines' memory before the new ones take theirs
        self._build_data(self._loader_builder)
        self.engine.set_accumulate(self.optimizer, self.K)

    @property
    def ordered_prefix(self) -> bool:
        return _ordered_prefix(self.train_loader)

    def resume(self, resume: str | None, start_over: bool = False) -> None:
        """5. resume on rank 0, then broadcast parameters, optimizer state and the loop position."""
        engine = self.engine
        loaded, error, shared = None, None, None
        if self.root:
            try:
                self.resume_path, loaded = train_state.load(
                    resume, self.workdir, start_over=start_over, model=self.model, optimizer=self.optimizer,
                    model_config=self.cfg.to_dict()["model"], say=_say)
                if loaded is not None:
                    shared = train_state.position_of(loaded, self.resume_path, self.workdir, say=_say)
            except CheckpointError as exc:
                error = (str(exc), EXIT_CHECKPOINT)
            except WorkdirInUse as exc:
                error = (str(exc), EXIT_CONFIG)
            except StorageError as exc:
                error = (str(exc), EXIT_STORAGE)
        error = engine.broadcast_object(error)  # every rank stops on a bad checkpoint; rank 0 says why
        if error:
            raise CoordinatedError(*error)
        if loaded is not None:
            self.run_id = str(loaded.get("run_id") or self.run_id)
        position = engine.broadcast_object(shared)
        engine.broadcast_state(self.model, self.optimizer)
        train_state.seed(self.cfg.train.seed * 1000003 + engine.rank)  # dropout and augmentation differ between ranks
        if position is not None:
            self._continue_from(position)

    def _continue_from(self, position: dict[str, Any]) -> None:
        """Every rank: the loop position of the checkpoint, under this run's batch plan."""
        engine = self.engine
        try:
            where = continue_under(position, self.plan,
                                   self.steps_per_epoch, ordered_prefix=self.ordered_prefix,
                                   path=position["path"])
        except CheckpointError as exc:
            raise CoordinatedError(str(exc), EXIT_CHECKPOINT) from None
        self.pos = Position(where.epoch, where.step, where.batch_in_epoch, position["best_top1"],
                            where.epoch_end_pending)
        if self.root:
            print(f"tsm-dist train: resumed from {position['path']} (epoch {self.pos.epoch}, step {self.pos.step})",
                  file=sys.stderr)
            if where.note:
                print(f"tsm-dist train: {where.note}", file=sys.stderr)
        self.scaler.load_state_dict(position["scaler"])
        if position["world_size"] == engine.size:
            train_state.set_rng_state(position["rng"][engine.rank])

    def open_logs(self, continued: bool = False) -> None:
        """Rank 0: the resolved config, wandb, ``metrics.jsonl`` with its header record, the progress line
        (``continued``: an elastic run's new rank 0, see :meth:`RunLog.open`)."""
        if not self.root:
            return
        engine, plan = self.engine, self.plan
        self.log.open(self.workdir, self.cfg, dict(
            git_commit=git_commit(), engine=engine.name, world_size=engine.size, local_size=engine.local_size,
            device=str(self.device), memory_format=self.memory_format, engine_settings=engine.settings,
            model=self.cfg.model.name, run_id=self.run_id, num_frames=self.cfg.model.num_frames,
            per_gpu_batch=plan.per_gpu_batch, accumulate=self.K, global_batch=plan.global_batch,
            steps_per_epoch=self.steps_per_epoch, peak_lr=self.schedule.peak_lr,
            warmup_steps=self.schedule.warmup_steps,
            params=sum(p.numel() for p in self.model.parameters()),
            resumed_from=str(self.resume_path) if self.resume_path else None, versions=versions(),
            hardware=hardware()), total_steps=self.total_steps, step=self.pos.step, continued=continued)

    def open_logs_if_root(self) -> None:
        """An elastic run whose rank 0 died: the new rank 0 takes over the run's account."""
        if self.root and self.log.metrics is None:
            self.open_logs(continued=True)

    # ------------------------------------------------------------------------------ loop
    def loop(self, stop: StopSignals, start: Callable[[], None]) -> tuple[str, int]:
        """6. epochs of optimizer steps until done or stopped: (status, exit code). An elastic run calls
        ``start`` first, inside Horovod's elastic loop (:mod:`tsm_dist.training.elastic`).

        The one place a stop becomes an outcome: every rank raises the same :class:`Stopped` after the
        same step, and rank 0 says why in one line.
        """
        try:
            if self.elastic is not None:
                self.elastic.run(start, self._epochs, stop)
            else:
                self._epochs(stop)
        except Stopped as stopped:
            if self.root:
                print(f"tsm-dist train: {stopped}", file=sys.stderr, flush=True)
            return stopped.status, stopped.code
        return "completed", EXIT_OK

    def _epochs(self, stop: StopSignals) -> None:
        cfg, pos = self.cfg, self.pos
        if pos.epoch_end_pending:  # the previous run stopped between an epoch's last step and its evaluation
            pos.epoch_end_pending = False
            self.end_of_epoch(stop)
        while pos.epoch < cfg.train.epochs and pos.step < self.total_steps:
            self.train_loader.set_epoch(pos.epoch, pos.batch_in_epoch)  # same order as an uninterrupted run
            batches = iter(self.train_loader)
            self.train_model.train()
            for _ in range(pos.batch_in_epoch // self.K, self.steps_per_epoch):
                if pos.step >= self.total_steps:
                    break
                self.train_step(batches, stop)
                if self.elastic is not None:
                    self.elastic.after_step()
            self.end_of_epoch(stop)
            if self.elastic is not None and pos.epoch < cfg.train.epochs and pos.step < self.total_steps:
                self.elastic.commit()

    # ------------------------------------------------------------------------------ step
    def train_step(self, batches: Iterator[Any], stop: StopSignals) -> None:
        """One optimizer step and its bookkeeping; raises :class:`Stopped` when training must stop."""
        cfg, pos = self.cfg, self.pos
        step_start = time.perf_counter()
        # GPU syncs split a step into data/compute/sync time; only steps that are logged pay them
        timed = (pos.step + 1) % cfg.log.interval == 0 or pos.step + 1 == self.total_steps
        lr = self.schedule(pos.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._clips_at = (pos.epoch, pos.batch_in_epoch * self.plan.per_gpu_batch * self.engine.size)
        times = self.accumulate_and_step(batches, timed)
        pos.step += 1
        pos.batch_in_epoch += self.K
        # 7. one small allreduce: metrics averaged over ranks, plus the stop flags
        loss_value = times.loss.float().cpu()
        stats = self.engine.allreduce_mean(torch.tensor([
            loss_value.item(), times.data, times.compute, times.sync, time.perf_counter() - step_start,
            float(not torch.isfinite(loss_value)), *_signal_flags(stop)], dtype=torch.float64))
        loss, data_t, compute_t, sync_t, step_t, nonfinite, warned, terminated = stats.tolist()
        if nonfinite > 0:
            self.log.step(self.step_record(loss, lr), pos.epoch + 1, shown=False)
            raise Diverged("the loss of at least one rank is NaN or Inf", pos)
        if pos.step % cfg.log.interval == 0 or pos.step == self.total_steps:
            self.log.step(self.step_record(loss, lr, data_time=data_t, compute_time=compute_t, sync_time=sync_t,
                                           step_time=step_t), pos.epoch + 1)  # 1-based, as the eval record
        epoch_ended = pos.batch_in_epoch >= self.steps_per_epoch * self.K
        if epoch_ended:  # the epoch's last step
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
        self.stop_if_signalled(warned, terminated, epoch_end_pending=epoch_ended or pos.step >= self.total_steps)

    def accumulate_and_step(self, batches: Iterator[Any], timed: bool) -> StepTimes:
        """K forward/backward passes, one gradient allreduce, clip, optimizer step."""
        device, K = self.device, self.K
        self.optimizer.zero_grad()  # set_to_none: Horovod's wrapper takes no arguments
        times = StepTimes(loss=torch.zeros((), device=device))
        for micro in range(K):
            t = time.perf_counter()
            clips, labels = next(batches)
            clips, labels = clips.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if timed:
                _wait(device)
            times.data += time.perf_counter() - t
            t = time.perf_counter()
            with self.engine.no_sync(self.train_model, sync=micro == K - 1):
                with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    # / K: the K passes add up to the gradient of one K-times larger batch
                    loss = self.criterion(self.train_model(clips), labels) / K
                self.scaler.scale(loss).backward()
            times.loss += loss.detach()
            if timed:
                _wait(device)
            times.compute += time.perf_counter() - t
        t = time.perf_counter()
        self.engine.synchronize(self.optimizer)  # gradients are now averaged over all ranks
        times.sync = time.perf_counter() - t
        t = time.perf_counter()
        self.scaler.unscale_(self.optimizer)  # clip the true, synchronized gradient
        if self.cfg.optim.clip_grad_norm:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip_grad_norm)
        self.engine.step(self.optimizer, self.scaler)
        self.scaler.update()
        if timed:
            _wait(device)
        times.compute += time.perf_counter() - t
        return times

    def step_record(self, loss: float, lr: float, **timing: float) -> dict[str, Any]:
        """The step record (rank means) of the step just taken; ``timing``: see :func:`records.step_record`."""
        step = self.pos.step
        position = None
        if self.elastic is not None:  # which clips of the epoch's global order this step trained, and when
            position = {"data_epoch": self._clips_at[0], "clip_start": self._clips_at[1],
                        "clips": self.plan.global_batch, "world_size": self.engine.size, "time": time.time()}
        return records.step_record(epoch=round(step / self.steps_per_epoch, 4), step=step, loss=loss, lr=lr,
                                   clips_per_step=self.plan.per_gpu_batch * self.K, world_size=self.engine.size,
                                   position=position, **timing)

    def end_of_epoch(self, stop: StopSignals) -> None:
        """8. end of an epoch (or of max_steps): evaluate, rank 0 checkpoints, then a stop signal that arrived
        meanwhile is acted on now, not one training step (and maybe a whole evaluation) later."""
        cfg, pos = self.cfg, self.pos
        last = pos.epoch >= cfg.train.epochs or pos.step >= self.total_steps
        is_best, top1 = False, None
        if self.val_loader is not None and (pos.epoch % cfg.train.eval_every_epochs == 0 or last):
            # each rank kept its own BN statistics; evaluate (and save) rank 0's everywhere
            self.engine.broadcast_tensors({n: b for n, b in self.model.named_buffers()})
            result = evaluate(self.model, self.val_loader, self.engine, amp_dtype=self.amp_dtype)
            if not math.isfinite(result["loss"]):
                self.log.evaluation(result, pos.epoch, pos.step, shown=False)
                raise Diverged("the validation loss is NaN or Inf (the model diverged)", pos)
            is_best, top1 = result["top1"] > pos.best_top1, result["top1"]
            pos.best_top1 = max(pos.best_top1, result["top1"])
            self.log.evaluation(result, pos.epoch, pos.step)
            self.train_model.train()
        if cfg.train.checkpoint_every_epochs and (pos.epoch % cfg.train.checkpoint_every_epochs == 0 or last):
            self.save(is_best, ending=("completed", EXIT_OK) if last else None)
        self.log.epoch_done(pos.epoch, pos.step, top1)
        if not last:  # after the last epoch the run is complete, whatever arrived
            warned, terminated = self.engine.allreduce_sum(
                torch.tensor(_signal_flags(stop), dtype=torch.float64)).tolist()
            self.stop_if_signalled(warned, terminated)

    # ------------------------------------------------------------------------------ stop, checkpoint, end
    def stop_if_signalled(self, warned: float, terminated: float, *, epoch_end_pending: bool = False) -> None:
        """The one stop path for signals, after a step and after an epoch's end: ``warned`` and ``terminated``
        are the ranks' :func:`_signal_flags` combined by an allreduce, so every rank decides alike. A stop
        checkpoints the position and raises :class:`Stopped` with the code the job script acts on."""
        if warned == 0 and terminated == 0:
            return
        level = 2 if terminated > 0 else 1  # SIGTERM on any rank wins over the warning: a cancel sticks
        self.pos.epoch_end_pending = epoch_end_pending
        status, code = "preempted" if level == 1 else "terminated", exit_code_for(level)
        self.save(ending=(status, code))
        raise Stopped(status, code, stop_message(level, self.pos.step))

    def save(self, is_best: bool = False, ending: tuple[str, int] | None = None) -> None:
        """Every rank contributes its random state; rank 0 writes the checkpoint.

        ``ending``: the run ends with this checkpoint, as (status, exit code). Rank 0 then writes the ``end``
        record the moment the checkpoint is in place, before any further collective: after a stop signal
        the launcher's SIGKILL follows soon (mpirun: 1 s after its SIGTERM), and on a loaded machine it
        came between the checkpoint and an end record written later.
        """
        skipped = self._skipped_here() if ending else []
        shared = self.engine.allgather_object((train_state.rng_state(), _finite(self.model), skipped))
        if not all(finite for _, finite, _ in shared):
            raise Diverged("the model's weights are NaN or Inf", self.pos)
        end = None
        if ending is not None:
            videos = _union([shard for _, _, shard in shared])
            end = functools.partial(self.log.end, *ending, self.pos.step, self.pos.epoch, videos)
        error = None
        if self.root:
            try:
                train_state.write(self.workdir, model=self.model, optimizer=self.optimizer, scaler=self.scaler,
                                  pos=self.pos, rngs=[rng for rng, _, _ in shared], cfg=self.cfg,
                                  engine_name=self.engine.name, plan=self.plan, run_id=self.run_id, is_best=is_best,
                                  then=end)
            except OSError as exc:
                error = (f"{storage_problem(exc, exc.filename or self.workdir / CHECKPOINT_DIR)}; training "
                         "stopped, the previous checkpoint is kept")
        error = self.engine.broadcast_object(error)  # every rank stops with the same code
        if error:
            raise CoordinatedError(error, EXIT_STORAGE)
        self.log.ended = self.log.ended or ending is not None

    def finish(self, status: str, code: int, stop: StopSignals | None = None) -> int:
        """The ``end`` record (with the videos every shard skipped: reported, never silently lost).

        Then a barrier: no rank exits before rank 0 has written everything, because launchers
        (``horovodrun``, ``mpirun``) terminate the remaining ranks when the first one exits; from then
        on such a SIGTERM ends the process with ``code``, so every rank reports the same code.
        """
        if not self.log.ended:  # not already written with the last checkpoint
            skipped = _union(self.engine.allgather_object(self._skipped_here()))
            self.log.end(status, code, self.pos.step, self.pos.epoch, skipped)
        self.log.say_summary()
        self.engine.barrier()
        if stop is not None:
            stop.exit_on_signal(code)
        self.log.close_wandb(code)
        return code

    def _skipped_here(self) -> list[Any]:
        """The videos this rank's loaders skipped as unreadable: [video, reason] each."""
        return [s for loader in (self.train_loader, self.val_loader) if loader is not None for s in loader.skipped]

    def release(self) -> None:
        """Drop the distributed model and optimizer while the engine still runs (see :func:`main`)."""
        self.train_model = self.model = self.optimizer = None  # type: ignore[assignment]
        gc.collect()


# ------------------------------------------------------------------------------- building blocks
@dataclass
class StepTimes:
    """One optimizer step on this rank: the summed loss of its K micro-batches and where the time went."""

    loss: torch.Tensor
    data: float = 0.0
    compute: float = 0.0
    sync: float = 0.0


def _signal_flags(stop: StopSignals) -> list[float]:
    """This rank's part of the stop decision: [time-limit warning or more, SIGTERM/SIGINT]."""
    return [float(stop.level >= 1), float(stop.level >= 2)]


def _union(shards: list[list[Any]]) -> list[tuple[str, str]]:
    """Every rank's skipped videos, once each, sorted."""
    return sorted({tuple(s) for shard in shards for s in shard})


def _say(text: str) -> None:
    print(f"tsm-dist train: {text}", file=sys.stderr)


def _wait(device: torch.device) -> None:
    """Wait for queued GPU work so a phase's time is really spent in that phase.

    Only the compute stream: DALI prefetches on its own streams and must keep running.
    """
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _finite(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in [*module.parameters(), *module.buffers()]
               if t.is_floating_point())


def _ordered_prefix(loader: Any) -> bool:
    """Whether the loader takes an epoch's clips in one global order whatever the number of ranks."""
    return not getattr(getattr(loader, "planner", None), "contiguous", False)


# ------------------------------------------------------------------------------------ the CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsm-dist train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (see configs/ and docs/training.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--workdir", help="run directory (default: runs/<config name>)")
    parser.add_argument("--resume", help="'auto' (newest checkpoint in the workdir, if any) or a checkpoint path")
    parser.add_argument(START_OVER_FLAG, dest="start_over", action="store_true",
                        help="start a new run in a workdir that holds another run's checkpoints: that run's "
                        "checkpoints and records move into <workdir>/previous/<its run id>/")
    parser.add_argument("--accumulate", type=int, help="gradient accumulation steps (overrides train.accumulate)")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors on every rank "
                        "(or TSM_DIST_DEBUG=1); exit codes: README 'When things go wrong'")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``tsm-dist train``; errors become one line from one rank and a documented code (:mod:`tsm_dist.commands.exit_codes`)."""
    code = run_main("tsm-dist train", _main, argv)
    # Gloo at exit: torch's Gloo process group outlives destroy_process_group while DDP holds it, and freed
    # during interpreter finalization it aborts the process (exit 134 after a completed run). Free it now,
    # while the interpreter is whole; Trainer.release already dropped the model and optimizer. The runs
    # that showed it: docs/training.md, "Exit 134 after a completed run".
    gc.collect()
    return code


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.start_over and args.resume:
        raise UsageError(f"{START_OVER_FLAG} starts a new run and --resume continues one: give one of them")
    accumulate = {} if args.accumulate is None else {"train.accumulate": args.accumulate}
    cfg = load_config(args.config, args.overrides, accumulate)  # every rank fails the same way; rank 0 says why
    workdir = args.workdir or str(Path("runs") / Path(args.config).stem)
    return train(cfg, workdir, resume=args.resume, start_over=args.start_over)


if __name__ == "__main__":
    raise SystemExit(main())

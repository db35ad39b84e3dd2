"""Rank 0's account of a training run: ``metrics.jsonl`` (header, step, evaluation and end records), wandb
and the progress (a bar on a terminal, plain lines in a batch log, and one summary line at the end).

Every rank holds a :class:`RunLog`; only rank 0 opens it, and an unopened one writes nothing, so the
trainer reports without asking which rank it is on.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from tsm_dist.runlog import records
from tsm_dist.state.checkpoint import CHECKPOINT_DIR
from tsm_dist.config import Config, dump_config
from tsm_dist.runlog.progress import Progress, duration
from tsm_dist.runlog.wandb_run import WandbRun


class RunLog:
    def __init__(self) -> None:
        self.metrics: records.MetricsLog | None = None  # what run_failure writes the ``failed`` end record to
        self._wandb: WandbRun | None = None
        self._progress: Progress | None = None
        self._workdir = Path()
        self._epochs, self._started = 0, time.monotonic()
        self.best: tuple[float, int] | None = None  # (top-1, epoch) of the best evaluation, resumed runs' included
        self.ended = False  # the end record is written (every rank: set where rank 0 writes it)
        self._ending: tuple[str, int, int] | None = None

    def open(self, workdir: Path, cfg: Config, header: dict[str, Any], total_steps: int, step: int, *,
             continued: bool = False) -> None:
        """The resolved config beside the run, wandb, the metrics file with its header record, the progress line.
        ``continued``: an elastic run's new rank 0 takes over the account of the run under way (no new header:
        the records so far are this run's)."""
        workdir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, workdir / "config.yaml")
        self._wandb = WandbRun(cfg.log.wandb, cfg.log.project, workdir, cfg.to_dict())
        path = workdir / records.METRICS_FILE
        if header.get("resumed_from") or continued:  # the best evaluation so far may be from before
            self.best = _best_evaluation(path)
        self.metrics = records.MetricsLog(path)
        if not continued:
            self.metrics.write(records.header_record(config=cfg.to_dict(), **header))
        self._workdir, self._epochs, self._started = workdir, cfg.train.epochs, time.monotonic()
        self._progress = Progress(total_steps, enabled=cfg.log.progress, initial=step, epochs=cfg.train.epochs,
                                  every_s=cfg.log.progress_every_s)

    def step(self, record: dict[str, Any], epoch: int, *, shown: bool = True) -> None:
        """A step record of the (1-based) ``epoch`` it belongs to; ``shown=False`` writes it to the metrics
        file only (the step a run diverged at)."""
        if self.metrics is None:
            return
        self.metrics.write(record)
        if shown and self._wandb is not None and self._progress is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "type"}, step=record["step"])
            self._progress.update(record["step"], epoch, loss=record["loss"], lr=record["lr"],
                                  clips_s=record.get("clips_per_sec_total", 0.0),
                                  data_time=record.get("data_time", 0.0), step_time=record.get("step_time", 0.0))

    def evaluation(self, result: dict[str, float], epoch: int, step: int, *, shown: bool = True) -> None:
        """An evaluation record; ``shown=False``: the metrics file only (a non-finite validation loss)."""
        if self.metrics is None:
            return
        self.metrics.write(records.eval_record(epoch=epoch, step=step, **result))
        if shown and self._wandb is not None:
            self._wandb.log({f"val/{k}": v for k, v in result.items()}, step=step)
        if shown and (self.best is None or result["top1"] > self.best[0]):
            self.best = (float(result["top1"]), epoch)

    def membership(self, record: dict[str, Any], total_steps: int) -> None:
        """An elastic run's ranks changed: the record, one log line, and the progress' new step count."""
        if self.metrics is None:
            return
        self.metrics.write(record)
        back, at = record["rolled_back_to"], record["continues_at"]
        print(f"tsm-dist train: elastic: {record['old_world']} -> {record['new_world']} ranks ({record['cause']}); "
              f"rolled back to the commit at step {back['step']} (epoch {back['epoch']}), {record['steps_lost']} "
              f"step(s) lost; continuing at step {at['step']} under {record['plan']}"
              + (f"; {record['note']}" if record.get("note") else ""), file=sys.stderr, flush=True)
        if self._wandb is not None:
            self._wandb.log({"elastic/world_size": record["new_world"]}, step=at["step"])
        if self._progress is not None:
            self._progress.renumber(total_steps, at["step"])

    def epoch_done(self, epoch: int, step: int, top1: float | None = None) -> None:
        """The end of ``epoch`` (1-based, as the checkpoint and eval record count it): one progress line
        in a batch log, with this epoch's validation top-1 when it was evaluated."""
        if self._progress is None:
            return
        evaluation = ""
        if top1 is not None and self.best is not None:
            evaluation = f"val top-1 {top1:.1f} % (best {self.best[0]:.1f} %, epoch {self.best[1]})"
        self._progress.epoch_done(epoch, step, evaluation)

    def end(self, status: str, code: int, step: int, epoch: int, skipped: list[tuple[str, str]]) -> None:
        """The ``end`` record, with every video the shards skipped (reported, never silently lost)."""
        if self.metrics is not None:
            if skipped:
                print(f"tsm-dist train: {len(skipped)} video(s) skipped as unreadable, e.g. {skipped[0][0]}: "
                      f"{skipped[0][1]} (all in {self.metrics.path})", file=sys.stderr)
            self.metrics.write(records.end_record(status=status, step=step, epoch=epoch,
                                                  skipped=[list(s) for s in skipped], exit_code=code))
            self.metrics.close()
        if self._progress is not None:
            self._progress.close()
        self.ended, self._ending = True, (status, step, epoch)

    def say_summary(self) -> None:
        """Rank 0's last line, once the run has its end record (:meth:`summary`)."""
        if self._progress is not None and self._ending is not None:
            print(self.summary(*self._ending), file=sys.stderr, flush=True)

    def summary(self, status: str, step: int, epoch: int) -> str:
        """The run's last line: how it ended, the best top-1 and its epoch, where checkpoints and metrics are."""
        best = (f"best val top-1 {self.best[0]:.1f} % at epoch {self.best[1]}" if self.best is not None
                else "no evaluation")
        where = self._workdir
        return (f"tsm-dist train: {status} at epoch {epoch}/{self._epochs}, step {step} after "
                f"{duration(time.monotonic() - self._started)}; {best}; checkpoints in {where / CHECKPOINT_DIR}, "
                f"metrics in {where / records.METRICS_FILE}")

    def close_wandb(self, code: int) -> None:
        """Last of all: a wandb that hangs (its service killed) then holds no other rank."""
        if self._wandb is not None:
            self._wandb.finish(exit_code=code)


def _best_evaluation(path: Path) -> tuple[float, int] | None:
    """(top-1, epoch) of the best eval record in an existing metrics file, for a resumed run's summary."""
    try:
        evals = [r for r in records.read_records(path) if r["type"] == "eval"] if path.is_file() else []
    except (records.MetricsError, OSError):
        return None  # the summary then counts this run's evaluations only; training never stops for it
    best = max(evals, key=lambda r: float(r["top1"]), default=None)
    return None if best is None else (float(best["top1"]), int(best["epoch"]))

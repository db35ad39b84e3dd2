"""Rank 0's account of a training run: ``metrics.jsonl`` (header, step, evaluation and end records), wandb
and the progress line.

Every rank holds a :class:`RunLog`; only rank 0 opens it, and an unopened one writes nothing, so the
trainer reports without asking which rank it is on.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from tsm_dist import records
from tsm_dist.config import Config, dump_config
from tsm_dist.progress import Progress
from tsm_dist.wandb_log import WandbRun


class RunLog:
    def __init__(self) -> None:
        self.metrics: records.MetricsLog | None = None  # what run_failure writes the ``failed`` end record to
        self._wandb: WandbRun | None = None
        self._progress: Progress | None = None

    def open(self, workdir: Path, cfg: Config, header: dict[str, Any], total_steps: int, step: int) -> None:
        """The resolved config beside the run, wandb, the metrics file with its header record, the progress line."""
        workdir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, workdir / "config.yaml")
        self._wandb = WandbRun(cfg.log.wandb, cfg.log.project, workdir, cfg.to_dict())
        self.metrics = records.MetricsLog(workdir / records.METRICS_FILE)
        self.metrics.write(records.header_record(config=cfg.to_dict(), **header))
        self._progress = Progress(total_steps, enabled=cfg.log.progress, initial=step)

    def step(self, record: dict[str, Any], epoch: int, *, shown: bool = True) -> None:
        """A step record; ``shown=False`` writes it to the metrics file only (the step a run diverged at)."""
        if self.metrics is None:
            return
        self.metrics.write(record)
        if shown and self._wandb is not None and self._progress is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "type"}, step=record["step"])
            self._progress.update(record["step"], epoch, loss=record["loss"], lr=record["lr"],
                                  clips_s=record["clips_per_sec_total"])

    def evaluation(self, result: dict[str, float], epoch: int, step: int, *, shown: bool = True) -> None:
        """An evaluation record; ``shown=False``: the metrics file only (a non-finite validation loss)."""
        if self.metrics is None:
            return
        self.metrics.write(records.eval_record(epoch=epoch, step=step, **result))
        if shown and self._wandb is not None:
            self._wandb.log({f"val/{k}": v for k, v in result.items()}, step=step)

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

    def close_wandb(self, code: int) -> None:
        """Last of all: a wandb that hangs (its service killed) then holds no other rank."""
        if self._wandb is not None:
            self._wandb.finish(exit_code=code)

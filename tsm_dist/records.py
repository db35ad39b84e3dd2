"""The run log ``metrics.jsonl``: its record types, the one writer (rank 0) and the one reader.

One JSON object per line, each with a ``type``:

* ``header`` -- once per start of the trainer (a resumed run appends a new one): the resolved config,
  engine, world and batch layout, model, parameter count, versions and hardware;
* ``step`` -- every ``log.interval`` optimizer steps: loss and LR, plus (rank means) the time split
  ``data_time``, ``compute_time``, ``sync_time``, ``step_time`` and throughput ``clips_per_sec_rank`` /
  ``clips_per_sec_total``. The step that found a non-finite loss is logged with loss and LR only;
* ``eval`` -- after an evaluation: ``top1``, ``top5``, ``loss``, ``num_samples``;
* ``end`` -- how the run ended: ``status`` (completed, preempted -- the time-limit warning --, terminated
  -- SIGTERM --, failed) and the videos it skipped.

The file is appended to across restarts; :func:`read_last_run` returns the records after the last header.
A run whose ranks died before any of them wrote its ``end`` record gets one from its job script
(``python -m tsm_dist.records finish``: :func:`close_run`), ``failed`` with the ranks' exit code as cause.
The trainer writes through :class:`MetricsLog`; the scaling sweep's collector, the allreduce benchmark and
the demo read through :func:`read_records` / :func:`read_last_run`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"

# the keys every record of a type has ("type" aside); the reader refuses a record without them
REQUIRED: dict[str, tuple[str, ...]] = {
    "header": ("time", "config", "engine", "world_size", "local_size", "model", "num_frames", "per_gpu_batch",
               "accumulate", "global_batch", "params"),
    "step": ("epoch", "step", "loss", "lr"),
    "eval": ("epoch", "step", "top1", "top5", "loss", "num_samples"),
    "end": ("time", "status", "step", "epoch"),
}
TIMING = ("data_time", "compute_time", "sync_time", "step_time")  # step records of timed steps


class MetricsError(ValueError):
    """A metrics file that does not follow this format; the message names the file (and line)."""


def _record(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    missing = [key for key in REQUIRED[kind] if key not in fields]
    if missing:
        raise TypeError(f"a {kind} record needs {', '.join(missing)}")
    return {"type": kind, **fields}


def header_record(**fields: Any) -> dict[str, Any]:
    """The run header: at least the keys of ``REQUIRED["header"]`` (``time`` defaults to now)."""
    return _record("header", {"time": time.time(), **fields})


def step_record(*, epoch: float, step: int, loss: float, lr: float, clips_per_step: int = 0,
                world_size: int = 1, **timing: float) -> dict[str, Any]:
    """A step record; with ``timing`` (the four ``TIMING`` keys) also clips/s from ``clips_per_step``
    (per rank) and ``world_size``."""
    record = _record("step", {"epoch": epoch, "step": step, "loss": loss, "lr": lr})
    if timing:
        missing = [key for key in TIMING if key not in timing]
        if missing:
            raise TypeError(f"a timed step record needs {', '.join(missing)}")
        record.update(timing)
        record["clips_per_sec_rank"] = clips_per_step / timing["step_time"]
        record["clips_per_sec_total"] = clips_per_step * world_size / timing["step_time"]
    return record


def eval_record(*, epoch: int, step: int, **result: Any) -> dict[str, Any]:
    """An evaluation: ``result`` is :func:`tsm_dist.evaluate.evaluate`'s top1, top5, loss, num_samples."""
    return _record("eval", {"epoch": epoch, "step": step, **result})


def end_record(*, status: str, step: int, epoch: int, skipped: list[list[str]] | None = None,
               **fields: Any) -> dict[str, Any]:
    """How the run ended: ``status`` completed, preempted (USR1), terminated (SIGTERM) or failed; ``skipped`` lists [video, reason]."""
    return _record("end", {"time": time.time(), "status": status, "step": step, "epoch": epoch,
                           "skipped": skipped or [], **fields})


class MetricsLog:
    """Appends records, one JSON object per line, flushed: a killed job keeps every record it wrote."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        if record.get("type") not in REQUIRED:
            raise TypeError(f"not a metrics record: {record!r:.80}")
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every record of a metrics file, checked: a JSON object per line, a known type, its required keys."""
    path = Path(path)
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise MetricsError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or record.get("type") not in REQUIRED:
            raise MetricsError(f"{path}:{lineno}: a metrics record must be an object with a 'type' of "
                               f"{', '.join(REQUIRED)}")
        missing = [key for key in REQUIRED[record["type"]] if key not in record]
        if missing:
            raise MetricsError(f"{path}:{lineno}: {record['type']} record lacks {', '.join(map(repr, missing))}")
        records.append(record)
    return records


@dataclass
class RunRecords:
    """One start of the trainer: its header and the records written after it."""

    header: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    # None: still running, or killed without a word (the job scripts then append a failed one: close_run)
    end: dict[str, Any] | None = None

    @property
    def status(self) -> str:
        return str(self.end["status"]) if self.end else "running"


def read_last_run(path: str | Path) -> RunRecords:
    """The last run of an (appended) metrics file; steps sorted by step number."""
    records = read_records(path)
    starts = [i for i, r in enumerate(records) if r["type"] == "header"]
    if not starts:
        raise MetricsError(f"{path}: no header record")
    run = RunRecords(header=records[starts[-1]])
    for record in records[starts[-1] + 1:]:
        if record["type"] == "step":
            run.steps.append(record)
        elif record["type"] == "eval":
            run.evals.append(record)
        elif record["type"] == "end":
            run.end = record
    run.steps.sort(key=lambda r: r["step"])
    return run


# ------------------------------------------------------------------ the job scripts' helper
def close_run(path: str | Path, exit_code: int, job_id: str = "") -> dict[str, Any] | None:
    """Append a ``failed`` end record to the last run of ``path`` when its ranks exited with
    ``exit_code`` != 0 and none of them wrote one (killed, or died before they could); return it, else None.

    The job script calls this after the ranks, so that a run is never left looking "running" once its
    job is over; the cause names the exit code and who recorded it.
    """
    path = Path(path)
    if exit_code == 0 or not path.is_file():
        return None
    run = read_last_run(path)
    if run.end is not None:
        return None
    last = run.steps[-1] if run.steps else {"step": 0, "epoch": 0}
    signal = f" (signal {exit_code - 128})" if exit_code > 128 else ""
    job = f"job {job_id}: " if job_id else ""
    record = end_record(status="failed", step=int(last["step"]), epoch=int(last["epoch"]),
                        cause=f"{job}ranks exited with status {exit_code}{signal}; no rank wrote an end record "
                              f"(recorded by the job script)", exit_code=exit_code)
    log = MetricsLog(path)
    try:
        log.write(record)
    finally:
        log.close()
    return record


def describe_run(path: str | Path) -> str:
    """One line for a batch log: where the run's record is, how it ended, epochs, the last accuracy."""
    path = Path(path)
    if not path.is_file():
        return f"run record: {path} was not written (the trainer did not start; its error is above)"
    run = read_last_run(path)
    end = run.end or {}
    where = f"step {end.get('step', run.steps[-1]['step'] if run.steps else 0)}"
    if "epoch" in end:
        where += f", epoch {end['epoch']}"
    cause = f" ({end['cause']})" if end.get("cause") else ""
    last = run.evals[-1] if run.evals else None
    accuracy = (f"; last evaluation (epoch {last['epoch']}): top-1 {float(last['top1']):.2f} %, top-5 "
                f"{float(last['top5']):.2f} %" if last else "; no evaluation in this run")
    return f"run record: {path}: {run.status}{cause} at {where}{accuracy}"


def main(argv: list[str] | None = None) -> int:
    """``python -m tsm_dist.records finish METRICS --exit-code RC [--job ID]``: the job scripts' last step."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m tsm_dist.records", description=main.__doc__)
    parser.add_argument("action", choices=("finish",))
    parser.add_argument("metrics", type=Path, help="the run's metrics.jsonl")
    parser.add_argument("--exit-code", type=int, required=True, help="the ranks' exit status")
    parser.add_argument("--job", default="", help="the scheduler's job id, for the cause")
    args = parser.parse_args(argv)
    try:
        close_run(args.metrics, args.exit_code, args.job)
        print(describe_run(args.metrics), flush=True)
    except (MetricsError, OSError) as err:  # the job's exit code stays the ranks'; this only reports
        print(f"run record: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

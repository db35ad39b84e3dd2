"""The run log ``metrics.jsonl``: its record types, the one writer (rank 0) and the one reader.

One JSON object per line, each with a ``type``:

* ``header`` -- once per start of the trainer (a resumed run appends a new one): the resolved config,
  engine, world and batch layout, model, parameter count, versions and hardware;
* ``step`` -- every ``log.interval`` optimizer steps: loss and LR, plus (rank means) the time split
  ``data_time``, ``compute_time``, ``sync_time``, ``step_time`` and throughput ``clips_per_sec_rank`` /
  ``clips_per_sec_total``. The step that found a non-finite loss is logged with loss and LR only;
* ``eval`` -- after an evaluation: ``top1``, ``top5``, ``loss``, ``num_samples``;
* ``end`` -- how the run ended: ``status`` (completed, preempted -- the time-limit warning --, terminated
  -- SIGTERM --, failed) and the videos it skipped;
* ``membership`` -- an elastic run's ranks changed (``engine.elastic``): old and new world size, the cause,
  the commit the run rolled back to, the steps lost, where it continues and under which batch plan. Step
  records written before it with steps past ``rolled_back_to`` were undone; :func:`read_last_run` drops
  them. An elastic run's step records also say which clips they trained (``data_epoch``, ``clip_start``,
  ``clips``: a slice of the epoch's global clip order) and when (``time``).

The file is appended to across restarts; :func:`read_last_run` returns the records after the last header.
A run whose ranks died before any of them wrote its ``end`` record gets one from its job script
(``python -m tsm_dist.runlog.records finish``: :func:`close_run`), ``failed`` with the ranks' exit code as cause;
the same step gives the job its exit code, the one the run's ``end`` record decided (:func:`finish_job`).
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
    "membership": ("time", "old_world", "new_world", "rolled_back_to", "steps_lost", "continues_at"),
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
                world_size: int = 1, position: dict[str, Any] | None = None, **timing: float) -> dict[str, Any]:
    """A step record; with ``timing`` (the four ``TIMING`` keys) also clips/s from ``clips_per_step``
    (per rank) and ``world_size``; ``position``: the clips it trained (elastic runs)."""
    record = _record("step", {"epoch": epoch, "step": step, "loss": loss, "lr": lr, **(position or {})})
    if timing:
        missing = [key for key in TIMING if key not in timing]
        if missing:
            raise TypeError(f"a timed step record needs {', '.join(missing)}")
        record.update(timing)
        record["clips_per_sec_rank"] = clips_per_step / timing["step_time"]
        record["clips_per_sec_total"] = clips_per_step * world_size / timing["step_time"]
    return record


def eval_record(*, epoch: int, step: int, **result: Any) -> dict[str, Any]:
    """An evaluation: ``result`` is :func:`tsm_dist.training.evaluate.evaluate`'s top1, top5, loss, num_samples."""
    return _record("eval", {"epoch": epoch, "step": step, **result})


def end_record(*, status: str, step: int, epoch: int, skipped: list[list[str]] | None = None,
               **fields: Any) -> dict[str, Any]:
    """How the run ended: ``status`` completed, preempted (USR1), terminated (SIGTERM) or failed; ``skipped`` lists [video, reason]."""
    return _record("end", {"time": time.time(), "status": status, "step": step, "epoch": epoch,
                           "skipped": skipped or [], **fields})


def membership_record(**fields: Any) -> dict[str, Any]:
    """An elastic run's change of ranks (see the module's description)."""
    return _record("membership", {"time": time.time(), **fields})


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

    @property
    def closed(self) -> bool:
        return self._file.closed


def read_records(path: str | Path, since: int = 0) -> list[dict[str, Any]]:
    """Every record of a metrics file, checked: a JSON object per line, a known type, its required keys;
    ``since``: only those appended after that many bytes (line numbers in messages stay the file's)."""
    path = Path(path)
    records = []
    data = path.read_bytes()
    first = data.count(b"\n", 0, since) + 1
    for lineno, line in enumerate(data[since:].decode().splitlines(), first):
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
    membership: list[dict[str, Any]] = field(default_factory=list)  # an elastic run's changes of ranks

    @property
    def status(self) -> str:
        return str(self.end["status"]) if self.end else "running"

    def world_sizes(self) -> str:
        """The run's world sizes in order, "4 -> 3 -> 4" (one number when its ranks never changed)."""
        sizes = [self.header.get("world_size"), *(m["new_world"] for m in self.membership)]
        if self.membership:
            sizes[0] = self.membership[0]["old_world"]
        return " -> ".join(str(w) for w in sizes)


def read_last_run(path: str | Path, since: int = 0) -> RunRecords:
    """The last run of an (appended) metrics file, of those started after byte ``since``; steps sorted by
    step number."""
    records = read_records(path, since)
    starts = [i for i, r in enumerate(records) if r["type"] == "header"]
    if not starts:
        raise MetricsError(f"{path}: no header record" + (f" after byte {since}" if since else ""))
    run = RunRecords(header=records[starts[-1]])
    for record in records[starts[-1] + 1:]:
        if record["type"] == "step":
            run.steps.append(record)
        elif record["type"] == "eval":
            run.evals.append(record)
        elif record["type"] == "end":
            run.end = record
        elif record["type"] == "membership":  # the steps (and evaluations) after the commit it rolled back to were undone
            run.membership.append(record)
            back = record["rolled_back_to"]["step"]
            run.steps = [s for s in run.steps if s["step"] <= back]
            run.evals = [e for e in run.evals if e["step"] <= back]  # an epoch evaluated again after the rollback
    run.steps.sort(key=lambda r: r["step"])
    return run


# ------------------------------------------------------------------ the job scripts' helper
def close_run(path: str | Path, exit_code: int, job_id: str = "", since: int = 0) -> dict[str, Any] | None:
    """Append a ``failed`` end record to the last run of ``path`` (started after byte ``since``) when its
    ranks exited with ``exit_code`` != 0 and none of them wrote one (killed, or died before they could);
    return it, else None.

    The job script calls this after the ranks, so that a run is never left looking "running" once its
    job is over; the cause names the exit code and who recorded it.
    """
    path = Path(path)
    if exit_code == 0 or not path.is_file():
        return None
    run = read_last_run(path, since)
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


def describe_run(path: str | Path, since: int = 0) -> str:
    """One line for a batch log: where the run's record is, how it ended, epochs, the last accuracy."""
    path = Path(path)
    if not path.is_file():
        return f"run record: {path} was not written (the trainer did not start; its error is above)"
    run = read_last_run(path, since)
    end = run.end or {}
    where = f"step {end.get('step', run.steps[-1]['step'] if run.steps else 0)}"
    if "epoch" in end:
        where += f", epoch {end['epoch']}"
    cause = f" ({end['cause']})" if end.get("cause") else ""
    last = run.evals[-1] if run.evals else None
    accuracy = (f"; last evaluation (epoch {last['epoch']}): top-1 {float(last['top1']):.2f} %, top-5 "
                f"{float(last['top5']):.2f} %" if last else "; no evaluation in this run")
    changes = ""
    if run.membership:
        lost = sum(int(m["steps_lost"]) for m in run.membership)
        changes = f"; elastic: ranks {run.world_sizes()} ({len(run.membership)} change(s), {lost} step(s) lost)"
    return f"run record: {path}: {run.status}{cause} at {where}{accuracy}{changes}"


def _appended_since(path: Path, since: int) -> int | None:
    """``since`` when the file grew past it at a line boundary (records appended by this job), 0 when
    the file is not the one measured (shorter, or not cut at a line end), None when nothing was appended."""
    data = path.read_bytes()
    if since == len(data):
        return None
    if since > len(data) or (since and data[since - 1:since] != b"\n"):
        return 0
    return since


def finish_job(path: str | Path, exit_code: int, job_id: str = "", since: int = 0) -> tuple[int, str]:
    """The job scripts' last step after the ranks exited with ``exit_code`` (the launcher's status):
    record a run that no rank closed (:func:`close_run`) and return (the job's exit code, one line for
    its log).

    The job's exit code is the one the run's ``end`` record decided (``exit_code``) when this job's ranks
    wrote it: a launcher that kills the surviving ranks after one was lost exits 137 or 143 (as if the job
    had been cancelled) although rank 0 recorded ``failed``, 1. ``since``: the metrics file's size before
    the ranks started, so that a run of an earlier job is never taken for this one.
    """
    path = Path(path)
    start = _appended_since(path, since) if path.is_file() else None
    if start is None:
        what = "was not written" if not path.is_file() else "has no record of this job"
        return exit_code, f"run record: {path} {what} (the trainer did not start; its error is above)"
    close_run(path, exit_code, job_id, start)
    run = read_last_run(path, start)
    decided = (run.end or {}).get("exit_code")
    code = decided if isinstance(decided, int) and 0 <= decided <= 255 else exit_code
    line = describe_run(path, start)
    if code != exit_code:
        line += f"; exit code {code}, as the end record decided (the launcher's: {exit_code})"
    return code, line


def main(argv: list[str] | None = None) -> int:
    """``python -m tsm_dist.runlog.records finish METRICS --exit-code RC [--since BYTES] [--job ID]``: the job
    scripts' last step. Exits with the job's exit code (:func:`finish_job`); on an error of its own, with RC."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m tsm_dist.runlog.records", description=main.__doc__)
    parser.add_argument("action", choices=("finish",))
    parser.add_argument("metrics", type=Path, help="the run's metrics.jsonl")
    parser.add_argument("--exit-code", type=int, required=True, help="the ranks' exit status")
    parser.add_argument("--since", type=int, default=0,
                        help="the metrics file's size in bytes before the ranks started (0: no file)")
    parser.add_argument("--job", default="", help="the scheduler's job id, for the cause")
    args = parser.parse_args(argv)
    try:
        code, line = finish_job(args.metrics, args.exit_code, args.job, max(0, args.since))
    except (MetricsError, OSError, UnicodeDecodeError) as err:  # the job's exit code stays the ranks'
        print(f"run record: {err}", file=sys.stderr)
        return args.exit_code
    print(line, flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())

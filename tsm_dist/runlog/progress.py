"""Rank 0's progress during training: a tqdm bar on a terminal, plain lines in a batch job's log.

Under horovodrun, mpirun, srun and jsrun rank 0's stderr is never a terminal, so a bar would never show
and a batch log would stay empty for hours: there a line is written at the end of every epoch and every
``every_s`` seconds in between, each one complete on its own (grep-able, no carriage returns).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO


def duration(seconds: float) -> str:
    """``95`` -> ``1m35s``; ``7325`` -> ``2h02m``: short enough for a progress line."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Rank 0's progress on ``stream`` (stderr); rank 0 alone builds one.

    ``enabled`` is ``log.progress``: None (auto) shows the bar on a terminal and plain lines otherwise;
    True the bar everywhere; False neither (the run's last summary line is still written by
    :class:`tsm_dist.runlog.account.RunLog`). Epochs are shown 1-based, as the checkpoints and eval records count
    them: the steps of ``epoch 1/E`` end with the eval record of epoch 1.
    """

    def __init__(self, total_steps: int, enabled: bool | None = None, stream: TextIO | None = None,
                 initial: int = 0, *, epochs: int = 0, every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stderr
        self.total, self.epochs, self.every_s, self._clock = total_steps, epochs, every_s, clock
        self._bar = None
        self._lines = False
        if self.stream.isatty() if enabled is None else enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial, file=self.stream, unit="step", dynamic_ncols=True)
        elif enabled is None:
            self._lines = True
        self._start_step, self._start_t = initial, clock()
        self._last_line_t = self._start_t
        self._window: list[dict[str, float]] = []  # the step values since the last line
        self._step, self._epoch = initial, 0

    def renumber(self, total_steps: int, step: int) -> None:
        """An elastic run's new batch plan numbers its steps anew: the new total and position; the rate
        (and the ETA) counts from here."""
        self.total, self._step = total_steps, step
        if self._bar is not None:
            self._bar.total, self._bar.n = total_steps, step
            self._bar.refresh()
        self._start_step, self._start_t = step, self._clock()

    def update(self, step: int, epoch: int, **values: float) -> None:
        """The step just taken, in the (1-based) ``epoch`` it belongs to; ``values``: loss, lr, clips_s and,
        for timed steps, data_time and step_time (the data-wait share)."""
        self._step, self._epoch = step, epoch
        if self._bar is not None:
            self._bar.set_description(self._epoch_text(epoch), refresh=False)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k not in ("data_time", "step_time")},
                                  refresh=False)
            self._bar.update(step - self._bar.n)
            return
        if not self._lines:
            return
        self._window.append(values)
        if self._clock() - self._last_line_t >= self.every_s:
            self._line(f"{self._epoch_text(epoch)} step {step}/{self.total}")

    def epoch_done(self, epoch: int, step: int, evaluation: str = "") -> None:
        """The end of ``epoch`` (1-based), after its evaluation: one line in a batch log (``evaluation``:
        e.g. "val top-1 87.5 % (best 87.5 %, epoch 3)")."""
        self._step = step
        if self._bar is not None:  # the bar redraws at most every 0.1 s: a short epoch is shown once it ends
            self._bar.set_description(self._epoch_text(epoch), refresh=False)
            self._bar.refresh()
        if self._lines:
            self._line(f"{self._epoch_text(epoch)} done, step {step}/{self.total}", evaluation)

    def _epoch_text(self, epoch: int) -> str:
        return f"epoch {epoch}/{self.epochs}" if self.epochs else f"epoch {epoch}"

    def _line(self, where: str, extra: str = "") -> None:
        now = self._clock()
        parts = [where, *_window_summary(self._window)]
        done, elapsed = self._step - self._start_step, now - self._start_t
        if 0 < done and self._step < self.total:
            parts.append(f"ETA {duration(elapsed / done * (self.total - self._step))}")
        parts.append(f"elapsed {duration(elapsed)}")
        if extra:
            parts.append(extra)
        print("tsm-dist train: " + ", ".join(parts), file=self.stream, flush=True)
        self._window, self._last_line_t = [], now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _window_summary(window: list[dict[str, Any]]) -> list[str]:
    """Loss and LR of the last step; clips/s and the data-wait share over the steps since the last line."""
    if not window:
        return []
    last = window[-1]
    parts = [f"loss {last['loss']:.4g}", f"lr {last['lr']:.3g}"]
    clips = [v["clips_s"] for v in window if v.get("clips_s")]
    if clips:
        parts.append(f"{sum(clips) / len(clips):.1f} clips/s")
    timed = [v for v in window if v.get("step_time")]
    if timed:
        share = sum(v["data_time"] for v in timed) / sum(v["step_time"] for v in timed)
        parts.append(f"data wait {100 * share:.0f} %")
    return parts

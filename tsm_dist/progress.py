"""The training progress bar (tqdm) of rank 0."""
from __future__ import annotations

import sys
from typing import TextIO

class Progress:
    """The training progress bar (tqdm) on stderr; rank 0 alone builds one.

    ``enabled`` is ``log.progress``: None (auto) shows it on a terminal only, so batch jobs' logs stay
    clean; True shows it in non-interactive logs too; False never.
    """

    def __init__(self, total_steps: int, enabled: bool | None = None, stream: TextIO | None = None,
                 initial: int = 0) -> None:
        stream = stream or sys.stderr
        self._bar = None
        if stream.isatty() if enabled is None else enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial, file=stream, unit="step", dynamic_ncols=True)

    def update(self, step: int, epoch: int, **values: float) -> None:
        if self._bar is None:
            return
        self._bar.set_description(f"epoch {epoch}", refresh=False)
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

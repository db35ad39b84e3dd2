"""The progress bar of rank 0: on a terminal unless asked otherwise."""
from __future__ import annotations

import io

import pytest

from tsm_dist.runlog.progress import Progress


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("enabled, tty, shown", [(None, True, True), (None, False, False), (True, False, True),
                                                 (False, True, False)])
def test_progress_bar_only_on_a_terminal_unless_asked(enabled, tty, shown):
    stream = _Stream(tty)
    bar = Progress(10, enabled=enabled, stream=stream, initial=2)  # resumed at step 2
    bar.update(5, 1, loss=0.5, lr=0.1)
    bar.close()
    text = stream.getvalue()
    assert bool(text) == shown
    if shown:
        assert "epoch 1" in text and "5/10" in text and "loss=0.5" in text

"""argparse types shared by the command lines: comma lists of names, of known choices, of counts; bounded integers."""
from __future__ import annotations

import argparse
from typing import Callable, Sequence


def name_list(text: str) -> list[str]:
    """``a,b,c`` -> ["a", "b", "c"] (blanks dropped)."""
    return [v.strip() for v in text.split(",") if v.strip()]


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """A non-empty comma list whose items are all in ``choices``."""
    def parse(text: str) -> list[str]:
        values = name_list(text)
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}; choose from {', '.join(choices)}")
        return values
    return parse


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (a size, a count of frames)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (a limit where 0 means none)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def count_list(text: str) -> list[int]:
    """``1,2,4`` -> [1, 2, 4]: distinct positive integers, sorted."""
    try:
        values = sorted({int(v) for v in name_list(text)})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"counts must be >= 1, got {text!r}")
    return values

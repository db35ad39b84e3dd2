"""argparse types shared by the command lines: comma lists of names, of known choices, of counts."""
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


def count_list(text: str) -> list[int]:
    """``1,2,4`` -> [1, 2, 4]: distinct positive integers, sorted."""
    try:
        values = sorted({int(v) for v in name_list(text)})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"counts must be >= 1, got {text!r}")
    return values

"""The file-list format: one video per line, ``relative/path label [start_frame end_frame]``.

Paths are relative to a root directory (absolute paths are kept as they are) and may contain spaces:
the line is split from the right, so only the last two (or four) whitespace-separated fields are
numbers. ``start_frame``/``end_frame`` restrict a video to the frames ``[start, end)``. Blank lines and
lines starting with ``#`` are ignored. Labels index ``classes.txt`` (one class name per line).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

from tsm_dist.data.errors import FileListError


@dataclass(frozen=True)
class VideoRecord:
    """One line of a file list; ``where`` is ``list_file:line`` for error messages."""

    path: str
    label: int
    start: int | None = None
    end: int | None = None
    where: str = ""

    def resolve(self, root: str | None) -> str:
        return os.path.join(root, self.path) if root else self.path


def _parse_line(text: str, where: str) -> VideoRecord:
    fields = text.split()
    numeric = 0
    for field in reversed(fields):
        if not field.lstrip("-").isdigit() or numeric == 3:
            break
        numeric += 1
    if numeric >= 3 and len(fields) >= 4:
        path = text.rsplit(maxsplit=3)[0]
        label, start, end = (int(f) for f in fields[-3:])
        if not 0 <= start < end:
            raise FileListError(f"{where}: frame range [{start}, {end}) is empty or negative")
        return VideoRecord(path, label, start, end, where)
    if numeric >= 1 and len(fields) >= 2:
        return VideoRecord(text.rsplit(maxsplit=1)[0], int(fields[-1]), where=where)
    raise FileListError(f"{where}: expected 'path label [start_frame end_frame]', got {text!r}")


def read_file_list(
    list_path: str, *, num_classes: int | None = None, skip_invalid: bool = False
) -> tuple[list[VideoRecord], list[tuple[str, str]]]:
    """Parse ``list_path``; return the records and the ``(file, reason)`` lines skipped.

    A malformed line or a label outside ``[0, num_classes)`` raises :class:`FileListError` naming the
    list file and line, unless ``skip_invalid`` is set: then it is skipped and reported.
    """
    if os.path.isdir(list_path):
        raise FileListError(f"{list_path} is a directory without pack.json: neither a file list nor a packed set "
                            "(`tsm-dist pack` writes pack.json last; an unfinished pack has none either)")
    if not os.path.isfile(list_path):
        raise FileListError(f"file list {list_path} does not exist")
    records: list[VideoRecord] = []
    skipped: list[tuple[str, str]] = []
    with open(list_path, encoding="utf-8") as f:
        for line_no, raw in enumerate(f, start=1):
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            try:
                records.append(_parse_line(text, f"{list_path}:{line_no}"))
            except FileListError as err:
                if not skip_invalid:
                    raise
                skipped.append((text, str(err)))
    records, invalid = check_labels(records, num_classes, skip_invalid=skip_invalid)
    skipped.extend(invalid)
    if not records:
        raise FileListError(f"file list {list_path} names no usable video")
    return records, skipped


def check_labels(
    records: list[VideoRecord], num_classes: int | None, *, skip_invalid: bool = False
) -> tuple[list[VideoRecord], list[tuple[str, str]]]:
    """Keep records whose label is in ``[0, num_classes)``; the others raise, or are returned as
    ``(path, reason)`` with ``skip_invalid``."""
    kept: list[VideoRecord] = []
    skipped: list[tuple[str, str]] = []
    bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
    for r in records:
        if r.label >= 0 and (num_classes is None or r.label < num_classes):
            kept.append(r)
            continue
        reason = f"{r.where or r.path}: label {r.label} of {r.path} is outside the classes {bound}"
        if not skip_invalid:
            raise FileListError(reason)
        skipped.append((r.path, reason))
    return kept, skipped


def write_file_list(list_path: str, records: Iterable[VideoRecord]) -> int:
    """Write records in the file-list format; return how many were written."""
    count = 0
    with open(list_path, "w", encoding="utf-8") as f:
        for r in records:
            span = f" {r.start} {r.end}" if r.start is not None and r.end is not None else ""
            f.write(f"{r.path} {r.label}{span}\n")
            count += 1
    return count


def read_class_names(path: str) -> list[str]:
    """``classes.txt``: one class name per line, the line index is the label."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def write_class_names(path: str, names: Iterable[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(f"{name}\n" for name in names)

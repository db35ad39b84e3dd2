"""Errors for bad input data. Every message names the culprit: the list file and line, the video file."""
from __future__ import annotations


class DataError(Exception):
    """Bad input data (file list, annotation file or video)."""


class FileListError(DataError):
    """A line of a file list or an annotation file is malformed or out of range."""


class VideoError(DataError):
    """A video cannot be used: missing, empty, corrupt, too short or in a codec the backend cannot decode.

    ``path`` is the video file, ``reason`` the cause without the file name (what ``loader.skipped``
    records), ``where`` the list file and line that named the video, when known.
    """

    def __init__(self, path: str, reason: str, where: str = "") -> None:
        self.path = path
        self.reason = reason
        self.where = where
        listed = f" (listed at {where})" if where else ""
        super().__init__(f"{path}{listed}: {reason}")

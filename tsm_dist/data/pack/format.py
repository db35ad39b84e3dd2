"""The packed video layout (``tsm-dist pack``) and the byte reader every file backend uses.

A packed directory ``OUT`` holds (docs/data.md, "Packed video shards", is the user-facing spec):

* ``pack.json``: ``{"format": "tsm-dist-packed", "version": 1, "complete": true, "videos": N,
  "shards": [{"file": "shard-00000.bin", "bytes": B}, ...], ...}`` (settings of the pack run too);
* ``index.jsonl``: one JSON object per video, in training order: ``path`` (as listed), ``label``,
  ``start``/``end`` (frame range or null), ``shard``, ``offset``, ``length``, ``crc32`` (zlib, of the
  video's bytes), ``frames``, ``height``, ``width``, ``codec``, ``item`` (line number in the source list);
* ``shard-NNNNN.bin``: complete video files (each a valid container) concatenated, nothing in between.

Readers never probe a packed video: frame count, size and codec come from the index. ``ByteReader``
reads a planned clip's encoded bytes, from its own file or from a shard (one open per shard per epoch,
positional reads), checks the checksum, and counts files opened and bytes read (the I/O study's
"instrumented opener").
"""
from __future__ import annotations

import io
import json
import os
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from tsm_dist.data.errors import DataError, FileListError, VideoError
from tsm_dist.data.filelist import VideoRecord
from tsm_dist.data.probe import VideoInfo

FORMAT = "tsm-dist-packed"
VERSION = 1
META = "pack.json"
INDEX = "index.jsonl"
SKIPPED = "skipped.jsonl"


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.bin"


def is_packed(path: str | os.PathLike) -> bool:
    """A directory written by ``tsm-dist pack`` (it has a pack.json)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, META))


@dataclass(frozen=True)
class Location:
    """Where a packed video's bytes are: ``length`` bytes at ``offset`` of ``shard`` (a file path)."""

    shard: str
    offset: int
    length: int
    crc32: int


class _Column(Sequence):
    """``make(entry)`` for every index entry, built when first asked for (start-up stays one JSON parse)."""

    def __init__(self, entries: list[dict[str, Any]], make: Callable[[dict[str, Any]], Any]) -> None:
        self._entries, self._make = entries, make
        self._built: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        value = self._built.get(i)
        if value is None:
            value = self._built[i] = self._make(self._entries[i])
        return value


@dataclass
class PackedSet:
    """A packed directory read for training: records in index order, their infos and locations."""

    root: str
    meta: dict[str, Any]
    records: list[VideoRecord]
    infos: Sequence[VideoInfo]
    locations: Sequence[Location]


def read_meta(out: str) -> dict[str, Any]:
    path = os.path.join(out, META)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable packed-set description ({err})") from err
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise DataError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                        f"expected {FORMAT!r} version {VERSION}")
    return meta


def read_index(out: str) -> list[dict[str, Any]]:
    """The index entries; a torn last line (an interrupted pack) is dropped."""
    path = os.path.join(out, INDEX)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    torn = lines.pop()  # "" after the last newline; a line written half when the pack was interrupted
    del torn  # (a re-run redoes that video)
    try:
        return json.loads("[" + ",".join(lines) + "]")  # one parse: 3x faster than one per line
    except ValueError:
        pass
    for number, line in enumerate(lines, start=1):  # find the culprit
        try:
            json.loads(line)
        except ValueError as err:
            raise FileListError(f"{path}:{number}: not a JSON index entry ({err})") from err
    raise FileListError(f"{path}: not a JSON-lines index")


def encoded_file(data: np.ndarray) -> io.BytesIO:
    """A file object over a video's encoded bytes as :class:`ByteReader` returns them, without copying them:
    ``BytesIO`` shares a ``bytes`` object but copies any other buffer (a whole video per clip)."""
    return io.BytesIO(data.base if isinstance(data.base, bytes) else data.tobytes())


def check_shard_sizes(out: str, meta: dict[str, Any]) -> None:
    """Before training: every shard exists with the size ``pack.json`` records (a stat each), so a pack
    copied in part or damaged is one line at start, not a read error hours later. Also with
    ``data.skip_corrupt``: a missing or cut shard is an incomplete copy of the set, not a bad video, and
    skipping it would drop a whole part of the data set (docs/data.md)."""
    for shard in meta.get("shards", []):
        path = os.path.join(out, shard["file"])
        try:
            size = os.path.getsize(path)
        except OSError as err:
            raise DataError(f"{path}: shard of the packed set cannot be read ({err.strerror}); "
                            f"check it with 'tsm-dist pack --verify {out}' (data.skip_corrupt skips single bad "
                            "videos, never a whole shard)") from None
        if size != shard["bytes"]:
            raise DataError(f"{path}: {size} bytes, pack.json records {shard['bytes']}; the pack is damaged or "
                            f"was copied in part: check it with 'tsm-dist pack --verify {out}' (data.skip_corrupt "
                            "skips single bad videos, never a whole shard)")


def load_packed(out: str, *, require_complete: bool = True) -> PackedSet:
    """Read ``out``'s index for training (no video is opened)."""
    out = os.path.abspath(out)
    meta = read_meta(out)
    if require_complete and not meta.get("complete"):
        raise DataError(f"{out}: packing did not finish; re-run the same 'tsm-dist pack' command to complete it")
    index_path = os.path.join(out, INDEX)
    shards = [os.path.join(out, s["file"]) for s in meta["shards"]]
    if require_complete:
        check_shard_sizes(out, meta)
    entries = read_index(out)
    records = []
    for number, e in enumerate(entries, start=1):
        try:
            records.append(VideoRecord(e["path"], int(e["label"]), e["start"], e["end"], f"{index_path}:{number}"))
            int(e["offset"]), int(e["crc32"]), int(e["height"]), int(e["width"]), str(e["codec"])
            if not 0 <= e["shard"] < len(shards) or e["length"] <= 0 or e["frames"] <= 0:
                raise ValueError(f"shard {e['shard']}, length {e['length']}, frames {e['frames']}")
        except (KeyError, TypeError, ValueError) as err:
            raise FileListError(f"{index_path}:{number}: malformed index entry ({err!r})") from err
    if not records:
        raise FileListError(f"{index_path} names no video")
    infos = _Column(entries, lambda e: VideoInfo(int(e["frames"]), int(e["height"]), int(e["width"]), str(e["codec"])))
    locations = _Column(entries, lambda e: Location(shards[e["shard"]], int(e["offset"]), int(e["length"]),
                                                    int(e["crc32"])))
    return PackedSet(out, meta, records, infos, locations)


class ByteReader:
    """Encoded bytes of planned clips, counted: ``files_opened``, ``bytes_read``.

    Unpacked videos are read whole from their own file (one open each). Packed videos are read with
    ``os.pread`` from shard handles kept open until :meth:`close` (loaders close at the end of each
    epoch), so a rank opens each shard it touches once per epoch. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: dict[str, int] = {}
        self.files_opened = 0
        self.bytes_read = 0

    def counters(self) -> dict[str, int]:
        return {"files_opened": self.files_opened, "bytes_read": self.bytes_read}

    def read(self, path: str, where: str, location: Location | None) -> np.ndarray:
        if location is None:
            return self._read_file(path, where)
        return self._read_packed(path, where, location)

    def _read_file(self, path: str, where: str) -> np.ndarray:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise VideoError(path, f"cannot read the file ({err})", where) from err
        with self._lock:
            self.files_opened += 1
            self.bytes_read += len(data)
        return np.frombuffer(data, dtype=np.uint8)

    def _handle(self, shard: str) -> int:
        with self._lock:
            fd = self._handles.get(shard)
            if fd is None:
                fd = os.open(shard, os.O_RDONLY)
                self._handles[shard] = fd
                self.files_opened += 1
            return fd

    def _read_packed(self, path: str, where: str, loc: Location) -> np.ndarray:
        damaged = f"damaged packed shard {loc.shard} at offset {loc.offset} ({loc.length} bytes)"
        try:
            data = os.pread(self._handle(loc.shard), loc.length, loc.offset)
        except OSError as err:
            raise VideoError(path, f"{damaged}: cannot read it ({err})", where) from err
        with self._lock:
            self.bytes_read += len(data)
        if len(data) != loc.length:
            raise VideoError(path, f"{damaged}: the shard ends after {len(data)} of them; "
                             f"check it with 'tsm-dist pack --verify {os.path.dirname(loc.shard)}'", where)
        if zlib.crc32(data) != loc.crc32:
            raise VideoError(path, f"{damaged}: checksum mismatch; check it with "
                             f"'tsm-dist pack --verify {os.path.dirname(loc.shard)}'", where)
        return np.frombuffer(data, dtype=np.uint8)

    def close(self) -> None:
        with self._lock:
            handles, self._handles = self._handles, {}
        for fd in handles.values():
            os.close(fd)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

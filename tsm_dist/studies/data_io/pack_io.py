"""Measure what packing changes for one rank: start-up, metadata and byte I/O per epoch, clips/s.

Used by the I/O study (``tsm_dist/studies/data_io/study.py``) and ``benchmarks/bench_loaders.py``. A rank is rank 0
of ``ranks`` (its shard of the data set). Counts come from the loader's own ``ByteReader`` (every encoded
byte a backend decodes passes through it) and the planner's probe counter; they are per epoch and rank.

* ``io_pass``: build a loader, plan every batch of epoch 0 and read every planned clip's bytes, without
  decoding: start-up (build + first batch planned and read), the epoch's metadata + byte time, files
  opened, bytes read, videos probed. Cheap enough for lists of >= 10k entries.
* ``decode_pass``: iterate the loader for real (decoding): clips/s, with the same counters.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from tsm_dist.data.video_loader import build_video_loader
from tsm_dist.data.filelist import read_file_list, write_file_list
from tsm_dist.data.pack.format import is_packed


@dataclass
class LoaderIO:
    layout: str  # "list" or "packed"
    backend: str
    entries: int
    ranks: int
    startup_s: float = math.nan  # build + first batch
    epoch_io_s: float = math.nan  # io_pass: plan + read one epoch on this rank (no decoding)
    files_opened: int = 0
    mb_read: float = 0.0
    probes: int = 0
    clips_per_s: float = math.nan  # decode_pass
    extra: dict[str, Any] = field(default_factory=dict)


def layout_of(source: str) -> str:
    return "packed" if is_packed(source) else "list"


def repeat_list(list_path: str, root: str | None, out_path: str, entries: int) -> int:
    """Write a list of >= ``entries`` lines repeating ``list_path``'s videos (absolute paths); return the count."""
    records, _ = read_file_list(list_path)
    records = [r.__class__(os.path.abspath(r.resolve(root)), r.label, r.start, r.end) for r in records]
    copies = math.ceil(entries / len(records))
    return write_file_list(out_path, records * copies)


def _counters(loader: Any, row: LoaderIO) -> None:
    c = loader.io_counters()
    row.files_opened, row.mb_read, row.probes = c["files_opened"], c["bytes_read"] / 2**20, c["probes"]


def io_pass(source: str, root: str | None, *, backend: str, ranks: int, entries: int, **options: Any) -> LoaderIO:
    row = LoaderIO(layout_of(source), backend, entries, ranks)
    start = time.perf_counter()
    loader = build_video_loader(source, root, backend=backend, shard_id=0, num_shards=ranks, **options)
    loader.set_epoch(0)
    for b in range(len(loader)):
        for spec in loader.planner.batch(b):
            if spec is not None:
                loader.reader.read(spec.path, spec.where, spec.location)
        if b == 0:
            row.startup_s = time.perf_counter() - start
    loader.reader.close()
    row.epoch_io_s = time.perf_counter() - start
    _counters(loader, row)
    return row


def decode_pass(source: str, root: str | None, *, backend: str, ranks: int, entries: int, epochs: int = 1,
                **options: Any) -> LoaderIO:
    """Counters are those of the first epoch; clips/s is over all ``epochs`` after the first batch."""
    row = LoaderIO(layout_of(source), backend, entries, ranks)
    start = time.perf_counter()
    loader = build_video_loader(source, root, backend=backend, shard_id=0, num_shards=ranks, **options)
    clips, timed_from = 0, None
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch, _ in loader:
            if timed_from is None:
                row.startup_s = time.perf_counter() - start
                timed_from = time.perf_counter()
            else:
                clips += batch.shape[0]
        if epoch == 0:
            _counters(loader, row)
    row.clips_per_s = clips / (time.perf_counter() - timed_from)
    return row


def markdown(rows: list[LoaderIO]) -> str:
    lines = ["| Layout | Loader | Entries | Ranks | Start-up (s) | Epoch plan + read, no decode (s) | Files opened "
             "/ epoch / rank | MiB read / epoch / rank | Probes / epoch / rank | Clips/s (decoding) |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r.layout} | {r.backend} | {r.entries} | {r.ranks} | {_f(r.startup_s, '.3f')} | "
                     f"{_f(r.epoch_io_s, '.2f')} | {r.files_opened} | {r.mb_read:.1f} | {r.probes} | "
                     f"{_f(r.clips_per_s, '.1f')} |")
    return "\n".join(lines) + "\n"


def _f(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)

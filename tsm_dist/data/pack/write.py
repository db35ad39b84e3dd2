"""``tsm-dist pack``: write a file list's videos into a few large shard files plus an index.

    tsm-dist pack --list train.txt --root DIR --out OUT [--shard-mb 1024] [--transcode vp9 --gop 16]
                  [--workers W] [--shuffle SEED]
    tsm-dist pack --verify OUT

Workers probe (and optionally transcode) videos in parallel; the main process appends them to the
current shard in list order (or a seeded shuffle of it) and appends one index line per video after its
bytes are written, so an interrupted run is resumed by running the same command again: the index says
what is done, bytes past the last indexed video are cut off. Each shard is read back and checked
against the index when it is closed. Bad videos are skipped, listed in ``OUT/skipped.jsonl`` and
reported. The layout is in ``pack_format.py`` and docs/data.md.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import sys
import zlib
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, fields
from multiprocessing import get_context
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from tsm_dist.data.errors import DataError, VideoError
from tsm_dist.data.filelist import VideoRecord, read_file_list
from tsm_dist.data.pack.format import (
    FORMAT, INDEX, META, SKIPPED, VERSION, load_packed, read_index, read_meta, shard_name,
)
from tsm_dist.data.pack.transcode import TRANSCODES

EXIT_USAGE, EXIT_BAD = 2, 4  # 4: the data code (tsm_dist.commands.exit_codes.EXIT_DATA), for every damaged pack
CHUNK = 1 << 24  # bytes read at a time when checking a shard


def progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (batch job logs)
    return tqdm(total=total, desc=desc, unit="video", disable=None if enabled else True, dynamic_ncols=True)


# ----------------------------------------------------------------------------- worker side
def prepare(job: tuple[int, str, str, str | None, int, int, str]) -> tuple[int, str, dict | None, str]:
    """Probe (and transcode) one video: ``(item, file to store, info or None, error reason)``."""
    from tsm_dist.data.pack.transcode import transcode_vp9
    from tsm_dist.data.probe import probe_video

    item, path, where, transcode, gop, crf, tmpdir = job
    stored = path
    try:
        if transcode:
            stored = os.path.join(tmpdir, f"{item}.webm")
            transcode_vp9(path, stored, gop=gop, crf=crf, where=where)
        info = probe_video(stored, where)
    except VideoError as err:
        if stored != path and os.path.exists(stored):
            os.remove(stored)
        return item, stored, None, err.reason
    return item, stored, {"frames": info.num_frames, "height": info.height, "width": info.width,
                          "codec": info.codec}, ""


def ordered_map(fn: Callable, jobs: list, executor: Executor | None, window: int) -> Iterator:
    """``map(fn, jobs)`` in order, at most ``window`` jobs in flight (results hold no bytes, but the
    transcoded files wait on disk)."""
    if executor is None:
        yield from map(fn, jobs)
        return
    pending: list[tuple[Future, Any]] = []
    position = 0
    while pending or position < len(jobs):
        while position < len(jobs) and len(pending) < window:
            with _whole():  # a submit starts the pool's processes and thread: a stop waits for it to end
                pending.append((executor.submit(fn, jobs[position]), jobs[position]))
            position += 1
        future, job = pending.pop(0)
        try:
            yield future.result()
        except BrokenProcessPool as err:  # a worker died (killed for memory, crashed in FFmpeg)
            raise DataError(f"{job[2]}: a pack worker died while preparing {job[1]} ({err}); re-run the same "
                            "command to continue") from err


# ----------------------------------------------------------------------------- writer side
class ShardWriter:
    """Appends videos to ``shard-NNNNN.bin`` files and lines to the index, in that order."""

    def __init__(self, out: str, shard_bytes: int, entries: list[dict[str, Any]]) -> None:
        self.out = out
        self.shard_bytes = shard_bytes
        self.entries = entries
        self.shard = entries[-1]["shard"] if entries else 0
        self.size = self._end_of(self.shard)
        self._truncate_after_resume()
        self._file = open(os.path.join(out, shard_name(self.shard)), "ab")
        self._index = open(os.path.join(out, INDEX), "a", encoding="utf-8")

    def _end_of(self, shard: int) -> int:
        ends = [e["offset"] + e["length"] for e in self.entries if e["shard"] == shard]
        return max(ends, default=0)

    def _truncate_after_resume(self) -> None:
        """Cut bytes written after the last indexed video, later shards and a torn index line."""
        path = os.path.join(self.out, shard_name(self.shard))
        have = os.path.getsize(path) if os.path.exists(path) else 0
        if have < self.size:  # truncate() would pad the missing videos with zeros
            raise DataError(f"{path}: {have} bytes, but the index places videos up to byte {self.size}; the pack is "
                            f"damaged: check it with 'tsm-dist pack --verify {self.out}' or start a new one")
        with open(path, "ab") as f:
            f.truncate(self.size)
        later = self.shard + 1
        while os.path.exists(os.path.join(self.out, shard_name(later))):
            os.remove(os.path.join(self.out, shard_name(later)))
            later += 1
        index = os.path.join(self.out, INDEX)
        with open(index, "a+", encoding="utf-8") as f:
            f.seek(0)
            text = f.read()
            if text and not text.endswith("\n"):
                f.truncate(len(text.encode("utf-8")) - len(text.rsplit("\n", 1)[-1].encode("utf-8")))

    def add(self, record: VideoRecord, item: int, data: bytes, info: dict[str, Any]) -> None:
        if self.size and self.size + len(data) > self.shard_bytes:
            self._next_shard()
        self._file.write(data)
        self._file.flush()
        entry = {"path": record.path, "label": record.label, "start": record.start, "end": record.end,
                 "shard": self.shard, "offset": self.size, "length": len(data), "crc32": zlib.crc32(data),
                 **info, "item": item}
        self._index.write(json.dumps(entry) + "\n")
        self._index.flush()
        self.entries.append(entry)
        self.size += len(data)

    def _next_shard(self) -> None:
        self._close_shard()
        self.shard += 1
        self.size = 0
        self._file = open(os.path.join(self.out, shard_name(self.shard)), "wb")

    def _close_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        problems = check_shard(self.out, self.shard, [e for e in self.entries if e["shard"] == self.shard])
        if problems:
            raise DataError("written shard does not read back: " + "; ".join(problems[:3]))

    def close(self) -> list[dict[str, Any]]:
        """Close and check the last shard, sync the index; return the shard table of pack.json."""
        self._close_shard()
        os.fsync(self._index.fileno())
        self._index.close()
        count = self.shard + 1 if self.entries else 0
        return [{"file": shard_name(k), "bytes": self._end_of(k)} for k in range(count)]


def check_shard(out: str, shard: int, entries: Iterable[dict[str, Any]], expected_size: int | None = None,
                index_lines: dict[int, int] | None = None) -> list[str]:
    """Problems of one shard: size, and every video's bytes against its checksum (one line each, naming
    the shard, the offset, the video and its index line)."""
    path = os.path.join(out, shard_name(shard))
    if not os.path.exists(path):
        return [f"{path}: shard file is missing"]
    problems = []
    size = os.path.getsize(path)
    if expected_size is not None and size != expected_size:
        problems.append(f"{path}: {size} bytes, the index says {expected_size}")
    with open(path, "rb") as f:
        for e in entries:
            where = f" ({e['path']}, {os.path.join(out, INDEX)}:{index_lines[id(e)]})" if index_lines else f" ({e['path']})"
            f.seek(e["offset"])
            data = f.read(e["length"])
            if len(data) != e["length"]:
                problems.append(f"{path} at offset {e['offset']}{where}: shard ends after {len(data)} of "
                                f"{e['length']} bytes")
            elif zlib.crc32(data) != e["crc32"]:
                problems.append(f"{path} at offset {e['offset']}{where}: checksum mismatch (damaged shard)")
    return problems


def verify(out: str, show_progress: bool = True) -> list[str]:
    """``tsm-dist pack --verify``: the layout and every video's checksum; returns the problems found."""
    meta = read_meta(out)
    try:
        load_packed(out, require_complete=False)  # every index entry has every key, with a usable value
    except DataError as err:
        return [str(err)]
    entries = read_index(out)
    problems = [] if meta.get("complete") else [f"{out}: packing did not finish (re-run the pack command)"]
    if meta.get("complete") and len(entries) != meta.get("videos"):
        problems.append(f"{os.path.join(out, INDEX)}: {len(entries)} entries, pack.json says {meta.get('videos')}")
    lines = {id(e): number for number, e in enumerate(entries, start=1)}
    by_shard: dict[int, list[dict[str, Any]]] = {}
    for e in entries:
        by_shard.setdefault(e["shard"], []).append(e)
    with progress(len(entries), "verify", show_progress) as bar:
        for number, shard in enumerate(meta.get("shards", [])):
            mine = sorted(by_shard.pop(number, []), key=lambda e: e["offset"])
            for a, b in zip(mine, mine[1:]):
                if a["offset"] + a["length"] > b["offset"]:
                    problems.append(f"{shard['file']}: videos at offsets {a['offset']} and {b['offset']} overlap")
            problems += check_shard(out, number, mine, shard["bytes"], lines)
            bar.update(len(mine))
    for number in by_shard:
        problems.append(f"{os.path.join(out, INDEX)}: entries name shard {number}, which pack.json does not list")
    return problems


# ----------------------------------------------------------------------------- the command
@dataclass(frozen=True)
class PackOptions:
    """What ``tsm-dist pack`` packs (its command line, checked)."""

    list: str
    out: str
    root: str | None = None
    shard_mb: float = 1024
    transcode: str | None = None
    gop: int = 16
    crf: int = 30
    workers: int = 1
    shuffle: int | None = None
    no_progress: bool = False


def _settings(args: PackOptions) -> dict[str, Any]:
    return {"list": os.path.abspath(args.list), "root": os.path.abspath(args.root) if args.root else None,
            "shard_mb": args.shard_mb, "transcode": args.transcode, "gop": args.gop if args.transcode else None,
            "crf": args.crf if args.transcode else None, "shuffle": args.shuffle}


def _write_meta(out: str, settings: dict[str, Any], complete: bool, entries: list, shards: list,
                skipped: int) -> None:
    meta = {"format": FORMAT, "version": VERSION, "complete": complete, "videos": len(entries),
            "shards": shards, "skipped": skipped, "settings": settings}
    tmp = os.path.join(out, META + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(out, META))


def _read_skipped(out: str) -> list[dict[str, Any]]:
    """The skipped videos recorded so far; a torn last line (an interrupted run) is cut off."""
    path = os.path.join(out, SKIPPED)
    if not os.path.exists(path):
        return []
    with open(path, "r+b") as f:
        data = f.read()
        whole = data[: data.rfind(b"\n") + 1]
        f.truncate(len(whole))
    return [json.loads(line) for line in whole.decode("utf-8").splitlines()]


# what a pack directory may hold before its pack.json is written
_OWN_BEFORE_META = {".lock", ".transcode"}


def foreign_files(out: str) -> list[str]:
    """Files in ``out`` that no ``tsm-dist pack`` wrote: all of them when ``out`` holds no pack.json."""
    if not os.path.isdir(out) or os.path.exists(os.path.join(out, META)):
        return []
    return sorted(set(os.listdir(out)) - _OWN_BEFORE_META)


def pack(args: PackOptions) -> int:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        what = "the file list itself" if os.path.realpath(args.out) == os.path.realpath(args.list) else "a file"
        print(f"tsm-dist pack: --out {args.out} is {what}; --out names the directory of the packed set",
              file=sys.stderr)
        return EXIT_USAGE
    records, bad_lines = read_file_list(args.list, skip_invalid=True)
    foreign = foreign_files(args.out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        print(f"tsm-dist pack: {args.out} is not empty and holds no pack ({shown}); packing never touches files "
              "it did not write: use an empty or new --out", file=sys.stderr)
        return EXIT_USAGE
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"tsm-dist pack: another 'tsm-dist pack' is writing {args.out}", file=sys.stderr)
            return EXIT_USAGE
        return _pack_locked(args, records, bad_lines)


def _pack_locked(args: PackOptions, records: list[VideoRecord], bad_lines: list[tuple[str, str]]) -> int:
    out, settings = args.out, _settings(args)
    entries: list[dict[str, Any]] = []
    skipped = _read_skipped(out)
    if os.path.exists(os.path.join(out, META)):
        meta = read_meta(out)
        if meta.get("settings") != settings:
            print(f"tsm-dist pack: {out} holds a pack made with other settings ({meta.get('settings')}); "
                  "use another --out or remove it", file=sys.stderr)
            return EXIT_USAGE
        if meta.get("complete"):
            print(f"{out} is complete: {meta['videos']} videos in {len(meta['shards'])} shards; nothing to do")
            return 0
        entries = read_index(out)
        print(f"resuming: {len(entries)} videos already packed, {len(skipped)} skipped")
    _write_meta(out, settings, False, entries, [], len(skipped))
    order = np.arange(len(records))
    if args.shuffle is not None:
        order = np.random.default_rng(args.shuffle).permutation(len(records))
    done = {e["item"] for e in entries} | {s["item"] for s in skipped}
    tmpdir = os.path.join(out, ".transcode")
    os.makedirs(tmpdir, exist_ok=True)
    for leftover in os.listdir(tmpdir):  # from an interrupted run
        os.remove(os.path.join(tmpdir, leftover))
    jobs = [(int(k), records[k].resolve(args.root), records[k].where, args.transcode, args.gop, args.crf, tmpdir)
            for k in order if int(k) not in done]
    writer = ShardWriter(out, int(args.shard_mb * 2**20), entries)
    executor = (ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) if args.workers > 1 else None)
    try:
        with open(os.path.join(out, SKIPPED), "a", encoding="utf-8") as skip_file, \
                progress(len(records), "pack", not args.no_progress) as bar:
            bar.update(len(done))
            for item, stored, info, reason in ordered_map(prepare, jobs, executor, 4 * args.workers):
                if info is None:
                    entry = {"item": item, "path": records[item].path, "reason": reason}
                    skip_file.write(json.dumps(entry) + "\n")
                    skip_file.flush()
                    skipped.append(entry)
                else:
                    with open(stored, "rb") as f:
                        writer.add(records[item], item, f.read(), info)
                    if args.transcode:
                        os.remove(stored)
                bar.update(1)
    finally:
        if executor is not None:
            _stop_workers(executor, interrupted=sys.exc_info()[0] is not None)
    shards = writer.close()
    os.rmdir(tmpdir)
    _write_meta(out, settings, True, entries, shards, len(skipped))
    total = sum(s["bytes"] for s in shards)
    print(f"packed {len(entries)} videos ({total / 2**20:.1f} MiB) into {len(shards)} shard(s) in {out}; "
          f"every shard read back and checked")
    _report_skipped(out, skipped, bad_lines)
    return 0


def _stop_workers(executor: ProcessPoolExecutor, interrupted: bool) -> None:
    """No worker outlives the command: after an interrupt the running ones (a transcode can take minutes)
    are terminated rather than waited for; a re-run redoes their videos."""
    if interrupted:
        for process in list((getattr(executor, "_processes", None) or {}).values()):
            process.terminate()
    executor.shutdown(wait=True, cancel_futures=True)


class Stopped(Exception):
    """SIGTERM (a cancelled job, ``kill``) while packing."""


_held = {"depth": 0, "signal": 0}  # inside _whole(): its depth, and a stop signal that came meanwhile


def _on_stop_signal(signum: int, frame: Any) -> None:
    """SIGTERM raises :class:`Stopped` and SIGINT ``KeyboardInterrupt``, where the code is, or at the end of
    :func:`_whole`."""
    if _held["depth"]:
        _held["signal"] = _held["signal"] or signum
        return
    raise Stopped() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def _whole() -> Iterator[None]:
    """A stop signal inside raises at its end: a process pool's submit starts worker processes and the pool's
    thread, and one interrupted halfway leaves the pool unable to shut down (the shutdown joins a thread whose
    start was cut short: a traceback instead of the one line, and workers left running)."""
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
        signum = _held["signal"] if not _held["depth"] else 0
        if signum:
            _held["signal"] = 0
            _on_stop_signal(signum, None)


def _report_skipped(out: str, skipped: list[dict[str, Any]], bad_lines: list[tuple[str, str]]) -> None:
    if bad_lines:
        print(f"skipped {len(bad_lines)} malformed list line(s):", file=sys.stderr)
        for _, reason in bad_lines[:10]:
            print(f"  {reason}", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} bad video(s), listed in {os.path.join(out, SKIPPED)}:", file=sys.stderr)
        for s in skipped[:10]:
            print(f"  {s['path']}: {s['reason']}", file=sys.stderr)
        if len(skipped) > 10:
            print(f"  ... and {len(skipped) - 10} more", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsm-dist pack", description="Pack a file list's videos into large shard files plus an index "
        "(read by every loader in place of the list: data.train_list=OUT), or verify a packed directory.")
    parser.add_argument("--list", help="file list to pack (path label [start end] per line)")
    parser.add_argument("--root", help="directory the list's paths are relative to")
    parser.add_argument("--out", help="output directory (a re-run of the same command resumes it)")
    parser.add_argument("--shard-mb", type=float, default=1024, help="shard size in MiB (default 1024)")
    parser.add_argument("--transcode", choices=TRANSCODES, help="re-encode every video (vp9: DALI's CPU decoder)")
    parser.add_argument("--gop", type=int, default=16, help="keyframe interval when transcoding (default 16)")
    parser.add_argument("--crf", type=int, default=30, help="VP9 quality when transcoding (default 30)")
    parser.add_argument("--workers", type=int, default=1, help="parallel probe/transcode processes (default 1)")
    parser.add_argument("--shuffle", type=int, metavar="SEED",
                        help="store the videos in a seeded random order (recommended when the list is sorted "
                        "by class: each rank reads a contiguous block)")
    parser.add_argument("--verify", metavar="OUT", help="check a packed directory's layout and checksums")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    options = None
    if not args.verify:
        if not args.list or not args.out:
            parser.error("--list and --out are required (or --verify OUT)")
        if args.shard_mb <= 0 or args.workers < 1 or args.gop < 1:
            parser.error("--shard-mb must be > 0, --workers and --gop >= 1")
        options = PackOptions(**{f.name: getattr(args, f.name) for f in fields(PackOptions)})
    previous = {signum: signal.signal(signum, _on_stop_signal) for signum in (signal.SIGTERM, signal.SIGINT)
                if signal.getsignal(signum) not in (signal.SIG_IGN, None)}  # an ignored SIGINT stays ignored
    try:
        return _run(args.verify, not args.no_progress, options)
    except (KeyboardInterrupt, Stopped) as stop:
        print("tsm-dist pack: interrupted; its workers are stopped, re-run the same command to resume",
              file=sys.stderr)
        return 143 if isinstance(stop, Stopped) else 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(verify_dir: str | None, show_progress: bool, options: PackOptions | None) -> int:
    """``--verify verify_dir``, or pack with ``options``; a data error is one line and the data code."""
    try:
        if verify_dir:
            problems = verify(verify_dir, show_progress)
            for line in problems:
                print(line, file=sys.stderr)
            if problems:
                print(f"{verify_dir}: {len(problems)} problem(s)", file=sys.stderr)
                return EXIT_BAD
            meta = read_meta(verify_dir)
            print(f"{verify_dir}: OK, {meta['videos']} videos in {len(meta['shards'])} shard(s), checksums match")
            return 0
        assert options is not None
        return pack(options)
    except DataError as err:
        print(f"tsm-dist pack: data error: {err}", file=sys.stderr)
        return EXIT_BAD


if __name__ == "__main__":
    raise SystemExit(main())

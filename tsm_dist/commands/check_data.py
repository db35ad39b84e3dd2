"""Data checked before the long wait, and ``tsm-dist check-data --config C``.

The trainer calls :func:`check_file_lists` before it builds loaders (a missing list is one line with
the resolved path, ``data.root`` and the command that makes the synthetic set) and :func:`preflight`
right after: every rank probes its shard of the validation set (so a bad ``val.txt`` entry does not
surface after a full epoch) and stats its share of the training set (existence, size: cheap even for
Kinetics' 240k files). ``tsm-dist check-data`` probes every listed video (container, frame count,
truncation, codec for DALI's CPU decoder, length for the sampling) with a progress bar and prints a
summary; it exits 0 when every video is usable and 4 (a data error) otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tsm_dist.training.build import resolve_list
from tsm_dist.commands.arguments import name_list
from tsm_dist.config import GENERATED, Config, load_config
from tsm_dist.data.errors import FileListError, VideoError
from tsm_dist.commands.exit_codes import EXIT_DATA, EXIT_OK, run_main

LIST_KEYS = ("train_list", "val_list")
SYNTHETIC_HINT = "tsm-dist make-synthetic --out {root}"


def check_file_lists(cfg: Config, keys: Sequence[str] = LIST_KEYS) -> None:
    """Raise :class:`FileListError` naming the resolved path when a configured list is missing."""
    if cfg.data.backend in GENERATED:
        return
    for key in keys:
        if not getattr(cfg.data, key):
            continue
        resolved = resolve_list(cfg, key)
        assert resolved is not None
        path = Path(resolved)
        if not path.exists():
            root = cfg.data.root or ""
            value = Path(getattr(cfg.data, key))
            looked = [path.resolve()] if value.is_absolute() or not root else \
                [(Path(root) / value).resolve(), value.resolve()]
            make = SYNTHETIC_HINT.format(root=root or "data/synthetic")
            raise FileListError(
                f"data.{key}={str(value)!r}: no such file list (looked for {' and '.join(map(str, looked))}; "
                f"data.root={root!r}); to make the synthetic set: {make}")
        if path.is_file() and not os.access(path, os.R_OK):
            raise FileListError(f"data.{key}: file list {path.resolve()} cannot be read (permissions)")


def _stat_problem(path: str) -> str | None:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    return "file is empty (0 bytes)" if size == 0 else None


def preflight(train_loader: Any, val_loader: Any, *, rank: int, size: int) -> list[str]:
    """This rank's share of the start-up check; one message per bad video (empty: all good).

    Loaders without a clip plan (the random backend) have nothing to check. With ``skip_corrupt`` the
    bad validation videos are recorded as skipped (and reported at the end) instead.
    """
    problems: list[str] = []
    val_plan = getattr(val_loader, "planner", None)
    if val_plan is not None and hasattr(val_plan, "shard_samples"):
        for i in val_plan.shard_samples():
            try:
                val_plan.check(i)
            except VideoError as err:
                problems.append(str(err))
    train_plan = getattr(train_loader, "planner", None)
    # packed sets keep the videos inside shard files (verified by `tsm-dist pack --verify`): nothing to stat
    packed = getattr(train_plan, "locations", None) is not None
    if train_plan is not None and not packed and not getattr(train_plan, "skip_corrupt", False):
        for record in train_plan.records[rank::size]:
            path = record.resolve(train_plan.root)
            reason = _stat_problem(path)
            if reason:
                problems.append(str(VideoError(path, reason, record.where)))
    return problems


# --------------------------------------------------------------------------------- check-data
def _progress(items: Iterable[Any], total: int, label: str, verb: str = "probed") -> Iterator[Any]:
    """tqdm when it is installed and stderr is a terminal; a line every 10 % otherwise (``verb``: what
    was done to each video: probed, or for a pack checked against its index)."""
    try:
        from tqdm import tqdm

        if sys.stderr.isatty():
            yield from tqdm(items, total=total, desc=label, unit="video")
            return
    except ImportError:
        pass
    step = max(1, total // 10)
    for done, item in enumerate(items, 1):
        yield item
        if done % step == 0 or done == total:
            print(f"{label}: {done}/{total} videos {verb}", file=sys.stderr, flush=True)


def _probe_one(planner: Any, i: int) -> str | None:
    try:
        planner.check(i)
    except VideoError as err:
        return err.reason
    return None


def check_list(cfg: Config, key: str, threads: int = 8) -> tuple[int, list[tuple[str, str]]]:
    """Probe every video of ``data.<key>`` as the training would; (videos listed, [(culprit, reason)])."""
    from tsm_dist.data.video_loader import read_videos
    from tsm_dist.data.clips import ClipOptions, ClipPlanner
    from tsm_dist.data.dali_loader import DALI_CPU_HINT
    from tsm_dist.data.probe import DALI_CPU_CODECS

    list_path = resolve_list(cfg, key)
    assert list_path is not None
    d = cfg.data
    videos = read_videos(list_path, d.root or None, cfg.model.num_classes, skip_corrupt=True)
    records, skipped_lines = videos.records, videos.skipped
    bad: list[tuple[str, str]] = [(text, reason) for text, reason in skipped_lines]
    damaged: set[str] = set()  # packed videos whose checksum failed: counted once, not again by the probe
    if videos.packed:  # a tsm-dist pack directory: its shards' checksums, then the index's facts below
        from tsm_dist.data.pack.write import verify

        for problem in verify(list_path, sys.stderr.isatty()):
            video = re.search(r"\(([^,()]+), (\S+:\d+)\)", problem)  # "(<video>, <index>:<line>)": one video's
            if video:
                damaged.add(video.group(2))
                bad.append((f"{video.group(1)} (listed at {video.group(2)})", problem))
            else:
                bad.append((list_path, problem))
    options = ClipOptions(num_frames=cfg.model.num_frames, sampling=d.sampling, stride=d.stride,
                          crop_size=d.crop_size, train=False, short_videos=d.short_videos)
    planner = ClipPlanner(records, videos.root, options, batch_size=1,  # one shard: every video
                          infos=videos.infos, locations=videos.locations)
    if d.backend == "dali" and d.device == "cpu":
        planner.restrict_codecs(DALI_CPU_CODECS, DALI_CPU_HINT)
    with ThreadPoolExecutor(threads) as pool:
        reasons = pool.map(lambda i: _probe_one(planner, i), range(len(records)))
        # a pack's videos are not probed: the planner reads their facts from the index
        verb = "checked against the pack's index (not probed)" if videos.packed else "probed"
        for i, reason in enumerate(_progress(reasons, len(records), f"data.{key}", verb)):
            if reason and records[i].where not in damaged:
                r = records[i]
                bad.append((f"{r.resolve(videos.root)} (listed at {r.where})", reason))
    return len(records) + len(skipped_lines), bad


def _category(reason: str) -> str:
    for key in ("file not found", "empty", "truncated", "not a readable video", "codec", "usable frames",
                "label", "expected 'path label", "frame range", "no frames", "no video stream"):
        if key in reason:
            return key
    return "other"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tsm-dist check-data", description=(
        "Probe every video of the config's file lists (container, frames, truncation, codec, length) and "
        "print a summary; exit 0 when all are usable, 4 otherwise."))
    p.add_argument("--config", required=True, help="the training config (data and model sections)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--lists", default="train_list,val_list", help="which lists (default: train_list,val_list)")
    p.add_argument("--threads", type=int, default=8, help="videos probed at once (default 8)")
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error (or TSM_DIST_DEBUG=1)")
    return p


def _main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.data.backend in GENERATED:
        print(f"check-data: data.backend={cfg.data.backend} reads no files; nothing to check")
        return EXIT_OK
    keys = [k for k in name_list(args.lists) if getattr(cfg.data, k, "")]
    check_file_lists(cfg, keys)
    failed = 0
    for key in keys:
        total, bad = check_list(cfg, key, threads=args.threads)
        failed += len(bad)
        layout = [reason for culprit, reason in bad if culprit == resolve_list(cfg, key)]  # a pack's, not a video's
        videos = [(culprit, reason) for culprit, reason in bad if culprit != resolve_list(cfg, key)]
        counts = Counter(_category(reason) for _, reason in videos)
        summary = ", ".join(f"{n} {c}" for c, n in counts.most_common()) or "none"
        print(f"data.{key} ({resolve_list(cfg, key)}): {total} entries, {total - len(videos)} usable, "
              f"{len(videos)} bad ({summary})" + (f"; {len(layout)} pack layout problem(s)" if layout else ""))
        for culprit, reason in bad:
            print(f"  {culprit}: {reason}")
    if failed:
        print(f"check-data: {failed} bad entr{'y' if failed == 1 else 'ies'}; fix or remove them, or train with "
              "data.skip_corrupt=true (skipped videos are listed in the run's end record)")
        return EXIT_DATA
    print("check-data: every listed video is usable")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return run_main("tsm-dist check-data", _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())

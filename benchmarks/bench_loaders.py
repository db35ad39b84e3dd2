"""Clips per second of the DALI CPU pipeline vs the PyAV loader (8-frame 224x224 clips, 2 threads).

Writes a benchmark set of VP9 videos (a panning smooth-noise texture with a moving object). The
default is shaped like Something-Something V2, the paper's main TSM data set, which is distributed as
VP9 WebM: 427x240, 48 frames (4 s at 12 fps). ``--kinetics`` makes Kinetics-like videos instead
(320x256, 250 frames = 10 s at 25 fps, keyframe every 25 frames, as transcoded for DALI's CPU path).
Each loader is warmed up for one epoch (DALI pipeline build, container probing), then ``--epochs``
epochs are timed per backend, alternating the backends ``--rounds`` times to even out machine load.
Prints clips/s (wall clock) and CPU milliseconds per clip (all threads of the process; less sensitive
to other load on the machine), the medians, and the DALI / PyAV ratio.

  .venv/bin/python benchmarks/bench_loaders.py                  # SSv2-like
  .venv/bin/python benchmarks/bench_loaders.py --kinetics       # Kinetics-like
  .venv/bin/python benchmarks/bench_loaders.py --packed         # packed shards vs file list

``--packed`` compares the same videos as a file list and packed (``tsm-dist pack``): clips/s of each
backend on both layouts (alternated ``--rounds`` times, 1 rank), and, for a list of ``--entries`` lines
(the videos repeated) packed into ``--shard-mb`` shards, what rank 0 of ``--ranks`` does in one epoch:
start-up, plan + read time without decoding, files opened, MiB read, videos probed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from tsm_dist.data.video_loader import build_video_loader
from tsm_dist.data.encode import write_video
from tsm_dist.data.filelist import VideoRecord, write_file_list
from tsm_dist.data.pack.write import main as pack_main
from tsm_dist.studies.data_io.pack_io import decode_pass, io_pass, markdown, repeat_list


def make_videos(
    out: str, count: int, frames: int, height: int, width: int, gop: int | None, fps: int
) -> list[VideoRecord]:
    records = []
    for i in range(count):
        path = os.path.join(out, f"v{i:04d}_gop{gop}_{width}x{height}x{frames}_{fps}fps.webm")
        if not os.path.exists(path):
            g = torch.Generator().manual_seed(i)
            noise = torch.rand(1, 3, height // 8 + 8, width // 8 + 16, generator=g)
            texture = F.interpolate(noise, scale_factor=4, mode="bicubic", align_corners=False)[0]
            texture = (texture.clamp(0, 1) * 255).permute(1, 2, 0).to(torch.uint8).numpy()
            texture = np.kron(texture, np.ones((2, 2, 1), dtype=np.uint8))  # about 2x the frame, smooth
            video = np.empty((frames, height, width, 3), dtype=np.uint8)
            for k in range(frames):
                dy, dx = k * 16 // frames, k * 32 // frames  # slow camera pan
                video[k] = texture[dy : dy + height, dx : dx + width]
                x = int((width - 40) * k / max(frames - 1, 1))
                video[k, height // 2 - 20 : height // 2 + 20, x : x + 40] = (230, 60, 40)
            write_video(path, video, quality=30, gop=gop, fps=fps)
        records.append(VideoRecord(path, i % 10))
    return records


def measure(loader, epochs: int) -> tuple[float, float]:
    """(clips per wall-clock second, CPU milliseconds per clip over all threads of this process)."""
    count = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        for clips, _ in loader:
            count += clips.shape[0]
    return count / (time.perf_counter() - wall), 1000 * (time.process_time() - cpu) / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinetics", action="store_true", help="Kinetics-like videos (see above)")
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--frames", type=int, help="frames per video (48; 250 with --kinetics)")
    parser.add_argument("--height", type=int, help="(240; 256 with --kinetics)")
    parser.add_argument("--width", type=int, help="(428; 320 with --kinetics)")
    parser.add_argument("--gop", type=int, help="keyframe interval (encoder default; 25 with --kinetics)")
    parser.add_argument("--num-frames", type=int, default=8, help="frames per clip")
    parser.add_argument("--sampling", default="segment", choices=("segment", "dense"))
    parser.add_argument("--crop-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=["dali", "pyav"])
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "tsm_dist_bench_loaders"))
    parser.add_argument("--packed", action="store_true", help="packed shards vs file list (see above)")
    parser.add_argument("--entries", type=int, default=10240, help="--packed: lines of the long list")
    parser.add_argument("--ranks", type=int, default=4, help="--packed: the long list's epoch is rank 0's of R")
    parser.add_argument("--shard-mb", type=float, default=64, help="--packed: shard size in MiB")
    args = parser.parse_args(argv)
    shape = dict(frames=250, height=256, width=320, gop=25, fps=25) if args.kinetics else dict(
        frames=48, height=240, width=428, gop=None, fps=12)
    for key in ("frames", "height", "width", "gop"):
        if getattr(args, key) is None:
            setattr(args, key, shape[key])

    torch.set_num_threads(args.threads)  # the PyAV loader's resize runs in torch
    os.makedirs(args.data, exist_ok=True)
    records = make_videos(args.data, args.videos, args.frames, args.height, args.width, args.gop, shape["fps"])
    size_kb = sum(os.path.getsize(r.path) for r in records) / len(records) / 1024
    print(f"videos: {len(records)} x {args.frames} frames {args.width}x{args.height} VP9 (gop {args.gop}), "
          f"{size_kb:.0f} KiB each; clips: {args.num_frames} frames {args.sampling}, {args.crop_size}^2, "
          f"batch {args.batch_size}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    if args.packed:
        return packed_comparison(args, records)
    loaders = {
        backend: build_video_loader(
            records, None, backend=backend, num_frames=args.num_frames, sampling=args.sampling, stride=2,
            batch_size=args.batch_size, crop_size=args.crop_size, train=True, num_threads=args.threads,
        )
        for backend in args.backends
    }
    for loader in loaders.values():
        measure(loader, 1)  # warm-up: pipeline build, probing
    rates: dict[str, list[float]] = {b: [] for b in loaders}
    cpu_ms: dict[str, list[float]] = {b: [] for b in loaders}
    for round_ in range(args.rounds):
        for backend, loader in loaders.items():
            rate, cost = measure(loader, args.epochs)
            rates[backend].append(rate)
            cpu_ms[backend].append(cost)
            print(f"round {round_} {backend:5s} {rate:7.1f} clips/s  {cost:6.1f} CPU ms/clip  "
                  f"load {os.getloadavg()[0]:.1f}")
    medians = {b: statistics.median(r) for b, r in rates.items()}
    costs = {b: statistics.median(c) for b, c in cpu_ms.items()}
    print("median: " + ", ".join(f"{b} {medians[b]:.1f} clips/s ({costs[b]:.1f} CPU ms/clip)" for b in medians))
    if "dali" in medians and "pyav" in medians:
        print(f"DALI CPU / PyAV: {medians['dali'] / medians['pyav']:.2f}x clips/s (goal >= 2x), "
              f"{costs['pyav'] / costs['dali']:.2f}x less CPU per clip; load average {os.getloadavg()[0]:.1f}")
    return 0


def _pack(list_path: str, out: str, shard_mb: float) -> None:
    """Pack (or resume, or find complete) ``list_path`` into ``out``; report the time it took."""
    start = time.perf_counter()
    if pack_main(["--list", list_path, "--out", out, "--shard-mb", str(shard_mb), "--no-progress"]) != 0:
        raise SystemExit(f"packing {list_path} failed")
    print(f"  ({time.perf_counter() - start:.1f} s)")


def packed_comparison(args: argparse.Namespace, records: list[VideoRecord]) -> int:
    short_list, long_list = os.path.join(args.data, "list.txt"), os.path.join(args.data, f"list_{args.entries}.txt")
    write_file_list(short_list, records)
    entries = repeat_list(short_list, None, long_list, args.entries)
    short_pack, long_pack = short_list + ".pack", f"{long_list}.{args.shard_mb:g}mb.pack"
    _pack(short_list, short_pack, args.shard_mb)
    _pack(long_list, long_pack, args.shard_mb)
    options = dict(num_frames=args.num_frames, sampling=args.sampling, stride=2, batch_size=args.batch_size,
                   crop_size=args.crop_size, train=True, num_threads=args.threads)
    rows = []
    for backend in args.backends:
        for source in (long_list, long_pack):
            rows.append(io_pass(source, None, backend=backend, ranks=args.ranks, entries=entries, **options))
            print(f"io pass {backend} {rows[-1].layout}: {rows[-1].epoch_io_s:.2f} s, "
                  f"{rows[-1].files_opened} files opened, load {os.getloadavg()[0]:.1f}", flush=True)
        rates: dict[str, list[float]] = {"list": [], "packed": []}
        for round_ in range(args.rounds):
            for layout, source in (("list", short_list), ("packed", short_pack)):
                row = decode_pass(source, None, backend=backend, ranks=1, entries=len(records),
                                  epochs=args.epochs, **options)
                rates[layout].append(row.clips_per_s)
                print(f"round {round_} {backend:5s} {layout:6s} {row.clips_per_s:7.1f} clips/s  "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
        for row in rows[-2:]:
            row.clips_per_s = statistics.median(rates[row.layout])
    print(f"\nper rank (rank 0 of {args.ranks}) and epoch on a list of {entries} entries "
          f"({len(records)} videos repeated), shards of {args.shard_mb:g} MiB; clips/s: median of {args.rounds} "
          f"rounds x {args.epochs} epochs of the {len(records)} videos, 1 rank:\n")
    print(markdown(rows))
    for backend in args.backends:
        plain, packed = [r for r in rows if r.backend == backend]
        print(f"{backend}: {plain.files_opened / max(packed.files_opened, 1):.0f}x fewer file opens, "
              f"{plain.probes} -> {packed.probes} probes, epoch plan + read {plain.epoch_io_s:.2f} -> "
              f"{packed.epoch_io_s:.2f} s, start-up {plain.startup_s:.3f} -> {packed.startup_s:.3f} s, "
              f"clips/s packed / list {packed.clips_per_s / plain.clips_per_s:.2f}x; "
              f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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

from tsm_dist.data import build_video_loader
from tsm_dist.data.encode import write_video
from tsm_dist.data.filelist import VideoRecord


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


if __name__ == "__main__":
    raise SystemExit(main())

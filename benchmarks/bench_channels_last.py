"""Channels-last costs: handing its gradients to Horovod, and a training step in it.

    horovodrun -np 2 -H localhost:2 --gloo python benchmarks/bench_channels_last.py [--depth 50 --width 64]
    python benchmarks/bench_channels_last.py --step [--depth 18 --width 16 --size 56 --batch 8]

Allreduces one set of gradients shaped like TSM8f-R50's parameters (97 MB at full size), per round:

* ``contiguous``: NCHW gradients, what Horovod 0.28.1 accepts as they are (the baseline);
* ``dense view``: channels-last gradients through ``gradients.DenseViewCompressor``, what the engine
  does: each gradient goes to Horovod as a contiguous *view* of its own storage (no copy);
* ``copy``: channels-last gradients copied into contiguous buffers and copied back (the alternative).

Rounds are interleaved; rank 0 prints median seconds per round and each variant's ratio to the baseline.

``--step`` (one process, no Horovod): TSM8f and TSN training steps (forward, backward, SGD) contiguous vs
channels-last, interleaved, at the demo's CPU size by default; prints the per-round ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def bench_step(args: argparse.Namespace) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_models

    from tsm_dist.models import build_model

    clips = torch.randn(args.batch, 8, 3, args.size, args.size)
    labels = torch.randint(0, 4, (args.batch,))
    steps = {}
    for name in ("tsm8f_r50", "tsn8f_r50"):
        for cl in (False, True):
            torch.manual_seed(0)
            model = build_model(name, 4, depth=args.depth, width=args.width)
            if cl:
                model = model.to(memory_format=torch.channels_last)
            steps[f"{name} {'channels_last' if cl else 'contiguous'}"] = bench_models._train_step(model, clips, labels)
    print(f"# training step, depth {args.depth} width {args.width}, batch {args.batch} x 8 x {args.size}^2, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds")
    times = bench_models._interleaved(steps, args.rounds, 2)
    for name, samples in times.items():
        print(f"{name:<26} median {statistics.median(samples):.3f} s")
    for name in ("tsm8f_r50", "tsn8f_r50"):
        ratios = [a / b for a, b in zip(times[f"{name} channels_last"], times[f"{name} contiguous"])]
        print(f"{name} channels_last / contiguous per round: median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--step", action="store_true", help="training-step comparison in one process")
    parser.add_argument("--depth", type=int, default=None, help="default: 50 (allreduce), 18 (--step)")
    parser.add_argument("--width", type=int, default=None, help="default: 64 (allreduce), 16 (--step)")
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    if args.step:
        args.depth, args.width = args.depth or 18, args.width or 16
        torch.set_num_threads(1)
        bench_step(args)
        return
    args.depth, args.width = args.depth or 50, args.width or 64
    import horovod.torch as hvd

    from tsm_dist.distributed.gradients import DenseViewCompressor
    from tsm_dist.models import build_model

    hvd.init()
    torch.set_num_threads(1)
    model = build_model("tsm8f_r50", 400, depth=args.depth, width=args.width)
    shapes = [p.shape for p in model.parameters()]
    plain = [torch.randn(s) for s in shapes]
    cl = [t.clone().to(memory_format=torch.channels_last) if t.dim() == 4 else t.clone() for t in plain]
    compressor = DenseViewCompressor(hvd.Compression.none)

    def contiguous() -> None:
        handles = [hvd.allreduce_async_(t, name=f"c{i}", op=hvd.Average) for i, t in enumerate(plain)]
        for h in handles:
            hvd.synchronize(h)

    def dense_view() -> None:
        work = []
        for i, t in enumerate(cl):
            wire, ctx = compressor.compress(t)
            work.append((hvd.allreduce_async_(wire, name=f"d{i}", op=hvd.Average), ctx))
        for h, ctx in work:
            compressor.decompress(hvd.synchronize(h), ctx)

    def copy() -> None:
        work = []
        for i, t in enumerate(cl):
            buf = t.contiguous()
            work.append((hvd.allreduce_async_(buf, name=f"k{i}", op=hvd.Average), t, buf))
        for h, t, buf in work:
            hvd.synchronize(h)
            if buf is not t:
                t.copy_(buf)

    variants = {"contiguous": contiguous, "dense view": dense_view, "copy": copy}
    for fn in variants.values():  # warm-up: negotiation and buffers
        fn()
    times: dict[str, list[float]] = {n: [] for n in variants}
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            hvd.barrier()
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    if hvd.rank() == 0:
        mb = sum(t.numel() * 4 for t in plain) / 1e6
        print(f"# {len(plain)} gradients, {mb:.0f} MB, {hvd.size()} ranks, {args.rounds} interleaved rounds")
        base = times["contiguous"]
        for name, samples in times.items():
            ratios = [t / b for t, b in zip(samples, base)]
            print(f"{name:<12} median {statistics.median(samples):.3f} s/round   vs contiguous: median "
                  f"{statistics.median(ratios):.3f}x (min {min(ratios):.3f}, max {max(ratios):.3f})")
    hvd.shutdown()


if __name__ == "__main__":
    main()

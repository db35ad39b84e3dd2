"""``tsm-dist stream``: an exported online ONNX model over a video, frame by frame, in onnxruntime.

Prints each frame's top-1 class (optionally smoothed: the mean of the last N frames' probabilities,
as the official online demo does) and the frames per second of the model alone; ``--jsonl`` writes
one record per frame: frame index, top-1 id and name, its probability, milliseconds in the model.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time

import numpy as np

from tsm_dist.deploy.frames import Preprocess, iter_video
from tsm_dist.commands.exit_codes import UsageError
from tsm_dist.streaming.onnx_stream import OnnxStream
from tsm_dist.data.errors import DataError


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tsm-dist stream", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="FILE.onnx of `tsm-dist export --mode online` (sidecar FILE.onnx.json)")
    p.add_argument("--video", required=True, help="a video file, or synthetic:LABEL[:SEED] (rendered in memory)")
    p.add_argument("--smooth", type=int, default=1, help="average the probabilities of the last N frames (1: none)")
    p.add_argument("--every", type=int, help="feed every K-th decoded frame (default: the sidecar's frame_spacing, "
                   "the training stride of dense sampling, else 1)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--jsonl", help="write one JSON line per frame here")
    p.add_argument("--quiet", action="store_true", help="only the summary line")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks of errors (or TSM_DIST_DEBUG=1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smooth < 1 or (args.every is not None and args.every < 1):
        raise UsageError("--smooth and --every must be >= 1")
    stream = OnnxStream(args.model, args.threads)
    meta = stream.meta
    every = args.every or int(meta.get("frame_spacing", {}).get("every", 1))
    preprocess = Preprocess(meta["input_size"][0], meta["scale_size"])
    classes = meta["classes"]
    recent: collections.deque[np.ndarray] = collections.deque(maxlen=args.smooth)
    out = open(args.jsonl, "w") if args.jsonl else None
    model_seconds, fed = 0.0, 0
    try:
        for index, rgb in enumerate(iter_video(args.video)):
            if index % every:
                continue
            frame = preprocess(rgb)
            start = time.perf_counter()
            logits = stream(frame)[0]
            seconds = time.perf_counter() - start
            model_seconds, fed = model_seconds + seconds, fed + 1
            recent.append(softmax(logits))
            probs = np.mean(recent, axis=0)
            top = int(probs.argmax())
            record = {"frame": index, "top1": top, "name": classes[top], "prob": round(float(probs[top]), 4),
                      "model_ms": round(seconds * 1e3, 3)}
            if out:
                out.write(json.dumps(record) + "\n")
            if not args.quiet:
                print(f"frame {index:5d}  {classes[top]:<24} p={probs[top]:.3f}  {1 / seconds:8.1f} frames/s")
    finally:
        if out:
            out.close()
    if fed == 0:
        raise DataError(f"--video {args.video}: no frame decoded (an empty, corrupt or truncated video)")
    print(f"{fed} frames, {fed / model_seconds:.1f} frames/s in the model ({meta['model']}, "
          f"{len(stream.caches_meta)} caches, {stream.cache_nbytes() / 1e6:.3f} MB)", file=sys.stdout)
    return 0


if __name__ == "__main__":
    from tsm_dist.commands.exit_codes import run_main

    raise SystemExit(run_main("tsm-dist stream", main))

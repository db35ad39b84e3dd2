"""``tsm-dist early-recognition``: accuracy vs the fraction of the video observed (Fig. 7/8).

Each video of a file list is cut into F equal segments (default: the model's training frame count)
and the segments' center frames stream through the exported online model in order. After k frames
the prediction is the mean of the k per-frame logits so far: what an online model can say having
seen k/F of the video (at k = F it is the offline uni-directional model's clip prediction, since the
online model equals it frame by frame). Writes the curve as a PNG and a Markdown table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tsm_dist.commands.arguments import non_negative_int, positive_int
from tsm_dist.deploy.frames import Preprocess, segment_frames
from tsm_dist.commands.exit_codes import UsageError
from tsm_dist.streaming.onnx_stream import OnnxStream


def early_curve(stream: OnnxStream, videos: list[tuple[str, int]], frames: int) -> np.ndarray:
    """Top-1 accuracy after 1..``frames`` observed segments, over ``videos`` [(path, label)]."""
    meta = stream.meta
    preprocess = Preprocess(meta["input_size"][0], meta["scale_size"])
    correct = np.zeros(frames)
    for path, label in videos:
        stream.reset()
        batch = preprocess(segment_frames(path, frames))
        running = np.cumsum([stream(batch[t:t + 1])[0] for t in range(frames)], axis=0)
        correct += running.argmax(-1) == label
    return correct / max(1, len(videos))


def table(accuracy: np.ndarray, model: str, count: int) -> str:
    frames = len(accuracy)
    lines = [f"Early recognition: {model}, {count} videos, {frames} segments per video", "",
             "| video observed | frames seen | top-1 accuracy |", "|---:|---:|---:|"]
    lines += [f"| {100 * (k + 1) / frames:.1f} % | {k + 1} | {100 * a:.1f} % |" for k, a in enumerate(accuracy)]
    return "\n".join(lines) + "\n"


def plot(accuracy: np.ndarray, model: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = len(accuracy)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(100 * np.arange(1, frames + 1) / frames, 100 * accuracy, marker="o")
    ax.set_xlabel("video observed (%)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"early recognition, online {model}")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _videos(list_path: str, root: str, num_classes: int, limit: int) -> list[tuple[str, int]]:
    from tsm_dist.data.filelist import read_file_list

    records, _ = read_file_list(list_path, num_classes=num_classes)
    base = Path(root) if root else Path(list_path).parent
    videos = [(str(base / r.path), r.label) for r in records]
    return videos[:limit] if limit else videos


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tsm-dist early-recognition", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="FILE.onnx of `tsm-dist export --mode online`")
    p.add_argument("--list", required=True, help="validation file list (path label per line)")
    p.add_argument("--root", default="", help="videos are under this directory (default: the list's directory)")
    p.add_argument("--frames", type=positive_int, help="segments per video (default: the model's training frames)")
    p.add_argument("--limit", type=non_negative_int, default=0, help="only the first N videos (0: all)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--out", default="early_recognition", help="writes OUT.png, OUT.md and OUT.json")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks of errors (or TSM_DIST_DEBUG=1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stream = OnnxStream(args.model, args.threads)
    frames = args.frames or stream.meta["num_frames"]
    if frames < 1:
        raise UsageError("--frames must be >= 1")
    videos = _videos(args.list, args.root, stream.meta["num_classes"], args.limit)
    if not videos:
        raise UsageError(f"--list {args.list} has no videos")
    accuracy = early_curve(stream, videos, frames)
    text = table(accuracy, stream.meta["model"], len(videos))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(text)
    Path(f"{args.out}.json").write_text(json.dumps(
        {"model": stream.meta["model"], "videos": len(videos), "frames": frames,
         "observed": [(k + 1) / frames for k in range(frames)], "top1": accuracy.tolist()}, indent=1) + "\n")
    plot(accuracy, stream.meta["model"], f"{args.out}.png")
    print(text + f"\nwrote {args.out}.png, {args.out}.md, {args.out}.json")
    return 0


if __name__ == "__main__":
    from tsm_dist.commands.exit_codes import run_main

    raise SystemExit(run_main("tsm-dist early-recognition", main))

"""Online TSM per frame in onnxruntime (CPU): vs the same 2D network without shift, vs the offline
clip model run per new frame (the sliding-window alternative); cache bytes; export time.

    python benchmarks/bench_online.py                       # ResNet-50 and MobileNetV2 at 224, 1 and 2 threads
    python benchmarks/bench_online.py --models tsm8f_mbv2 --rounds 40 --threads 1 --forms concat,mask --cpu-time

Each model is exported from the same weights as: the online graph with explicit shift caches in each
graph form (``--forms``: ``concat``, the shifted input as slices + concatenation; ``mask``, ``sub`` and
``split``, convs (and a Sub on the caches), tsm_dist/streaming/; a form that does not apply to a model is
left out), the same graph
without any shift (a 2D network per frame: no caches, no slices, no concatenation), and the offline
8-frame clip graph. On a shared
machine absolute times drift, so the variants are timed interleaved: every round runs each online form
and the 2D graph as a block of ``--block`` consecutive frames (a stream runs one graph frame after frame;
the first ``--warm`` frames of a block, which follow another graph, are not timed), the blocks in reverse order
every other round (ABBA), all on the same frame. Every graph is called the way OnnxStream calls it
(``--call binding``: inputs and outputs bound to buffers once, the caches swapped between frames) or
with ``session.run`` and numpy feeds (``--call run``). Per form it reports the median of the per-round
paired ratios online/2D (with IQR) and the ratio of the minimum times (the least disturbed run of
each). The clip model is timed every round too (one run = the cost of one new frame under a sliding
window). ``uptime`` (the load) is printed before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tsm_dist.deploy.export import export_graph
from tsm_dist.deploy.runtime import session
from tsm_dist.models import build_model
from tsm_dist.streaming import GRAPH_FORMS
from tsm_dist.streaming.onnx_stream import BoundStep
from tsm_dist.streaming.step import split_applies


def _export(model, mode: str, out: Path, size: int, with_shift: bool = True, form: str = "concat") -> tuple[dict, float]:
    start = time.perf_counter()
    interface = export_graph(model, mode, "onnx", out, size, with_shift=with_shift, form=form)
    return interface, time.perf_counter() - start


CLOCK = time.perf_counter  # --cpu-time: time.process_time


def _timed(run) -> float:
    start = CLOCK()
    run()
    return CLOCK() - start


def _step(sess, caches: list[dict], frame: np.ndarray, call: str, input_name: str = "frame"):
    """One streamed frame, the previous call's new caches in, this call's out; ``call``: how a deployment
    calls onnxruntime, the same for every graph: "binding" (buffers bound once, OnnxStream's way) or
    "run" (``session.run`` with numpy feeds and outputs every call)."""
    if call == "binding":
        step = BoundStep(sess, caches, frame.shape[0], input_name)
        return lambda: step(frame)
    feeds = {c["input"]: np.zeros((frame.shape[0], *c["shape"][1:]), np.float32) for c in caches}
    out_names = ["logits", *[c["output"] for c in caches]]

    def run() -> None:
        outs = sess.run(out_names, {input_name: frame, **feeds})
        feeds.update({c["input"]: o for c, o in zip(caches, outs[1:])})
    return run


def _block(step, frames: int, warm: int) -> list[float]:
    """``frames`` consecutive frames of one graph, as a stream runs them; the first ``warm``, which follow
    another graph's run (its weights and arena out of the CPU caches: a frame costs less for 4-5 frames
    on MobileNetV2), are not timed."""
    for _ in range(warm):
        step()
    return [_timed(step) for _ in range(frames - warm)]


def _rounds(steps: dict, plain, clip, rounds: int, block: int, warm: int) -> tuple[dict, list, list, list]:
    """Interleaved timing: per form its times and per-round ratios to the 2D graph run in the same round.
    Each graph runs a block of frames per round; the order of the blocks reverses every round (ABBA)."""
    for step in (*steps.values(), plain, clip):  # warm-up: first runs allocate and plan
        step()
        step()
    graphs = [*steps.items(), ("2d", plain)]
    times = {name: [] for name, _ in graphs}
    ratios = {f: [] for f in steps}
    t_clip = []
    for i in range(rounds):
        timed = {name: _block(step, block, warm) for name, step in (graphs if i % 2 == 0 else graphs[::-1])}
        for name in times:
            times[name] += timed[name]
        for f in steps:
            ratios[f].append(sum(timed[f]) / sum(timed["2d"]))
        t_clip.append(_timed(clip))
    t_2d = times.pop("2d")
    return times, ratios, t_2d, t_clip


def bench_model(name: str, size: int, threads: list[int], workdir: Path, forms: list[str], args) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(name, 400, online=True).eval()
    forms = [f for f in forms if f != "split" or split_applies(model)]
    exported = {f: _export(model, "online", workdir / f"{name}_{f}.onnx", size, form=f) for f in forms}
    _, plain_s = _export(model, "online", workdir / f"{name}_2d.onnx", size, with_shift=False)
    _, clip_s = _export(model, "offline", workdir / f"{name}_clip.onnx", size)
    rng = np.random.default_rng(0)
    frame = rng.standard_normal((1, 3, size, size), dtype=np.float32)
    clip = rng.standard_normal((1, model.num_frames, 3, size, size), dtype=np.float32)
    interface = exported[forms[0]][0]
    cache_bytes = sum(4 * int(np.prod(c["shape"][1:])) for c in interface["caches"])
    rows = []
    for n in threads:
        steps = {f: _step(session(workdir / f"{name}_{f}.onnx", n), exported[f][0]["caches"], frame, args.call)
                 for f in forms}
        plain = _step(session(workdir / f"{name}_2d.onnx", n), [], frame, args.call)
        clip_step = _step(session(workdir / f"{name}_clip.onnx", n), [], clip, args.call, "clips")
        times, ratios, t_2d, t_clip = _rounds(steps, plain, clip_step, args.rounds, args.block, args.warm)
        feeds = {"frame": frame, **{c["input"]: np.zeros((1, *c["shape"][1:]), np.float32) for c in interface["caches"]}}
        for f in forms:
            q = statistics.quantiles(ratios[f], n=4)
            shares = op_shares(workdir / f"{name}_{f}.onnx", feeds, max(10, args.rounds), n)
            rows.append({
                "model": name, "form": f, "size": size, "threads": n, "rounds": args.rounds, "block": args.block,
                "warm": args.warm,
                "call": args.call,
                "online_op_shares": {k: round(v, 4) for k, v in shares.items()},
                "online_ms": 1e3 * statistics.median(times[f]), "plain_2d_ms": 1e3 * statistics.median(t_2d),
                "online_vs_2d": statistics.median(ratios[f]), "online_vs_2d_iqr": [q[0], q[2]],
                "online_vs_2d_min": min(times[f]) / min(t_2d),
                "clip_per_new_frame_ms": 1e3 * statistics.median(t_clip),
                "clip_vs_online": statistics.median(t_clip) / statistics.median(times[f]),
                "cache_bytes": cache_bytes, "caches": len(interface["caches"]),
                "export_s": {"online": exported[f][1], "2d": plain_s, "clip": clip_s},
            })
            print(_line(rows[-1]), flush=True)
    return rows


def op_shares(model_path: Path, feeds: dict, runs: int, threads: int) -> dict[str, float]:
    """Share of onnxruntime's kernel time per op type over ``runs`` runs (its own profiler): which ops
    an online graph spends its time in, independent of how loaded the machine is."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.intra_op_num_threads = threads
    opts.profile_file_prefix = str(model_path.with_suffix(""))
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            per_op[op] = per_op.get(op, 0.0) + e["dur"]
    total = sum(per_op.values()) or 1.0
    return {op: t / total for op, t in sorted(per_op.items(), key=lambda kv: -kv[1])}


def _line(r: dict) -> str:
    lo, hi = r["online_vs_2d_iqr"]
    return (f"{r['model']:<11} {r['form']:<6} {r['threads']} thr  online {r['online_ms']:8.2f} ms  2D "
            f"{r['plain_2d_ms']:8.2f} ms  online/2D median {r['online_vs_2d']:.3f} (IQR {lo:.3f}-{hi:.3f}) "
            f"min {r['online_vs_2d_min']:.3f}  clip per new frame "
            f"{r['clip_per_new_frame_ms']:8.1f} ms ({r['clip_vs_online']:.1f}x online)  cache "
            f"{r['cache_bytes'] / 1e6:.3f} MB in {r['caches']}  export {r['export_s']['online']:.1f} s\n"
            f"{'':<11} online graph kernel time by op: "
            + ", ".join(f"{op} {100 * v:.1f} %" for op, v in list(r["online_op_shares"].items())[:6]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tsm8f_mbv2,tsm8f_r50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", default="1,2", help="comma list of onnxruntime intra-op thread counts")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--block", type=int, default=8,
                   help="frames each graph runs per round, one after another as in a stream")
    p.add_argument("--warm", type=int, default=4, help="frames at the start of each block that are not timed")
    p.add_argument("--call", choices=("binding", "run"), default="binding",
                   help="how every graph is called: inputs and outputs bound to buffers once (OnnxStream) or "
                        "session.run with numpy feeds and outputs every call")
    p.add_argument("--forms", default=",".join(GRAPH_FORMS), help="comma list of online graph forms (tsm_dist/streaming/)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--cpu-time", action="store_true",
                   help="time CPU seconds of this process instead of wall-clock: on a loaded machine the time a "
                        "run waits for a core is not counted (onnxruntime computes in the calling thread at 1 thread)")
    args = p.parse_args()
    if not 0 <= args.warm < args.block:
        p.error("--warm must be >= 0 and below --block (the frames of a block that are timed: block - warm)")
    global CLOCK
    CLOCK = time.process_time if args.cpu_time else time.perf_counter
    print("uptime:", os.popen("uptime").read().strip(), flush=True)
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {os.cpu_count()} cores, "
          f"{'CPU' if args.cpu_time else 'wall-clock'} time, calls: {args.call}, {args.block} frames per graph "
          f"per round (the first {args.warm} not timed)", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += bench_model(name, args.size, [int(t) for t in args.threads.split(",")], Path(tmp),
                                args.forms.split(","), args)
    print("uptime:", os.popen("uptime").read().strip())
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

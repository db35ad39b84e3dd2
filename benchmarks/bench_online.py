"""Online TSM per frame in onnxruntime (CPU): vs the same 2D network without shift, vs the offline
clip model run per new frame (the sliding-window alternative); cache bytes; export time.

    python benchmarks/bench_online.py                       # ResNet-50 and MobileNetV2 at 224, 1 and 2 threads
    python benchmarks/bench_online.py --models tsm8f_mbv2 --rounds 40 --threads 1

Each model is exported three times from the same weights: online with explicit shift caches, the
same graph without any shift (a 2D network per frame: no caches, no slices, no concatenation), and
the offline 8-frame clip graph. On a shared machine absolute times drift, so the variants are timed
interleaved: every round runs online, 2D, 2D, online (ABBA) on the same frame, and the per-round
ratio online/2D is paired; the median of those ratios is the result. The clip model is timed every
round too (one run = the cost of one new frame under a sliding window). ``uptime`` is printed.
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


def _export(model, mode: str, out: Path, size: int, with_shift: bool = True) -> tuple[dict, float]:
    start = time.perf_counter()
    interface = export_graph(model, mode, "onnx", out, size, with_shift=with_shift)
    return interface, time.perf_counter() - start


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def bench_model(name: str, size: int, threads: list[int], rounds: int, workdir: Path) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(name, 400, online=True).eval()
    online_if, online_s = _export(model, "online", workdir / f"{name}_online.onnx", size)
    _, plain_s = _export(model, "online", workdir / f"{name}_2d.onnx", size, with_shift=False)
    _, clip_s = _export(model, "offline", workdir / f"{name}_clip.onnx", size)
    rng = np.random.default_rng(0)
    frame = rng.standard_normal((1, 3, size, size), dtype=np.float32)
    clip = rng.standard_normal((1, model.num_frames, 3, size, size), dtype=np.float32)
    cache_bytes = sum(4 * int(np.prod(c["shape"][1:])) for c in online_if["caches"])
    rows = []
    for n in threads:
        online, plain, offline = (session(workdir / f"{name}_{k}.onnx", n) for k in ("online", "2d", "clip"))
        caches = {c["input"]: np.zeros((1, *c["shape"][1:]), np.float32) for c in online_if["caches"]}
        out_names = ["logits", *[c["output"] for c in online_if["caches"]]]

        def step_online() -> None:
            outs = online.run(out_names, {"frame": frame, **caches})
            caches.update({c["input"]: o for c, o in zip(online_if["caches"], outs[1:])})

        def step_plain() -> None:
            plain.run(["logits"], {"frame": frame})

        def step_clip() -> None:
            offline.run(["logits"], {"clips": clip})

        for step in (step_online, step_plain, step_clip):  # warm-up: first runs allocate and plan
            step()
            step()
        ratios, t_on, t_2d, t_clip = [], [], [], []
        for _ in range(rounds):
            a1, b1, b2, a2 = _timed(step_online), _timed(step_plain), _timed(step_plain), _timed(step_online)
            t_on += [a1, a2]
            t_2d += [b1, b2]
            ratios.append((a1 + a2) / (b1 + b2))
            t_clip.append(_timed(step_clip))
        q = statistics.quantiles(ratios, n=4)
        feeds = {"frame": frame, **{c["input"]: np.zeros((1, *c["shape"][1:]), np.float32) for c in online_if["caches"]}}
        shares = op_shares(workdir / f"{name}_online.onnx", feeds, max(10, rounds), n)
        rows.append({
            "model": name, "online_op_shares": {k: round(v, 4) for k, v in shares.items()}, "size": size, "threads": n, "rounds": rounds,
            "online_ms": 1e3 * statistics.median(t_on), "plain_2d_ms": 1e3 * statistics.median(t_2d),
            "online_vs_2d": statistics.median(ratios), "online_vs_2d_iqr": [q[0], q[2]],
            "clip_per_new_frame_ms": 1e3 * statistics.median(t_clip),
            "clip_vs_online": statistics.median(t_clip) / statistics.median(t_on),
            "cache_bytes": cache_bytes, "caches": len(online_if["caches"]),
            "export_s": {"online": online_s, "2d": plain_s, "clip": clip_s},
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
    return (f"{r['model']:<11} {r['threads']} thr  online {r['online_ms']:8.2f} ms  2D {r['plain_2d_ms']:8.2f} ms  "
            f"online/2D {r['online_vs_2d']:.3f} (IQR {lo:.3f}-{hi:.3f})  clip per new frame "
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
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    print("uptime:", os.popen("uptime").read().strip(), flush=True)
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {os.cpu_count()} cores", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += bench_model(name, args.size, [int(t) for t in args.threads.split(",")], args.rounds, Path(tmp))
    print("uptime:", os.popen("uptime").read().strip())
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

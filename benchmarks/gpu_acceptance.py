"""One command that proves the GPU paths on a GPU machine (and keeps working on CPU in CI).

    python benchmarks/gpu_acceptance.py --device cuda --out runs/gpu_acceptance   # <= 7 min on one GPU (estimate)
    python benchmarks/gpu_acceptance.py --device cpu  --out runs/cpu_acceptance   # <= 4 min, what CI runs

Writes ``OUT/acceptance.json`` (one entry per check: name, ok, skipped, figures, error, seconds) and
``OUT/acceptance.md`` (the same as a table). Exit code 0 when no check failed (skipped ones do not
fail), 1 otherwise. The checks:

1. ``stack``: torch and its CUDA, Horovod built with NCCL, DALI, NVDEC's library (libnvcuvid), the
   unversioned ``libcuda.so`` Horovod's GPU allreduce opens; each reported on its own (a missing Horovod
   does not hide DALI's status).
2. ``dali_decode_vp9``, ``dali_decode_h264``: files made on the spot whose frame k is gray level
   16 + 9k, decoded by DALI (NVDEC on cuda, DALI's CPU decoder on cpu; H.264 is NVDEC only) at
   unsorted, repeated frame numbers, against PyAV's frames: mean absolute difference and the frame
   numbers recovered from the gray levels. Frame sizes meet NVDEC's minimums (VP9: 128x128).
3. ``shift_gradients_amp``: the fused shift vs the plain shift-then-conv, channels-last, under bf16 and
   fp16 autocast: outputs, every gradient, and gradient strides equal to parameter strides.
4. ``shift_overhead``: TSN vs TSM8f training-step time (the paper's P1), with the reference shift beside
   it; interleaved rounds, median ratios. On cuda it fails above +5 % (goal: +2 %).
5. ``table10_throughput``: inference clips/s of TSM8f, I3D3x3x3 and I3D3x1x1 (R50), as ratios to
   I3D3x1x1 beside the paper's 2.0 : 1.5 : 1.0; on cuda it fails unless the paper's order holds.
6. ``amp_channels_last``: TSM8f training clips/s with AMP off/bf16/fp16 and channels-last off/on; on
   cuda it fails unless fp16 AMP is faster than fp32 (channels-last).
7. ``train_synthetic_dali``: a short 1-GPU training on the synthetic set with DALI decoding on the
   device: the trainer's own data_time / step_time records.
8. ``engine_step_channels_last``: one Horovod step (size 1: no collective runs) and one DDP step (NCCL on
   cuda, Gloo on cpu; DDP's reducer allreduces at size 1 too) on a channels-last TSM: strides kept, no
   DDP stride warning.
9. ``horovod_allreduce_hooks``: Horovod's gradient hooks registered at size 1 (Horovod registers none
   there), so every gradient goes through a real allreduce (NCCL on cuda) via the engine's contiguous
   views, with K = 2 accumulation and, on cuda, fp16 AMP with GradScaler; equal to the local gradient.
10. ``optimizer_state_broadcast``: momentum buffers through Horovod's broadcast as bytes, loaded onto
   this rank's device (the path ``broadcast_state`` skips at size 1).
11. ``horovod_two_ranks_gloo``: two ranks (``horovodrun --gloo``) on this one device, the engine's
   contiguous views with Horovod's fp16 compressor and K = 2 accumulation on a channels-last TSM: both
   ranks must hold the same gradients, equal to the mean of their local ones within fp16 rounding. On a
   GPU the tensors are CUDA tensors that Horovod stages through host memory for Gloo; a Horovod built
   with NCCL has no such path (NCCL takes every CUDA tensor and refuses two ranks on one GPU), so the
   check then says so and is skipped.

Without DALI the DALI checks say "skipped: DALI not installed", without Horovod the Horovod ones
"skipped: Horovod not installed"; every other check runs. A failed check names why in ``acceptance.md``.
With ``--device cpu`` the device-only checks (H.264 on NVDEC, fp16 autocast, NCCL) are reported as
skipped, the rest run on small models. Figures are measurements, not assertions, except where a
check states a bound.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

# bench_models beside this file, and tsm_dist from this checkout when it is not installed (a node where
# the offline install stopped early): runs from the repository root without PYTHONPATH
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

PAPER_RATIOS = {"tsm8f_r50": 84.8 / 41.9, "i3d3x3x3_r50": 63.1 / 41.9, "i3d3x1x1_r50": 1.0}
GRAY0, GRAY_STEP, DECODE_FRAMES = 16, 9, 24
DECODE_PICK = [0, 7, 3, 23, 12, 12, 1]  # unsorted, repeated, first and last frame
DECODE_MAD_BOUND = 3.0  # mean |DALI - PyAV| in 0..255 levels
SHIFT_GOAL, SHIFT_FAIL = 0.02, 0.05  # TSM8f step over TSN's on a GPU: the goal, and where the check fails


class Skipped(Exception):
    """A check that cannot run on this device."""


# --------------------------------------------------------------------------------------- settings
class Settings:
    """Problem sizes: full ResNet-50 at 224 on a GPU, tiny networks on a CPU (what CI can afford)."""

    def __init__(self, device: str, out: Path) -> None:
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self.cuda = device == "cuda"
        self.out = out
        if self.cuda:
            self.arch = {}  # the registry's R50
            self.size, self.batch, self.rounds, self.warmup = 224, 8, 10, 3
            self.infer_batch, self.infer_iters = 8, 10
            self.train_videos, self.train_size, self.train_crop, self.train_epochs = 16, 128, 112, 2
        else:
            self.arch = {"depth": 18, "width": 8}
            self.size, self.batch, self.rounds, self.warmup = 48, 2, 2, 1
            self.infer_batch, self.infer_iters = 2, 2
            self.train_videos, self.train_size, self.train_crop, self.train_epochs = 4, 64, 48, 1

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def _model(name: str, s: Settings, **kw: Any) -> torch.nn.Module:
    from tsm_dist.models import build_model

    return build_model(name, 400 if s.cuda else 10, dropout=0.0, **{**s.arch, **kw}).to(s.device)


# ------------------------------------------------------------------------------------------ checks
def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _need_dali() -> None:
    if not _installed("nvidia.dali"):
        raise Skipped("DALI not installed")


def _need_horovod() -> None:
    if not _installed("horovod.torch"):
        raise Skipped("Horovod not installed")


_HOROVOD: list[Any] = []  # one Horovod engine for every check: MPI cannot start again after it finalized


def _horovod_engine() -> Any:
    _need_horovod()
    if not _HOROVOD:
        from tsm_dist.config import EngineConfig
        from tsm_dist.distributed.engine import Engine

        _HOROVOD.append(Engine(EngineConfig(name="horovod")).init())
    return _HOROVOD[0]


def check_stack(s: Settings) -> dict[str, Any]:
    """Each component on its own, so that a missing Horovod does not hide DALI's or NVDEC's status."""
    import ctypes

    from tsm_dist.commands.selfcheck import libcuda_problem

    figures: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                               "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        figures["gpu"] = torch.cuda.get_device_name(0)
        figures["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        figures["gpus_visible"] = torch.cuda.device_count()
    figures["horovod"] = "not installed"
    if _installed("horovod.torch"):
        import horovod.torch as hvd

        figures.update(horovod=getattr(__import__("horovod"), "__version__", "?"), horovod_nccl=hvd.nccl_built(),
                       horovod_gloo=hvd.gloo_built(), horovod_mpi=hvd.mpi_built())
    figures["dali"] = __import__("nvidia.dali").dali.__version__ if _installed("nvidia.dali") else "not installed"
    try:
        ctypes.CDLL("libnvcuvid.so.1")
        figures["nvcuvid"] = True
    except OSError:
        figures["nvcuvid"] = False
    figures["libcuda_so"] = libcuda_problem() or "ok"
    problems = []
    if s.cuda:
        problems += [what for what, good in (("torch has no CUDA device", torch.cuda.is_available()),
                                             ("Horovod not installed", figures["horovod"] != "not installed"),
                                             ("Horovod is built without NCCL", bool(figures.get("horovod_nccl"))),
                                             ("libcuda.so missing", figures["libcuda_so"] == "ok"),
                                             ("libnvcuvid.so.1 (NVDEC) not found", figures["nvcuvid"])) if not good]
    figures["problems"] = problems
    return {"ok": not problems, "figures": figures}


def _gray_video(path: Path, codec: str) -> np.ndarray:
    from tsm_dist.data.encode import write_video

    levels = np.array([GRAY0 + GRAY_STEP * k for k in range(DECODE_FRAMES)], dtype=np.uint8)
    frames = np.ascontiguousarray(np.broadcast_to(levels[:, None, None, None], (DECODE_FRAMES, 128, 160, 3)))
    write_video(str(path), frames, codec=codec, quality=4, gop=8)
    return frames


def _dali_decode(path: Path, frames: list[int], s: Settings) -> np.ndarray:
    from nvidia.dali import fn, pipeline_def

    from tsm_dist.data.dali_loader import PAD_MODE

    data = np.fromfile(path, dtype=np.uint8)
    pick = np.array(frames, dtype=np.int32)

    @pipeline_def(batch_size=1, num_threads=2, device_id=0 if s.cuda else None)
    def pipe():
        encoded, numbers = fn.external_source(source=lambda: ([data], [pick]), num_outputs=2, batch=True)
        return fn.decoders.video(encoded, frames=numbers, device="mixed" if s.cuda else "cpu", pad_mode=PAD_MODE)

    p = pipe()
    p.build()
    (out,) = p.run()
    if s.cuda:
        out = out.as_cpu()
    return out.as_array()[0]


def _pyav_frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _decode_check(codec: str, s: Settings) -> dict[str, Any]:
    _need_dali()
    suffix = {"libvpx-vp9": "webm", "libx264": "mp4"}[codec]
    path = s.out / f"gray_{codec}.{suffix}"
    _gray_video(path, codec)
    got = _dali_decode(path, DECODE_PICK, s).astype(np.float64)
    ref = _pyav_frames(path)[DECODE_PICK].astype(np.float64)
    mad = float(np.abs(got - ref).mean())
    recovered = np.round((got.mean(axis=(1, 2, 3)) - GRAY0) / GRAY_STEP).astype(int).tolist()
    figures = {"decoder": "NVDEC (mixed)" if s.cuda else "DALI CPU", "shape": list(got.shape),
               "requested": DECODE_PICK, "recovered": recovered, "mean_abs_diff_vs_pyav": round(mad, 3),
               "bound": DECODE_MAD_BOUND}
    return {"ok": recovered == DECODE_PICK and mad < DECODE_MAD_BOUND, "figures": figures}


def check_dali_decode_vp9(s: Settings) -> dict[str, Any]:
    return _decode_check("libvpx-vp9", s)


def check_dali_decode_h264(s: Settings) -> dict[str, Any]:
    if not s.cuda:
        raise Skipped("H.264 is decoded by NVDEC only (DALI's CPU decoder reads VP8/VP9/MJPEG)")
    return _decode_check("libx264", s)


@contextlib.contextmanager
def _no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check_shift_gradients_amp(s: Settings) -> dict[str, Any]:
    import bench_models

    import tsm_dist.models.temporal_shift as ts

    figures: dict[str, Any] = {}
    ok = True
    for dtype, bound in ((None, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)):
        name = str(dtype).split(".")[-1] if dtype else "fp32"
        if dtype == torch.float16 and not s.cuda:
            figures[name] = "skipped: fp16 autocast is a GPU mode"
            continue
        torch.manual_seed(0)
        bottleneck = {} if s.cuda else {"depth": 26}  # bottlenecks: the shift fused with a 1x1 conv
        fused = _model("tsm8f_r50", s, **bottleneck).to(memory_format=torch.channels_last)
        plain = _model("tsm8f_r50", s, **bottleneck).to(memory_format=torch.channels_last)
        plain.load_state_dict(fused.state_dict())
        bench_models._use_shift(plain, ts.temporal_shift)
        clips = torch.randn(2, 8, 3, s.size, s.size, device=s.device)
        results = []
        for model in (fused, plain):
            # fp32 means fp32: cuDNN's default TF32 convolutions would make the two models differ by ~1e-3
            with _no_tf32(), torch.autocast(s.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(clips)
                out.float().square().mean().backward()
            results.append((out.detach().float(), {n: p.grad for n, p in model.named_parameters()}))
        (out_f, g_f), (out_p, g_p) = results
        worst = max(float((g_f[n].float() - g_p[n].float()).norm() / g_p[n].float().norm().clamp_min(1e-12))
                    for n in g_p)
        out_err = float((out_f - out_p).norm() / out_p.norm())
        strides = [n for n, p in fused.named_parameters() if p.grad.stride() != p.stride()]
        figures[name] = {"output_rel_err": out_err, "worst_grad_rel_err": worst, "bound": bound,
                         "grads_with_other_strides": strides}
        ok = ok and worst < bound and out_err < bound and not strides
    return {"ok": ok, "figures": figures}


def _timed_step(step: Callable[[], None], s: Settings) -> Callable[[], None]:
    def run() -> None:
        step()
        s.sync()
    return run


def check_shift_overhead(s: Settings) -> dict[str, Any]:
    import bench_models

    torch.manual_seed(0)
    tsn = _model("tsn8f_r50", s)
    models = {"TSN": tsn, "TSM8f": _model("tsm8f_r50", s), "TSM8f reference shift": _model("tsm8f_r50", s)}
    bench_models._use_shift(models["TSM8f reference shift"], bench_models.temporal_shift)
    for model in models.values():
        model.load_state_dict(tsn.state_dict())
        model.to(memory_format=torch.channels_last)
    clips = torch.randn(s.batch, 8, 3, s.size, s.size, device=s.device)
    labels = torch.randint(0, 10, (s.batch,), device=s.device)
    steps = {n: _timed_step(bench_models._train_step(m, clips, labels), s) for n, m in models.items()}
    times = bench_models._interleaved(steps, s.rounds, s.warmup)
    figures = {f"{n} step_s (median)": statistics.median(t) for n, t in times.items()}
    for name in ("TSM8f", "TSM8f reference shift"):
        figures[f"{name} overhead vs TSN (median)"] = statistics.median(
            t / b - 1 for t, b in zip(times[name], times["TSN"]))
    figures["setup"] = f"batch {s.batch} x 8 frames x {s.size}^2, channels-last, {s.rounds} interleaved rounds"
    overhead = figures["TSM8f overhead vs TSN (median)"]
    figures.update(goal=SHIFT_GOAL, fail_above=SHIFT_FAIL, goal_met=overhead <= SHIFT_GOAL)
    if not s.cuda:  # a tiny network on a shared CPU: the step is bookkeeping, not what the goal is about
        figures["bound"] = "applies on cuda only"
        return {"ok": True, "figures": figures}
    why = None if overhead <= SHIFT_FAIL else f"TSM8f step {overhead:+.1%} over TSN, fail above {SHIFT_FAIL:.0%}"
    return {"ok": why is None, "figures": figures, "why": why}


def check_table10_throughput(s: Settings) -> dict[str, Any]:
    from tsm_dist.models.profiler import measure_throughput

    clips_s: dict[str, float] = {}
    models = {name: _model(name, s) for name in PAPER_RATIOS}
    for order in (list(models), list(models)[::-1]):  # twice, in both orders: the best of the two
        for name in order:
            clips_s[name] = max(clips_s.get(name, 0.0), measure_throughput(
                models[name], batch=s.infer_batch, size=s.size, device=s.device, warmup=1, iters=s.infer_iters,
                channels_last=True))
    base = clips_s["i3d3x1x1_r50"]
    ratios = {n: v / base for n, v in clips_s.items()}
    figures = {"clips_per_s": clips_s, "ratio_to_i3d3x1x1": ratios, "paper_ratio": PAPER_RATIOS,
               "ours_over_paper": {n: ratios[n] / PAPER_RATIOS[n] for n in ratios},
               "setup": f"inference, batch {s.infer_batch}, {s.size}^2, channels-last, fp32"}
    # The paper's order (TSM8f > I3D3x3x3 > I3D3x1x1 in clips/s is 2.0 : 1.5 : 1.0) must hold on a GPU
    order = ratios["tsm8f_r50"] > ratios["i3d3x3x3_r50"] > 1.0
    why = None if order or not s.cuda else "clips/s not in the paper's order TSM8f > I3D3x3x3 > I3D3x1x1"
    return {"ok": all(v > 0 for v in clips_s.values()) and why is None, "figures": figures, "why": why}


def check_amp_channels_last(s: Settings) -> dict[str, Any]:
    import bench_models

    modes = [("fp32", None), ("bf16", torch.bfloat16)] + ([("fp16", torch.float16)] if s.cuda else [])
    steps, figures = {}, {}
    clips = torch.randn(s.batch, 8, 3, s.size, s.size, device=s.device)
    labels = torch.randint(0, 10, (s.batch,), device=s.device)
    for amp_name, dtype in modes:
        for cl in (False, True):
            torch.manual_seed(0)
            model = _model("tsm8f_r50", s)
            if cl:
                model = model.to(memory_format=torch.channels_last)
            inner = bench_models._train_step(model, clips, labels)

            def step(inner=inner, dtype=dtype) -> None:
                with torch.autocast(s.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    inner()
            steps[f"{amp_name} {'channels_last' if cl else 'contiguous'}"] = _timed_step(step, s)
    times = bench_models._interleaved(steps, s.rounds, s.warmup)
    for name, t in times.items():
        figures[f"{name} clips/s"] = s.batch / statistics.median(t)
    if not s.cuda:
        figures["fp16"] = "skipped: fp16 autocast is a GPU mode"
        return {"ok": True, "figures": figures}
    fp32, fp16 = figures["fp32 channels_last clips/s"], figures["fp16 channels_last clips/s"]
    why = None if fp16 > fp32 else f"fp16 AMP {fp16:.2f} clips/s is not faster than fp32 {fp32:.2f}"
    return {"ok": why is None, "figures": figures, "why": why}


def check_train_synthetic_dali(s: Settings) -> dict[str, Any]:
    from tsm_dist.config import load_config
    from tsm_dist.data.synthetic import make_synthetic
    from tsm_dist.runlog.records import read_records
    from tsm_dist.training.train import train

    _need_dali()
    root = s.out / "synthetic"
    if not (root / "train.txt").exists():
        make_synthetic(str(root), videos_per_class=s.train_videos, frames=16, size=s.train_size, seed=0)
    overrides = {"data.root": str(root), "data.backend": "dali", "data.device": "gpu" if s.cuda else "cpu",
                 "data.crop_size": s.train_crop, "data.scale_size": s.train_size, "data.batch_size": 4,
                 "data.num_threads": 2, "train.epochs": s.train_epochs, "train.eval_every_epochs": 0,
                 "train.checkpoint_every_epochs": 0, "train.amp": "bf16" if s.cuda else "none",
                 "engine.name": "torch", "log.interval": 1, "log.wandb": "disabled", "log.progress": False,
                 "optim.base_batch": 4}
    if not s.cuda:
        overrides.update({"model.depth": 18, "model.width": 8})
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "synthetic_tsm.yaml"),
                      [f"{k}={v}" for k, v in overrides.items()])
    workdir = s.out / "train_synthetic"
    code = train(cfg, workdir)
    records = read_records(workdir / "metrics.jsonl")
    steps = [r for r in records if r["type"] == "step"][1:]  # the first step builds the pipeline
    header = next(r for r in records if r["type"] == "header")
    figures = {"exit_code": code, "steps": len(steps) + 1, "device": header["device"],
               "memory_format": header.get("memory_format"), "decode": overrides["data.device"]}
    if steps:
        for key in ("data_time", "compute_time", "step_time"):
            figures[f"{key} (median s)"] = statistics.median(r[key] for r in steps)
        figures["data share of step"] = figures["data_time (median s)"] / figures["step_time (median s)"]
        figures["loss first/last"] = [steps[0]["loss"], steps[-1]["loss"]]
    return {"ok": code == 0 and bool(steps) and all(np.isfinite(r["loss"]) for r in steps), "figures": figures}


def _micro_batches(s: Settings, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 8, 3, s.size, s.size, generator=g).to(s.device),
             torch.randint(0, 10, (2,), generator=g).to(s.device)) for _ in range(2)]


def _accumulated_grads(model: torch.nn.Module, batches: list, dtype: torch.dtype | None,
                       scaler: torch.amp.GradScaler) -> None:
    for clips, labels in batches:  # K = 2 backward passes, loss / K as the trainer does
        with torch.autocast(clips.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(clips), labels) / len(batches)
        scaler.scale(loss).backward()


def check_horovod_allreduce_hooks(s: Settings) -> dict[str, Any]:
    """Horovod's gradient hooks at size 1 (where Horovod registers none): every gradient of a channels-last
    TSM goes through a real allreduce (NCCL on a GPU) via the engine's contiguous views, with K = 2
    accumulation and fp16 AMP + GradScaler on a GPU; the result must equal the local accumulated gradient."""
    engine = _horovod_engine()
    dtype = torch.float16 if s.cuda else None
    batches = _micro_batches(s)
    torch.manual_seed(0)
    reference = _model("tsm8f_r50", s).to(memory_format=torch.channels_last)
    _accumulated_grads(reference, batches, dtype, torch.amp.GradScaler(s.device.type, enabled=s.cuda))
    torch.manual_seed(0)
    model = _model("tsm8f_r50", s).to(memory_format=torch.channels_last)
    _, opt = engine.distribute(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), accumulate=2)
    if engine.size == 1:
        opt._register_hooks()  # what Horovod does at size > 1
    scaler = torch.amp.GradScaler(s.device.type, enabled=s.cuda)
    _accumulated_grads(model, batches, dtype, scaler)
    launched = len(opt._handles)
    engine.synchronize(opt)
    want = dict(reference.named_parameters())  # both still scaled by the same initial loss scale
    worst = max(float((p.grad.float() - want[n].grad.float()).norm() / want[n].grad.float().norm().clamp_min(1e-12))
                for n, p in model.named_parameters())
    with opt.skip_synchronize():
        scaler.step(opt)  # unscales, skips the step on inf/NaN: the fp16 path the trainer takes
    scaler.update()
    import horovod.torch as hvd

    figures = {"ops": "NCCL" if s.cuda and hvd.nccl_built() else "Gloo/MPI (CPU)", "size": engine.size,
               "allreduces_launched_by_hooks": launched, "parameters": len(want), "amp": str(dtype),
               "worst_grad_rel_err_vs_local": worst, "bound": 1e-3 if s.cuda else 1e-5,
               "grads_with_other_strides": [n for n, p in model.named_parameters() if p.grad.stride() != p.stride()]}
    ok = launched == len(want) and worst < figures["bound"] and not figures["grads_with_other_strides"]
    return {"ok": ok, "figures": figures}


def check_optimizer_state_broadcast(s: Settings) -> dict[str, Any]:
    """The optimizer-state path of ``broadcast_state`` (which returns early at size 1), run explicitly:
    momentum buffers as bytes through Horovod's broadcast, loaded onto this rank's device."""
    _horovod_engine()
    import horovod.torch as hvd

    from tsm_dist.distributed.engine import _state_bytes, _state_from_bytes

    torch.manual_seed(0)
    model = _model("tsn8f_r50", s).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    clips, labels = _micro_batches(s)[0]
    torch.nn.functional.cross_entropy(model(clips), labels).backward()
    opt.step()
    payload = hvd.broadcast_object(_state_bytes(opt.state_dict()), root_rank=0, name="acceptance.opt_state")
    state = _state_from_bytes(payload, s.device)
    sent = opt.state_dict()["state"]
    devices = sorted({str(v["momentum_buffer"].device) for v in state["state"].values()})
    equal = all(torch.equal(state["state"][k]["momentum_buffer"], v["momentum_buffer"]) for k, v in sent.items())
    return {"ok": equal and devices == [str(s.device)],
            "figures": {"buffers": len(sent), "devices": devices, "bit_equal": equal}}


def check_engine_step_channels_last(s: Settings) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from tsm_dist.config import EngineConfig
    from tsm_dist.distributed.engine import Engine

    figures: dict[str, Any] = {}
    clips = torch.randn(2, 8, 3, s.size, s.size, device=s.device)
    labels = torch.randint(0, 10, (2,), device=s.device)

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = _model("tsm8f_r50", s).to(memory_format=torch.channels_last)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    # Horovod through our engine, 1 rank without hooks (horovod_allreduce_hooks runs the collectives)
    figures["horovod"] = {"skipped": "Horovod not installed", "grads_with_other_strides": []}
    if _installed("horovod.torch"):
        engine = _horovod_engine()
        model, opt = fresh()
        engine.broadcast_state(model, opt)
        _, opt = engine.distribute(model, opt, accumulate=1)
        torch.nn.functional.cross_entropy(model(clips), labels).backward()
        engine.synchronize(opt)
        with opt.skip_synchronize():
            opt.step()
        figures["horovod"] = {"grads_with_other_strides": [n for n, p in model.named_parameters()
                                                           if p.grad.stride() != p.stride()]}
    # DDP, 1 rank
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl" if s.cuda else "gloo", init_method=f"file://{tmp}/store", rank=0,
                                world_size=1, **({"device_id": s.device} if s.cuda else {}))
        try:
            model, opt = fresh()
            ddp = DistributedDataParallel(model, device_ids=[s.device.index] if s.cuda else None)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.nn.functional.cross_entropy(ddp(clips), labels).backward()
            opt.step()
            figures["ddp"] = {"backend": dist.get_backend(),
                              "grads_with_other_strides": [n for n, p in model.named_parameters()
                                                           if p.grad.stride() != p.stride()],
                              "stride_warnings": [str(w.message)[:120] for w in caught
                                                  if "strides do not match" in str(w.message)]}
        finally:
            dist.destroy_process_group()
    ok = not (figures["horovod"]["grads_with_other_strides"] or figures["ddp"]["grads_with_other_strides"]
              or figures["ddp"]["stride_warnings"])
    return {"ok": ok, "figures": figures}


TWO_RANK_BOUND = 1e-2  # per-parameter relative error vs the local mean (fp16 rounding ~1e-3; a scramble ~1)


def two_ranks_worker(device: str, result: Path) -> int:
    """One of the two ranks of ``horovod_two_ranks_gloo`` (started by horovodrun); rank 0 writes ``result``."""
    from tsm_dist.config import EngineConfig
    from tsm_dist.distributed.engine import Engine

    s = Settings(device, result.parent)
    engine = Engine(EngineConfig(name="horovod", fp16_compression=True, allow_shared_gpu=True)).init()
    try:
        batches = [_micro_batches(s, seed=1 + rank) for rank in range(engine.size)]
        torch.manual_seed(0)
        reference = _model("tsm8f_r50", s).to(memory_format=torch.channels_last)
        for rank_batches in batches:  # the mean of every rank's local gradient, in fp32
            _accumulated_grads(reference, rank_batches, None, torch.amp.GradScaler(enabled=False))
        torch.manual_seed(0)
        model = _model("tsm8f_r50", s).to(memory_format=torch.channels_last)
        _, opt = engine.distribute(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), accumulate=2)
        _accumulated_grads(model, batches[engine.rank], None, torch.amp.GradScaler(enabled=False))
        launched = len(opt._handles)
        engine.synchronize(opt)
        want = dict(reference.named_parameters())
        mean = {n: p.grad / engine.size for n, p in want.items()}
        worst = max(float((p.grad - mean[n]).norm() / mean[n].norm().clamp_min(1e-12)) for n, p in model.named_parameters())
        flat = torch.cat([p.grad.detach().flatten().float().cpu() for p in model.parameters()])
        digests = engine.allgather_object(hashlib.sha256(flat.numpy().tobytes()).hexdigest())
        figures = {"ranks": engine.size, "device": str(engine.device),
                   "compression": "fp16", "accumulate": 2, "allreduces_launched_by_hooks": launched,
                   "parameters": len(want), "ranks_hold_equal_gradients": len(set(digests)) == 1,
                   "worst_grad_rel_err_vs_local_mean": worst, "bound": TWO_RANK_BOUND,
                   "grads_with_other_strides": [n for n, p in model.named_parameters()
                                                if p.grad.stride() != p.stride()]}
        if engine.rank == 0:
            result.write_text(json.dumps(figures))
    finally:
        engine.shutdown()
    return 0


def check_horovod_two_ranks_gloo(s: Settings) -> dict[str, Any]:
    _need_horovod()
    import horovod.torch as hvd

    if s.cuda and hvd.nccl_built():
        raise Skipped("Horovod built with NCCL: NCCL takes every CUDA tensor and refuses two ranks on one GPU "
                      "(Gloo stages CUDA tensors through the host only in a build without GPU allreduce)")
    result = s.out / "two_ranks.json"
    result.unlink(missing_ok=True)
    from tsm_dist.commands.processes import find_tool, run_session

    cmd = [find_tool("horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, str(Path(__file__).resolve()),
           "--device", "cuda" if s.cuda else "cpu", "--out", str(s.out), "--two-ranks-worker", str(result)]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    lines: list[str] = []  # a time-out or the check's alarm kills horovodrun's whole session, ranks included
    code = run_session(cmd, timeout=150, env=env, on_line=lines.append)
    if code != 0 or not result.exists():
        tail = [line.strip() for line in lines if line.strip()][-3:]
        return {"ok": False, "why": f"horovodrun exited {code}: " + " / ".join(tail), "figures": {}}
    figures = json.loads(result.read_text())
    ok = (figures["ranks_hold_equal_gradients"] and figures["worst_grad_rel_err_vs_local_mean"] < TWO_RANK_BOUND
          and figures["allreduces_launched_by_hooks"] == figures["parameters"]
          and not figures["grads_with_other_strides"])
    return {"ok": ok, "figures": figures}


CHECKS: list[tuple[str, Callable[[Settings], dict[str, Any]]]] = [
    ("stack", check_stack),
    ("dali_decode_vp9", check_dali_decode_vp9),
    ("dali_decode_h264", check_dali_decode_h264),
    ("shift_gradients_amp", check_shift_gradients_amp),
    ("shift_overhead", check_shift_overhead),
    ("table10_throughput", check_table10_throughput),
    ("amp_channels_last", check_amp_channels_last),
    ("train_synthetic_dali", check_train_synthetic_dali),
    ("engine_step_channels_last", check_engine_step_channels_last),
    ("horovod_allreduce_hooks", check_horovod_allreduce_hooks),
    ("optimizer_state_broadcast", check_optimizer_state_broadcast),
    ("horovod_two_ranks_gloo", check_horovod_two_ranks_gloo),
]


# -------------------------------------------------------------------------------------- reporting
class CheckTimeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise CheckTimeout("the check ran past --check-timeout (a hang in native code ends only when it returns)")


def run_check(name: str, fn: Callable[[Settings], dict[str, Any]], s: Settings, limit_s: int) -> dict[str, Any]:
    start = time.perf_counter()
    entry: dict[str, Any] = {"name": name, "ok": False, "skipped": None, "figures": {}, "error": None, "why": None}
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit_s)
    try:
        entry.update(fn(s))
    except Skipped as why:
        entry.update(ok=None, skipped=str(why))
    except Exception as err:  # a failed check is a result, the others still run
        entry["error"] = f"{type(err).__name__}: {err}\n" + "".join(traceback.format_exc(limit=-4))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    entry["seconds"] = round(time.perf_counter() - start, 2)
    return entry


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_short(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


def markdown(results: list[dict[str, Any]], header: dict[str, Any]) -> str:
    lines = [f"# GPU acceptance ({header['device']})", "",
             f"{header['when']}, host {header['host']}, load {header['load']}, {header['seconds']:.0f} s in all.", "",
             "| check | result | seconds | figures / error |", "| --- | --- | --- | --- |"]
    for r in results:
        status = "skipped" if r["skipped"] else ("ok" if r["ok"] else "FAILED")
        why = r.get("why") or (r["error"].splitlines()[0] if r["error"] else "")
        detail = r["skipped"] or (f"{why}; " if why else "") + _short(r["figures"])
        lines.append(f"| {r['name']} | {status} | {r['seconds']} | {detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--out", required=True, help="directory for acceptance.json / acceptance.md")
    parser.add_argument("--only", default="", help="comma-separated check names (default: all)")
    parser.add_argument("--check-timeout", type=int, default=180, help="seconds one check may take (default 180)")
    parser.add_argument("--two-ranks-worker", type=Path, help=argparse.SUPPRESS)  # a rank of horovod_two_ranks_gloo
    args = parser.parse_args(argv)
    if args.two_ranks_worker:
        return two_ranks_worker(args.device, args.two_ranks_worker)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_acceptance: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "disabled")
    settings = Settings(args.device, out)
    if settings.cuda:
        torch.cuda.set_device(settings.device)
    else:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    wanted = {n for n in args.only.split(",") if n}
    start = time.perf_counter()
    results = []
    for name, fn in CHECKS:
        if wanted and name not in wanted:
            continue
        result = run_check(name, fn, settings, args.check_timeout)
        status = "skipped" if result["skipped"] else ("ok" if result["ok"] else "FAILED")
        print(f"{name:<28} {status:<8} {result['seconds']:>7.1f} s", flush=True)
        results.append(result)
    for engine in _HOROVOD:
        engine.shutdown()
    header = {"device": args.device, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "host": os.uname().nodename,
              "load": os.getloadavg()[0], "seconds": time.perf_counter() - start}
    (out / "acceptance.json").write_text(json.dumps({**header, "checks": results}, indent=2, default=str))
    (out / "acceptance.md").write_text(markdown(results, header))
    failed = [r["name"] for r in results if r["ok"] is False]
    print(f"{len(results)} checks, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; "
          f"{out / 'acceptance.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())

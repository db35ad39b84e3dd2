"""``tsm-dist profile``: the paper's Tables 10 and 11 for our builds, plus measured throughput.

MACs are counted by ``torch.utils.flop_counter`` (FLOPs / 2) on the meta device, so full-size
models cost no memory and no compute; parameters are counted the same way. Compute/IO is MACs per
input value (T x 3 x H x W), the paper's measure of how much work a clip of loaded data buys.
Throughput is measured for real on the chosen device (inference, like the paper's Table 10).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from tsm_dist.commands.arguments import name_list
from tsm_dist.models.registry import build_model, describe_model, list_models, model_defaults

TABLE10_MODELS = ("i3d3x3x3_r50", "i3d3x1x1_r50", "tsm8f_r50")
# profiled by default: Table 10's models and the online/edge model of Section 4
DEFAULT_MODELS = (*TABLE10_MODELS, "tsm8f_mbv2")
# Section 4: "For ResNet-50, we only need 0.9MB memory cache" (our figure and why it differs: docs/models.md)
PAPER_CACHE_MB = {"tsm8f_r50": 0.9}

# What the paper states (Table 10 and Section 7 text; 224x224, 400 classes, P100, batch 16), printed
# beside our numbers for comparison. MACs/params it gives only for TSM8f and as ratios.
PAPER: dict[str, dict[str, float]] = {
    "tsm8f_r50": {"gmacs": 33.0, "mparams": 24.3, "compute_io_k": 27.4, "clips_per_s": 84.8},
    "i3d3x3x3_r50": {"compute_io_k": 16.6, "params_vs_tsm": 1.9, "clips_per_s": 63.1},
    "i3d3x1x1_r50": {"compute_io_k": 6.85, "clips_per_s": 41.9},
}


@dataclass
class ModelStats:
    name: str
    frames: int
    input_shape: tuple[int, int, int, int]  # (T, 3, H, W) per clip
    input_values: int
    macs: int  # multiply-accumulates per clip
    params: int
    compute_io: float  # MACs per input value
    temporal_resolution: list[tuple[str, int]]
    clips_per_s: float | None = None
    throughput_setup: dict[str, object] = field(default_factory=dict)
    # bytes an online (uni-directional) build keeps between frames, per stream, float32; None: cannot stream
    online_cache_bytes: int | None = None


def _build(name: str, num_classes: int, num_frames: int | None, depth: int | None,
           width: int | None, online: bool = False) -> torch.nn.Module:
    # --depth is a ResNet option: a model without depth (MobileNetV2) keeps its own
    depth = None if model_defaults(name)["depth"] is None else depth
    return build_model(name, num_classes=num_classes, num_frames=num_frames, depth=depth, width=width,
                       online=online)


def model_stats(name: str, *, num_classes: int = 400, size: int = 224, num_frames: int | None = None,
                depth: int | None = None, width: int | None = None) -> ModelStats:
    """Frames, MACs, parameters, compute/IO and Table 11's temporal resolution; no compute spent."""
    with torch.device("meta"):
        model = _build(name, num_classes, num_frames, depth, width).eval()
        clip = torch.empty(1, model.num_frames, 3, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(clip)
    macs = counter.get_total_flops() // 2
    values = clip[0].numel()
    return ModelStats(
        name=name, frames=model.num_frames, input_shape=tuple(clip.shape[1:]), input_values=values,
        macs=macs, params=sum(p.numel() for p in model.parameters()), compute_io=macs / values,
        temporal_resolution=model.temporal_resolution(clip),
        online_cache_bytes=online_cache_bytes(name, num_classes=num_classes, size=size, depth=depth, width=width))


def online_cache_bytes(name: str, *, num_classes: int = 400, size: int = 224, depth: int | None = None,
                       width: int | None = None) -> int | None:
    """Shift-cache bytes per stream of ``name`` built online (one frame streamed on the meta device);
    None for a model without a shift (nothing to cache) or a 3D model (cannot stream)."""
    from tsm_dist.streaming.online import OnlineTSM

    with torch.device("meta"):
        model = _build(name, num_classes, None, depth, width)
        if model.conv3d or not model.shift_modules():
            return None
        online = OnlineTSM(_build(name, num_classes, None, depth, width, online=True).eval())
        online(torch.empty(1, 3, size, size))
    return online.cache_nbytes()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(model: torch.nn.Module, *, batch: int, size: int, device: torch.device,
                       warmup: int, iters: int, train: bool = False, channels_last: bool = False) -> float:
    """Clips per second of inference (or of SGD training steps with ``train``) on random clips."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=model.memory_format)
    clips = torch.randn(batch, model.num_frames, 3, size, size, device=device)
    labels = torch.randint(0, model.num_classes, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) if train else None

    def step() -> None:
        if opt is None:
            with torch.inference_mode():
                model(clips)
            return
        loss = torch.nn.functional.cross_entropy(model(clips), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train(train)
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return batch * iters / (time.perf_counter() - start)


def _fmt_count(v: float, unit: str) -> str:
    return f"{v / 1e9:.2f} G" if unit == "G" else f"{v / 1e6:.2f} M"


def format_tables(stats: list[ModelStats]) -> str:
    tsm_params = next((s.params for s in stats if s.name == "tsm8f_r50"), None)
    head = (f"{'model':<14} {'frames':>6} {'input':>14} {'MACs/clip':>10} {'params':>20} "
            f"{'compute/IO':>10} {'clips/s':>8}   paper (P100): MACs, params, compute/IO, clips/s")
    lines = ["Table 10: efficiency statistics (MACs = multiply-accumulates, the paper's 'FLOPs')", head]
    for s in stats:
        paper = PAPER.get(s.name, {})
        ref = [f"{paper['gmacs']:.0f} G" if "gmacs" in paper else "-",
               f"{paper['mparams']:.1f} M" if "mparams" in paper else
               (f"{paper['params_vs_tsm']:.1f}x TSM" if "params_vs_tsm" in paper else "-"),
               f"{paper['compute_io_k']:.2f}k" if "compute_io_k" in paper else "-",
               f"{paper['clips_per_s']:.1f}" if "clips_per_s" in paper else "-"]
        params = _fmt_count(s.params, "M")
        if tsm_params and s.name not in ("tsm8f_r50", "tsn8f_r50"):
            params += f" ({s.params / tsm_params:.2f}x TSM)"
        rate = "-" if s.clips_per_s is None else f"{s.clips_per_s:.2f}"
        shape = "x".join(str(d) for d in s.input_shape)
        lines.append(f"{s.name:<14} {s.frames:>6} {shape:>14} {_fmt_count(s.macs, 'G'):>10} {params:>20} "
                     f"{s.compute_io / 1e3:>9.2f}k {rate:>8}   {', '.join(ref)}")
    setups = {json.dumps(s.throughput_setup, sort_keys=True) for s in stats if s.throughput_setup}
    for setup in sorted(setups):
        lines.append(f"throughput measured with {setup}")

    stages: list[str] = []  # union of every model's stages, each kept after its predecessor
    for s in stats:
        at = 0
        for stage, _ in s.temporal_resolution:
            if stage not in stages:
                stages.insert(at, stage)
            at = stages.index(stage) + 1
    lines += _online_table(stats)
    lines += ["", "Table 11: temporal resolution of the output of each stage",
              f"{'stage':<12}" + "".join(f"{s.name:>15}" for s in stats)]
    for stage in stages:
        row = [dict(s.temporal_resolution).get(stage) for s in stats]
        lines.append(f"{stage:<12}" + "".join(f"{'-' if v is None else v:>15}" for v in row))
    return "\n".join(lines)


def _online_table(stats: list[ModelStats]) -> list[str]:
    """Section 4: what an online (uni-directional) model costs per frame, and the cache it keeps."""
    rows = [s for s in stats if s.online_cache_bytes is not None]
    if not rows:
        return []
    lines = ["", "Online models (Section 4): per frame, batch 1, float32 shift cache per stream",
             f"{'model':<14} {'MACs/frame':>10} {'params':>10} {'cache':>10}   paper"]
    for s in rows:
        paper = PAPER_CACHE_MB.get(s.name)
        lines.append(f"{s.name:<14} {_fmt_count(s.macs / s.frames, 'G'):>10} {_fmt_count(s.params, 'M'):>10} "
                     f"{s.online_cache_bytes / 1e6:>7.3f} MB   {f'{paper} MB cache' if paper else '-'}")
    return lines


def _parser() -> argparse.ArgumentParser:
    known = "; ".join(f"{n}: {describe_model(n)}" for n in list_models())
    p = argparse.ArgumentParser(prog="tsm-dist profile", description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated. {known}")
    p.add_argument("--size", type=int, default=224, help="input height = width")
    p.add_argument("--num-classes", type=int, default=400)
    p.add_argument("--num-frames", type=int, default=None, help="override every model's clip length")
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--batch", type=int, default=None, help="clips per batch (default 16 on GPU, 1 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 5 GPU, 1 CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 GPU, 2 CPU)")
    p.add_argument("--train", action="store_true", help="time SGD training steps instead of inference")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--no-throughput", action="store_true", help="only count MACs/params (instant)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = name_list(args.models)
    unknown = [n for n in names if n not in list_models()]
    if unknown:
        print(f"tsm-dist profile: unknown model(s) {unknown}; known: {', '.join(list_models())}",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    gpu = device.type == "cuda"
    batch = args.batch or (16 if gpu else 1)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    iters = args.iters if args.iters is not None else (20 if gpu else 2)
    stats = []
    for name in names:
        s = model_stats(name, num_classes=args.num_classes, size=args.size, num_frames=args.num_frames,
                        depth=args.depth, width=args.width)
        if not args.no_throughput:
            torch.manual_seed(0)
            model = _build(name, args.num_classes, args.num_frames, args.depth, args.width)
            s.clips_per_s = measure_throughput(model, batch=batch, size=args.size, device=device,
                                               warmup=warmup, iters=iters, train=args.train,
                                               channels_last=args.channels_last)
            s.throughput_setup = {"device": str(device), "batch": batch, "iters": iters,
                                  "mode": "train" if args.train else "inference",
                                  "channels_last": args.channels_last, "threads": torch.get_num_threads()}
            del model
        stats.append(s)
    if args.json:
        print(json.dumps([asdict(s) for s in stats], indent=2))
    else:
        print(format_tables(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

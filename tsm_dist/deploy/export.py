"""``tsm-dist export``: a checkpoint -> an ONNX or TorchScript model and a sidecar JSON.

Online (``--mode online``): the graph of :class:`tsm_dist.streaming.step.ExplicitCacheTSM`, inputs
``frame`` ``(N, 3, H, W)`` and ``cache_00 ... cache_{K-1}``, outputs ``logits`` ``(N, classes)`` and
``new_cache_00 ...`` (same shapes): feed each frame with the previous call's new caches (zeros to
start a stream). Offline (``--mode offline``): the clip model ``clips`` ``(N, T, 3, H, W)`` -> ``logits``.
The batch dim is dynamic in ONNX and every other size is fixed, inputs and outputs alike (H and W at
export; the caches' sizes and the fold follow from them as constants of the graph). The sidecar
(``FILE.json``) records what a runtime needs: model, classes, frames, preprocessing (resize method,
crop, normalisation), frame spacing, what each output is, and every cache's input/output pair and shape.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tsm_dist.commands.arguments import positive_int
from tsm_dist.commands.exit_codes import UsageError
from tsm_dist.config import Config, ConfigError, config_from_dict, load_config
from tsm_dist.streaming.step import GRAPH_FORMS, auto_form, split_applies

SIDECAR_VERSION = 2  # 2: outputs, preprocess, frame_spacing


def sidecar_path(model_path: str | Path) -> Path:
    return Path(str(model_path) + ".json")


def read_sidecar(model_path: str | Path) -> dict[str, Any]:
    path = sidecar_path(model_path)
    if not Path(model_path).exists():
        raise UsageError(f"model {model_path} does not exist")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} not found: the sidecar `tsm-dist export` writes beside {model_path}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not JSON ({exc})") from None


def trained_model(checkpoint: str, config: str | None, overrides: list[str]) -> tuple[nn.Module, Config]:
    """The checkpoint's model in eval mode, built from ``config`` (checked against the checkpoint) or
    from the config recorded in the checkpoint."""
    from tsm_dist.state import checkpoint as ckpt
    from tsm_dist.training.build import build_model_from_config

    state = ckpt.load_checkpoint(checkpoint)
    if config is not None:
        cfg = load_config(config, overrides)
        ckpt.check_model(state, cfg.to_dict()["model"], checkpoint)
    else:
        saved = state.get("config")
        if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
            raise UsageError(f"checkpoint {checkpoint} records no config: pass --config")
        cfg = config_from_dict(saved, f"checkpoint {checkpoint}", overrides)
    model = build_model_from_config(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None)))
    ckpt.load_model_state(model, state, checkpoint)
    return model.eval(), cfg


def check_exportable(model: nn.Module, mode: str) -> None:
    """One line (exit 2) for a model that cannot be exported in ``mode``."""
    if mode != "online":
        return
    if model.conv3d:
        raise UsageError(f"{model.name} is a 3D model: it pools time inside the network and cannot be "
                         "exported online (use --mode offline)")
    if any(s.direction != "uni" for s in model.shift_modules()):
        raise UsageError(f"{model.name} shifts bi-directionally (trained with model.online=false): its frames "
                         "read the next frame, so it cannot stream; train with model.online=true, or --mode offline")


def graph_module(model: nn.Module, mode: str, size: int, batch: int = 1, with_shift: bool = True,
                 form: str = "concat") -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str], list[str]]:
    """(module to trace, example inputs, input names, output names) for ``mode``."""
    from tsm_dist.deploy.clip_graph import CatShiftClipModel
    from tsm_dist.streaming.step import ExplicitCacheTSM

    if mode == "offline":
        clips = torch.zeros(batch, model.num_frames, 3, size, size)
        return CatShiftClipModel(model), (clips,), ["clips"], ["logits"]
    module = ExplicitCacheTSM(model, with_shift=with_shift, form=form)
    frame = torch.zeros(batch, 3, size, size)
    caches = tuple(torch.zeros(s) for s in module.cache_shapes(tuple(frame.shape)))
    return module, (frame, *caches), ["frame", *module.cache_names()], ["logits", *module.new_cache_names()]


def export_graph(model: nn.Module, mode: str, fmt: str, out: str | Path, size: int,
                 with_shift: bool = True, form: str = "concat") -> dict[str, Any]:
    """Write ``model`` as ``fmt`` ("onnx" | "torchscript") to ``out``; returns the graph's interface."""
    if with_shift:
        check_exportable(model, mode)
    module, inputs, in_names, out_names = graph_module(model, mode, size, with_shift=with_shift, form=form)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    # The tracer warns at every Python-level shape check of the models; the shapes are fixed by design.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        results = module(*inputs)
        results = results if isinstance(results, tuple) else (results,)
        if fmt == "onnx":
            torch.onnx.export(module, inputs, str(out), input_names=in_names, output_names=out_names,
                              dynamic_axes={n: {0: "batch"} for n in (*in_names, *out_names)},
                              opset_version=17, dynamo=False)
            _fixed_output_sizes(out, {n: t.shape[1:] for n, t in zip(out_names, results)})
        else:
            traced = torch.jit.trace(module, inputs, check_trace=False)
            with open(out, "wb") as file:  # an unwritable place is an OSError naming it (exit 6), as for ONNX
                torch.jit.save(traced, file)
    shapes = {n: ["batch", *t.shape[1:]] for n, t in zip((*in_names, *out_names), (*inputs, *results))}
    return {"inputs": in_names, "outputs": out_names, "shapes": shapes,
            "caches": [{"input": i, "output": o, "shape": shapes[i]} for i, o in zip(in_names[1:], out_names[1:])]}


def _fixed_output_sizes(path: str | Path, sizes: dict[str, torch.Size]) -> None:
    """Write every output's sizes but the batch into the graph: the exporter leaves a size it cannot
    follow through a reshape as an invented name (``ReduceMeanlogits_dim_1``), which converters and
    runtimes then treat as dynamic."""
    import onnx

    model = onnx.load(str(path))
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        for dim, size in zip(list(dims)[1:], sizes[output.name]):
            dim.Clear()
            dim.dim_value = int(size)
    onnx.save(model, str(path))


def sidecar(model: nn.Module, cfg: Config, mode: str, fmt: str, size: int, interface: dict[str, Any],
            classes: list[str]) -> dict[str, Any]:
    from tsm_dist.data.augment import MEAN, STD, default_scale_size

    cache_bytes = sum(4 * _prod(c["shape"][1:]) for c in interface["caches"])
    scale_size = cfg.data.scale_size or default_scale_size(size)
    return {
        "version": SIDECAR_VERSION, "format": fmt, "mode": mode, "model": cfg.model.name,
        "model_options": dataclasses.asdict(cfg.model), "num_classes": model.num_classes, "classes": classes,
        "num_frames": model.num_frames, "input_size": [size, size], "scale_size": scale_size,
        "normalization": {"mean": list(MEAN), "std": list(STD), "input_range": "[0, 1] RGB, then (x - mean) / std"},
        "preprocess": {
            "crop": f"center square of side min(H, W) * {size} / {scale_size} (= shorter side resized to "
                    f"{scale_size}, center {size} crop)",
            "resize": {"to": [size, size], "method": "bilinear", "antialias": True, "align_corners": False},
            "layout": "NCHW float32, RGB"},
        "frame_spacing": frame_spacing(cfg),
        **interface, "output_meaning": output_meaning(mode, interface), "cache_bytes_per_stream": cache_bytes,
    }


def frame_spacing(cfg: Config) -> dict[str, Any]:
    """Which decoded frames a stream feeds: dense training saw every ``stride``-th frame; segment
    training saw one frame per 1/T of each video, no fixed spacing, so a stream feeds every frame."""
    dense = cfg.data.sampling == "dense"
    return {"every": cfg.data.stride if dense else 1, "sampling": cfg.data.sampling, "stride": cfg.data.stride,
            "why": "the training stride (dense sampling)" if dense else
                   "segment sampling has no fixed spacing; pass tsm-dist stream --every K to choose one"}


def output_meaning(mode: str, interface: dict[str, Any]) -> dict[str, str]:
    if mode == "offline":
        return {"logits": "clip logits before softmax: the mean of the clip's per-frame logits (TSN consensus)"}
    meaning = {"logits": "this frame's logits before softmax; a clip's prediction is the mean of its frames' "
                         "logits (TSN consensus, = the offline model at the clip's last frame), softmax after"}
    for cache in interface["caches"]:
        meaning[cache["output"]] = (f"feed as {cache['input']} with the same stream's next frame "
                                    "(zeros start a stream)")
    return meaning


def _prod(values: list[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


def _class_names(path: str | None, cfg: Config, num_classes: int) -> list[str]:
    from tsm_dist.data.filelist import read_class_names

    candidates = [path] if path else [str(Path(cfg.data.root) / "classes.txt")] if cfg.data.root else []
    for candidate in candidates:
        if Path(candidate).is_file():
            names = read_class_names(candidate)
            if len(names) != num_classes:
                raise UsageError(f"{candidate} names {len(names)} classes, the model has {num_classes}")
            return names
        if path:
            raise UsageError(f"--classes {path} does not exist")
    return [str(i) for i in range(num_classes)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tsm-dist export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint of `tsm-dist train`")
    p.add_argument("--config", help="the config it was trained with (default: the one recorded in the checkpoint)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--mode", choices=("online", "offline"), default="online")
    p.add_argument("--graph-form", choices=("auto", *GRAPH_FORMS), default="auto",
                   help="online shift points as slices + a concatenation (the official demo's graph), in convs "
                        "only: mask (any model) or split (ResNet, MobileNetV2), or sub (any model: convs and a Sub on "
                        "the caches); auto: the one measured cheapest per frame in onnxruntime for the architecture "
                        "(split for ResNet, else concat; docs/deploy.md)")
    p.add_argument("--size", type=positive_int, help="input height = width (default: the config's data.crop_size)")
    p.add_argument("--classes", help="class names, one per line (default: <data.root>/classes.txt if present)")
    p.add_argument("--out", required=True, help="the model file; the sidecar is FILE.json")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks of errors (or TSM_DIST_DEBUG=1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a directory: give the model file's path "
                         f"(e.g. {Path(args.out) / 'model.onnx'})")
    model, cfg = trained_model(args.checkpoint, args.config, args.overrides)
    size = args.size or cfg.data.crop_size
    if size < 32:
        raise ConfigError(f"--size {size} is below 32, the network's total stride")
    check_exportable(model, args.mode)
    start = time.perf_counter()
    form = args.graph_form if args.graph_form != "auto" else auto_form(model)
    if args.mode == "online" and form == "split" and not split_applies(model):
        raise UsageError(f"--graph-form split needs a ResNet or MobileNetV2 shifted at the residual branch, "
                         f"not {cfg.model.name} as configured; "
                         "use sub, mask or concat")
    interface = export_graph(model, args.mode, args.format, args.out, size, form=form)
    seconds = time.perf_counter() - start
    meta = sidecar(model, cfg, args.mode, args.format, size, interface,
                   _class_names(args.classes, cfg, model.num_classes))
    meta["export_seconds"] = round(seconds, 3)
    meta["graph_form"] = form if args.mode == "online" else None
    sidecar_path(args.out).write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {args.out} ({args.format}, {args.mode}, {len(interface['caches'])} caches, "
          f"{meta['cache_bytes_per_stream'] / 1e6:.3f} MB of cache per stream) and {sidecar_path(args.out)} "
          f"in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    from tsm_dist.commands.exit_codes import run_main

    raise SystemExit(run_main("tsm-dist export", main))

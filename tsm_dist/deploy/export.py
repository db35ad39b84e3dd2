"""``tsm-dist export``: a checkpoint -> an ONNX or TorchScript model and a sidecar JSON.

Online (``--mode online``): the graph of :class:`tsm_dist.models.online.ExplicitCacheTSM`, inputs
``frame`` ``(N, 3, H, W)`` and ``cache_00 ... cache_{K-1}``, outputs ``logits`` ``(N, classes)`` and
``new_cache_00 ...`` (same shapes): feed each frame with the previous call's new caches (zeros to
start a stream). Offline (``--mode offline``): the clip model ``clips`` ``(N, T, 3, H, W)`` -> ``logits``.
The batch dim is dynamic in ONNX; H and W are fixed (the caches' sizes follow from them). The sidecar
(``FILE.json``) records what a runtime needs: model, classes, frames, input size, normalisation and
every cache's name and shape.
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

from tsm_dist.config import Config, ConfigError, config_from_dict, load_config
from tsm_dist.commands.exit_codes import UsageError

SIDECAR_VERSION = 1


def sidecar_path(model_path: str | Path) -> Path:
    return Path(str(model_path) + ".json")


def read_sidecar(model_path: str | Path) -> dict[str, Any]:
    path = sidecar_path(model_path)
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


def graph_module(model: nn.Module, mode: str, size: int, batch: int = 1,
                 with_shift: bool = True) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[str], list[str]]:
    """(module to trace, example inputs, input names, output names) for ``mode``."""
    from tsm_dist.models.online import CatShiftClipModel, ExplicitCacheTSM

    if mode == "offline":
        clips = torch.zeros(batch, model.num_frames, 3, size, size)
        return CatShiftClipModel(model), (clips,), ["clips"], ["logits"]
    module = ExplicitCacheTSM(model, with_shift=with_shift)
    frame = torch.zeros(batch, 3, size, size)
    caches = tuple(torch.zeros(s) for s in module.cache_shapes(tuple(frame.shape)))
    names = module.cache_names()
    return module, (frame, *caches), ["frame", *names], ["logits", *[f"new_{n}" for n in names]]


def export_graph(model: nn.Module, mode: str, fmt: str, out: str | Path, size: int,
                 with_shift: bool = True) -> dict[str, Any]:
    """Write ``model`` as ``fmt`` ("onnx" | "torchscript") to ``out``; returns the graph's interface."""
    if with_shift:
        check_exportable(model, mode)
    module, inputs, in_names, out_names = graph_module(model, mode, size, with_shift=with_shift)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    # The tracer warns at every Python-level shape check of the models; the shapes are fixed by design.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        if fmt == "onnx":
            torch.onnx.export(module, inputs, str(out), input_names=in_names, output_names=out_names,
                              dynamic_axes={n: {0: "batch"} for n in (*in_names, *out_names)},
                              opset_version=17, dynamo=False)
        else:
            torch.jit.save(torch.jit.trace(module, inputs, check_trace=False), str(out))
    shapes = {n: ["batch", *t.shape[1:]] for n, t in zip(in_names, inputs)}
    return {"inputs": in_names, "outputs": out_names, "shapes": shapes,
            "caches": [{"input": n, "output": f"new_{n}", "shape": shapes[n]} for n in in_names[1:]]}


def sidecar(model: nn.Module, cfg: Config, mode: str, fmt: str, size: int, interface: dict[str, Any],
            classes: list[str]) -> dict[str, Any]:
    from tsm_dist.data.augment import MEAN, STD, default_scale_size

    cache_bytes = sum(4 * _prod(c["shape"][1:]) for c in interface["caches"])
    return {
        "version": SIDECAR_VERSION, "format": fmt, "mode": mode, "model": cfg.model.name,
        "model_options": dataclasses.asdict(cfg.model), "num_classes": model.num_classes, "classes": classes,
        "num_frames": model.num_frames, "input_size": [size, size],
        "scale_size": cfg.data.scale_size or default_scale_size(size),
        "normalization": {"mean": list(MEAN), "std": list(STD), "input_range": "[0, 1] RGB, then (x - mean) / std"},
        **interface, "cache_bytes_per_stream": cache_bytes,
    }


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
    p.add_argument("--size", type=int, help="input height = width (default: the config's data.crop_size)")
    p.add_argument("--classes", help="class names, one per line (default: <data.root>/classes.txt if present)")
    p.add_argument("--out", required=True, help="the model file; the sidecar is FILE.json")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks of errors (or TSM_DIST_DEBUG=1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model, cfg = trained_model(args.checkpoint, args.config, args.overrides)
    size = args.size or cfg.data.crop_size
    if size < 32:
        raise ConfigError(f"--size {size} is below 32, the network's total stride")
    check_exportable(model, args.mode)
    start = time.perf_counter()
    interface = export_graph(model, args.mode, args.format, args.out, size)
    seconds = time.perf_counter() - start
    meta = sidecar(model, cfg, args.mode, args.format, size, interface,
                   _class_names(args.classes, cfg, model.num_classes))
    meta["export_seconds"] = round(seconds, 3)
    sidecar_path(args.out).write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {args.out} ({args.format}, {args.mode}, {len(interface['caches'])} caches, "
          f"{meta['cache_bytes_per_stream'] / 1e6:.3f} MB of cache per stream) and {sidecar_path(args.out)} "
          f"in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    from tsm_dist.commands.exit_codes import run_main

    raise SystemExit(run_main("tsm-dist export", main))

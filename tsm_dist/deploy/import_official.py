"""``tsm-dist import-official CKPT --out our.pt``: a checkpoint of the official TSM code as a tsm_dist checkpoint.

Both official layouts (tsm_dist/models/official.py): the model zoo's ``main.py`` checkpoints (ResNet TSM/TSN,
MobileNetV2 TSM; ``module.base_model...``, shifts wrapped as ``.net``, ``new_fc``) and the online demo's
flat MobileNetV2. The result is what ``tsm-dist train`` writes, model state and config, so ``eval``,
``export``, ``stream`` and fine-tuning (``model.pretrained: our.pt``) take it as it is. Every tensor is
loaded strictly; anything else is refused in one line naming the key: another architecture (exit 5), a
fold or segment count that contradicts the file (exit 5), a bad option value (exit 2).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from tsm_dist.commands.exit_codes import CheckpointError, UsageError
from tsm_dist.models.pretrained import load_tensor_file

_NAME_FOLD = re.compile(r"_shift(\d+)_")
_NAME_SEGMENTS = re.compile(r"_segment(\d+)")
# what the online demo's code fixes: x[:, :c // 8] (online_demo/mobilenet_v2_tsm.py)
_DEMO_FOLD = 8


def read_official(path: str | Path) -> tuple[dict[str, Tensor], str | None]:
    """The file's tensors (``module.`` stripped) and the ``arch`` main.py recorded, if any."""
    path = Path(path)
    obj = load_tensor_file(path, CheckpointError)
    arch = obj.get("arch") if isinstance(obj, dict) and isinstance(obj.get("arch"), str) else None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state_dict (a mapping of names to tensors, or one under 'state_dict')")
    return {k.removeprefix("module."): v for k, v in obj.items()}, arch


def name_hints(path: str | Path) -> dict[str, int]:
    """Fold and segments as the model zoo's file names state them (``..._shift8_blockres_avg_segment8_...``)."""
    hints = {}
    for key, pattern in (("fold_div", _NAME_FOLD), ("num_frames", _NAME_SEGMENTS)):
        m = pattern.search(Path(path).name)
        if m:
            hints[key] = int(m.group(1))
    return hints


def _choose(path: Path, option: str, given: int | None, stated: int | None, source: str) -> int:
    if given is not None and stated is not None and given != stated:
        raise CheckpointError(f"{path.name}: {source} says {option}={stated}, --{option.replace('_', '-')} "
                              f"{given} asks for another; the weights were trained with {stated}")
    return given if given is not None else stated if stated is not None else 8


def plan(path: Path, state: dict[str, Tensor], arch: str | None, num_frames: int | None,
         fold_div: int | None) -> tuple[dict[str, Tensor], dict[str, Any], Any]:
    """(our state, model options, layout) of an official file; CheckpointError for what ours cannot hold."""
    from tsm_dist.models.official import OfficialLayoutError, is_official, model_options, to_ours

    if not is_official(state):
        raise CheckpointError(f"{path}: not in an official TSM layout (no base_model./new_fc. names, no flat "
                              "MobileNetV2); a torchvision or tsm_dist state_dict loads as model.pretrained")
    try:
        ours, layout = to_ours(state)
        options = model_options(ours, layout)
    except OfficialLayoutError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    expected_arch = "mobilenetv2" if layout.family == "mobilenet_v2" else f"resnet{options.get('depth')}"
    if arch is not None and arch != expected_arch:
        raise CheckpointError(f"{path}: arch {arch!r} recorded, the tensors are a {expected_arch}: another architecture")
    hints = name_hints(path)
    if layout.source == "online_demo":
        hints["fold_div"] = _DEMO_FOLD
    source = "the online demo's code" if layout.source == "online_demo" else "the file name"
    options["fold_div"] = _choose(path, "fold_div", fold_div, hints.get("fold_div"), source)
    options["num_frames"] = _choose(path, "num_frames", num_frames, hints.get("num_frames"), "the file name")
    return ours, options, layout


def build_and_load(path: Path, ours: dict[str, Tensor], options: dict[str, Any], layout: Any) -> nn.Module:
    """The registry model with ``options``, every tensor of ``ours`` loaded strictly."""
    from tsm_dist.models.official import OfficialLayoutError, check_shifted
    from tsm_dist.models.registry import ModelOptionError, build_model

    opts = dict(options)
    name, classes = opts.pop("name"), opts.pop("num_classes")
    try:
        model = build_model(name, classes, **opts)
    except ModelOptionError as exc:
        raise UsageError(f"{path}: {exc}") from None
    try:
        check_shifted(layout, [n for n, m in model.named_modules() if getattr(m, "shift", None) is not None])
    except OfficialLayoutError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    target = model.state_dict()
    for key, want in target.items():
        if key not in ours and key.endswith("num_batches_tracked"):
            ours[key] = want  # files older than the counter; it only matters to momentum=None BN
        elif key not in ours:
            raise CheckpointError(f"{path}: {key} missing for {name} (another architecture)")
        elif ours[key].shape != want.shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(ours[key].shape)}, {name} needs "
                                  f"{tuple(want.shape)} (another width or architecture)")
    extra = [k for k in ours if k not in target]
    if extra:
        raise CheckpointError(f"{path}: {extra[0]} has no place in {name} ({len(extra)} such tensors: another architecture)")
    model.load_state_dict(ours, strict=True)
    return model.eval()


def import_official(path: str | Path, num_frames: int | None = None,
                    fold_div: int | None = None) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(model with the official weights, its model options, what was mapped) for an official file."""
    path = Path(path)
    state, arch = read_official(path)
    ours, options, layout = plan(path, state, arch, num_frames, fold_div)
    model = build_and_load(path, ours, options, layout)
    report = {"path": str(path), "family": layout.family, "source": layout.source, "tensors": len(state),
              "renames": layout.renames, "shifted_blocks": len(layout.shifted) or None,
              "shift_place": layout.shift_place, "arch": arch}
    return model, options, report


def imported_checkpoint(model: nn.Module, options: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """What ``tsm-dist train`` writes (model state, the resolved config), plus where it came from."""
    from tsm_dist.config import load_config

    # No data set comes with the weights: the random loader keeps the config valid, and the official
    # test-time view (shorter side 256, center 224) is what export's sidecar then describes.
    sets = [f"model.{k}={json.dumps(v)}" for k, v in options.items()]
    cfg = load_config(None, [*sets, "data.backend=random", "data.num_samples=1", "data.crop_size=224", "data.scale_size=256"])
    return {"model": model.state_dict(), "config": cfg.to_dict(), "imported_from": report}


def describe(options: dict[str, Any], report: dict[str, Any]) -> str:
    what = {"online_demo": "the online demo's flat MobileNetV2", "main.py": f"a main.py {report['family']} checkpoint"}
    opts = ", ".join(f"{k}={v}" for k, v in options.items() if k != "name")
    renames = "; ".join(f"{rule}: {n}" for rule, n in report["renames"].items()) or "none"
    return (f"{report['path']}: {what[report['source']]}, {report['tensors']} tensors -> {options['name']} ({opts})\n"
            f"  renamed: {renames}\n  loaded strictly, every tensor of the model from the file")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tsm-dist import-official", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="an official TSM checkpoint (main.py's .pth(.tar), or the online demo's)")
    p.add_argument("--out", required=True, help="the tsm_dist checkpoint to write")
    p.add_argument("--num-frames", type=int, help="segments (default: the file name's segmentN, else 8)")
    p.add_argument("--fold-div", type=int, help="1/fold_div of the channels shifted (default: shiftN of the name, else 8)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks of errors (or TSM_DIST_DEBUG=1)")
    return p


def main(argv: list[str] | None = None) -> int:
    from tsm_dist.state.checkpoint import atomic_save

    args = build_parser().parse_args(argv)
    model, options, report = import_official(args.checkpoint, args.num_frames, args.fold_div)
    atomic_save(imported_checkpoint(model, options, report), args.out)
    print(describe(options, report))
    print(f"wrote {args.out}: tsm-dist eval / export --checkpoint {args.out}; fine-tune with model.pretrained: {args.out}")
    return 0

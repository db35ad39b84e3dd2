"""Model names -> (VideoSpec, one-line description); ``build_model`` and ``list_models``.

The four models of the paper's Tables 10/11 differ only in these few lines of data; everything else
is the shared builder in resnet.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tsm_dist.models.mobilenet import STEM, VideoMobileNetV2
from tsm_dist.models.pretrained import load_pretrained
from tsm_dist.models.resnet import DEPTHS, VideoResNet
from tsm_dist.models.video_spec import VideoSpec


@dataclass(frozen=True)
class ModelEntry:
    spec: VideoSpec
    description: str
    # "resnet" (the shared ResNet builder) or "mobilenet_v2" (mobilenet.py: no depth, width = stem channels)
    backbone: str = "resnet"


_MODELS: dict[str, ModelEntry] = {
    "tsn8f_r50": ModelEntry(
        VideoSpec(num_frames=8),
        "TSN: 2D ResNet on 8 frames, per-frame logits averaged, no temporal modelling"),
    "tsm8f_r50": ModelEntry(
        VideoSpec(num_frames=8, shift=True),
        "TSM: the same 2D ResNet with a temporal shift in every residual block, no temporal pooling"),
    # Carreira & Zisserman's inflation on ResNet-50: every 3x3 conv -> 3x3x3 and a 7x7x7 stem; time
    # is halved by pool1 and by the first block of res3, res4 and res5 (16 -> 8 -> 4 -> 2 -> 1).
    "i3d3x3x3_r50": ModelEntry(
        VideoSpec(num_frames=16, conv3d=True, stem_kt=7, pool1_t_stride=2, stage_t_strides=(1, 2, 2, 2),
                  inflate="3x3"),
        "I3D3x3x3: 16 frames, every 3x3 conv inflated to 3x3x3, temporal resolution pooled four times"),
    # Wang et al.'s I3D baseline (non-local paper, without non-local blocks), the layout of their
    # code: 5x7x7 stem with temporal stride 2, 3x3x3 pool1 and 3x1x1 pool2 with stride 2
    # (32 -> 16 -> 8 -> 4), and the first 1x1 conv of every other block (all of res2) -> 3x1x1.
    "i3d3x1x1_r50": ModelEntry(
        VideoSpec(num_frames=32, conv3d=True, stem_kt=5, stem_t_stride=2, pool1_t_stride=2,
                  pool2_t_stride=2, inflate="first", inflate_blocks=((1,), (1, 0), (1, 0), (0, 1))),
        "I3D3x1x1: 32 frames, first 1x1 conv of every other block inflated to 3x1x1, pooled three times"),
    # The paper's edge model (Section 4, Table 8): shift in the inverted-residual blocks, as the official code.
    "tsm8f_mbv2": ModelEntry(
        VideoSpec(num_frames=8, shift=True),
        "TSM on MobileNetV2: shift in the 10 residual inverted-residual blocks; the online/edge model",
        backbone="mobilenet_v2"),
}
# what a backbone builds with where it differs from _DEFAULTS (MobileNetV2 has no depth)
_BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {"mobilenet_v2": {"depth": None, "width": STEM}}

_DEFAULTS: dict[str, Any] = {
    "dropout": 0.5, "fold_div": 8, "shift_place": "residual", "online": False,
    "depth": 50, "width": 64, "pretrained": None, "classifier_init": "reference",
}
CLASSIFIER_INITS = ("reference", "linear")


def model_defaults(name: str) -> dict[str, Any]:
    """The options ``name`` is built with when they are not given (None): the one source of model defaults."""
    entry = _entry(name)
    return {"num_frames": entry.spec.num_frames, **_DEFAULTS, **_BACKBONE_DEFAULTS.get(entry.backbone, {})}


def model_spec(name: str) -> VideoSpec:
    """How ``name`` handles time (3D or shift, inflation, temporal pooling), without building it."""
    return _entry(name).spec


def list_models() -> list[str]:
    return list(_MODELS)


def describe_model(name: str) -> str:
    return _entry(name).description


def _entry(name: str) -> ModelEntry:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_MODELS)}") from None


class ModelOptionError(ValueError):
    """A model option with a value the model cannot be built with; ``option`` names it."""

    def __init__(self, name: str, option: str, value: Any, why: str) -> None:
        super().__init__(f"build_model({name!r}): {option}={value!r} {why}")
        self.option, self.value, self.why = option, value, why


def resolve_options(name: str, num_classes: int, **options: Any) -> dict[str, Any]:
    """Every option of ``name`` (those given as None or left out take the model's default), validated:
    the one place that fills in and checks model options (configs, the trainer and eval call it)."""
    spec = _entry(name).spec
    unknown = sorted(set(options) - set(_DEFAULTS) - {"num_frames"})
    if unknown:
        raise TypeError(f"build_model({name!r}): unknown option(s) {unknown}; "
                        f"known: {sorted([*_DEFAULTS, 'num_frames'])}")
    opts = {k: (default if options.get(k) is None else options[k]) for k, default in model_defaults(name).items()}
    _validate(name, spec, num_classes, opts)
    return opts


def build_model(name: str, num_classes: int, **options: Any) -> VideoResNet | VideoMobileNetV2:
    """Build a registered model. Options (None means the model's default):

    num_frames (clip length T), dropout (0.5, before the classifier), fold_div (8: 1/8 of the
    channels shifted each way), shift_place ("residual" | "inplace"), online (uni-directional shift
    for streaming), depth (18, 26, 34, 50, 101), width (base channels, 64), pretrained (path to a 2D
    ImageNet-style state_dict; inflated for 3D models), classifier_init ("reference": N(0, 0.001) as the
    TSM code, made for fine-tuning; "linear": nn.Linear's default scale). Shift options only act on shift models.
    MobileNetV2 models have no depth and take width as the stem's channels (32); their shift is always
    at the residual branch's input (shift_place "residual").
    """
    entry = _entry(name)
    spec = entry.spec
    opts = resolve_options(name, num_classes, **options)
    model: VideoResNet | VideoMobileNetV2
    if entry.backbone == "mobilenet_v2":
        model = VideoMobileNetV2(
            spec, num_classes=num_classes, num_frames=int(opts["num_frames"]), width=opts["width"],
            dropout=float(opts["dropout"]), fold_div=opts["fold_div"],
            direction="uni" if opts["online"] else "bi")
    else:
        model = VideoResNet(
            spec, num_classes=num_classes, num_frames=int(opts["num_frames"]), depth=opts["depth"],
            width=opts["width"], dropout=float(opts["dropout"]), fold_div=opts["fold_div"],
            shift_place=opts["shift_place"], direction="uni" if opts["online"] else "bi")
    model.name = name
    if opts["classifier_init"] == "linear":  # nn.Linear's own scale: training from scratch (LARS/LAMB studies)
        model.fc.reset_parameters()
    if opts["pretrained"] is not None:
        load_pretrained(model, opts["pretrained"])
    return model


def _validate(name: str, spec: VideoSpec, num_classes: int, opts: dict[str, Any]) -> None:
    def bad(option: str, why: str) -> ModelOptionError:
        return ModelOptionError(name, option, opts[option], why)

    if not isinstance(num_classes, int) or num_classes < 1:
        raise ModelOptionError(name, "num_classes", num_classes, "must be a positive int")
    if not isinstance(opts["num_frames"], int) or opts["num_frames"] < 1:
        raise bad("num_frames", "must be >= 1")
    mobilenet = _entry(name).backbone == "mobilenet_v2"
    if mobilenet and opts["depth"] is not None:
        raise bad("depth", "is a ResNet option; MobileNetV2 has no depth (leave it unset)")
    if mobilenet and opts["shift_place"] != "residual":
        raise bad("shift_place", "must be 'residual' for MobileNetV2 (the official placement)")
    if not mobilenet and opts["depth"] not in DEPTHS:
        raise bad("depth", f"is not one of {sorted(DEPTHS)}")
    if not isinstance(opts["width"], int) or opts["width"] < 8:
        raise bad("width", "must be an int >= 8")
    if not 0.0 <= float(opts["dropout"]) < 1.0:
        raise bad("dropout", "must be in [0, 1)")
    if opts["classifier_init"] not in CLASSIFIER_INITS:
        raise bad("classifier_init", f"must be one of {', '.join(CLASSIFIER_INITS)}")
    if opts["shift_place"] not in ("residual", "inplace"):
        raise bad("shift_place", "must be 'residual' or 'inplace'")
    if not isinstance(opts["fold_div"], int) or opts["fold_div"] < 2:
        raise bad("fold_div", "must be an int >= 2")
    if spec.shift and opts["width"] // opts["fold_div"] < 1:
        raise bad("fold_div", f"leaves no channel to shift at width={opts['width']}")
    if opts["online"] and spec.conv3d:
        raise bad("online", "is only defined for the 2D models (TSM, TSN)")
    if opts["pretrained"] is not None and not Path(opts["pretrained"]).is_file():
        raise bad("pretrained", "is not a file")

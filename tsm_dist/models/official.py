"""The official TSM code's checkpoints (github.com/mit-han-lab/temporal-shift-module) in our names.

Two layouts exist, and both hold our networks exactly (same convolutions, same shift, same head):

* ``main.py`` checkpoints (the model zoo: ResNet TSM/TSN on Kinetics, Something-Something; MobileNetV2
  TSM): ``{'epoch', 'arch', 'state_dict', 'optimizer', 'best_prec1'}``, the state of a DataParallel
  ``TSN`` (ops/models.py): ``module.base_model.<backbone>`` and ``module.new_fc`` (the backbone's own
  classifier is a Dropout then; with dropout 0 it stays ``base_model.fc`` / ``classifier``). A shift
  wraps the module it precedes as ``.net``: ResNet ``layerK.i.conv1.net`` (place ``blockres``, our
  ``shift_place: residual``) or the whole block ``layerK.i.net`` (place ``block``, our ``inplace``);
  MobileNetV2 ``features.N.conv.0.net`` (our only placement).
* The online demo's MobileNetV2 (online_demo/mobilenet_v2_tsm.py, ``mobilenetv2_jester_online.pth.tar``):
  a bare state_dict in the flat layout of archs/mobilenet_v2.py, ``features.N.conv.{0,1,3,4,6,7}``
  (conv, BN, -, conv, BN, -, conv, BN; the ReLU6 at 2 and 5 hold nothing) and ``classifier``. Its shift is
  uni-directional with ``c // 8`` written in the code: an online model, fold 8.

What the weights cannot say (segments, fold) the file name of the zoo says
(``TSM_kinetics_RGB_resnet50_shift8_blockres_avg_segment8_e50.pth``) or the caller does.
:func:`to_ours` renames; it refuses, naming the key, what our networks do not have (non-local blocks,
temporal pooling, a shift in only some blocks).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import Tensor

_FLAT_MBV2 = re.compile(r"^features\.(\d+)\.conv\.(\d+)\.(.+)$")
# flat index -> our nesting, for blocks with an expansion (8 layers) and without (features.1: 5 layers)
_EXPAND = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
_NO_EXPAND = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
_NESTED = re.compile(r"^features\.\d+\.conv\.\d+\.\d+\.")  # ours / torchvision's: already nested
_WRAPPED_RESIDUAL = re.compile(r"^(layer\d+\.\d+)\.conv1\.net\.")
_WRAPPED_BLOCK = re.compile(r"^(layer\d+\.\d+)\.net\.")
_WRAPPED_MBV2 = re.compile(r"^(features\.\d+)\.conv\.0\.net\.")


class OfficialLayoutError(ValueError):
    """The file is an official checkpoint, but of a network that ours cannot hold."""


@dataclass
class OfficialLayout:
    """What a file in an official layout is, as far as its names and shapes tell."""

    family: str  # "resnet" | "mobilenet_v2"
    source: str  # "main.py" (the TSN wrapper of the model zoo) | "online_demo" (flat MobileNetV2)
    shifted: list[str] = field(default_factory=list)  # blocks with a shift, our module paths
    shift_place: str | None = None  # "residual" | "inplace"; None: the file does not say (online demo)
    renames: dict[str, int] = field(default_factory=dict)  # rule -> keys it renamed


def is_official(state: dict[str, Tensor]) -> bool:
    """Names only the official code writes: the TSN wrapper's, or MobileNetV2's flat layer indices
    (torchvision's and ours stop at conv.3; the flat layout reaches conv.7)."""
    return any(k.startswith(("base_model.", "new_fc.")) for k in state) or any(
        (m := _FLAT_MBV2.match(k)) and int(m.group(2)) > 3 for k in state)


def to_ours(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], OfficialLayout]:
    """``state`` (``module.`` already stripped) renamed to our modules, and what the names said."""
    wrapped = any(k.startswith(("base_model.", "new_fc.")) for k in state)
    renames: dict[str, int] = {}

    def rename(rule: str, key: str, new: str) -> str:
        if new != key:
            renames[rule] = renames.get(rule, 0) + 1
        return new

    if wrapped:
        _refuse_extras(state)
        state = {rename("base_model. -> (none), new_fc -> fc", k, _unwrap_head(k)): v for k, v in state.items()}
    family = "mobilenet_v2" if "features.0.0.weight" in state else "resnet"
    if family == "resnet" and "conv1.weight" not in state:
        raise OfficialLayoutError("neither ResNet (conv1.weight) nor MobileNetV2 (features.0.0.weight): another "
                                  "architecture (BNInception?); tsm_dist holds ResNet and MobileNetV2")
    layout = OfficialLayout(family, "main.py" if wrapped else "online_demo", renames=renames)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        out[_unshift(key, layout, rename)] = value
    if family == "mobilenet_v2":
        out = _nest_mobilenet(out, rename)
    return out, layout


def _refuse_extras(state: dict[str, Tensor]) -> None:
    for key in state:
        if ".nl." in key or "non_local" in key:
            raise OfficialLayoutError(f"{key}: a non-local block (the official '_nl' models); tsm_dist has none")
        if key.startswith("base_model.layer2.net."):
            raise OfficialLayoutError(f"{key}: temporal pooling after res2 (the official 'tpool' models halve "
                                      "the segments inside the network); tsm_dist's TSM keeps every frame")


def _unwrap_head(key: str) -> str:
    for old, new in (("new_fc.", "fc."), ("base_model.fc.", "fc."), ("base_model.classifier.", "fc."),
                     ("base_model.", "")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _unshift(key: str, layout: OfficialLayout, rename) -> str:
    """Drop a shift wrapper's ``.net`` and note the block it shifts and where."""
    for pattern, place, new in ((_WRAPPED_RESIDUAL, "residual", r"\1.conv1."), (_WRAPPED_BLOCK, "inplace", r"\1."),
                                (_WRAPPED_MBV2, "residual", r"\1.conv.0.")):
        m = pattern.match(key)
        if m:
            if m.group(1) not in layout.shifted:
                layout.shifted.append(m.group(1))
            if layout.shift_place not in (None, place):
                raise OfficialLayoutError(f"{key}: shifts wrapped both as blocks and as conv1 in one file")
            layout.shift_place = place
            return rename("shift wrapper .net -> (none)", key, pattern.sub(new, key))
    return key


def _nest_mobilenet(state: dict[str, Tensor], rename) -> dict[str, Tensor]:
    expanded = {m.group(1) for k in state if (m := _FLAT_MBV2.match(k)) and m.group(2) in ("6", "7")}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = _FLAT_MBV2.match(key)
        if m and not _NESTED.match(key):
            block, index, rest = m.groups()
            table = _EXPAND if block in expanded else _NO_EXPAND
            if index not in table:
                raise OfficialLayoutError(f"{key}: layer {index} of an inverted residual block holds nothing in "
                                          "MobileNetV2 (another layout)")
            key = rename("flat features.N.conv.K -> nested", key, f"features.{block}.conv.{table[index]}.{rest}")
        elif key.startswith("classifier."):
            key = rename("classifier -> fc", key, "fc." + key[len("classifier."):])
        out[key] = value
    return out


def model_options(state: dict[str, Tensor], layout: OfficialLayout) -> dict[str, object]:
    """The registry model and the options the renamed ``state`` needs (name, classes, depth, width,
    direction, placement); what only the file name or the caller knows (segments, fold) is not here."""
    if "fc.weight" not in state:
        raise OfficialLayoutError("no classifier (new_fc.weight, fc.weight or classifier.weight)")
    options: dict[str, object] = {"num_classes": int(state["fc.weight"].shape[0])}
    if layout.family == "mobilenet_v2":
        stem = int(state["features.0.0.weight"].shape[0])
        if stem != 32:
            raise OfficialLayoutError(f"features.0.0.weight: a stem of {stem} channels; the official MobileNetV2 "
                                      "has 32 at any width_mult, tsm_dist's width scales the stem too")
        if layout.source == "main.py" and not layout.shifted:
            raise OfficialLayoutError("a MobileNetV2 without shift (TSN): tsm_dist's MobileNetV2 is tsm8f_mbv2 only")
        return {"name": "tsm8f_mbv2", **options, "width": stem, "online": layout.source == "online_demo"}
    return {"name": "tsm8f_r50" if layout.shifted else "tsn8f_r50", **options, **_resnet_shape(state),
            "width": int(state["conv1.weight"].shape[0]), "shift_place": layout.shift_place or "residual",
            "online": False}


def _resnet_shape(state: dict[str, Tensor]) -> dict[str, int]:
    from tsm_dist.models.resnet import DEPTHS

    blocks = tuple(len({m.group(1) for k in state if (m := re.match(rf"^layer{s}\.(\d+)\.", k))}) for s in range(1, 5))
    kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    depth = next((d for d, (k, b) in DEPTHS.items() if (k, b) == (kind, blocks)), None)
    if depth is None:
        raise OfficialLayoutError(f"a ResNet of {kind} blocks {blocks} per stage: not one of tsm_dist's depths "
                                  f"{sorted(DEPTHS)}")
    return {"depth": depth}


def check_shifted(layout: OfficialLayout, ours: list[str]) -> None:
    """The file's shifted blocks are the blocks our model shifts (a main.py file names them by its
    ``.net`` wrappers; the online demo's are its architecture's, as ours)."""
    if layout.source != "main.py" or not layout.shifted:
        return
    missing = [b for b in ours if b not in layout.shifted]
    extra = [b for b in layout.shifted if b not in ours]
    if missing or extra:
        raise OfficialLayoutError(f"the file shifts {len(layout.shifted)} blocks, tsm_dist shifts {len(ours)} "
                                  f"({(missing or extra)[0]} differs; the official n_round=2 of deep ResNets "
                                  "shifts every other block): another placement")

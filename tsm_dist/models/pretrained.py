"""Initialise a model from a local 2D ImageNet-style state_dict (nothing is downloaded).

Names follow torchvision's ResNet and MobileNetV2, which our builders mirror. For a 3D model every 2D kernel is
inflated to its temporal size by repeating it kT times and dividing by kT (Carreira & Zisserman), so
a clip of identical frames gives the 2D network's activations away from the temporal borders. The
classifier is skipped when the file was trained on another number of classes (the usual fine-tuning
start); any other mismatch is an error naming the file and the key. Checkpoints of the official TSM code
(its model zoo's, the online demo's MobileNetV2) are renamed first (official.py), so they load here too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from tsm_dist.models.inflation import inflate
from tsm_dist.models.official import OfficialLayoutError, is_official, to_ours

_CLASSIFIER = ("fc.weight", "fc.bias")
# torchvision's mobilenet_v2 keeps its classifier as classifier.1 (after a dropout); ours is fc
_RENAMES = (("classifier.1.", "fc."),)


class PretrainedError(ValueError):
    """A ``model.pretrained`` file that cannot initialise the model: unreadable, not tensors, another shape."""


def unreadable(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` could not read a file, in a few words (torch's own messages
    run to paragraphs, and advise loading untrusted pickles)."""
    text = str(exc)
    detail = text.split("WeightsUnpickler error:", 1)[1].strip() if "WeightsUnpickler error:" in text else ""
    if detail.startswith("Unsupported global"):  # "Unsupported global: GLOBAL argparse.Namespace was not ..."
        name = detail.split("GLOBAL", 1)[-1].split()[0] if "GLOBAL" in detail else "?"
        return f"it pickles Python objects beyond tensors and numbers ({name}); save its state_dict alone"
    if detail or "invalid load key" in text:
        return "not a PyTorch file (neither a zip archive nor a pickle of tensors)"
    if "zip archive" in text:
        return f"a damaged or truncated archive ({text.split('.')[0]})"
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def load_tensor_file(path: Path, error: type[Exception] = PretrainedError) -> object:
    """``torch.load`` of a weights file, tensors and plain containers only; ``error`` naming the file."""
    if not path.is_file():
        raise error(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign, truncated or object-pickling files
        raise error(f"{path} cannot be read: {unreadable(exc)}") from None


@dataclass
class PretrainedReport:
    path: str
    loaded: list[str] = field(default_factory=list)
    inflated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # classifier with another class count


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint file: a bare state_dict, or one under "state_dict"/"model"."""
    path = Path(path)
    obj = load_tensor_file(path)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise PretrainedError(f"{path}: not a state_dict (expected a mapping of names to tensors)")
    # Checkpoints saved from DataParallel/DDP prefix every name with "module.".
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if is_official(state):
        try:
            state = to_ours(state)[0]
        except OfficialLayoutError as exc:
            raise PretrainedError(f"{path}: {exc}") from None
    for old, new in _RENAMES:
        state = {new + k[len(old):] if k.startswith(old) else k: v for k, v in state.items()}
    return state


def load_pretrained(model: nn.Module, path: str | Path) -> PretrainedReport:
    source = read_state_dict(path)
    report = PretrainedReport(str(path))
    target = model.state_dict()
    new_state: dict[str, Tensor] = {}
    for key, want in target.items():
        if key not in source:
            continue
        got = source[key]
        if got.shape == want.shape:
            new_state[key] = got
            report.loaded.append(key)
        elif got.dim() == 4 and want.dim() == 5 and got.shape == want.shape[:2] + want.shape[3:]:
            new_state[key] = inflate(got, want.shape[2])
            report.inflated.append(key)
        elif key in _CLASSIFIER:
            report.skipped.append(key)
        else:
            raise PretrainedError(f"{path}: {key} has shape {tuple(got.shape)}, the model needs {tuple(want.shape)}"
                             " (another depth or width?)")
    # Old torchvision files predate BN's num_batches_tracked; a missing counter is harmless.
    missing = [k for k in target if k not in source and not k.endswith("num_batches_tracked")
               and k not in _CLASSIFIER]
    unexpected = [k for k in source if k not in target]
    if missing or unexpected:
        raise PretrainedError(f"{path}: does not match the model; missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(new_state, strict=False)
    return report

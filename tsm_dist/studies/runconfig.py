"""Configs of measurement runs: a base training config plus what a timed, throw-away run needs."""
from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from tsm_dist.config import Config


def measurement_overrides(total_steps: int) -> list[str]:
    """Stop after ``total_steps``, log every optimizer step, skip evaluation, checkpoints and wandb, and
    keep the ranks fixed (not elastic)."""
    return [f"train.max_steps={total_steps}",
            # one record per optimizer step so the warm-up steps can be cut exactly
            "log.interval=1", "log.wandb=disabled", "log.progress=false",
            "train.eval_every_epochs=0", "train.checkpoint_every_epochs=0",
            # a measurement at N ranks keeps N ranks: an elastic run would go on timing another world
            "engine.elastic=false", "engine.elastic_min_ranks=0", "engine.elastic_max_ranks=0"]


# The paper's clips span a 64-frame window: a 2D model (TSN, TSM) samples it in T segments, a 3D model
# (I3D) takes T frames densely, every 64/T-th (I3D3x3x3: 16 frames every 4th, I3D3x1x1: 32 every 2nd).
CLIP_WINDOW_FRAMES = 64


def model_input(model: str) -> tuple[int, str, int]:
    """(frames, sampling, stride) that ``model`` takes by default."""
    from tsm_dist.models import model_defaults, model_spec

    frames = int(model_defaults(model)["num_frames"])
    if model_spec(model).conv3d:
        return frames, "dense", max(1, CLIP_WINDOW_FRAMES // frames)
    return frames, "segment", 1


@functools.lru_cache(maxsize=None)
def model_frame_overrides(base: Path, model: str) -> tuple[str, ...]:
    """The frames and sampling ``model`` takes by default, when the config ``base`` was written for another
    model (a TSM config swapped to I3D gets I3D's dense sampling, not TSM's segments)."""
    from tsm_dist.config import load_config

    if load_config(base).model.name == model:
        return ()
    from tsm_dist.models import model_defaults

    frames, sampling, stride = model_input(model)
    # a ResNet config's depth means nothing to a model without one (MobileNetV2): back to its default
    no_depth = ("model.depth=null",) if model_defaults(model)["depth"] is None else ()
    return (f"model.num_frames={frames}", f"data.sampling={sampling}", f"data.stride={stride}", *no_depth)


def write_run_config(base: Path, model: str, overrides: list[str], path: Path) -> "Config":
    """Validate ``base`` + the model's frames + ``overrides`` and write the resolved config to ``path``.

    The model's default frame count goes first so that an explicit ``model.num_frames`` override wins.
    """
    from tsm_dist.config import dump_config, load_config

    # loaded = resolved: the written config names the frames etc. the run uses, also where the base leaves
    # them to the model
    cfg = load_config(base, [*model_frame_overrides(Path(base), model), *overrides, f"model.name={model}"])
    path.parent.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, path)
    return cfg


def model_config_item(text: str) -> tuple[str, Path]:
    """argparse type of ``--model-config MODEL=CONFIG``: a per-model base config (frames, sampling)."""
    model, eq, path = text.partition("=")
    if not eq or not model.strip() or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MODEL=CONFIG")
    return model.strip(), Path(path)

"""Config -> the objects a run is made of: model, sharded loaders, AMP dtype, data paths.

``tsm-dist train``, ``tsm-dist eval`` and the studies build through this module, so a config means the
same thing everywhere. It imports neither the trainer nor the evaluator.

A loaded config names every model option (``load_config`` filled in the model's own). Data paths follow
one rule (:func:`resolve_list`): an absolute path is kept; a relative one is looked up under
``data.root`` first, then taken relative to the working directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tsm_dist.config import Config, ConfigError

if TYPE_CHECKING:  # torch is imported when something is built, so the studies' CLIs start fast
    import torch
    from torch import nn

    from tsm_dist.distributed.engine import Engine

ModelBuilder = Callable[..., "nn.Module"]
LoaderBuilder = Callable[..., Any]

AMP_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16"}  # train.amp -> torch dtype


def amp_dtype(cfg: Config, device: "torch.device | None" = None,
              capability: "Callable[[Any], tuple[int, int]] | None" = None) -> "torch.dtype | None":
    """The autocast dtype of ``train.amp``; None when AMP is off. bf16 on a GPU of compute capability
    below 8.0 (V100, P100) is refused: cuDNN has no bf16 convolutions there, every conv would silently
    take a slow fallback path."""
    import torch

    name = AMP_DTYPE_NAMES.get(cfg.train.amp)
    if name == "bfloat16" and device is not None and device.type == "cuda":
        major, minor = (capability or torch.cuda.get_device_capability)(device)
        if major < 8:
            raise ConfigError(f"train.amp: bf16 needs a GPU of compute capability >= 8.0, {device} is {major}.{minor} "
                              "(no bf16 convolutions in cuDNN: every conv would run on a slow path); "
                              "use train.amp=fp16 or none")
    return getattr(torch, name) if name else None


def default_model_builder() -> ModelBuilder:
    from tsm_dist.models import build_model

    return build_model


def default_loader_builder() -> LoaderBuilder:
    from tsm_dist.data.video_loader import build_video_loader

    return build_video_loader


def resolve_list(cfg: Config, key: str) -> str | None:
    """The file named by ``data.<key>`` (``train_list`` / ``val_list``), or None when it is not set.

    The one rule for data paths: absolute paths are kept; a relative path is taken under ``data.root``
    when it exists there, otherwise relative to the working directory. A list may also be a packed
    directory (``tsm-dist pack``).
    """
    value = getattr(cfg.data, key)
    if not value:
        return None
    path = Path(value)
    if not path.is_absolute() and cfg.data.root and (Path(cfg.data.root) / path).exists():
        return str(Path(cfg.data.root) / path)
    return value


def flip_label_map(cfg: Config) -> dict[int, int] | None:
    """``data.flip_label_map``: "" (none), "synthetic" (the synthetic set's map) or a file of "a b" lines."""
    spec = cfg.data.flip_label_map
    if not spec:
        return None
    if spec == "synthetic":
        from tsm_dist.data import synthetic

        found = getattr(synthetic, "FLIP_LABEL_MAP", None)
        return dict(found() if callable(found) else found)
    mapping = {}
    for number, line in enumerate(Path(spec).read_text().splitlines(), 1):
        if line.strip():
            parts = line.split()
            if len(parts) != 2 or not all(p.lstrip("-").isdigit() for p in parts):
                raise ConfigError(f"{spec}:{number}: expected two class ids 'a b', got {line!r}")
            mapping[int(parts[0])] = int(parts[1])
    return mapping


def build_model_from_config(cfg: Config, builder: ModelBuilder | None = None) -> "nn.Module":
    from tsm_dist.commands.exit_codes import CheckpointError
    from tsm_dist.models.pretrained import PretrainedError

    m = cfg.model  # every option filled in when the config was loaded
    try:
        return (builder or default_model_builder())(
            m.name, num_classes=m.num_classes, num_frames=m.num_frames, dropout=m.dropout, fold_div=m.fold_div,
            shift_place=m.shift_place, depth=m.depth, width=m.width, pretrained=m.pretrained, online=m.online,
            classifier_init=m.classifier_init)
    except PretrainedError as exc:  # the same file on every rank: one line from rank 0
        raise CheckpointError(f"model.pretrained: {exc}") from None


def build_loader_from_config(cfg: Config, engine: "Engine", *, train: bool, builder: LoaderBuilder | None = None,
                             num_clips: int = 1, num_crops: int = 1) -> Any:
    """Rank ``engine.rank``'s shard of the training (``train``) or validation set."""
    d = cfg.data
    options: dict[str, Any] = dict(
        backend=d.backend, device=d.device, num_frames=cfg.model.num_frames, sampling=d.sampling,
        stride=d.stride, batch_size=d.batch_size if train else (d.val_batch_size or d.batch_size),
        crop_size=d.crop_size, train=train, shard_id=engine.rank, num_shards=engine.size,
        seed=cfg.train.seed, num_threads=d.num_threads, num_clips=num_clips, num_crops=num_crops,
        flip=d.flip and train, flip_label_map=flip_label_map(cfg) if train else None,
        skip_corrupt=d.skip_corrupt, num_classes=cfg.model.num_classes, short_videos=d.short_videos,
        feed_thread=d.feed_thread)
    if d.scale_size:
        options["scale_size"] = d.scale_size
    if engine.device.type == "cuda":
        options["device_id"] = engine.device.index
    if d.backend == "random":
        options["num_samples"] = d.num_samples
    if d.backend == "procedural":
        options.update(num_samples=d.num_samples if train else d.num_val_samples, preset=d.preset,
                       label_noise=d.label_noise, scene_seed=d.scene_seed)
    file_list = resolve_list(cfg, "train_list" if train else "val_list")
    return (builder or default_loader_builder())(file_list, d.root or None, **options)


def has_val_set(cfg: Config) -> bool:
    """Whether the config names a validation set (the random backend always has one, the procedural one
    with ``data.num_val_samples``)."""
    return bool(cfg.data.val_list) or cfg.data.backend == "random" or (
        cfg.data.backend == "procedural" and cfg.data.num_val_samples > 0)

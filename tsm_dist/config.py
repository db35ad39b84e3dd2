"""Typed, validated training configuration.

A config is a YAML file with the sections below, overridden by ``--set section.key=value``.
Every key is checked against these dataclasses: an unknown key, a wrong type or a value outside
its choices is a :class:`ConfigError` naming the key and where it came from (``file:line`` or
the ``--set`` argument), raised before any rank starts work.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the key and its source."""


GENERATED = ("random", "procedural")  # data backends that make their clips and read no files


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``1e-4`` (no dot) is a string; people write learning rates that
    way, and YAML 1.2 reads them as floats. This loader does too (``1e-4``, ``5e-5``, ``1e6``, ``1E5``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML with 1.2-style exponent floats (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)


def _choices(*values: str) -> dict[str, Any]:
    return {"choices": values}


@dataclass
class ModelConfig:
    """None (the default) means the model's own value from the registry (tsm_dist.models.registry.resolve_options):
    an I3D config without ``num_frames`` gets its 16 or 32 frames. :func:`load_config` fills them in, once: a
    loaded config names every option the model is built with, and so does the checkpoint that stores it."""

    name: str = "tsm8f_r50"
    num_classes: int = 400
    num_frames: Optional[int] = None
    dropout: Optional[float] = None
    fold_div: Optional[int] = None
    shift_place: Optional[str] = field(default=None, metadata=_choices("residual", "inplace"))
    depth: Optional[int] = None
    width: Optional[int] = None
    pretrained: Optional[str] = None
    online: Optional[bool] = None  # uni-directional shift: the model `tsm-dist export --mode online` streams
    # "reference": N(0, 0.001) as the TSM code (fine-tuning); "linear": nn.Linear's own scale (from scratch)
    classifier_init: Optional[str] = field(default=None, metadata=_choices("reference", "linear"))


@dataclass
class DataConfig:
    # random: noise of the right shape (throughput only); procedural: the synthetic scenes rendered in
    # memory (tsm_dist/data/procedural_loader.py); neither reads files
    backend: str = field(default="dali", metadata=_choices("dali", "pyav", "random", "procedural"))
    device: str = field(default="cpu", metadata=_choices("cpu", "gpu"))
    root: str = ""
    train_list: str = ""
    val_list: str = ""
    sampling: str = field(default="segment", metadata=_choices("segment", "dense"))
    stride: int = 1
    batch_size: int = 8  # per GPU (per rank)
    val_batch_size: int = 0  # 0: same as batch_size
    crop_size: int = 224
    scale_size: int = 0  # shorter side before cropping; 0: the loader's default for crop_size
    short_videos: str = field(default="error", metadata=_choices("error", "loop"))
    num_threads: int = 2
    skip_corrupt: bool = False
    # plan and read batches on a feeder thread, off the training thread (false: inside next(); docs/data.md)
    feed_thread: bool = True
    num_samples: int = 0  # random / procedural backend: clips per epoch (all ranks together)
    num_val_samples: int = 0  # procedural backend: validation clips (0: no validation set)
    preset: str = field(default="temporal", metadata=_choices("temporal", "hard"))  # procedural: the scenes
    label_noise: float = 0.0  # procedural: share of labels redrawn uniformly over the classes (train and val)
    scene_seed: int = 0  # procedural: the set's seed (train.seed shuffles; every training seed sees one set)
    flip: bool = True
    # "" (no label swap), "synthetic" (the synthetic set's left/right map) or a file of "a b" lines
    flip_label_map: str = ""


@dataclass
class OptimConfig:
    # sgd: momentum SGD. lars / lamb: layer-wise trust ratio (You et al. 2017 / 2019) on the weights
    # (BN and bias parameters excluded from adaptation and decay); tsm_dist/training/optim.py
    name: str = field(default="sgd", metadata=_choices("sgd", "lars", "lamb"))
    base_lr: float = 0.01  # learning rate at base_batch; scaled linearly with the global batch
    base_batch: int = 64
    # how the peak rate follows the global batch: linear (Goyal et al., SGD and LARS), sqrt (LAMB's paper),
    # auto: the optimizer's own (sqrt for lamb, linear otherwise)
    lr_scaling: str = field(default="auto", metadata=_choices("auto", "linear", "sqrt"))
    momentum: float = 0.9
    weight_decay: float = 1e-4
    no_bn_bias_decay: bool = False
    warmup_epochs: float = 0.0
    warmup_min_steps: int = 0  # the warmup's floor in optimizer steps (a large batch has few per epoch)
    schedule: str = field(default="step", metadata=_choices("step", "cosine"))
    decay_epochs: list[float] = field(default_factory=lambda: [40.0, 80.0])
    decay_factor: float = 0.1
    clip_grad_norm: float = 0.0  # 0: no clipping
    trust_coefficient: float = 0.001  # LARS eta; 0.001 as You et al. 2017
    trust_clip: bool = True  # LARS: at most the global lr per layer (LARC), so small batches stay plain SGD
    beta2: float = 0.999  # LAMB's second-moment decay (its first is optim.momentum)
    eps: float = 1e-6  # LAMB's epsilon


@dataclass
class TrainConfig:
    epochs: int = 100
    max_steps: int = 0  # 0: no limit; otherwise stop after this many optimizer steps
    accumulate: int = 1
    # 0: per-GPU batch x world x accumulate. Otherwise the effective batch to reach: accumulate is
    # derived from the world size (how the paper simulated 512 and 1024 nodes).
    global_batch: int = 0
    amp: str = field(default="none", metadata=_choices("none", "bf16", "fp16"))
    channels_last: bool = True  # the model's channels-last format (2D or 3D), on CPU and GPU
    seed: int = 0
    checkpoint_every_epochs: int = 1  # 0: only on preemption
    keep_last: int = 5
    eval_every_epochs: int = 1  # 0: never during training


@dataclass
class EngineConfig:
    name: str = field(default="horovod", metadata=_choices("horovod", "torch"))
    fp16_compression: bool = False
    fusion_threshold_mb: float = 64.0  # Horovod fusion buffer; DDP bucket size for "torch"
    cycle_time_ms: float = 0.0  # Horovod only; 0: 5 ms on CPU ranks, Horovod's 1 ms on GPUs (engine.horovod_env)
    timeline: str = ""  # Horovod only; path of a Chrome-trace timeline written by rank 0
    gradient_predivide_factor: float = 1.0
    # A rank that stops answering: Horovod warns after stall_check_s and shuts the job down
    # after stall_shutdown_s; torch.distributed collectives time out after timeout_s.
    stall_check_s: int = 60
    stall_shutdown_s: int = 600
    timeout_s: int = 1800
    # Two ranks on one GPU are refused (engine._refuse_shared_gpu); only a deliberate test of the
    # collective path on a one-GPU machine (benchmarks/gpu_acceptance.py) turns the refusal off.
    allow_shared_gpu: bool = False
    # Elastic training (Horovod's elastic mode, Gloo controller; docs/training.md#elastic-training): ranks may
    # leave or join without a restart. The state is committed every commit_every optimizer steps and at every
    # epoch end; a failure rolls the survivors back to the last commit.
    elastic: bool = False
    elastic_min_ranks: int = 0  # horovodrun --min-np; 0: the starting world size
    elastic_max_ranks: int = 0  # horovodrun --max-np; 0: the starting world size
    commit_every: int = 50
    # when the world size changes: keep the global batch (accumulation adapts, LR schedule unchanged) or the
    # per-rank batch (the global batch follows the world size, the LR rescaled linearly)
    on_resize: str = field(default="keep_global_batch", metadata=_choices("keep_global_batch", "keep_rank_batch"))


@dataclass
class LogConfig:
    interval: int = 10  # optimizer steps between step records
    wandb: str = field(default="offline", metadata=_choices("offline", "online", "disabled"))
    project: str = "tsm_dist"
    # rank 0's progress: null (default) a bar on a terminal, plain lines in a batch log (every epoch and every
    # progress_every_s seconds); true the bar everywhere; false neither (the last summary line stays)
    progress: Optional[bool] = None
    progress_every_s: float = 60.0


@dataclass
class EvalConfig:
    num_clips: int = 1
    num_crops: int = field(default=1, metadata={"choices": (1, 3)})
    last_n: int = 5


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.default_factory().__class__ for f in dataclasses.fields(Config)}  # type: ignore[misc]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():  # 1e6 for a count
        return int(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _yaml_problem(exc: yaml.YAMLError, where: str) -> str:
    """One line: ``file:line:column: invalid YAML: <problem>`` (PyYAML's text spans several lines and
    names ``<unicode string>``)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
    return f"{at}: invalid YAML: {problem}" + (f" ({context})" if context else "")


def _yaml_with_lines(text: str, path: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML and remember the line of every ``section.key`` for error messages."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(_yaml_problem(exc, path)) from None
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            lines[str(key_node.value)] = key_node.start_mark.line + 1
            if isinstance(value_node, yaml.MappingNode):
                for sub_key, _ in value_node.value:
                    lines[f"{key_node.value}.{sub_key.value}"] = sub_key.start_mark.line + 1
    return parse_yaml(text), lines


def _unknown(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}; known: {', '.join(known)}")


def _set(cfg: Config, dotted: str, value: Any, where: str) -> None:
    section_name, _, key = dotted.partition(".")
    if section_name not in SECTIONS:
        raise _unknown(section_name, list(SECTIONS), where)
    section = getattr(cfg, section_name)
    fields = {f.name: f for f in dataclasses.fields(section)}
    if not key or key not in fields:
        raise _unknown(dotted, list(fields), where)
    hints = typing.get_type_hints(type(section))
    coerced = _coerce(value, hints[key], f"{where}: {dotted}")
    choices = fields[key].metadata.get("choices")
    if choices is not None and coerced is not None and coerced not in choices:
        raise ConfigError(f"{where}: {dotted}={coerced!r} is not one of {', '.join(map(str, choices))}")
    setattr(section, key, coerced)


def _check_ranges(cfg: Config) -> None:
    positive = ["model.num_classes", "data.stride",
                "data.batch_size", "data.crop_size", "data.num_threads", "optim.base_batch",
                "train.epochs", "train.accumulate", "train.keep_last", "log.interval",
                "eval.num_clips", "eval.last_n", "engine.fusion_threshold_mb",
                "engine.gradient_predivide_factor", "engine.timeout_s", "engine.commit_every"]
    non_negative = ["optim.base_lr", "optim.weight_decay", "optim.warmup_epochs", "optim.clip_grad_norm",
                    "optim.momentum", "optim.trust_coefficient", "optim.eps", "train.max_steps", "train.global_batch", "data.num_samples",
                    "data.num_val_samples", "data.label_noise", "optim.warmup_min_steps",
                    "data.val_batch_size", "train.checkpoint_every_epochs", "train.eval_every_epochs",
                    "engine.cycle_time_ms", "engine.stall_check_s", "engine.stall_shutdown_s", "log.progress_every_s",
                    "engine.elastic_min_ranks", "engine.elastic_max_ranks"]
    for key in positive + non_negative:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:
            continue
        if value < 0 or (key in positive and value == 0):
            raise ConfigError(f"{key}={value!r} must be {'> 0' if key in positive else '>= 0'}")
    if cfg.optim.decay_epochs != sorted(cfg.optim.decay_epochs):
        raise ConfigError(f"optim.decay_epochs={cfg.optim.decay_epochs!r} must be increasing")
    if cfg.data.backend in GENERATED and cfg.data.num_samples <= 0:
        raise ConfigError(f"data.num_samples must be > 0 with data.backend={cfg.data.backend} (it sets the epoch length)")
    if cfg.data.label_noise > 1:
        raise ConfigError(f"data.label_noise={cfg.data.label_noise!r} must be <= 1")
    if cfg.data.backend not in GENERATED and not cfg.data.train_list:
        raise ConfigError(f"data.train_list is required with data.backend={cfg.data.backend}")
    if cfg.engine.name == "torch":
        for key, default in (("timeline", ""), ("cycle_time_ms", 0.0)):
            if getattr(cfg.engine, key) != default:
                raise ConfigError(f"engine.{key} is a Horovod option; unset it for engine.name=torch")
    _check_elastic(cfg.engine)


def _check_elastic(engine: EngineConfig) -> None:
    """Elastic keys only with engine.elastic on Horovod, and a --min-np/--max-np pair horovodrun accepts."""
    if not engine.elastic:
        for key in ("elastic_min_ranks", "elastic_max_ranks"):
            if getattr(engine, key):
                raise ConfigError(f"engine.{key} is an elastic option; set engine.elastic: true or unset it")
        return
    if engine.name != "horovod":
        raise ConfigError("engine.elastic needs engine.name=horovod (Horovod's elastic mode; torch.distributed has none here)")
    if engine.cycle_time_ms:
        raise ConfigError("engine.cycle_time_ms must stay 0 with engine.elastic: Horovod 0.28.1 crashes re-initializing "
                          "after a lost rank when the cycle time and the fusion threshold are both set")
    low, high = engine.elastic_min_ranks, engine.elastic_max_ranks
    if low and high and low > high:
        raise ConfigError(f"engine.elastic_min_ranks={low} must be <= engine.elastic_max_ranks={high}")


def resolve_model_options(model: ModelConfig) -> dict[str, Any]:
    """The registry's resolution of ``model``'s options (its defaults where the config leaves None),
    with its errors as :class:`ConfigError` naming the ``model.`` key; the registry is the one place that
    knows model names, defaults and valid values."""
    from tsm_dist.models.registry import ModelOptionError, list_models, resolve_options

    known = list_models()
    if model.name not in known:
        close = difflib.get_close_matches(model.name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"model.name={model.name!r} is not a known model{hint}; known: {', '.join(known)}")
    options = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in ("name", "num_classes")}
    try:
        resolved = resolve_options(model.name, model.num_classes, **options)
    except ModelOptionError as exc:
        raise ConfigError(f"model.{exc.option}={exc.value!r} {exc.why}") from None
    return {key: resolved[key] for key in options}


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                values: dict[str, Any] | None = None) -> Config:
    """Read ``path`` (or start from the defaults when None), apply ``section.key=value`` overrides (the
    command line's ``--set``), then ``values`` (typed values from in-process callers and flags such as
    ``--accumulate``, never round-tripped through strings), check ranges and fill in the model's options."""
    cfg = Config()
    if path is not None:
        path = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        data, lines = _yaml_with_lines(text, path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        apply_sections(cfg, data, lambda dotted: f"{path}:{lines.get(dotted, '?')}")
    apply_overrides(cfg, overrides or [])
    for dotted, value in (values or {}).items():
        _set(cfg, dotted, value, "set by the caller")
    return finish_config(cfg)


def apply_overrides(cfg: Config, overrides: list[str]) -> None:
    """``--set section.key=value`` items, each value parsed as YAML (a string key keeps its text)."""
    for item in overrides:
        dotted, eq, raw = item.partition("=")
        if not eq:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(_yaml_problem(exc, f"--set {item!r}").replace("invalid YAML", "cannot parse the value")) from None
        # a string-typed key keeps the text as written ("01" stays "01", "null" becomes None only
        # for Optional keys, where _coerce accepts it)
        if isinstance(value, (int, float, bool)) and _is_str_key(dotted.strip()):
            value = raw
        _set(cfg, dotted.strip(), value, f"--set {item}")


def apply_sections(cfg: Config, data: dict[str, Any], where: Any) -> None:
    """Set every ``section: {key: value}`` of ``data`` on ``cfg``; ``where(dotted)`` names the source."""
    for section_name, section in data.items():
        at = where(str(section_name))
        if section_name not in SECTIONS:
            raise _unknown(str(section_name), list(SECTIONS), at)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{at}: section {section_name!r} must be a mapping")
        for key, value in section.items():
            dotted = f"{section_name}.{key}"
            _set(cfg, dotted, value, where(dotted))


def finish_config(cfg: Config) -> Config:
    """Range checks, then the model's own options where the config leaves them (None) to the model."""
    _check_ranges(cfg)
    cfg.model = dataclasses.replace(cfg.model, **resolve_model_options(cfg.model))
    return cfg


def config_from_dict(data: dict[str, Any], source: str, overrides: list[str] | None = None) -> Config:
    """A config recorded as a mapping (the one a checkpoint stores), validated as a file is, then the
    command line's ``--set`` overrides on top."""
    cfg = Config()
    apply_sections(cfg, data, lambda dotted: f"{source}: {dotted}")
    apply_overrides(cfg, overrides or [])
    return finish_config(cfg)


def _is_str_key(dotted: str) -> bool:
    section_name, _, key = dotted.partition(".")
    section_type = SECTIONS.get(section_name)
    if section_type is None:
        return False
    hint = typing.get_type_hints(section_type).get(key)
    return hint is str or hint == Optional[str]


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

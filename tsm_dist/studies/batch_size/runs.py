"""The batch-size study's plan: which runs (optimizer, effective batch, seed) on how many ranks with which
per-rank batch and accumulation, and the overrides every run shares. Written to ``plan.json`` so that
``collect`` reads a study directory without its command line."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tsm_dist import package_files

OPTIMIZERS = ("sgd", "lars", "lamb")
PLAN_FILE = "plan.json"
# per_rank 2: batch 4 runs on 2 ranks as is, batch 8 is simulated (K = 2); a config that reads files gets a
# tiny hard set (videos_per_class, frames, size), the procedural one 64 training and 32 validation clips
QUICK = {"videos_per_class": 4, "frames": 8, "size": 32, "per_rank": 2, "batches": [4, 8], "epochs": 2, "seeds": 1,
         "num_samples": 64, "num_val_samples": 32, "optimizers": ["sgd"]}
# 16 = 2 ranks x 8 clips, the base batch, up to 64x; SGD and LARS, 3 seeds: 42 runs, about 40 minutes on 2
# idle cores (LAMB's 21 more: --optimizers sgd,lars,lamb in the same --out; docs/studies.md)
DEFAULT_BATCHES = [16, 32, 64, 128, 256, 512, 1024]
DEFAULT_OPTIMIZERS = ["sgd", "lars"]
DEFAULT_CONFIG = "batch_study.yaml"


@dataclass
class StudyOptions:
    """What the command line asks for (``None``: the config's or the quick mode's value)."""

    config: Path | None = None
    batches: list[int] | None = None
    nodes: list[int] | None = None
    gpus_per_node: int = 1
    optimizers: list[str] | None = None  # default: DEFAULT_OPTIMIZERS (quick: sgd)
    seeds: int | None = None
    epochs: int | None = None
    ranks: int = 2
    launcher: str = "horovodrun"
    data: Path | None = None
    overrides: list[str] = field(default_factory=list)
    quick: bool = False
    # scheduler runs: up to max_nodes nodes of ranks_per_node ranks; a larger batch is simulated on max_nodes
    scheduler: str = "local"
    max_nodes: int = 1
    ranks_per_node: int | None = None  # default: --gpus-per-node (local: --ranks)


@dataclass(frozen=True)
class StudyRun:
    """One training run of the study."""

    optimizer: str
    batch: int  # effective (global) batch
    seed: int
    ranks: int
    per_rank_batch: int
    accumulate: int
    nodes: int = 1  # nodes the run allocates (scheduler runs)

    @property
    def simulated(self) -> bool:
        return self.accumulate > 1

    @property
    def tag(self) -> str:
        return f"{self.optimizer}_b{self.batch:05d}_s{self.seed}"


def plan_runs(batches: list[int], optimizers: list[str], seeds: int, ranks: int, max_per_rank: int,
              max_nodes: int = 1) -> list[StudyRun]:
    """``ranks`` per node, at most ``max_nodes`` nodes. Per-rank batch: the config's, or less for a batch
    smaller than ranks x that; nodes: as many as the batch fills, up to ``max_nodes``; the rest is K."""
    layout = {}
    for batch in batches:
        per_rank = min(max_per_rank, batch // ranks)
        nodes = max(1, min(max_nodes, batch // (ranks * max(per_rank, 1))))
        if per_rank < 1 or batch % (nodes * ranks * per_rank):
            raise ValueError(f"batch {batch} is not a multiple of {nodes} node(s) x {ranks} ranks x a per-rank "
                             f"batch <= {max_per_rank} (data.batch_size)")
        layout[batch] = (per_rank, nodes, batch // (nodes * ranks * per_rank))
    # seed by seed: a study cut short still has whole curves for the seeds it finished
    return [StudyRun(optimizer, batch, seed, layout[batch][1] * ranks, layout[batch][0], layout[batch][2],
                     layout[batch][1])
            for seed in range(seeds) for optimizer in optimizers for batch in batches]


def run_overrides(run: StudyRun) -> list[str]:
    return [f"optim.name={run.optimizer}", f"train.seed={run.seed}", f"data.batch_size={run.per_rank_batch}",
            f"train.global_batch={run.batch}", "train.accumulate=1"]


def _config_path(args: StudyOptions) -> Path:
    return args.config or package_files.CONFIGS / DEFAULT_CONFIG


def ensure_data(root: Path | None, quick: bool) -> None:
    """Make the hard synthetic set at ``root`` when it is missing (None: the clips are generated)."""
    if root is None or (root / "train.txt").is_file():
        return
    from tsm_dist.data.synthetic import make_synthetic

    sizes = {k: QUICK[k] for k in ("videos_per_class", "frames", "size")} if quick else {}
    print(f"making the hard synthetic set in {root} ...", flush=True)
    make_synthetic(str(root), preset="hard", **sizes)


def plan_study(args: StudyOptions) -> dict[str, Any]:
    """The resolved study: base config, overrides shared by every run, and the runs."""
    from tsm_dist.config import load_config

    from tsm_dist.config import GENERATED

    config = _config_path(args)
    overrides = list(args.overrides)
    generated = load_config(config, overrides).data.backend in GENERATED
    if args.quick:
        overrides = [f"data.batch_size={QUICK['per_rank']}", *(
            [f"data.num_samples={QUICK['num_samples']}", f"data.num_val_samples={QUICK['num_val_samples']}"]
            if generated else [f"data.crop_size={QUICK['size'] - 4}", f"data.scale_size={QUICK['size']}"]),
            *overrides]
    cfg = load_config(config, overrides)
    if generated and args.data:
        raise ValueError(f"--data: the config's data.backend={cfg.data.backend} reads no files (it makes its clips)")
    data = None if generated else (args.data or (Path("data/synthetic_hard_quick") if args.quick
                                                 else Path(cfg.data.root)))
    epochs = args.epochs or (QUICK["epochs"] if args.quick else cfg.train.epochs)
    if args.batches and args.nodes:
        raise ValueError("give --batches or --nodes, not both")
    batches = (args.batches or ([n * args.gpus_per_node * cfg.data.batch_size for n in args.nodes] if args.nodes
                                else QUICK["batches"] if args.quick else DEFAULT_BATCHES))
    seeds = args.seeds or (QUICK["seeds"] if args.quick else 3)
    last_n = min(cfg.eval.last_n, epochs)
    shared = [*overrides, *([f"data.root={data.resolve()}"] if data else []), f"train.epochs={epochs}",
              f"eval.last_n={last_n}",
              f"train.keep_last={max(cfg.train.keep_last, last_n)}", "train.eval_every_epochs=1",
              "train.checkpoint_every_epochs=1", "log.progress=false", "log.wandb=disabled",
              "log.interval=1"]  # a loss point per step: a large batch has only a few steps per epoch
    per_node = args.ranks if args.scheduler == "local" else (args.ranks_per_node or args.gpus_per_node)
    if per_node < 1:
        raise ValueError("CPU nodes (--gpus-per-node 0) need --ranks-per-node" if args.scheduler != "local"
                         else f"--ranks must be >= 1, got {per_node}")
    optimizers = args.optimizers or (QUICK["optimizers"] if args.quick else DEFAULT_OPTIMIZERS)
    runs = plan_runs(sorted(set(batches)), optimizers, seeds, per_node, cfg.data.batch_size,
                     max_nodes=1 if args.scheduler == "local" else args.max_nodes)
    return {"config": str(Path(config).resolve()), "overrides": shared, "data": str(data) if data else None,
            "epochs": epochs, "last_n": last_n, "num_frames": cfg.model.num_frames, "base_batch": cfg.optim.base_batch,
            "base_lr": cfg.optim.base_lr, "warmup_epochs": cfg.optim.warmup_epochs,
            "warmup_min_steps": cfg.optim.warmup_min_steps, "model": cfg.model.name, "backend": cfg.data.backend,
            "quick": args.quick, "launcher": args.launcher, "scheduler": args.scheduler,
            "runs": [asdict(r) for r in runs]}



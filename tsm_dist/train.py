"""``tsm-dist train``: synchronous data-parallel SGD, started once per rank (horovodrun, mpirun, jsrun, srun).

The whole recipe is :func:`train`, top to bottom: start the engine and pin the device by local rank
-> sharded loaders -> model and optimizer -> distributed optimizer with K backward passes per
allreduce -> resume on rank 0 and broadcast parameters and optimizer state -> per step: LR from the warmup
/ decay schedule, K micro-batches, one gradient allreduce, clip, step -> metrics averaged with one
allreduce (which also carries the preemption and non-finite-loss flags) -> rank-0 logging, evaluation
and checkpoints.

Exit codes: 0 done, 1 crash, 2 configuration error, 3 non-finite loss, 75 preempted (requeue).
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from tsm_dist import checkpoint as ckpt
from tsm_dist.config import Config, ConfigError, dump_config, load_config, plan_batch
from tsm_dist.engine import Engine, is_launcher_rank0
from tsm_dist.evaluate import evaluate
from tsm_dist.metrics import JsonlWriter, Progress, WandbRun, git_commit, hardware, versions
from tsm_dist.preemption import PREEMPTED_EXIT_CODE, PreemptionFlag
from tsm_dist.schedule import LRSchedule

EXIT_OK, EXIT_CRASH, EXIT_CONFIG, EXIT_NONFINITE = 0, 1, 2, 3

ModelBuilder = Callable[..., nn.Module]
LoaderBuilder = Callable[..., Any]


# ------------------------------------------------------------------------------- building blocks
def default_model_builder() -> ModelBuilder:
    from tsm_dist.models import build_model

    return build_model


def default_loader_builder() -> LoaderBuilder:
    from tsm_dist.data import build_video_loader

    return build_video_loader


def build_model_from_config(cfg: Config, builder: ModelBuilder) -> nn.Module:
    m = cfg.model
    return builder(m.name, num_classes=m.num_classes, num_frames=m.num_frames, dropout=m.dropout,
                   fold_div=m.fold_div, shift_place=m.shift_place, depth=m.depth, width=m.width,
                   pretrained=m.pretrained)


def _file_list(cfg: Config, name: str) -> str | None:
    """A relative list path is looked up under data.root first, then the working directory."""
    value = getattr(cfg.data, name)
    if not value:
        return None
    path = Path(value)
    if not path.is_absolute() and cfg.data.root and (Path(cfg.data.root) / path).exists():
        return str(Path(cfg.data.root) / path)
    return value


def _flip_label_map(cfg: Config) -> dict[int, int] | None:
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


def build_loader_from_config(cfg: Config, builder: LoaderBuilder, engine: Engine, *, train: bool,
                             num_clips: int = 1, num_crops: int = 1) -> Any:
    d = cfg.data
    options: dict[str, Any] = dict(
        backend=d.backend, device=d.device, num_frames=cfg.model.num_frames, sampling=d.sampling,
        stride=d.stride, batch_size=d.batch_size if train else (d.val_batch_size or d.batch_size),
        crop_size=d.crop_size, train=train, shard_id=engine.rank, num_shards=engine.size,
        seed=cfg.train.seed, num_threads=d.num_threads, num_clips=num_clips, num_crops=num_crops,
        flip=d.flip and train, flip_label_map=_flip_label_map(cfg) if train else None,
        skip_corrupt=d.skip_corrupt, num_classes=cfg.model.num_classes, short_videos=d.short_videos)
    if d.scale_size:
        options["scale_size"] = d.scale_size
    if engine.device.type == "cuda":
        options["device_id"] = engine.device.index
    if d.backend == "random":
        options["num_samples"] = d.num_samples
    file_list = _file_list(cfg, "train_list" if train else "val_list")
    return builder(file_list, d.root or None, **options)


def param_groups(model: nn.Module, weight_decay: float, no_bn_bias_decay: bool) -> list[dict[str, Any]]:
    """With ``no_bn_bias_decay``, BN scales/shifts and biases (the 1-D parameters) get no weight decay."""
    if not no_bn_bias_decay:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _wait(device: torch.device) -> None:
    """Wait for queued GPU work so a phase's time is really spent in that phase.

    Only the compute stream: DALI prefetches on its own streams and must keep running.
    """
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def evaluate_and_share(model: nn.Module, loader: Any, engine: Engine, amp_dtype: torch.dtype | None) -> dict[str, float]:
    # each rank kept its own BN statistics; evaluate (and save) rank 0's everywhere
    engine.broadcast_tensors({n: b for n, b in model.named_buffers()})
    return evaluate(model, loader, engine, amp_dtype=amp_dtype)


# ---------------------------------------------------------------------------------- the recipe
def train(cfg: Config, workdir: str | Path, *, resume: str | None = None,
          model_builder: ModelBuilder | None = None, loader_builder: LoaderBuilder | None = None) -> int:
    """Train on every rank of the launched job; returns the process exit code."""
    workdir = Path(workdir)
    engine = Engine(cfg.engine).init()  # 1. one process per GPU, pinned by local rank
    device = engine.device
    root = engine.is_root
    try:
        plan = plan_batch(cfg, engine.size)
        if cfg.data.device == "gpu" and device.type != "cuda":
            raise ConfigError("data.device=gpu needs a CUDA device; set data.device=cpu on this machine")
    except ConfigError as exc:
        if root:
            print(f"tsm-dist train: config error: {exc}", file=sys.stderr)
        engine.shutdown()
        return EXIT_CONFIG
    K = plan.accumulate

    # 2. sharded loaders: rank r reads shard r of size; every shard has the same number of batches
    loader_builder = loader_builder or default_loader_builder()
    train_loader = build_loader_from_config(cfg, loader_builder, engine, train=True)
    val_loader = (build_loader_from_config(cfg, loader_builder, engine, train=False)
                  if cfg.train.eval_every_epochs and (cfg.data.val_list or cfg.data.backend == "random") else None)
    steps_per_epoch = len(train_loader) // K
    if steps_per_epoch == 0:
        if root:
            print(f"tsm-dist train: config error: data.batch_size={plan.per_gpu_batch} x {engine.size} ranks x "
                  f"accumulate {K} = {plan.global_batch} clips per step does not fit the training set "
                  f"({len(train_loader)} batches per rank per epoch)", file=sys.stderr)
        engine.shutdown()
        return EXIT_CONFIG
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    schedule = LRSchedule.from_config(cfg.optim, global_batch=plan.global_batch,
                                      steps_per_epoch=steps_per_epoch, epochs=cfg.train.epochs)

    # 3. model, optimizer, AMP; the seed alone decides rank 0's initial weights
    _seed(cfg.train.seed)
    model = build_model_from_config(cfg, model_builder or default_model_builder()).to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=getattr(model, "memory_format", torch.channels_last))  # 2D or 3D
    optimizer = torch.optim.SGD(param_groups(model, cfg.optim.weight_decay, cfg.optim.no_bn_bias_decay),
                                lr=schedule(0), momentum=cfg.optim.momentum)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    criterion = nn.CrossEntropyLoss(ignore_index=-1)

    # 4. distributed optimizer: K backward passes, then one allreduce. Before loading a checkpoint:
    # Horovod's wrapper is a new optimizer over the same parameter groups, without their state
    train_model, optimizer = engine.distribute(model, optimizer, accumulate=K)

    # 5. resume on rank 0, then broadcast parameters, optimizer state and the loop position
    resume_path = ckpt.resolve_resume(resume, workdir) if root else None
    state = ckpt.load_checkpoint(resume_path) if resume_path else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    position = engine.broadcast_object(
        {key: state[key] for key in ("epoch", "step", "batch_in_epoch", "best_top1", "rng", "scaler", "world_size")}
        if state is not None else None)
    engine.broadcast_state(model, optimizer)
    _seed(cfg.train.seed * 1000003 + engine.rank)  # dropout and augmentation differ between ranks
    epoch, step, batch_in_epoch, best_top1 = 0, 0, 0, -math.inf
    if position is not None:
        epoch, step, batch_in_epoch, best_top1 = (position["epoch"], position["step"],
                                                  position["batch_in_epoch"], position["best_top1"])
        scaler.load_state_dict(position["scaler"])
        if position["world_size"] == engine.size:
            _set_rng_state(position["rng"][engine.rank])
        elif root:
            print(f"tsm-dist train: resuming a {position['world_size']}-rank checkpoint on {engine.size} ranks: "
                  "data order and random state differ from the original run", file=sys.stderr)

    log = wandb = progress = None
    if root:
        workdir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, workdir / "config.yaml")
        wandb = WandbRun(cfg.log.wandb, cfg.log.project, workdir, cfg.to_dict())
        log = JsonlWriter(workdir / "metrics.jsonl")
        log.write({"type": "header", "time": time.time(), "config": cfg.to_dict(), "git_commit": git_commit(),
                   "engine": engine.name, "world_size": engine.size, "local_size": engine.local_size,
                   "device": str(device), "model": cfg.model.name, "num_frames": cfg.model.num_frames,
                   "per_gpu_batch": plan.per_gpu_batch, "accumulate": K, "global_batch": plan.global_batch,
                   "steps_per_epoch": steps_per_epoch, "peak_lr": schedule.peak_lr,
                   "params": sum(p.numel() for p in model.parameters()),
                   "resumed_from": str(resume_path) if resume_path else None,
                   "versions": versions(), "hardware": hardware()})
        progress = Progress(total_steps, enabled=cfg.log.progress)

    def save(is_best: bool = False) -> None:
        # every rank contributes its random state; rank 0 writes
        rngs = engine.allgather_object(_rng_state())
        if root:
            ckpt.save_checkpoint(workdir / ckpt.CHECKPOINT_DIR, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch,
                "best_top1": best_top1, "rng": rngs, "config": cfg.to_dict(), "engine": engine.name,
                "world_size": engine.size, "global_batch": plan.global_batch, "accumulate": K},
                epoch=epoch, step=step, keep_last=cfg.train.keep_last, is_best=is_best)

    def finish(status: str, code: int) -> int:
        # videos skipped with data.skip_corrupt, from every shard: reported, never silently lost
        skipped = sorted({tuple(s) for shard in engine.allgather_object(
            [*getattr(train_loader, "skipped", []), *getattr(val_loader, "skipped", [])]) for s in shard})
        if root:
            if skipped:
                print(f"tsm-dist train: {len(skipped)} video(s) skipped as unreadable, e.g. "
                      f"{skipped[0][0]}: {skipped[0][1]} (all in {workdir / 'metrics.jsonl'})", file=sys.stderr)
            log.write({"type": "end", "time": time.time(), "status": status, "step": step, "epoch": epoch,
                       "skipped": [list(s) for s in skipped]})
            log.close()
            progress.close()
            wandb.finish(exit_code=code)
        engine.shutdown()
        return code

    # 6. the loop: one optimizer step = K micro-batches, one allreduce
    with PreemptionFlag() as preemption:
        while epoch < cfg.train.epochs and step < total_steps:
            train_loader.set_epoch(epoch, batch_in_epoch)  # same order as an uninterrupted run
            batches = iter(train_loader)
            train_model.train()
            for _ in range(batch_in_epoch // K, steps_per_epoch):
                if step >= total_steps:
                    break
                step_start = time.perf_counter()
                # GPU syncs split a step into data/compute/sync time; only steps that are logged pay them
                timed = (step + 1) % cfg.log.interval == 0 or step + 1 == total_steps
                lr = schedule(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad()  # set_to_none: Horovod's wrapper takes no arguments
                data_time = compute_time = 0.0
                loss_sum = torch.zeros((), device=device)
                for micro in range(K):
                    t = time.perf_counter()
                    clips, labels = next(batches)
                    clips, labels = clips.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                    if timed:
                        _wait(device)
                    data_time += time.perf_counter() - t
                    t = time.perf_counter()
                    with engine.no_sync(train_model, sync=micro == K - 1):
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                            # / K: the K passes add up to the gradient of one K-times larger batch
                            loss = criterion(train_model(clips), labels) / K
                        scaler.scale(loss).backward()
                    loss_sum += loss.detach()
                    if timed:
                        _wait(device)
                    compute_time += time.perf_counter() - t
                t = time.perf_counter()
                engine.synchronize(optimizer)  # gradients are now averaged over all ranks
                sync_time = time.perf_counter() - t
                t = time.perf_counter()
                scaler.unscale_(optimizer)  # clip the true, synchronized gradient
                if cfg.optim.clip_grad_norm:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
                engine.step(optimizer, scaler)
                scaler.update()
                if timed:
                    _wait(device)
                compute_time += time.perf_counter() - t
                step += 1
                batch_in_epoch += K

                # 7. one small allreduce: metrics averaged over ranks, plus the stop flags
                loss_value = loss_sum.float().cpu()
                stats = engine.allreduce_mean(torch.tensor([
                    loss_value.item(), data_time, compute_time, sync_time, time.perf_counter() - step_start,
                    float(not torch.isfinite(loss_value)), float(preemption.requested)], dtype=torch.float64))
                loss_mean, data_t, compute_t, sync_t, step_t, nonfinite, preempted = stats.tolist()
                if nonfinite > 0:
                    if root:
                        log.write({"type": "step", "epoch": round(step / steps_per_epoch, 4), "step": step,
                                   "loss": loss_mean, "lr": lr})
                        print(f"tsm-dist train: the loss is NaN or Inf at optimizer step {step} (epoch {epoch}) "
                              "on at least one rank; training stopped", file=sys.stderr)
                    return finish("failed", EXIT_NONFINITE)
                if root and (step % cfg.log.interval == 0 or step == total_steps):
                    clips_per_step = plan.per_gpu_batch * K
                    record = {"type": "step", "epoch": round(step / steps_per_epoch, 4), "step": step, "loss": loss_mean, "lr": lr,
                              "data_time": data_t, "compute_time": compute_t, "sync_time": sync_t,
                              "step_time": step_t, "clips_per_sec_rank": clips_per_step / step_t,
                              "clips_per_sec_total": clips_per_step * engine.size / step_t}
                    log.write(record)
                    wandb.log({k: v for k, v in record.items() if k != "type"}, step=step)
                    progress.update(step, epoch, loss=loss_mean, lr=lr, clips_s=record["clips_per_sec_total"])
                if preempted > 0:
                    if batch_in_epoch >= steps_per_epoch * K:
                        epoch, batch_in_epoch = epoch + 1, 0
                    save()
                    if root:
                        print(f"tsm-dist train: preempted; checkpoint at step {step}, exiting with "
                              f"{PREEMPTED_EXIT_CODE} so the job is requeued", file=sys.stderr)
                    return finish("preempted", PREEMPTED_EXIT_CODE)

            # 8. end of an epoch (or of max_steps): evaluate, then rank 0 checkpoints
            if batch_in_epoch >= steps_per_epoch * K:
                epoch, batch_in_epoch = epoch + 1, 0
            last = epoch >= cfg.train.epochs or step >= total_steps
            is_best = False
            if val_loader is not None and (epoch % cfg.train.eval_every_epochs == 0 or last):
                result = evaluate_and_share(model, val_loader, engine, amp_dtype)
                is_best = result["top1"] > best_top1
                best_top1 = max(best_top1, result["top1"])
                if root:
                    log.write({"type": "eval", "epoch": epoch, "step": step, **result})
                    wandb.log({f"val/{k}": v for k, v in result.items()}, step=step)
                train_model.train()
            if cfg.train.checkpoint_every_epochs and (epoch % cfg.train.checkpoint_every_epochs == 0 or last):
                save(is_best)
    return finish("completed", EXIT_OK)


# ------------------------------------------------------------------------------------ the CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsm-dist train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (see configs/ and docs/training.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (repeatable)")
    parser.add_argument("--workdir", help="run directory (default: runs/<config name>)")
    parser.add_argument("--resume", help="'auto' (newest checkpoint in the workdir, if any) or a checkpoint path")
    parser.add_argument("--accumulate", type=int, help="gradient accumulation steps (overrides train.accumulate)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.accumulate is not None:
        overrides.append(f"train.accumulate={args.accumulate}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        if is_launcher_rank0():  # every rank fails the same way; one message is enough
            print(f"tsm-dist train: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    workdir = args.workdir or str(Path("runs") / Path(args.config).stem)
    return train(cfg, workdir, resume=args.resume)


if __name__ == "__main__":
    raise SystemExit(main())

"""``tsm-dist eval``: top-1/top-5 of checkpoints, 1 clip center crop or K clips x 3 crops, on all ranks.

Each rank evaluates its shard; the counts (valid samples, correct@1, correct@5, summed loss) are added
with one allreduce, so padded samples (label -1, added to give every shard the same batch count) are
never counted. With several checkpoints (``--last-n N`` picks the newest N of a workdir) it reports each
and their mean +- standard deviation, as the paper does for its last 5 checkpoints.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from tsm_dist.state import checkpoint as ckpt
from tsm_dist.training.build import amp_dtype, build_loader_from_config, build_model_from_config, has_val_set
from tsm_dist.commands.check_data import check_file_lists
from tsm_dist.config import Config, ConfigError, load_config
from tsm_dist.commands.exit_codes import EXIT_CHECKPOINT, CheckpointError, CoordinatedError, run_main
from tsm_dist.training.accuracy import topk_counts

if TYPE_CHECKING:  # the engine (Horovod, torch.distributed) is imported only when a run starts
    from tsm_dist.distributed.engine import Engine


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, engine: "Engine", *,
             amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Accuracy (percent) and loss over the whole evaluation set, identical on every rank.

    Multi-view batches (N, V, T, 3, H, W) are scored by averaging the V views' softmax, and the loss
    is the negative log of that average (for V = 1 it is the usual cross-entropy). Non-finite logits
    (a diverged model) make the loss NaN: its accuracy means nothing.
    """
    device = engine.device
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64)  # valid, correct@1, correct@5, loss sum, non-finite logits
    for clips, labels in loader:
        clips, labels = clips.to(device, non_blocking=True), labels.to(device)
        views = clips.shape[1] if clips.dim() == 6 else 1
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(clips.flatten(0, 1) if views > 1 else clips)
        totals[4] += float((~torch.isfinite(logits.float())).sum())
        probs = F.softmax(logits.float(), dim=-1).view(labels.shape[0], views, -1).mean(1)
        scores = probs.clamp_min(1e-12).log()
        valid = labels >= 0
        totals[:3] += topk_counts(scores.cpu(), labels.cpu())
        if valid.any():
            totals[3] += float(F.nll_loss(scores[valid], labels[valid], reduction="sum"))
    n, top1, top5, loss, nonfinite = engine.allreduce_sum(totals).tolist()
    if nonfinite:
        loss = math.nan
    if n == 0:
        raise RuntimeError("the evaluation set is empty (no sample with a label >= 0)")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "num_samples": int(n)}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _checkpoints(checkpoints: list[str], workdir: str | None, last_n: int) -> tuple[list[Path], str]:
    """The checkpoints to evaluate, and a note when the workdir holds fewer than the ``last_n`` asked for."""
    paths, note = [Path(p) for p in checkpoints], ""
    if workdir:
        directory = Path(workdir) / ckpt.CHECKPOINT_DIR
        found = ckpt.list_checkpoints(directory)
        if not found:
            raise CheckpointError(f"no checkpoints in {directory}")
        if len(found) < last_n:  # the answer is smaller than the question: say so beside it
            note = f"{last_n} asked (--last-n / eval.last_n), {directory} holds {len(found)}"
        paths += found[-last_n:]
    if not paths:
        raise ConfigError("give --checkpoint PATH [PATH ...] or --workdir W (its last eval.last_n checkpoints)")
    return paths, note


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsm-dist eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the training config (model and data sections)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--checkpoint", nargs="+", help="checkpoint file(s) to evaluate")
    parser.add_argument("--workdir", help="evaluate the newest --last-n checkpoints of this run directory")
    parser.add_argument("--last-n", type=int, help="how many checkpoints of --workdir (default: eval.last_n)")
    parser.add_argument("--num-clips", type=int, help="clips per video (default: eval.num_clips)")
    parser.add_argument("--num-crops", type=int, choices=(1, 3), help="crops per clip (default: eval.num_crops)")
    parser.add_argument("--json", help="also write the results to this JSON file (rank 0)")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors (or TSM_DIST_DEBUG=1)")
    return parser


def evaluate_checkpoints(cfg: Config, paths: list[Path], engine: "Engine") -> list[dict[str, Any]]:
    """Each checkpoint's accuracy on the validation set (``cfg.eval`` views), identical on every rank."""
    loader = build_loader_from_config(cfg, engine, train=False, num_clips=cfg.eval.num_clips,
                                      num_crops=cfg.eval.num_crops)
    model = build_model_from_config(cfg).to(engine.device)
    results = []
    for path in paths:
        error = None
        if engine.is_root:
            try:  # the config decides the model: a checkpoint of another model is refused, naming both
                state = ckpt.load_checkpoint(path)
                ckpt.check_model(state, cfg.to_dict()["model"], path)
                ckpt.load_model_state(model, state, path)
            except CheckpointError as exc:
                error = str(exc)
        error = engine.broadcast_object(error)
        if error:
            raise CoordinatedError(error, EXIT_CHECKPOINT)
        engine.broadcast_tensors(model.state_dict())
        result = evaluate(model, loader, engine, amp_dtype=amp_dtype(cfg, engine.device))
        results.append({"checkpoint": str(path), **result})
    return results


def report(cfg: Config, results: list[dict[str, Any]], world_size: int, json_path: str | None,
           note: str = "") -> None:
    """Print one row per checkpoint and their mean +- std (``note``: fewer checkpoints than asked for);
    optionally write them as JSON."""
    views = f"{cfg.eval.num_clips} clip(s) x {cfg.eval.num_crops} crop(s)"
    print(f"{cfg.model.name}, {views}, {world_size} rank(s)")
    print(f"{'checkpoint':<40} {'top1':>7} {'top5':>7} {'loss':>8} {'samples':>8}")
    for r in results:
        print(f"{Path(r['checkpoint']).name:<40} {r['top1']:7.2f} {r['top5']:7.2f} {r['loss']:8.4f} "
              f"{r['num_samples']:8d}")
    summary = {k: mean_std([r[k] for r in results]) for k in ("top1", "top5")}
    print(f"{'mean +- std over ' + str(len(results)):<40} "
          + " ".join(f"{m:.2f}+-{s:.2f}" for m, s in summary.values()) + (f"  (only {len(results)}: {note})"
                                                                        if note else ""))
    if json_path:
        Path(json_path).write_text(json.dumps({
            "model": cfg.model.name, "num_clips": cfg.eval.num_clips, "num_crops": cfg.eval.num_crops,
            "world_size": world_size, "checkpoints": results, "fewer_than_asked": note or None,
            "top1_mean": summary["top1"][0], "top1_std": summary["top1"][1],
            "top5_mean": summary["top5"][0], "top5_std": summary["top5"][1]}, indent=2))


def main(argv: list[str] | None = None) -> int:
    """``tsm-dist eval``; errors become one line from one rank and a documented code (:mod:`tsm_dist.commands.exit_codes`)."""
    return run_main("tsm-dist eval", _main, argv)


def _main(argv: list[str]) -> int:
    from tsm_dist.distributed.engine import started

    args = build_parser().parse_args(argv)
    flags = {key: flag for flag, key in ((args.num_clips, "eval.num_clips"), (args.num_crops, "eval.num_crops"),
                                         (args.last_n, "eval.last_n")) if flag is not None}
    cfg = load_config(args.config, args.overrides, flags)
    paths, note = _checkpoints(args.checkpoint or [], args.workdir, cfg.eval.last_n)
    if not has_val_set(cfg):
        raise ConfigError("data.val_list is not set")
    check_file_lists(cfg, keys=("val_list",))
    with started(cfg.engine) as engine:
        results = evaluate_checkpoints(cfg, paths, engine)
        if engine.is_root:
            report(cfg, results, engine.size, args.json, note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

r"""The I/O study (paper, Fig. 9b and Table 10): does data loading hide under compute, per model and loader?

On one node, trains each model for a few timed steps with each video loader (DALI, PyAV) and reads the
trainer's per-step records: ``data_time`` is the time a step waited for its batch, i.e. I/O *not hidden*
by compute, next to ``compute_time``. With the models' compute/IO ratio (multiply-accumulates per clip /
input values per clip, Table 10) it shows why TSM8f (8 frames) hides its I/O where I3D (16, 32) cannot:

    tsm-dist io-study --config configs/tsm8f_r50_kinetics400.yaml \
        --models tsm8f_r50,i3d3x3x3_r50,i3d3x1x1_r50 --loaders dali,pyav --ranks 6 --out runs/io

``--packed DIR`` (or ``auto``: pack the config's training list into OUT/packed) adds the packed layout
(``tsm-dist pack``) to every run, and a table of what one rank's loader does per epoch with each layout on
a list of ``--io-entries`` lines (the training list repeated): start-up, plan + read time, files opened,
bytes read, videos probed. ``--feed thread,inline`` runs each configuration with batches planned and
read on the loader's feeder thread (the default) and on the training thread (``data.feed_thread=false``,
the former behaviour), to show ``data_time`` before/after.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tsm_dist.commands.arguments import choice_list, name_list
from tsm_dist.runlog.records import METRICS_FILE, MetricsError
from tsm_dist.state.identity import START_OVER_FLAG, run_files
from tsm_dist.studies.scaling.collect import RunSummary, summarize_run
from tsm_dist.studies.runconfig import measurement_overrides, model_config_item, write_run_config
from tsm_dist.studies.runner import LAUNCHERS, launch_prefix, run_logged, tail
from tsm_dist.studies.tables import pyplot, write_csv

if TYPE_CHECKING:
    from tsm_dist.config import Config

LOADERS = ("dali", "pyav")
FEEDS = ("thread", "inline")


@dataclass
class IORow:
    model: str
    loader: str
    num_frames: int
    crop_size: int
    ranks: int
    per_gpu_batch: int
    status: str
    layout: str = "list"
    feed: str = "thread"
    macs_per_clip: float = math.nan
    input_values_per_clip: int = 0
    compute_per_io: float = math.nan  # MACs per input value (Table 10's "Compute/IO")
    params: int = 0
    data_time_s: float = math.nan  # per batch: waiting for data, not hidden by compute
    compute_time_s: float = math.nan
    sync_time_s: float = math.nan
    step_time_s: float = math.nan
    clips_per_sec: float = math.nan

    @property
    def io_hidden(self) -> bool:
        return self.data_time_s < 0.05 * self.step_time_s


def count_macs(cfg: "Config") -> float:
    """Multiply-accumulates of one clip's forward pass at the run's input size (the models' profiler)."""
    from tsm_dist.models.profiler import model_stats

    m = cfg.model
    return float(model_stats(m.name, num_classes=m.num_classes, size=cfg.data.crop_size, num_frames=m.num_frames,
                             depth=m.depth, width=m.width).macs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsm-dist io-study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="base training config on real videos")
    parser.add_argument("--models", type=name_list,
                        help="comma list (default: the config's model.name)")
    parser.add_argument("--model-config", action="append", default=[], type=model_config_item,
                        metavar="MODEL=CONFIG",
                        help="base config for one model instead of --config; repeatable")
    parser.add_argument("--loaders", type=choice_list(LOADERS), default=list(LOADERS),
                        help="comma list of dali, pyav (default both)")
    parser.add_argument("--ranks", type=int, default=1, help="ranks (GPUs) of the single node (default 1)")
    parser.add_argument("--per-gpu-batch", type=int, help="default: the config's data.batch_size")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--packed", metavar="DIR",
                        help="packed training set (tsm-dist pack) to compare with the list, or 'auto' to pack it")
    parser.add_argument("--feed", type=choice_list(FEEDS), default=["thread"],
                        help="comma list of thread (feeder thread, default), inline (on the training thread)")
    parser.add_argument("--io-entries", type=int, default=10240,
                        help="with --packed: lines of the list for the loader I/O table (default 10240)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="mpirun")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dry-run", action="store_true", help="write the configs and print the commands")
    return parser


@dataclass
class StudyOptions:
    """What the study runs (the command line, checked); ``packed`` is resolved by :func:`prepare_packed`."""

    config: Path
    out: Path
    models: list[str] | None = None
    model_configs: dict[str, Path] = field(default_factory=dict)
    loaders: list[str] = field(default_factory=lambda: list(LOADERS))
    ranks: int = 1
    per_gpu_batch: int | None = None
    steps: int = 20
    warmup_steps: int = 5
    overrides: list[str] = field(default_factory=list)
    packed: str | None = None
    feed: list[str] = field(default_factory=lambda: ["thread"])
    io_entries: int = 10240
    launcher: str = "mpirun"
    timeout: float = 1800.0
    dry_run: bool = False


def parse_args(argv: list[str] | None) -> StudyOptions:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ranks < 1 or args.steps < 1 or args.warmup_steps < 0:
        parser.error("--ranks and --steps must be >= 1, --warmup-steps >= 0")
    args.model_configs = dict(args.model_config)
    return StudyOptions(**{f.name: getattr(args, f.name) for f in fields(StudyOptions)})


def _row(cfg: "Config", loader: str, ranks: int, summary: RunSummary | None, status: str, macs: float,
         layout: str = "list", feed: str = "thread") -> IORow:
    values = cfg.model.num_frames * 3 * cfg.data.crop_size ** 2
    row = IORow(model=cfg.model.name, loader=loader, num_frames=cfg.model.num_frames,
                crop_size=cfg.data.crop_size, ranks=ranks, per_gpu_batch=cfg.data.batch_size, status=status,
                layout=layout, feed=feed, macs_per_clip=macs, input_values_per_clip=values,
                compute_per_io=macs / values)
    if summary is not None:
        row.params = summary.params
        row.data_time_s, row.compute_time_s = summary.data_time_s, summary.compute_time_s
        row.sync_time_s, row.step_time_s = summary.sync_time_s, summary.step_time_s
        row.clips_per_sec = summary.clips_per_sec
    return row


def _variants(opts: StudyOptions) -> list[tuple[str, str, str, list[str]]]:
    """(loader, layout, feed, overrides) of every run of one model."""
    layouts = [("list", [])] + ([("packed", [f"data.train_list={opts.packed}"])] if opts.packed else [])
    return [(loader, layout, feed, [f"data.backend={loader}", *layout_set, f"data.feed_thread={feed == 'thread'}"])
            for loader in opts.loaders for layout, layout_set in layouts for feed in opts.feed]


def run_study(opts: StudyOptions) -> list[IORow]:
    from tsm_dist.config import load_config

    out: Path = opts.out.resolve()
    models = opts.models or [load_config(opts.config, opts.overrides).model.name]
    rows = []
    for model in models:
        base = opts.model_configs.get(model, opts.config)
        macs = math.nan
        for loader, layout, feed, variant in _variants(opts):
            tag = f"{model}_{loader}" + ("" if (layout, feed) == ("list", "thread") else f"_{layout}_{feed}")
            overrides = [*opts.overrides, *variant,
                         *([f"data.batch_size={opts.per_gpu_batch}"] if opts.per_gpu_batch else []),
                         *measurement_overrides(opts.warmup_steps + opts.steps)]
            config_path = out / "jobs" / tag / "config.yaml"
            cfg = write_run_config(base, model, overrides, config_path)
            if math.isnan(macs):
                macs = count_macs(cfg)  # same model and input for every loader
            workdir = out / "runs" / tag
            # a fresh measurement: an earlier study's run of this tag moves to previous/, not appended to
            again = [START_OVER_FLAG] if run_files(workdir) else []
            command = launch_prefix(opts.launcher, opts.ranks) + [
                sys.executable, "-m", "tsm_dist.training.train", "--config", str(config_path), "--workdir", str(workdir),
                *again]
            if opts.dry_run:
                print("$ " + shlex.join(command))
                continue
            error = run_logged(command, opts.ranks, workdir / "train.log", opts.timeout)
            summary = None
            if error:
                print(f"[{tag}] {error}; last lines of its log:\n{tail(workdir / 'train.log')}", file=sys.stderr)
            else:
                try:
                    summary = summarize_run(workdir / METRICS_FILE, opts.warmup_steps)
                except MetricsError as err:
                    error = f"unusable metrics: {err}"
            rows.append(_row(cfg, loader, opts.ranks, summary, error or "completed", macs, layout, feed))
            print(f"[{tag}] {rows[-1].status}", flush=True)
    return rows


def _pack(list_path: str, root: str | None, out: Path, shard_mb: float = 1024) -> str:
    from tsm_dist.data.pack.write import main as pack_main

    argv = ["--list", list_path, "--out", str(out), "--shard-mb", f"{shard_mb:g}", "--no-progress"]
    if pack_main(argv + (["--root", root] if root else [])) != 0:
        raise ValueError(f"packing {list_path} into {out} failed")
    return str(out)


def prepare_packed(opts: StudyOptions) -> str:
    """The packed directory to compare with; ``--packed auto`` packs the config's training list into
    OUT/packed (resumed if interrupted)."""
    from tsm_dist.training.build import resolve_list
    from tsm_dist.config import load_config

    packed = str(opts.packed)
    if packed == "auto" and opts.dry_run:
        packed = str(opts.out.resolve() / "packed")
    elif packed == "auto":
        cfg = load_config(opts.config, opts.overrides)
        packed = _pack(resolve_list(cfg, "train_list"), cfg.data.root or None, opts.out.resolve() / "packed")
    return str(Path(packed).resolve())


def loader_io(opts: StudyOptions) -> list:
    """Rank 0 of ``--ranks``: one epoch's start-up, plan + read time, opens, bytes, probes, per layout, on
    the training list repeated to ``--io-entries`` lines and the same list packed."""
    from tsm_dist.training.build import resolve_list
    from tsm_dist.config import load_config
    from tsm_dist.data.pack.format import read_meta
    from tsm_dist.studies.data_io.pack_io import io_pass, repeat_list

    cfg = load_config(opts.config, opts.overrides)
    d = cfg.data
    long_list = str(opts.out.resolve() / f"io_list_{opts.io_entries}.txt")
    entries = repeat_list(resolve_list(cfg, "train_list"), d.root or None, long_list, opts.io_entries)
    shard_mb = read_meta(opts.packed)["settings"]["shard_mb"]
    long_pack = _pack(long_list, None, Path(long_list + ".pack"), shard_mb)
    options = dict(num_frames=cfg.model.num_frames, sampling=d.sampling, stride=d.stride,
                   batch_size=opts.per_gpu_batch or d.batch_size, crop_size=d.crop_size, train=True,
                   num_classes=cfg.model.num_classes, short_videos=d.short_videos)
    return [io_pass(source, None, backend=loader, ranks=opts.ranks, entries=entries, **options)
            for loader in opts.loaders for source in (long_list, long_pack)]


def _fmt(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def markdown(rows: list[IORow], opts: StudyOptions) -> str:
    lines = [f"# I/O study: one node, {opts.ranks} rank(s), {opts.steps} timed steps after {opts.warmup_steps} "
             f"warm-up", "",
             "| Model | Loader | Layout | Feed | Frames | Input size | MACs/clip (G) | Params (M) | Compute/IO | "
             "I/O not hidden (s/batch) | Compute (s/batch) | Sync (s/batch) | Batch time (s) | Clips/s | I/O hidden |",
             "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        hidden = "-" if math.isnan(r.step_time_s) else ("yes" if r.io_hidden else "no")
        params = f"{r.params / 1e6:.2f}" if r.params else "-"
        status = "" if r.status == "completed" else f" ({r.status})"
        lines.append(f"| {r.model} | {r.loader}{status} | {r.layout} | {r.feed} | {r.num_frames} | {r.num_frames}x{r.crop_size}² | "
                     f"{_fmt(r.macs_per_clip / 1e9, '.3g')} | {params} | {_fmt(r.compute_per_io / 1e3, '.2f')}k | "
                     f"{_fmt(r.data_time_s, '.4f')} | {_fmt(r.compute_time_s, '.4f')} | {_fmt(r.sync_time_s, '.4f')} | "
                     f"{_fmt(r.step_time_s, '.4f')} | {_fmt(r.clips_per_sec, '.1f')} | {hidden} |")
    lines += ["", "I/O not hidden = the trainer's data_time: time a step waited for its batch after the loader's "
              "prefetching; 'I/O hidden' = under 5% of the batch time. Compute/IO = MACs per clip / input values "
              "per clip (frames x 3 x crop²), from the models' profiler (torch.utils.flop_counter, FLOPs / 2)."]
    return "\n".join(lines) + "\n"


def plot(rows: list[IORow], path: Path) -> None:
    """Fig. 9b: per model and loader, batch time split into compute and I/O not hidden."""
    plt = pyplot()
    done = [r for r in rows if not math.isnan(r.step_time_s)]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(done) + 2), 4.5))
    labels = [f"{r.model}\n{r.loader}" + ("" if (r.layout, r.feed) == ("list", "thread") else f"\n{r.layout} {r.feed}")
              for r in done]
    compute = [r.compute_time_s + r.sync_time_s for r in done]
    io = [r.data_time_s for r in done]
    ax.bar(labels, compute, color="tab:blue", label="Compute time")
    ax.bar(labels, io, bottom=compute, color="tab:orange", label="I/O time (not hidden)")
    ax.set_ylabel("Batch training time (s)")
    ax.set_title("Data loading vs compute per batch (one node)")
    ax.legend()
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    opts.out.mkdir(parents=True, exist_ok=True)
    try:
        if opts.packed:
            opts = replace(opts, packed=prepare_packed(opts))
        rows = run_study(opts)
        io_rows = loader_io(opts) if opts.packed and not opts.dry_run else []
    except (ValueError, FileNotFoundError) as err:  # a config error (ConfigError) names the key and file
        print(f"io_study: error: {err}", file=sys.stderr)
        return 2
    if opts.dry_run:
        return 0
    out = opts.out
    write_csv(rows, IORow, out / "io_study.csv")
    text = markdown(rows, opts)
    if io_rows:
        from tsm_dist.studies.data_io.pack_io import markdown as io_markdown

        text += (f"\n## Loader I/O per rank and epoch: file list vs packed\n\nRank 0 of {opts.ranks}, the training "
                 f"list repeated to {io_rows[0].entries} entries, one epoch planned and read without decoding "
                 f"(counted by the loader's byte reader and probe counter):\n\n" + io_markdown(io_rows))
    (out / "io_study.md").write_text(text)
    plot(rows, out / "io_study.png")
    print((out / "io_study.md").read_text())
    print(f"wrote {out / 'io_study.csv'}, {out / 'io_study.png'}")
    return 0 if all(r.status == "completed" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

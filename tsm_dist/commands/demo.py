"""``tsm-dist demo``: TSM against TSN on the synthetic temporal-order set, 2 local Horovod ranks on CPU.

Makes the synthetic set if it is missing, trains the small TSM and the matching TSN of
configs/synthetic_tsm.yaml and configs/synthetic_tsn.yaml with ``horovodrun -np 2 --gloo``, evaluates
the last checkpoints of both on 2 ranks, prints a table and writes ``demo.png`` (validation accuracy
and training loss). The classes differ only in frame order, so TSM should reach ~100 % while TSN
stays near chance (25 %). ``--quick`` runs a reduced version (tiny set, 2 epochs) for CI.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tsm_dist import package_files
from tsm_dist.training.evaluate import mean_std
from tsm_dist.commands.processes import find_tool, run_session
from tsm_dist.runlog.records import METRICS_FILE, read_last_run
from tsm_dist.studies.tables import pyplot

MODELS = (("TSM", "synthetic_tsm.yaml"), ("TSN", "synthetic_tsn.yaml"))
FULL = {"videos_per_class": 80, "frames": 32, "size": 64, "crop": 56, "epochs": 15}
QUICK = {"videos_per_class": 10, "frames": 16, "size": 32, "crop": 28, "epochs": 2}


def configs_dir() -> Path:
    found = package_files.CONFIGS
    if not (found / MODELS[0][1]).is_file():
        raise FileNotFoundError(f"the demo's configs are missing: expected {found / MODELS[0][1]}")
    return found


def _run(cmd: list[str], timeout: float, log_file: Path) -> None:
    """Run one multi-rank job; its output goes to the terminal and to ``log_file``."""
    print("$ " + " ".join(cmd), flush=True)

    with log_file.open("w") as log:
        def copy(line: str) -> None:
            log.write(line)
            sys.stdout.write("  " + line)
            sys.stdout.flush()

        try:  # horovodrun and the ranks it started end together on a timeout
            code = run_session(cmd, timeout=timeout, on_line=copy)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"timed out after {timeout:.0f}s: {' '.join(cmd)} (log: {log_file})") from None
    if code != 0:
        raise RuntimeError(f"exit code {code}: {' '.join(cmd)} (log: {log_file})")


def plot(curves: dict[str, dict[str, list[tuple[float, float]]]], path: Path) -> None:
    plt = pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for name, curve in curves.items():
        acc_ax.plot(*zip(*curve["top1"]), marker="o", label=name)
        loss_ax.plot(*zip(*curve["loss"]), label=name)
    acc_ax.axhline(25.0, color="gray", linestyle="--", label="chance")
    acc_ax.set(xlabel="epoch", ylabel="validation top-1 (%)", title="accuracy", ylim=(0, 102))
    loss_ax.set(xlabel="optimizer step", ylabel="training loss", title="loss", yscale="log")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("TSM vs TSN on the synthetic temporal-order set (2 Horovod ranks, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tsm-dist demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    parser.add_argument("--data", help="synthetic set directory, made if missing "
                                       "(default: data/synthetic, or data/synthetic_quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="reduced size for CI: tiny set, 2 epochs")
    parser.add_argument("--epochs", type=int, help="override the number of epochs")
    parser.add_argument("--np", type=int, default=2, help="local Horovod ranks (default 2)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per launched job")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    epochs = args.epochs or size["epochs"]
    out = Path(args.out)
    data = Path(args.data or ("data/synthetic_quick" if args.quick else "data/synthetic"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        configs = configs_dir()
        horovodrun = find_tool("horovodrun")
    except FileNotFoundError as exc:
        print(f"tsm-dist demo: {exc}", file=sys.stderr)
        return 1

    if not (data / "train.txt").is_file():
        from tsm_dist.data.synthetic import make_synthetic

        print(f"making the synthetic set in {data} ...", flush=True)
        made = make_synthetic(str(data), videos_per_class=size["videos_per_class"], frames=size["frames"],
                              size=size["size"])
        print(f"  {made.num_train} training and {made.num_val} validation videos", flush=True)

    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    launch = [horovodrun, "-np", str(args.np), "-H", f"localhost:{args.np}", "--gloo", sys.executable, "-m"]
    for name, config_file in MODELS:
        workdir = out / name.lower()
        if workdir.exists():
            shutil.rmtree(workdir)  # a demo always starts from scratch
        workdir.mkdir(parents=True)
        settings = [f"data.root={data.resolve()}", f"train.epochs={epochs}", f"data.crop_size={size['crop']}",
                    f"data.scale_size={size['size']}"]
        sets = [arg for s in settings for arg in ("--set", s)]
        config = str(configs / config_file)
        t0 = time.perf_counter()
        try:
            _run([*launch, "tsm_dist.training.train", "--config", config, "--workdir", str(workdir), *sets],
                 args.timeout, workdir / "train.log")
            train_s = time.perf_counter() - t0
            _run([*launch, "tsm_dist.training.evaluate", "--config", config, "--workdir", str(workdir),
                  "--json", str(workdir / "eval.json"), *sets], args.timeout, workdir / "eval.log")
        except RuntimeError as exc:
            print(f"tsm-dist demo: {name} failed: {exc}", file=sys.stderr)
            return 1
        run = read_last_run(workdir / METRICS_FILE)
        steps, evals = run.steps, run.evals
        result = json.loads((workdir / "eval.json").read_text())
        rows.append({"model": name, "top1": (result["top1_mean"], result["top1_std"]),
                     "top5": (result["top5_mean"], result["top5_std"]), "checkpoints": len(result["checkpoints"]),
                     "train_s": train_s, "clips_s": mean_std([r["clips_per_sec_total"] for r in steps])[0]})
        curves[name] = {"top1": [(r["epoch"], r["top1"]) for r in evals],
                        "loss": [(r["step"], r["loss"]) for r in steps]}

    plot(curves, out / "demo.png")
    print(f"\n{'model':<6} {'top-1 (%)':>14} {'top-5 (%)':>14} {'train time':>11} {'clips/s':>8}")
    for r in rows:
        print(f"{r['model']:<6} {r['top1'][0]:8.1f} +-{r['top1'][1]:4.1f} {r['top5'][0]:8.1f} +-{r['top5'][1]:4.1f} "
              f"{r['train_s']:10.0f}s {r['clips_s']:8.1f}")
    print(f"(mean +- std over the last {rows[0]['checkpoints']} checkpoints, {args.np} Horovod ranks, "
          f"{epochs} epochs; chance is 25 %)")
    print(f"plot: {out / 'demo.png'}   total time: {time.perf_counter() - started:.0f}s")
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    print(next_steps(out / MODELS[0][0].lower(), configs / MODELS[0][1], sets))
    return 0


def next_steps(workdir: Path, config: Path, sets: list[str]) -> str:
    """What to run after the demo, as commands that work from where the demo ran."""
    tool = _here(Path(sys.executable).parent / "tsm-dist")
    rows = [("evaluate TSM, 10 clips x 3 crops", f"{tool} eval --config {_here(config)} --workdir {workdir} "
             f"--num-clips 10 --num-crops 3 {' '.join(sets)}"),
            ("model statistics (Tables 10/11)", f"{tool} profile --models tsm8f_r50,i3d3x3x3_r50,i3d3x1x1_r50"),
            ("deploy: online TSM, stream", "docs/deploy.md (train with model.online=true, export, stream)"),
            ("batch-size study (Table 12)", f"{tool} batch-study --quick (the full study: docs/studies.md, "
                                            "\"The batch-size study\")")]
    width = max(len(name) for name, _ in rows)
    return "\nnext:\n" + "\n".join(f"  {name + ':':<{width + 1}} {what}" for name, what in rows)


def _here(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter to copy), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    raise SystemExit(main())

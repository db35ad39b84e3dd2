"""Elastic training's costs, to choose ``engine.commit_every`` by (docs/training.md, "Elastic training").

    python benchmarks/bench_elastic.py commit      # ms per commit's copy: the demo's network and TSM8f-R50
    python benchmarks/bench_elastic.py recovery    # 3 ranks of the demo's network, one SIGKILLed: death -> training

``commit`` times what every rank copies at a commit (:func:`tsm_dist.training.elastic.capture`: parameters,
buffers, the optimizer's momentum, GradScaler, RNG), the two models interleaved, wall and CPU time; the rest of
a commit is Horovod's check for added hosts, one broadcast of a small object, which the ``recovery`` run's
own line ("N commits, median X ms each") includes. ``recovery`` starts ``horovodrun --min-np 2 --max-np 3`` with
a discovery script naming this machine three ways (one slot each: Horovod blacklists a failed worker's
host), kills rank 2 after step 6, and reads the times from ``metrics.jsonl``: the membership record (the
survivors back in training, fitted to 2 ranks) and the first step after it. ``--gloo-timeout S`` sets
``HOROVOD_GLOO_TIMEOUT_SECONDS`` (Horovod's default 30 s): a rank blocked in a receive from the dead one
learns of the death only when it times out.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
HOSTS = ["localhost", "127.0.0.1", socket.gethostname()]


def _demo_config(*overrides: str) -> Any:
    from tsm_dist.config import load_config

    return load_config(REPO / "configs" / "synthetic_tsm.yaml", [
        "data.backend=procedural", "data.num_samples=480", "data.num_val_samples=0", "data.batch_size=4",
        "train.eval_every_epochs=0",
        "train.global_batch=24", "train.epochs=2", "log.interval=1", "log.wandb=disabled", "log.progress=false",
        "engine.elastic=true", "engine.elastic_min_ranks=2", "engine.elastic_max_ranks=3", "engine.commit_every=5",
        *overrides])


def _copy_setup(cfg: Any) -> tuple[Any, ...]:
    from tsm_dist.state.train_state import Position
    from tsm_dist.training.batch_plan import BatchPlan
    from tsm_dist.training.build import build_model_from_config
    from tsm_dist.training.memory_format import to_memory_format
    from tsm_dist.training.optim import build_optimizer

    model, _ = to_memory_format(build_model_from_config(cfg), True)
    optimizer = build_optimizer(model, cfg.optim, lr=0.01)
    for p in model.parameters():  # one step: the momentum buffers a commit copies exist
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, optimizer, scaler, Position(), BatchPlan(8, 1, 1)


def commit_main(rounds: int) -> None:
    from tsm_dist.training.elastic import capture

    sizes = {"demo (synthetic_tsm.yaml)": _demo_config(), "TSM8f-R50 (Kinetics-400)": _demo_config(
        "model.depth=50", "model.width=64", "model.num_classes=400", "model.dropout=0.5")}
    setups = {name: _copy_setup(cfg) for name, cfg in sizes.items()}
    wall: dict[str, list[float]] = {name: [] for name in setups}
    cpu: dict[str, list[float]] = {name: [] for name in setups}
    for r in range(rounds):
        for name in (list(setups) if r % 2 == 0 else list(reversed(setups))):
            model, optimizer, scaler, pos, plan = setups[name]
            w, c = time.perf_counter(), time.process_time()
            capture(model, optimizer, scaler, pos, plan, world=1, started=True)
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    print(f"torch threads {torch.get_num_threads()}; load {os.getloadavg()[0]:.1f} before the summary")
    for name, (model, optimizer, *_rest) in setups.items():
        params = sum(p.numel() for p in model.parameters())
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                    if torch.is_tensor(t))
        copied = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + state
        print(f"{name}: {params / 1e6:.2f} M parameters, {copied / 2**20:.1f} MiB copied per commit; "
              f"wall median {1e3 * statistics.median(wall[name]):.1f} ms (min {1e3 * min(wall[name]):.1f}), "
              f"CPU median {1e3 * statistics.median(cpu[name]):.1f} ms (n={rounds})")


# --------------------------------------------------------------------------------------- recovery
def rank_main(workdir: Path) -> None:
    from tsm_dist.training.build import default_loader_builder
    from tsm_dist.training.train import train

    inner = default_loader_builder()

    def loader_builder(*args: Any, shard_id: int, train: bool, **kwargs: Any) -> Any:
        if train:  # which process is which rank now, for the kill
            (workdir / f"rank{shard_id}.pid").write_text(str(os.getpid()))
        return inner(*args, shard_id=shard_id, train=train, **kwargs)

    train(_demo_config(), workdir / "run", loader_builder=loader_builder)


def recovery_main(out: Path, gloo_timeout: int, kill_after: int) -> None:
    from tsm_dist.runlog.records import read_records

    out.mkdir(parents=True, exist_ok=False)
    (out / "hosts.txt").write_text("".join(f"{h}:1\n" for h in HOSTS))
    script = out / "discover.sh"
    script.write_text(f"#!/bin/sh\ncat {out / 'hosts.txt'}\n")
    script.chmod(0o755)
    venv = Path(sys.executable).parent
    env = dict(os.environ, HOROVOD_GLOO_IFACE="lo", OMP_NUM_THREADS="1", HOROVOD_GLOO_TIMEOUT_SECONDS=str(gloo_timeout),
               PATH=f"{venv}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [str(venv / "horovodrun"), "-np", "3", "--min-np", "2", "--max-np", "3", "--host-discovery-script",
           str(script), "--network-interface", "lo", sys.executable, __file__, "rank", str(out)]
    metrics = out / "run" / "metrics.jsonl"
    with (out / "log.txt").open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while not any(r["type"] == "step" and r["step"] >= kill_after for r in _records(metrics, read_records)):
            if proc.poll() is not None:
                raise SystemExit(f"the job ended before step {kill_after}: {out / 'log.txt'}")
            time.sleep(0.05)
        killed = time.time()
        os.kill(int((out / "rank2.pid").read_text()), signal.SIGKILL)
        code = proc.wait(timeout=1800)
    records = read_records(metrics)
    change = next(r for r in records if r["type"] == "membership")
    after = next(r for r in records[records.index(change):] if r["type"] == "step")
    steps = [r for r in records if r["type"] == "step" and "step_time" in r]
    print(f"exit {code}; HOROVOD_GLOO_TIMEOUT_SECONDS={gloo_timeout}; load {os.getloadavg()[0]:.1f} at the end")
    print(f"killed rank 2 after step {kill_after}; rolled back to step {change['rolled_back_to']['step']}, "
          f"{change['steps_lost']} step(s) lost")
    print(f"death -> survivors fitted to 2 ranks: {change['time'] - killed:.1f} s; death -> first step trained: "
          f"{after['time'] - killed:.1f} s (a step takes {statistics.median(s['step_time'] for s in steps):.2f} s)")
    for line in (out / "log.txt").read_text().splitlines():
        if "elastic:" in line:
            print(line)


def _records(path: Path, read: Any) -> list[dict[str, Any]]:
    try:
        return read(path)
    except Exception:  # not written yet, or a line being written
        return []


def main() -> None:
    if sys.argv[1:2] == ["rank"]:
        rank_main(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("commit", "recovery"))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_elastic")
    parser.add_argument("--gloo-timeout", type=int, default=30)
    parser.add_argument("--kill-after", type=int, default=6)
    args = parser.parse_args()
    if args.what == "commit":
        commit_main(args.rounds)
    else:
        recovery_main(args.out / f"gloo{args.gloo_timeout}_{int(time.time())}", args.gloo_timeout, args.kill_after)


if __name__ == "__main__":
    main()

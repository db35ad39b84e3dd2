"""Elastic training with real horovodrun + Gloo on this machine (engine.elastic; tsm_dist/training/elastic.py).

1. 3 ranks, one SIGKILLed mid-run: the survivors roll back to the last commit and finish on 2.
2. 2 ranks, the discovery script adds a third host: it joins at the next commit.

In both, the kept step records cover every clip of every epoch exactly once (their recorded positions), and
the final parameters equal those of an uninterrupted run that followed the same world-size schedule: a
non-elastic run on the first world size stopped at the commit the change came at, resumed on the second.

Horovod blacklists a host whose worker failed, with every worker on it: one "localhost:3" would lose all
three ranks. The discovery script therefore names this machine three ways (localhost, 127.0.0.1 and its
host name: horovodrun starts a worker without ssh when the name resolves to a local address), one slot each.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import PYTHON, VENV_BIN, launcher_env, run_bounded  # noqa: E402
from tsm_dist.runlog.records import read_last_run, read_records  # noqa: E402
from tiny_run import TensorLoader, TinyNet, config  # noqa: E402

pytestmark = pytest.mark.multirank

SAMPLES, BATCH, GLOBAL, EPOCHS = 36, 2, 12, 6  # 3 steps per epoch on 2 or 3 ranks (K = 3 or 2)
HOSTS = ["localhost", "127.0.0.1", socket.gethostname()]


class SlowLoader(TensorLoader):
    """A step takes long enough for the test to act between steps."""

    def __iter__(self):
        for batch in super().__iter__():
            time.sleep(0.15)
            yield batch


def _overrides(elastic: bool, max_steps: int = 0) -> dict[str, Any]:
    values: dict[str, Any] = {"data.num_samples": SAMPLES, "data.batch_size": BATCH, "train.global_batch": GLOBAL,
                              "train.epochs": EPOCHS, "train.max_steps": max_steps,
                              "train.checkpoint_every_epochs": 1, "optim.warmup_epochs": 1,
                              # no tensor fusion: Gloo's ring splits a fused buffer into one chunk per rank, and
                              # which rank starts an element's sum depends on what was fused with it (timing);
                              # with 3 ranks that changes the last bit (a + b is b + a; (a + b) + c is not)
                              "engine.fusion_threshold_mb": 1e-6}
    if elastic:
        values.update({"engine.elastic": True, "engine.elastic_min_ranks": 2, "engine.elastic_max_ranks": 3,
                       "engine.commit_every": 2})
    return values


def rank_main(out: Path, mode: str, max_steps: int, resume: str) -> None:
    from tsm_dist.training.train import train

    built: list[Any] = []

    def model_builder(name: str, *, num_classes: int, num_frames: int, dropout: float, **_: Any) -> Any:
        built.append(TinyNet(num_classes, num_frames, dropout))
        return built[-1]

    def loader_builder(file_list: Any, root: Any, *, batch_size: int, shard_id: int, num_shards: int, seed: int,
                       train: bool, num_samples: int, **_: Any) -> TensorLoader:
        if train:  # the rank this process has now (a change renumbers the ranks)
            (out / "pids" / f"rank{shard_id}.pid").write_text(str(os.getpid()))
        return SlowLoader(num_samples, batch_size, shard_id, num_shards, seed, train)

    host = os.environ["HOROVOD_HOSTNAME"] if mode == "elastic" else "plain"
    (out / "pids").mkdir(exist_ok=True)
    cfg = config("horovod", **_overrides(mode == "elastic", max_steps))
    code = train(cfg, out / "run", resume=resume or None, model_builder=model_builder, loader_builder=loader_builder)
    torch.save({"code": code, "params": built[-1].state_dict()}, out / f"final_{host}_{os.getpid()}.pt")


# ------------------------------------------------------------------------------------- pytest side
def _discovery(out: Path, hosts: list[str]) -> Path:
    hosts_file = out / "hosts.txt"
    tmp = out / "hosts.tmp"
    tmp.write_text("".join(f"{h}:1\n" for h in hosts))
    os.replace(tmp, hosts_file)
    script = out / "discover.sh"
    if not script.exists():
        script.write_text(f"#!/bin/sh\ncat {hosts_file}\n")
        script.chmod(0o755)
    return script


def _elastic_cmd(out: Path, np: int) -> list[str]:
    return [str(VENV_BIN / "horovodrun"), "-np", str(np), "--min-np", "2", "--max-np", "3",
            "--host-discovery-script", str(out / "discover.sh"), "--network-interface", "lo",
            PYTHON, __file__, str(out), "elastic", "0", ""]


def _run_elastic(out: Path, np: int, when_step: int, act: Any, timeout: float = 300) -> tuple[int, str]:
    """Start the elastic job in its own session; once a step past ``when_step`` is logged, ``act()``."""
    metrics = out / "run" / "metrics.jsonl"
    proc = subprocess.Popen(_elastic_cmd(out, np), env=launcher_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not any(r["type"] == "step" and r["step"] >= when_step for r in _records(metrics)):
            assert proc.poll() is None, proc.stdout.read()[-4000:] if proc.stdout else proc.returncode
            assert time.monotonic() < deadline, "no step was taken"
            time.sleep(0.1)
        act()
        output, _ = proc.communicate(timeout=max(10.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the elastic job did not finish:\n{output[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, output


def _records(metrics: Path) -> list[dict[str, Any]]:
    try:
        return read_records(metrics)
    except Exception:  # not written yet, or a line being written
        return []


def _reference(out: Path, first: int, second: int, commit_step: int) -> dict[str, torch.Tensor]:
    """The uninterrupted run with the same world-size schedule: ``first`` ranks up to the commit, then
    ``second`` ranks resumed from there (the same rule an elastic change follows)."""
    out.mkdir()
    for np, max_steps, resume in ((first, commit_step, ""), (second, 0, "auto")):
        # the elastic job's layout (one rank per host name): Gloo sums 3 ranks' gradients in its order
        hosts = ",".join(f"{h}:1" for h in HOSTS[:np])
        cmd = [str(VENV_BIN / "horovodrun"), "-np", str(np), "-H", hosts, "--gloo", "--network-interface", "lo",
               PYTHON, __file__, str(out), "plain", str(max_steps), resume]
        result = run_bounded(cmd, timeout=240)
        assert result.returncode == 0, result.stdout[-4000:]
    finals = sorted(out.glob("final_plain_*.pt"), key=lambda p: p.stat().st_mtime)
    return torch.load(finals[-1], weights_only=False)["params"]


def _check_every_clip_once(metrics: Path) -> None:
    run = read_last_run(metrics)
    by_epoch: dict[int, list[tuple[int, int]]] = {}
    for step in run.steps:
        by_epoch.setdefault(step["data_epoch"], []).append((step["clip_start"], step["clips"]))
    assert sorted(by_epoch) == list(range(EPOCHS))
    for epoch, slices in by_epoch.items():
        covered = sorted(c for start, n in slices for c in range(start, start + n))
        assert covered == list(range(SAMPLES)), (epoch, slices)


def _finals(out: Path, hosts: list[str]) -> list[dict[str, Any]]:
    return [torch.load(p, weights_only=False) for h in hosts for p in out.glob(f"final_{h}_*.pt")]


def _check_run(tmp_path: Path, out: Path, hosts: list[str], change_is: tuple[int, int, str]) -> dict[str, Any]:
    """One membership change as expected, every clip once, and the final parameters of every rank equal to the
    uninterrupted run's with the same world sizes; returns the change."""
    metrics = out / "run" / "metrics.jsonl"
    run = read_last_run(metrics)
    assert run.status == "completed" and len(run.membership) == 1, run.membership
    change = run.membership[0]
    assert (change["old_world"], change["new_world"], change["cause"]) == change_is
    _check_every_clip_once(metrics)
    finals = _finals(out, hosts)
    assert len(finals) == len(hosts) and all(f["code"] == 0 for f in finals)
    reference = _reference(tmp_path / "reference", change_is[0], change_is[1], change["rolled_back_to"]["step"])
    for final in finals:
        assert all(torch.equal(final["params"][k], reference[k]) for k in reference)
    return change


def test_a_killed_rank_rolls_back_and_training_completes_on_two(tmp_path):
    out = tmp_path / "elastic"
    out.mkdir()
    _discovery(out, HOSTS)
    victim = out / "pids" / "rank2.pid"
    code, output = _run_elastic(out, 3, 4, lambda: os.kill(int(victim.read_text()), signal.SIGKILL))
    assert code == 0, output[-4000:]
    assert "elastic: 3 -> 2 ranks (rank lost)" in output
    survivors = [h for h in HOSTS if any(out.glob(f"final_{h}_*.pt"))]
    change = _check_run(tmp_path, out, survivors, (3, 2, "rank lost"))
    assert len(survivors) == 2 and change["rolled_back_to"]["step"] % 2 == 0 and change["steps_lost"] >= 0


def test_an_added_host_joins_at_the_next_commit(tmp_path):
    out = tmp_path / "elastic"
    out.mkdir()
    _discovery(out, HOSTS[:2])
    code, output = _run_elastic(out, 2, 3, lambda: _discovery(out, HOSTS))
    assert code == 0, output[-4000:]
    assert "elastic: 2 -> 3 ranks (hosts added)" in output
    assert _check_run(tmp_path, out, HOSTS, (2, 3, "hosts added"))["steps_lost"] == 0


if __name__ == "__main__":
    rank_main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4])

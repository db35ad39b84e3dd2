"""The training recipe on 2 ranks, once per engine (horovod through horovodrun, torch through torchrun).

One launch per engine runs several trainings in the same processes (launches are the slow part):
gradient accumulation K x B against one K*B step, a control run that must differ, an uninterrupted
run, and the same run preempted by a SIGUSR1 that only rank 1 receives and then resumed with
``--resume auto``. The model has no batch norm and the loader is an in-memory tensor set, so the
comparisons can be exact. Run as a script, this file is the per-rank program.
"""
from __future__ import annotations

import gc
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the rank processes start outside pytest
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import PYTHON, VENV_BIN, free_port, horovodrun, launcher_env, run_bounded  # noqa: E402
from tsm_dist.config import Config, load_config  # noqa: E402
from tsm_dist.runlog.records import read_records  # noqa: E402
from tiny_run import CLASSES, FRAMES, SIZE, TensorLoader, TinyNet, config, tiny_builders  # noqa: E402,F401

class CrashingLoader(TensorLoader):
    def __iter__(self):
        for b, batch in enumerate(super().__iter__()):
            if b == 2 and self.shard_id == 1:
                raise RuntimeError("simulated crash on rank 1")
            yield batch


def crash_main(engine_name: str, out: Path) -> None:
    """Rank 1 dies in step 3; the launcher must end the job instead of rank 0 waiting forever."""
    from tsm_dist.training.train import train

    def loader_builder(file_list: Any, root: Any, *, batch_size: int, shard_id: int, num_shards: int,
                       seed: int, train: bool, num_samples: int, **_: Any) -> TensorLoader:
        return CrashingLoader(num_samples, batch_size, shard_id, num_shards, seed, train)

    train(config(engine_name, **{"train.epochs": 1000}), out / "crash", loader_builder=loader_builder,
          model_builder=lambda name, *, num_classes, num_frames, dropout, **_: TinyNet(num_classes, num_frames, dropout))


def lifecycle_main(engine_name: str, out: Path) -> None:
    """train() starts and stops the engine itself: how many DDP models are alive when it shuts down."""
    from tsm_dist.distributed.engine import Engine
    from tsm_dist.training.train import train

    alive: list[int] = []
    shutdown = Engine.shutdown

    def counting_shutdown(self: Engine, clean: bool = True) -> None:
        alive.append(sum(isinstance(o, nn.parallel.DistributedDataParallel) for o in gc.get_objects()))
        shutdown(self, clean)

    Engine.shutdown = counting_shutdown  # type: ignore[method-assign]
    code = train(config(engine_name, **{"train.max_steps": 2}), out / "lifecycle",
                 model_builder=lambda name, *, num_classes, num_frames, dropout, **_: TinyNet(num_classes, num_frames,
                                                                                             dropout),
                 loader_builder=lambda file_list, root, *, batch_size, shard_id, num_shards, seed, train, num_samples,
                 **_: TensorLoader(num_samples, batch_size, shard_id, num_shards, seed, train))
    (out / f"lifecycle{os.environ['RANK']}.txt").write_text(f"{code} {alive}")


def rank_main(engine_name: str, out: Path) -> None:
    from tsm_dist.distributed.engine import Engine
    from tsm_dist.training.train import train

    # started here, so train() leaves it running between the trainings below
    timeline = {"engine.timeline": str(out / "timeline.json")} if engine_name == "horovod" else {}
    engine = Engine(config(engine_name, **timeline).engine).init()
    built: list[nn.Module] = []
    signal_at: list[tuple[int, int] | None] = [None]

    model_builder, loader_builder = tiny_builders(built, signal_at)

    def run(cfg: Config, name: str, resume: str | None = None) -> tuple[int, dict[str, torch.Tensor]]:
        code = train(cfg, out / name, resume=resume, model_builder=model_builder, loader_builder=loader_builder)
        return code, {k: v.detach().clone() for k, v in built[-1].state_dict().items()}

    results: dict[str, Any] = {}
    # 1. accumulation: 2 passes of 2 clips vs 1 pass of 4 (same clips per step: shards split in order)
    results["accum"] = run(config(engine_name, **{"train.accumulate": 2, "train.max_steps": 6}), "accum")
    results["big"] = run(config(engine_name, **{"data.batch_size": 4, "train.max_steps": 6}), "big")
    results["control"] = run(config(engine_name, **{"train.max_steps": 6}), "control")
    results["compressed"] = run(config(engine_name, **{"data.batch_size": 4, "train.max_steps": 6,
                                                       "engine.fp16_compression": True,
                                                       "engine.gradient_predivide_factor": 2.0}), "compressed")
    # 2. uninterrupted vs preempted + resumed; dropout, warmup, clipping, eval, checkpoints, wandb
    full = config(engine_name, **{"train.accumulate": 2, "model.dropout": 0.3, "optim.warmup_epochs": 1,
                                  "optim.clip_grad_norm": 0.5, "train.eval_every_epochs": 1,
                                  "train.checkpoint_every_epochs": 1, "train.keep_last": 2,
                                  "log.wandb": "offline"})
    results["full"] = run(full, "full")
    signal_at[0] = (1, 2)  # rank 1 only, during the 2nd step of epoch 1
    results["preempted"] = run(full, "resumed")
    signal_at[0] = None
    results["resumed"] = run(full, "resumed", resume="auto")
    torch.save(results, out / f"rank{engine.rank}.pt")


# ------------------------------------------------------------------------------------- pytest side
def _launch(engine: str, out: Path, mode: str = "suite", timeout: float = 240) -> Any:
    script = [PYTHON, __file__, engine, str(out), mode]
    if engine == "horovod":
        cmd = horovodrun(2, *script)
    else:
        cmd = [str(VENV_BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
               *script[1:]]
    env = launcher_env(WANDB_DIR=str(out), WANDB_MODE="offline", WANDB_SILENT="true")
    return run_bounded(cmd, timeout=timeout, env=env)


@pytest.fixture(scope="module", params=["horovod", "torch"])
def launched(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp(f"train2_{request.param}")
    result = _launch(request.param, out)
    assert result.returncode == 0, result.stdout[-5000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return request.param, out, ranks


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> bool:
    return all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


pytestmark = pytest.mark.multirank


def test_ranks_hold_identical_parameters(launched):
    _, _, ranks = launched
    for name in ("accum", "big", "control", "compressed", "full", "resumed"):
        assert _equal(ranks[0][name][1], ranks[1][name][1]), name


def test_accumulation_equals_one_large_batch_step(launched):
    _, out, ranks = launched
    accum, big, control = (ranks[0][n][1] for n in ("accum", "big", "control"))
    assert _close(accum, big, atol=1e-6)
    assert not _close(accum, control, atol=1e-3)  # the check can fail: half the batch differs
    # fp16 gradients on the wire and pre-division by 2: the same average, up to fp16 rounding
    assert _close(ranks[0]["compressed"][1], big, atol=2e-3)
    assert not _equal(ranks[0]["compressed"][1], big)
    header = read_records(out / "accum" / "metrics.jsonl")[0]
    assert (header["per_gpu_batch"], header["accumulate"], header["global_batch"]) == (2, 2, 8)
    # linear scaling: the effective batch (8) sets the rate
    assert header["peak_lr"] == pytest.approx(0.2 * 8 / 4)
    steps = [r for r in read_records(out / "accum" / "metrics.jsonl") if r["type"] == "step"]
    big_steps = [r for r in read_records(out / "big" / "metrics.jsonl") if r["type"] == "step"]
    assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in big_steps], abs=1e-6)


def test_preempted_then_resumed_run_equals_uninterrupted(launched):
    _, out, ranks = launched
    for rank in ranks:
        assert rank["full"][0] == 0 and rank["preempted"][0] == 75 and rank["resumed"][0] == 0
    assert _equal(ranks[0]["resumed"][1], ranks[0]["full"][1])
    records = read_records(out / "resumed" / "metrics.jsonl")
    ends = [r for r in records if r["type"] == "end"]
    # 4 steps per epoch; the signal came during step 6, both ranks stopped after it
    assert ends[0]["status"] == "preempted" and ends[0]["step"] == 6
    assert ends[1]["status"] == "completed" and ends[1]["step"] == 12
    headers = [r for r in records if r["type"] == "header"]
    assert headers[1]["resumed_from"].endswith("ckpt_e0001_s00000006.pt")


def test_checkpoints_eval_records_and_wandb_offline_run(launched):
    _, out, _ = launched
    names = sorted(p.name for p in (out / "full" / "checkpoints").iterdir())
    assert names == ["best.pt", "ckpt_e0002_s00000008.pt", "ckpt_e0003_s00000012.pt"]  # keep_last 2
    records = read_records(out / "full" / "metrics.jsonl")
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2, 3]
    assert all(r["num_samples"] == 31 for r in evals)  # the padded slot is not counted, no sample lost
    steps = [r for r in records if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 13))
    # per-iteration warmup over epoch 0 (4 steps) from base_lr 0.2 to the peak 0.4; step i logs the
    # rate it used, i.e. schedule(i - 1)
    assert [r["lr"] for r in steps[:6]] == pytest.approx([0.2, 0.25, 0.3, 0.35, 0.4, 0.4])
    assert {"data_time", "compute_time", "sync_time", "step_time", "clips_per_sec_total"} <= set(steps[0])
    runs = list((out / "full" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), runs


def test_horovod_timeline_is_written(launched):
    engine, out, _ = launched
    if engine != "horovod":
        pytest.skip("the timeline is a Horovod option")
    assert "ALLREDUCE" in (out / "timeline.json").read_text().upper()


def test_a_crashing_rank_ends_the_job(tmp_path):
    # 1000 epochs: only the crash can end this run within the timeout
    result = _launch("horovod", tmp_path, mode="crash", timeout=120)
    assert result.returncode != 0
    assert "simulated crash on rank 1" in result.stdout


def test_the_distributed_model_is_freed_before_the_engine_shuts_down(tmp_path):
    # a DDP model that outlives destroy_process_group makes Gloo abort the rank at exit (exit 134; the runs:
    # docs/training.md, "Exit 134 after a completed run")
    result = _launch("torch", tmp_path, mode="lifecycle", timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    assert [(tmp_path / f"lifecycle{r}.txt").read_text() for r in range(2)] == ["0 [0]"] * 2


if __name__ == "__main__":
    main = {"crash": crash_main, "lifecycle": lifecycle_main}.get(sys.argv[3], rank_main)
    main(sys.argv[1], Path(sys.argv[2]))

"""Elastic training without ranks: the batch plan of a new world, the start-time check of every allowed world
size, the membership record and what the reader makes of it (tsm_dist/training/elastic.py)."""
from __future__ import annotations

import json

import pytest

from tsm_dist.commands.exit_codes import CoordinatedError
from tsm_dist.config import ConfigError, EngineConfig
from tsm_dist.distributed.engine import horovod_env
from tsm_dist.runlog import records
from tsm_dist.training.batch_plan import BatchPlan, elastic_world_sizes, plan_for_world
from tsm_dist.training.elastic import check_world_sizes


def test_keep_global_batch_adapts_accumulation():
    base = BatchPlan(per_gpu_batch=2, world_size=3, accumulate=2)
    plan = plan_for_world(base, 2, "keep_global_batch")
    assert (plan.world_size, plan.accumulate, plan.global_batch) == (2, 3, 12)
    with pytest.raises(ConfigError, match=r"engine.on_resize=keep_global_batch: the global batch 12 is not a "
                                          r"multiple of data.batch_size=2 x 4 ranks = 8"):
        plan_for_world(base, 4, "keep_global_batch")


def test_keep_rank_batch_lets_the_global_batch_follow_the_world():
    base = BatchPlan(per_gpu_batch=2, world_size=3, accumulate=2)
    plan = plan_for_world(base, 4, "keep_rank_batch")
    assert (plan.world_size, plan.accumulate, plan.global_batch) == (4, 2, 16)


def test_every_allowed_world_size_is_checked_at_start():
    base = BatchPlan(per_gpu_batch=2, world_size=3, accumulate=2)
    assert list(elastic_world_sizes(0, 0, 3)) == [3] and list(elastic_world_sizes(2, 6, 3)) == [2, 3, 4, 5, 6]
    check_world_sizes(base, 1, 3)  # 12 clips: 1, 2, 3 ranks of 2 all divide it
    with pytest.raises(CoordinatedError, match=r"not a multiple of data.batch_size=2 x 4 ranks .* \(it fails on 4 ranks\)"):
        check_world_sizes(base, 2, 4)


def test_an_elastic_run_leaves_horovods_cycle_time_alone_on_cpu():
    assert "HOROVOD_CYCLE_TIME" in horovod_env(EngineConfig(), on_gpu=False, env={})
    assert "HOROVOD_CYCLE_TIME" not in horovod_env(EngineConfig(elastic=True), on_gpu=False, env={})


def _step(step: int, start: int) -> dict:
    return records.step_record(epoch=step / 3, step=step, loss=1.0, lr=0.1,
                               position={"data_epoch": (step - 1) // 3, "clip_start": start, "clips": 12})


def test_the_reader_drops_an_evaluation_a_membership_change_rolled_back(tmp_path):
    """Epoch 1 ends at step 3 and is evaluated; a rank dies before the epoch-end commit, the run goes back to the
    commit at step 2, trains step 3 again and evaluates epoch 1 again: one evaluation of it is kept, the second."""
    path = tmp_path / records.METRICS_FILE
    log = records.MetricsLog(path)
    log.write(records.header_record(config={}, engine="horovod", world_size=3, local_size=1, model="m",
                                    num_frames=2, per_gpu_batch=2, accumulate=2, global_batch=12, params=1))
    for step, start in ((1, 0), (2, 12), (3, 24)):
        log.write(_step(step, start))
    log.write(records.eval_record(epoch=1, step=3, top1=50.0, top5=100.0, loss=1.0, num_samples=8))
    log.write(records.membership_record(old_world=3, new_world=2, cause="rank lost",
                                        rolled_back_to={"step": 2, "epoch": 0, "batch_in_epoch": 4}, steps_lost=1,
                                        continues_at={"step": 2, "epoch": 0, "batch_in_epoch": 6}))
    log.write(_step(3, 24))
    log.write(records.eval_record(epoch=1, step=3, top1=75.0, top5=100.0, loss=1.0, num_samples=8))
    log.close()
    run = records.read_last_run(path)
    assert [(e["epoch"], e["top1"]) for e in run.evals] == [(1, 75.0)]
    assert [s["step"] for s in run.steps] == [1, 2, 3]


def test_the_reader_drops_the_steps_a_membership_change_rolled_back(tmp_path):
    path = tmp_path / records.METRICS_FILE
    log = records.MetricsLog(path)
    log.write(records.header_record(config={}, engine="horovod", world_size=3, local_size=1, model="m",
                                    num_frames=2, per_gpu_batch=2, accumulate=2, global_batch=12, params=1))
    for step, start in ((1, 0), (2, 12), (3, 24), (4, 0), (5, 12)):
        log.write(_step(step, start))
    log.write(records.membership_record(old_world=3, new_world=2, cause="rank lost",
                                        rolled_back_to={"step": 4, "epoch": 1, "batch_in_epoch": 2}, steps_lost=1,
                                        continues_at={"step": 4, "epoch": 1, "batch_in_epoch": 3}))
    log.write(_step(5, 12))
    log.write(_step(6, 24))
    log.close()
    run = records.read_last_run(path)
    assert [(s["step"], s["clip_start"]) for s in run.steps] == [(1, 0), (2, 12), (3, 24), (4, 0), (5, 12), (6, 24)]
    assert len(run.membership) == 1 and json.loads(path.read_text().splitlines()[-3])["type"] == "membership"
    assert "elastic: ranks 3 -> 2 (1 change(s), 1 step(s) lost)" in records.describe_run(path)


def test_an_elastic_run_started_without_the_elastic_launcher_is_one_line(tmp_path):
    from conftest import REPO, VENV_BIN, launcher_env, run_bounded

    result = run_bounded([str(VENV_BIN / "tsm-dist"), "train", "--config", str(REPO / "configs" / "synthetic_tsm.yaml"),
                          "--workdir", str(tmp_path / "run"), *[a for s in (
                              "data.backend=random", "data.num_samples=8", "data.batch_size=4", "data.crop_size=32",
                              "model.width=8", "model.num_frames=2", "log.wandb=disabled", "engine.elastic=true")
                              for a in ("--set", s)]], timeout=240, env=launcher_env())
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stdout[-3000:]
    assert "engine.elastic: true needs Horovod's elastic launcher" in lines[0]

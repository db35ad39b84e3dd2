"""The batch-size study: its plan (per-rank batch, accumulation, seeds), its table and figures from run
records (a failed run stays in the table), and ``--quick`` end to end on 2 real Horovod ranks."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from tsm_dist.runlog import records
from tsm_dist.cli import COMMANDS
from tsm_dist.studies.batch_size.runs import PLAN_FILE, StudyOptions, StudyRun, plan_runs, plan_study
from tsm_dist.studies.batch_size.report import report


def test_plan_simulates_what_the_ranks_cannot_hold():
    runs = plan_runs([16, 64, 8], ["sgd", "lars"], seeds=2, ranks=2, max_per_rank=8)
    assert len(runs) == 12
    by_batch = {r.batch: r for r in runs}
    assert (by_batch[16].per_rank_batch, by_batch[16].accumulate, by_batch[16].simulated) == (8, 1, False)
    assert (by_batch[64].per_rank_batch, by_batch[64].accumulate, by_batch[64].simulated) == (8, 4, True)
    assert (by_batch[8].per_rank_batch, by_batch[8].accumulate) == (4, 1)  # smaller than ranks x 8
    assert [r.seed for r in runs[:6]] == [0] * 6  # seed by seed
    with pytest.raises(ValueError, match=r"batch 24 is not a multiple of 1 node\(s\) x 2 ranks"):
        plan_runs([24], ["sgd"], seeds=1, ranks=2, max_per_rank=8)
    assert "batch-study" in COMMANDS


def test_nodes_count_as_the_paper_and_runs_share_the_epochs(tmp_path):
    from tsm_dist import package_files

    hard = plan_study(StudyOptions(config=package_files.CONFIGS / "synthetic_hard_tsm.yaml", data=tmp_path, seeds=1))
    assert f"data.root={tmp_path.resolve()}" in hard["overrides"] and hard["data"] == str(tmp_path)
    plan = plan_study(StudyOptions(nodes=[1, 4], gpus_per_node=2, epochs=3, seeds=1, optimizers=["sgd"]))
    assert [r["batch"] for r in plan["runs"]] == [16, 64]  # nodes x 2 GPUs x data.batch_size 8
    assert "train.epochs=3" in plan["overrides"] and "eval.last_n=2" in plan["overrides"]  # the config's 2
    assert "log.interval=1" in plan["overrides"]
    with pytest.raises(ValueError, match="not both"):
        plan_study(StudyOptions(nodes=[1], batches=[16]))


def test_the_default_study_is_the_rendered_set_from_16_to_1024_with_sgd_and_lars(tmp_path):
    from tsm_dist.config import load_config

    plan = plan_study(StudyOptions())
    assert plan["backend"] == "procedural" and plan["data"] is None
    assert not any(o.startswith("data.root=") for o in plan["overrides"])  # nothing to read
    runs = [StudyRun(**r) for r in plan["runs"]]
    assert sorted({r.batch for r in runs}) == [16, 32, 64, 128, 256, 512, 1024]
    assert {r.optimizer for r in runs} == {"sgd", "lars"} and {r.seed for r in runs} == {0, 1, 2}
    assert {(r.per_rank_batch, r.accumulate) for r in runs if r.batch == 1024} == {(8, 64)}
    cfg = load_config(plan["config"], plan["overrides"])
    assert (cfg.data.num_samples, cfg.data.num_val_samples, cfg.data.label_noise) == (4096, 1024, 0.2)
    assert cfg.model.classifier_init == "linear" and cfg.optim.warmup_min_steps == 8
    # a config that makes its clips has no data directory to point at
    with pytest.raises(ValueError, match="--data: the config's data.backend=procedural reads no files"):
        plan_study(StudyOptions(data=tmp_path))
    quick = plan_study(StudyOptions(quick=True))
    assert [(r["optimizer"], r["batch"]) for r in quick["runs"]] == [("sgd", 4), ("sgd", 8)]
    assert "data.num_samples=64" in quick["overrides"]


def _write_run(out: Path, run: StudyRun, top1: list[float], status: str = "completed") -> None:
    workdir = out / "runs" / run.tag
    workdir.mkdir(parents=True)
    log = records.MetricsLog(workdir / records.METRICS_FILE)
    log.write(records.header_record(config={}, engine="horovod", world_size=2, local_size=2, model="tsm8f_r50",
                                    num_frames=8, params=1, per_gpu_batch=run.per_rank_batch,
                                    accumulate=run.accumulate, global_batch=run.batch, steps_per_epoch=4,
                                    warmup_steps=2, peak_lr=0.1 * run.batch / 16))
    for epoch, value in enumerate(top1, 1):
        log.write(records.step_record(epoch=float(epoch), step=epoch * 4, loss=2.0 / epoch, lr=0.1))
        log.write(records.eval_record(epoch=epoch, step=epoch * 4, top1=value, top5=100.0, loss=1.0,
                                      num_samples=64))
    log.write(records.end_record(status=status, step=len(top1) * 4, epoch=len(top1)))
    log.close()
    (workdir / "study_run.json").write_text(json.dumps({"error": "", "wall_s": 10.0}))


def test_table_and_figures_from_run_records(tmp_path):
    runs = plan_runs([16, 64], ["sgd"], seeds=2, ranks=2, max_per_rank=8)
    plan = {"runs": [asdict(r) for r in runs],
            "last_n": 2, "num_frames": 8, "model": "tsm8f_r50", "epochs": 3, "base_lr": 0.02, "base_batch": 16,
            "warmup_epochs": 1.0}
    (tmp_path / PLAN_FILE).write_text(json.dumps(plan))
    _write_run(tmp_path, runs[0], [10.0, 60.0, 70.0])
    _write_run(tmp_path, runs[1], [10.0, 20.0, 30.0])
    _write_run(tmp_path, runs[2], [10.0, 50.0, 60.0])
    _write_run(tmp_path, runs[3], [10.0, float("nan")], status="failed")
    text = report(tmp_path)
    # batch 16: seeds 65 and 55 (means of the last 2) -> 60 +- 7.1; batch 64*: one seed failed, so the row
    # stands on one seed: no "+- 0.0" spread, and its status says so (issue 32)
    # (steps per epoch, steps done, warmup steps and the peak rate from the runs' headers)
    assert "| sgd | 2 | 16 | 128 | 4 | 12 | 2 | 0.1 | 60.0 +- 7.1 | 7.1 | 2/2 | 10 | completed |" in text
    assert "| sgd | 8* | 64* | 512 | 4 | 12 | 2 | 0.4 | 25.0 | 7.1 | 1/2 | 10 | 1/2 seeds (the rest: failed) |" in text
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert [r["batch"] for r in rows] == ["16", "64"] and rows[1]["simulated"] == "True"
    assert (rows[0]["steps_per_epoch"], rows[0]["total_steps"]) == ("4", "12")
    for name in ("fig11_accuracy_vs_batch.png", "fig13_curves.png"):
        assert (tmp_path / name).stat().st_size > 10_000


@pytest.mark.multirank
def test_quick_study_on_two_horovod_ranks(tmp_path):
    from conftest import launcher_env

    out = tmp_path / "study"
    result = subprocess.run([sys.executable, "-m", "tsm_dist.batch_study", "--quick", "--out", str(out)],
                            env=launcher_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = (out / "table.md").read_text()
    assert "| sgd | 2 | 4 | 32 |" in table and "| sgd | 4* | 8* | 64 |" in table and table.count("completed") == 2
    for tag, accumulate in (("sgd_b00004_s0", 1), ("sgd_b00008_s0", 2)):
        run = records.read_last_run(out / "runs" / tag / records.METRICS_FILE)
        assert run.status == "completed" and run.header["accumulate"] == accumulate
        assert [e["epoch"] for e in run.evals] == [1, 2]
    assert (out / "fig11_accuracy_vs_batch.png").is_file() and (out / "fig13_curves.png").is_file()
    again = subprocess.run([sys.executable, "-m", "tsm_dist.batch_study", "collect", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "| sgd | 4* | 8* |" in again.stdout


def test_scheduler_study_renders_one_job_per_run_through_the_job_template(tmp_path, capsys):
    from tsm_dist.studies.batch_size.study import main

    out = tmp_path / "slurm"
    assert main(["--scheduler", "slurm", "--gpus-per-node", "4", "--max-nodes", "2", "--batches", "32,256",
                 "--optimizers", "sgd,lars", "--seeds", "1", "--out", str(out)]) == 0
    assert "4 job scripts" in capsys.readouterr().out
    plan = json.loads((out / PLAN_FILE).read_text())
    assert {t: j["status"] for t, j in plan["jobs"].items()} == dict.fromkeys(
        ["sgd_b00032_s0", "sgd_b00256_s0", "lars_b00032_s0", "lars_b00256_s0"], "planned")
    # 256 = 2 nodes x 4 GPUs x 8 clips x K=4: simulated on the largest allocation
    big = next(r for r in plan["runs"] if r["batch"] == 256)
    assert (big["nodes"], big["ranks"], big["accumulate"]) == (2, 8, 4)
    script = (out / plan["jobs"]["sgd_b00256_s0"]["script"]).read_text()
    assert "#SBATCH --nodes=2" in script and "--ntasks-per-node=4" in script and "launch/rank.sh" in script
    assert f"--config \"$CONFIG\"" in script and str(out / "jobs" / "sgd_b00256_s0" / "sgd_b00256_s0.yaml") in script
    assert "python -m tsm_dist.batch_study --scheduler slurm" in script
    assert subprocess.run(["bash", "-n", str(out / plan["jobs"]["sgd_b00256_s0"]["script"])]).returncode == 0
    config = (out / "jobs" / "lars_b00032_s0" / "lars_b00032_s0.yaml").read_text()
    assert "name: lars" in config and "global_batch: 32" in config
    assert main(["collect", str(out)]) == 0 and "| planned |" in capsys.readouterr().out
    # LSF needs the allocation to charge: one line, exit 2
    assert main(["--scheduler", "lsf", "--gpus-per-node", "6", "--batches", "48", "--out", str(tmp_path / "lsf")]) == 2
    assert "--project is required for LSF" in capsys.readouterr().err

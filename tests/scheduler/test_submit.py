"""Study jobs (tsm_dist.scheduler.submit) and the job scripts' record helper (python -m tsm_dist.runlog.records finish):
job ids, a run's outcome from its metrics and its job's state, CPU job rendering for LSF and Slurm."""
import json
import subprocess
import sys

import pytest

from tsm_dist.runlog import records
from tsm_dist.runlog.records import MetricsLog, close_run, describe_run, finish_job, read_last_run
from tsm_dist.scheduler.submit import (JobOptions, JobSpec, SubmitError, job_log, parse_job_id, render_jobs,
                                   run_outcome)
from tsm_dist.studies.scaling.sweep import main as sweep_main


def write_run(path, steps=3, end=None, evals=()):
    log = MetricsLog(path)
    log.write(records.header_record(config={}, engine="horovod", world_size=2, local_size=1, model="m",
                                    num_frames=8, per_gpu_batch=2, accumulate=1, global_batch=4, params=10))
    for step in range(1, steps + 1):
        log.write(records.step_record(epoch=0, step=step, loss=1.0, lr=0.1))
    for top1 in evals:
        log.write(records.eval_record(epoch=1, step=steps, top1=top1, top5=100.0, loss=0.5, num_samples=8))
    if end:
        log.write(records.end_record(status=end, step=steps, epoch=0))
    log.close()


@pytest.mark.parametrize("scheduler, stdout, job_id", [
    ("slurm", "12345\n", "12345"), ("slurm", "777;cluster2\n", "777"),
    ("lsf", "Job <4242> is submitted to queue <batch>.\n", "4242")])
def test_job_ids_from_sbatch_and_bsub(scheduler, stdout, job_id):
    assert parse_job_id(scheduler, stdout) == job_id


def test_no_job_id_is_an_error_that_quotes_the_scheduler():
    with pytest.raises(SubmitError, match="sbatch printed no job id: 'sbatch: error: Batch job submission failed'"):
        parse_job_id("slurm", "sbatch: error: Batch job submission failed")


def test_outcome_of_a_run_whose_job_is_over_without_an_end_record_is_failed(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_run(path)
    assert run_outcome(path, job_active=True) == "running"
    assert run_outcome(path, job_active=None) == "running"  # no scheduler to ask: not called failed
    assert run_outcome(path, job_active=False).startswith("failed: the job ended without an end record")
    assert run_outcome(tmp_path / "none.jsonl", job_active=False).startswith("failed: no none.jsonl")
    assert run_outcome(tmp_path / "none.jsonl", job_active=None) == "no metrics"
    write_run(path, end="completed")
    assert run_outcome(path, job_active=False) == "completed"


def test_the_job_script_records_failed_only_when_no_rank_did(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_run(path, steps=5)
    assert close_run(path, 0) is None and read_last_run(path).end is None  # exit 0: nothing to add
    record = close_run(path, 137, job_id="99")
    end = read_last_run(path).end
    assert end == record and end["status"] == "failed" and end["step"] == 5 and end["exit_code"] == 137
    assert end["cause"] == ("job 99: ranks exited with status 137 (signal 9); no rank wrote an end record "
                            "(recorded by the job script)")
    assert close_run(path, 137) is None  # once
    assert run_outcome(path, job_active=False) == f"failed: {end['cause']}"
    written = tmp_path / "done.jsonl"
    write_run(written, end="preempted")
    assert close_run(written, 75) is None and read_last_run(written).status == "preempted"


def test_the_batch_log_line_says_where_the_record_is(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_run(path, steps=4, end="completed", evals=(50.0, 62.5))
    result = subprocess.run([sys.executable, "-m", "tsm_dist.runlog.records", "finish", str(path), "--exit-code", "0",
                             "--job", "7"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (f"run record: {path}: completed at step 4, epoch 0; last evaluation (epoch 1): "
                             f"top-1 62.50 %, top-5 100.00 %\n")
    assert describe_run(tmp_path / "x.jsonl").endswith("was not written (the trainer did not start; its error "
                                                       "is above)")


def test_cpu_jobs_render_without_a_gpu_request(tmp_path):
    (tmp_path / "c.yaml").write_text("{}\n")
    runs = [JobSpec(tag="b16", config="c.yaml", workdir="runs/b16", run_nodes=2, overrides=["optim.lr=0.2"],
                    then_module="tsm_dist.training.evaluate", then_args=["--last-n", "5"])]
    render_jobs(runs, tmp_path, JobOptions("slurm", gpus_per_node=0, ranks_per_node=4, cpus_per_rank=2))
    text = (tmp_path / runs[0].script).read_text()
    assert runs[0].script == "jobs/b16/job.sbatch"
    assert "#SBATCH --ntasks-per-node=4" in text and "#SBATCH --cpus-per-task=2" in text
    assert "gpus" not in "".join(line for line in text.splitlines() if line.startswith("#SBATCH"))
    assert "--set optim.lr=0.2" in text and "--module tsm_dist.training.evaluate -- \\\n    --last-n 5" in text
    render_jobs(runs, tmp_path, JobOptions("lsf", gpus_per_node=0, ranks_per_node=2, project="P"))
    lsf = (tmp_path / "jobs/b16/job.lsf").read_text()
    assert "--nrs 2 --rs_per_host 1 --tasks_per_rs 2 --cpu_per_rs 42 --gpu_per_rs 0" in lsf


def test_cpu_sweep_dry_run_for_slurm_and_lsf(tmp_path, capsys):
    base = ["--config", "configs/synthetic_tsm.yaml", "--nodes", "1,2,4", "--gpus-per-node", "0",
            "--dataset-size", "100", "--dry-run"]
    assert sweep_main(["--scheduler", "slurm", *base, "--ranks-per-node", "2", "--cpus-per-rank", "4",
                       "--out", str(tmp_path / "s")]) == 0
    plan = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert (plan["gpus_per_node"], plan["ranks_per_node"]) == (0, 2)
    assert "horovod_tsm8f_r50_n0004: 4 node(s), 8 rank(s), batch 64" in capsys.readouterr().out
    text = (tmp_path / "s" / "jobs" / "horovod_tsm8f_r50_n0004" / "job.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in text and "#SBATCH --cpus-per-task=4" in text and "--gpus none" in text
    assert "#SBATCH --gpus" not in text
    assert sweep_main(["--scheduler", "lsf", *base, "--project", "P", "--out", str(tmp_path / "l")]) == 0
    lsf = (tmp_path / "l" / "jobs" / "horovod_tsm8f_r50_n0002" / "job.lsf").read_text()
    assert "jsrun --nrs 2 --rs_per_host 1 --tasks_per_rs 1 --cpu_per_rs 42 --gpu_per_rs 0" in lsf
    assert "disable_gpu_hooks" not in lsf
    for path in (tmp_path / "l").glob("jobs/*/job.lsf"):
        subprocess.run(["bash", "-n", str(path)], check=True)


def test_collect_without_a_sweep_is_one_line(tmp_path, capsys):
    assert sweep_main(["collect", str(tmp_path / "none"), "--wait", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sweep.json: no sweep plan here" in err


def test_a_job_cancelled_while_pending_is_not_sent_to_a_job_log_it_never_wrote(tmp_path):
    metrics, log = tmp_path / "runs/b16/metrics.jsonl", tmp_path / job_log("slurm", "b16", "12")
    assert log.name == "b16-12.out" and job_log("lsf", "b16", "12") == "b16.12.out"
    assert run_outcome(metrics, False, "CANCELLED", log) == \
        "cancelled before it started (while pending: no metrics.jsonl, no job log)"
    # gone from squeue's memory: no log says the job never ran, not "see the job log"
    gone = run_outcome(metrics, False, "", log)
    assert gone.startswith("failed: no metrics.jsonl and no job log b16-12.out (the job never ran") and \
        "see the job log" not in gone
    log.write_text("Slurm job 12 ...\n")
    assert run_outcome(metrics, False, "CANCELLED", log) == "cancelled before the trainer started (see the job log b16-12.out)"
    assert run_outcome(metrics, False, "FAILED", log) == \
        "failed: no metrics.jsonl (the trainer did not start; see the job log b16-12.out)"


def _run_with(path, end=None, **end_fields):
    """A run's metrics file: header, 3 steps, and an end record written by rank 0 (with its exit_code)."""
    write_run(path)
    if end:
        log = MetricsLog(path)
        log.write(records.end_record(status=end, step=3, epoch=0, **end_fields))
        log.close()


@pytest.mark.parametrize("end, fields, launcher, job", [
    ("failed", {"exit_code": 1, "cause": "rank 1 was lost without a word"}, 143, 1),  # horovodrun killed rank 0
    ("failed", {"exit_code": 1, "cause": "rank 1 was lost without a word"}, 137, 1),
    ("terminated", {"exit_code": 143}, 1, 143),  # mpirun's own 1 after the ranks' 143
    ("preempted", {"exit_code": 75}, 143, 75),
    ("completed", {"exit_code": 0}, 0, 0),
    (None, {}, 137, 137),  # no rank wrote one: the launcher's code, recorded as failed
])
def test_the_job_exits_with_the_code_the_end_record_decided(tmp_path, end, fields, launcher, job):
    path = tmp_path / "metrics.jsonl"
    _run_with(path, end, **fields)
    result = subprocess.run([sys.executable, "-m", "tsm_dist.runlog.records", "finish", str(path), "--exit-code",
                             str(launcher), "--since", "0", "--job", "7"], capture_output=True, text=True, timeout=60)
    assert result.returncode == job, result.stdout + result.stderr
    if job != launcher:
        assert f"exit code {job}, as the end record decided (the launcher's: {launcher})" in result.stdout


def test_an_end_record_of_an_earlier_job_decides_nothing(tmp_path):
    """A requeued job whose trainer fails before its header: the previous run's 'preempted' (75) must not
    requeue it again, and the line says the trainer did not start."""
    path = tmp_path / "metrics.jsonl"
    _run_with(path, "preempted", exit_code=75)
    size = path.stat().st_size
    code, line = finish_job(path, 2, "8", since=size)
    assert code == 2 and "has no record of this job (the trainer did not start" in line
    assert read_last_run(path).status == "preempted"  # nothing appended to the earlier run
    _run_with(path)  # this job's run: a header, steps, no end; the ranks were killed
    code, line = finish_job(path, 137, "8", since=size)
    assert code == 137 and read_last_run(path).end["exit_code"] == 137 and "failed" in line
    assert finish_job(tmp_path / "none.jsonl", 2)[0] == 2

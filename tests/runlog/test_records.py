"""metrics.jsonl: the records the trainer writes and the one reader the studies and the demo use."""
from __future__ import annotations

import pytest

from tsm_dist.runlog import records
from tsm_dist.runlog.records import MetricsError, MetricsLog, read_last_run, read_records


def _header(**extra):
    return records.header_record(config={}, engine="horovod", world_size=2, local_size=2, model="m",
                                 num_frames=8, per_gpu_batch=4, accumulate=1, global_batch=8, params=10, **extra)


def test_appends_across_restarts_and_reads_the_last_run(tmp_path):
    path = tmp_path / records.METRICS_FILE
    for start, steps in ((0, 3), (2, 2)):  # a run, then its resumed continuation
        log = MetricsLog(path)
        log.write(_header(resumed_from=None if start == 0 else "ckpt.pt"))
        for step in range(start + 1, start + steps + 1):
            log.write(records.step_record(epoch=0, step=step, loss=1.0, lr=0.1, clips_per_step=4, world_size=2,
                                          data_time=0.1, compute_time=0.2, sync_time=0.1, step_time=0.5))
        log.write(records.eval_record(epoch=1, step=start + steps, top1=50.0, top5=100.0, loss=0.7, num_samples=8))
        log.write(records.end_record(status="completed", step=start + steps, epoch=1))
        log.close()
    assert [r["type"] for r in read_records(path)].count("header") == 2
    run = read_last_run(path)
    assert run.header["resumed_from"] == "ckpt.pt" and run.status == "completed"
    assert [r["step"] for r in run.steps] == [3, 4]
    assert run.steps[0]["clips_per_sec_rank"] == pytest.approx(8.0)  # 4 clips / 0.5 s
    assert run.steps[0]["clips_per_sec_total"] == pytest.approx(16.0)
    assert run.evals[0]["top1"] == 50.0 and run.end["skipped"] == []


def test_a_step_without_timing_has_loss_and_lr_only():
    record = records.step_record(epoch=0.5, step=3, loss=float("nan"), lr=0.1)
    assert set(record) == {"type", "epoch", "step", "loss", "lr"}
    with pytest.raises(TypeError, match="step_time"):
        records.step_record(epoch=0, step=1, loss=1.0, lr=0.1, data_time=0.1, compute_time=0.1, sync_time=0.1)


def test_the_writer_refuses_what_is_not_a_record(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    with pytest.raises(TypeError, match="needs engine"):
        records.header_record(config={})
    with pytest.raises(TypeError, match="not a metrics record"):
        log.write({"type": "note", "text": "hello"})
    log.close()


@pytest.mark.parametrize("line, message", [
    ("{broken", "2: not valid JSON"),
    ('["a list"]', "2: a metrics record must be an object"),
    ('{"type": "note"}', "2: a metrics record must be an object with a 'type'"),
    ('{"type": "step", "step": 1}', "2: step record lacks 'epoch', 'loss', 'lr'"),
])
def test_reader_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write(_header())
    log.close()
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(MetricsError, match=f"{path}:{message}"):
        read_records(path)


def test_no_header_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write(records.end_record(status="failed", step=0, epoch=0))
    log.close()
    with pytest.raises(MetricsError, match="no header record"):
        read_last_run(path)


def test_the_header_versions_name_what_is_installed_before_it_is_imported():
    """The header is written before DALI and wandb are imported: their versions still show (issue 32)."""
    import json
    import subprocess
    import sys
    from importlib import metadata

    code = ("import json, sys; from tsm_dist.runlog.header import versions; v = versions(); "
            "print(json.dumps([v, 'wandb' in sys.modules, 'nvidia.dali' in sys.modules]))")
    found, wandb_imported, dali_imported = json.loads(subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout)
    assert not wandb_imported and not dali_imported  # asking does not import them
    assert found["wandb"] == metadata.version("wandb")
    dali = [d.metadata["Version"] for d in metadata.distributions() if d.metadata["Name"].startswith("nvidia-dali-cuda")]
    assert found["dali"] == (dali[0] if dali else None)

"""`tsm-dist demo --quick`: synthetic set, TSM and TSN on 2 Horovod ranks, evaluation, table and plot."""
from __future__ import annotations

import json
import shlex

import pytest

from conftest import PYTHON, REPO, launcher_env, run_bounded
from tsm_dist.runlog.records import read_records

pytestmark = pytest.mark.multirank


def test_quick_demo_end_to_end(tmp_path):
    out, data = tmp_path / "out", tmp_path / "data"
    result = run_bounded([PYTHON, "-m", "tsm_dist.cli", "demo", "--quick", "--out", str(out), "--data", str(data)],
                         timeout=400, env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO)
    assert result.returncode == 0, result.stdout[-4000:]
    assert (data / "train.txt").is_file()  # the demo made the synthetic set
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads((out / "summary.json").read_text())
    assert [r["model"] for r in rows] == ["TSM", "TSN"]
    for name in ("tsm", "tsn"):
        records = read_records(out / name / "metrics.jsonl")
        assert records[0]["world_size"] == 2 and records[0]["engine"] == "horovod"
        assert records[-1]["status"] == "completed"
        report = json.loads((out / name / "eval.json").read_text())
        assert report["world_size"] == 2 and report["checkpoints"]
        assert report["top1_mean"] == pytest.approx(next(r for r in rows if r["model"].lower() == name)["top1"][0])
    assert "TSM" in result.stdout and "TSN" in result.stdout and "demo.png" in result.stdout

    # the training phases under horovodrun: rank 0's progress lines and summary reach train.log (issue 32)
    for name in ("tsm", "tsn"):
        log = (out / name / "train.log").read_text()
        assert "epoch 1/2 done, step" in log and "epoch 2/2 done, step" in log, log[-2000:]
        assert log.count("tsm-dist train: completed at epoch 2/2") == 1, log[-2000:]
    # what to run next: the evaluation line runs as printed, from where the demo ran
    block = result.stdout[result.stdout.index("\nnext:\n"):].splitlines()
    assert any("profile --models" in line for line in block) and any("docs/deploy.md" in line for line in block)
    command = next(line for line in block if "--num-clips 10 --num-crops 3" in line).split(": ", 1)[1]
    evaluated = run_bounded(shlex.split(command), timeout=240, env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO)
    assert evaluated.returncode == 0 and "10 clip(s) x 3 crop(s)" in evaluated.stdout, evaluated.stdout[-2000:]

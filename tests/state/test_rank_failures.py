"""A run whose ranks died is recorded as failed, with its cause, by the survivors (issue 21 item 4, rank side).

Two ranks under horovodrun, as users launch them; each rank's exit code is caught by a wrapper that
outlives the launcher's SIGTERM (as the step of a job script sees them): a video that only rank 1 reads
is corrupt (both ranks exit 4, whichever exits first; rank 0 writes the ``end`` record ``failed`` naming
rank 1 and the video), and rank 1 killed with SIGKILL mid-run (rank 0's one line names rank 1 instead of
Horovod's shutdown text; the ``end`` record says so).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import PYTHON, REPO, horovodrun, kill_after_first_step, launcher_env, run_bounded
from tsm_dist.data.synthetic import make_synthetic
from tsm_dist.commands.exit_codes import EXIT_DATA, EXIT_STORAGE
from tsm_dist.runlog.records import read_records

pytestmark = pytest.mark.multirank

CONFIG = str(REPO / "configs" / "synthetic_tsm.yaml")
TINY = ["model.width=8", "data.batch_size=2", "data.crop_size=32", "data.scale_size=32", "log.wandb=disabled",
        "log.progress=false", "engine.name=horovod"]
# the exit code of each rank, kept past the launcher's SIGTERM
WRAPPER = ("trap 'true' TERM; \"$@\" & pid=$!; while :; do wait $pid; rc=$?; kill -0 $pid 2>/dev/null || break; "
           "done; echo $rc > {out}/rc.$HOROVOD_RANK")


def _command(out: Path, workdir: Path, *sets: str) -> list[str]:
    args = ["--config", CONFIG, "--workdir", str(workdir)] + [a for s in [*TINY, *sets] for a in ("--set", s)]
    return horovodrun(2, "bash", "-c", WRAPPER.format(out=out), "rank", PYTHON, "-m", "tsm_dist.training.train", *args)


def _codes(out: Path) -> list[str]:
    return [(out / f"rc.{r}").read_text().strip() if (out / f"rc.{r}").exists() else "none" for r in (0, 1)]


def test_a_data_error_on_rank_1_is_recorded_by_rank_0_and_every_rank_exits_4(tmp_path):
    root = tmp_path / "data"
    make_synthetic(str(root), videos_per_class=2, frames=12, size=32, seed=0, val_fraction=0.5)
    (root / "corrupt.webm").write_bytes(b"\x1aE\xdf\xa3" + bytes(range(256)) * 8)
    lines = (root / "train.txt").read_text().splitlines()
    bad = tmp_path / "train_bad.txt"
    bad.write_text("\n".join([lines[0], "corrupt.webm 1", *lines[1:]]) + "\n")
    out, workdir = tmp_path / "rc", tmp_path / "w"
    out.mkdir()
    # train.seed=4 puts sample 1 (the corrupt video) in rank 1's first batch and nowhere in rank 0's epoch
    cmd = _command(out, workdir, f"data.root={root}", f"data.train_list={bad}", "data.backend=pyav",
                   "train.seed=4", "train.epochs=1")
    result = run_bounded(cmd, timeout=240, env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO)
    errors = [line for line in result.stdout.splitlines() if "data error:" in line]
    assert len(errors) == 1 and "rank 1:" in errors[0] and "corrupt.webm" in errors[0], result.stdout[-3000:]
    assert "data.skip_corrupt=true" in errors[0]
    assert _codes(out) == [str(EXIT_DATA)] * 2, result.stdout[-3000:]
    end = [r for r in read_records(workdir / "metrics.jsonl") if r["type"] == "end"]
    assert len(end) == 1 and end[0]["status"] == "failed" and end[0]["exit_code"] == EXIT_DATA, end
    assert end[0]["cause"].startswith("rank 1 failed: ") and "corrupt.webm" in end[0]["cause"]


def test_a_killed_rank_is_named_by_the_survivor_and_recorded(tmp_path):
    out, workdir = tmp_path / "rc", tmp_path / "w"
    out.mkdir()
    cmd = _command(out, workdir, "data.backend=random", "data.num_samples=64", "model.num_frames=2",
                   "train.epochs=50", "log.interval=1")
    _, output = kill_after_first_step(
        cmd, workdir / "metrics.jsonl", env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO,
        victims=lambda: [pid for pid in _rank_processes(str(workdir)) if _environ(pid).get("HOROVOD_RANK") == "1"])
    ours = [line for line in output.splitlines() if "tsm-dist train:" in line]
    assert len(ours) == 1 and "rank 1 was lost without a word" in ours[0], output[-3000:]
    assert "Traceback" not in output
    end = [r for r in read_records(workdir / "metrics.jsonl") if r["type"] == "end"]
    assert len(end) == 1 and end[0]["status"] == "failed" and "rank 1 was lost" in end[0]["cause"], end
    assert _codes(out)[0] == "1"


def _rank_processes(marker: str) -> list[int]:
    """The python rank processes (not their wrappers) whose command line holds ``marker``."""
    found = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in argv and b"tsm_dist.training.train" in argv and Path(argv[0].decode()).name.startswith("python"):
            found.append(int(pid_dir.name))
    return found


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\0") if b"=" in item)


def test_a_failed_checkpoint_write_stops_every_rank_with_6(tmp_path):
    """Rank 0's checkpoint write hits a file-size quota (``ulimit -f``: EFBIG): one line, both ranks 6, the
    ``end`` record says why."""
    out, workdir = tmp_path / "rc", tmp_path / "w"
    out.mkdir()
    cmd = _command(out, workdir, "data.backend=random", "data.num_samples=16", "model.num_frames=2",
                   "train.epochs=1")
    at = cmd.index("bash")
    cmd[at + 2] = "trap '' XFSZ; ulimit -f 1024; " + cmd[at + 2]  # 1 MiB per file: records fit, a checkpoint not
    result = run_bounded(cmd, timeout=240, env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO)
    lines = [line for line in result.stdout.splitlines() if "storage error:" in line]
    assert len(lines) == 1 and "File too large" in lines[0], result.stdout[-3000:]
    assert _codes(out) == [str(EXIT_STORAGE)] * 2, result.stdout[-3000:]
    end = [r for r in read_records(workdir / "metrics.jsonl") if r["type"] == "end"]
    assert len(end) == 1 and (end[0]["status"], end[0]["exit_code"]) == ("failed", EXIT_STORAGE)

"""One clear line per error, from one rank, with a documented exit code (tsm_dist/commands/exit_codes.py).

The trainer and evaluator run as users run them (``python -m tsm_dist.training.train``, 1 process and 2 ranks
under horovodrun) on a real synthetic VP9 set with bad entries written into its lists: a missing,
an empty, a corrupt and a truncated video, a label out of range, a malformed line, a missing list; an
unknown model name; a missing and a corrupt ``--resume`` checkpoint; a checkpoint of another model.
Each must give exactly one line naming the culprit, the documented code, and no traceback (unless
``--debug``).
"""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, horovodrun, launcher_env, run_bounded
from tsm_dist.data.synthetic import make_synthetic
from tsm_dist.commands.exit_codes import EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DATA

CONFIG = str(REPO / "configs" / "synthetic_tsm.yaml")
TINY = ["model.width=8", "data.batch_size=2", "data.crop_size=32", "data.scale_size=32", "train.epochs=1",
        "log.wandb=disabled", "log.progress=false", "engine.name=torch", "data.backend=pyav"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(str(root), videos_per_class=2, frames=12, size=32, seed=0, val_fraction=0.5)
    good = (root / "val.txt").read_text().splitlines()[0].split()[0]
    (root / "empty.webm").write_bytes(b"")
    (root / "corrupt.webm").write_bytes(b"\x1aE\xdf\xa3" + bytes(range(256)) * 8)
    data = (root / good).read_bytes()
    (root / "truncated.webm").write_bytes(data[: len(data) // 2])  # promises 12 frames, holds fewer
    return root


def _train(root: Path, workdir: Path, *sets: str, extra: tuple[str, ...] = (), np: int = 1,
           env: dict[str, str] | None = None):
    args = ["--config", CONFIG, "--workdir", str(workdir), "--set", f"data.root={root}"]
    args += [a for s in [*TINY, *sets] for a in ("--set", s)] + list(extra)
    cmd = [PYTHON, "-m", "tsm_dist.training.train", *args]
    if np > 1:
        cmd = horovodrun(np, *cmd)
    return run_bounded(cmd, timeout=240, env=launcher_env(PYTHONPATH=str(REPO), **(env or {})), cwd=REPO)


def _with_val_entry(root: Path, tmp_path: Path, line: str) -> str:
    lines = (root / "val.txt").read_text().splitlines()
    path = tmp_path / "val_bad.txt"
    path.write_text("\n".join(lines[:1] + [line] + lines[1:]) + "\n")
    return str(path)


def _error_lines(output: str, kind: str) -> list[str]:
    return [line for line in output.splitlines() if f"{kind} error:" in line]


def _no_traceback(output: str) -> bool:
    return "Traceback (most recent call last)" not in output


def _rank_traceback(output: str) -> bool:
    """A traceback printed by a rank (horovodrun prefixes rank output with [r]<stderr>:; its own
    RuntimeError about the failed ranks is not ours)."""
    return any("Traceback (most recent call last)" in line for line in output.splitlines() if line.startswith("["))


@pytest.mark.parametrize("entry, culprit, reason", [
    ("missing.webm 0", "missing.webm", "file not found"),
    ("empty.webm 1", "empty.webm", "file is empty"),
    ("corrupt.webm 1", "corrupt.webm", "not a readable video"),
    ("truncated.webm 0", "truncated.webm", "truncated: the container promises 12 frames"),
    ("val_bad_label.webm 7", "val_bad.txt:2", "label 7 of val_bad_label.webm is outside the classes [0, 4)"),
    ("just-a-path-without-label", "val_bad.txt:2", "expected 'path label"),
])
def test_bad_validation_entry_is_one_line_before_training(dataset, tmp_path, entry, culprit, reason):
    bad_list = _with_val_entry(dataset, tmp_path, entry)
    result = _train(dataset, tmp_path / "w", f"data.val_list={bad_list}")
    assert result.returncode == EXIT_DATA, result.stdout[-3000:]
    lines = _error_lines(result.stdout, "data")
    assert len(lines) == 1 and culprit in lines[0] and reason in lines[0], result.stdout[-3000:]
    assert _no_traceback(result.stdout), result.stdout[-3000:]
    assert not (tmp_path / "w" / "metrics.jsonl").exists()  # found before the first step, not after an epoch


def test_truncated_video_is_corrupt_even_when_short_videos_loop(dataset, tmp_path):
    """A short video may loop; a truncated one is corrupt: skipped and counted under skip_corrupt."""
    bad_list = _with_val_entry(dataset, tmp_path, "truncated.webm 0")
    result = _train(dataset, tmp_path / "w", f"data.val_list={bad_list}", "data.short_videos=loop")
    assert result.returncode == EXIT_DATA and "truncated" in result.stdout, result.stdout[-3000:]
    result = _train(dataset, tmp_path / "w2", f"data.val_list={bad_list}", "data.short_videos=loop",
                    "data.skip_corrupt=true")
    assert result.returncode == 0, result.stdout[-3000:]
    from tsm_dist.runlog.records import read_records

    end = read_records(tmp_path / "w2" / "metrics.jsonl")[-1]
    assert [Path(s[0]).name for s in end["skipped"]] == ["truncated.webm"], end["skipped"]


@pytest.mark.parametrize("backend", ["dali", "pyav"])
def test_truncated_video_is_skipped_by_both_backends_even_with_loop(dataset, tmp_path, backend):
    from tsm_dist.data.video_loader import build_video_loader

    listed = tmp_path / "list.txt"
    listed.write_text((dataset / "val.txt").read_text() + "truncated.webm 0\n")
    loader = build_video_loader(str(listed), str(dataset), backend=backend, num_frames=8, batch_size=2,
                                crop_size=16, train=False, num_classes=4, short_videos="loop", skip_corrupt=True)
    batches = list(loader)
    assert sum(int((labels >= 0).sum()) for _, labels in batches) == len(listed.read_text().splitlines()) - 1
    assert [Path(p).name for p, _ in loader.skipped] == ["truncated.webm"], loader.skipped
    assert "truncated: the container promises 12 frames" in loader.skipped[0][1]


@pytest.mark.parametrize("codec, ext", [("mjpeg", "avi"), ("libvpx-vp9", "webm")])
def test_probe_finds_truncation_by_header_count_and_by_duration(tmp_path, codec, ext):
    """AVI/MP4 headers hold the exact frame count, WebM only a duration: both reveal a cut-off file."""
    import numpy as np

    from tsm_dist.data.encode import write_video
    from tsm_dist.data.errors import VideoError
    from tsm_dist.data.probe import probe_video

    path = tmp_path / f"v.{ext}"
    write_video(str(path), np.random.default_rng(0).integers(0, 255, (24, 32, 32, 3), dtype=np.uint8), codec=codec)
    assert probe_video(str(path)).num_frames == 24
    data = path.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match="truncated: the container promises 24 frames but only"):
        probe_video(str(cut))


@pytest.mark.multirank
def test_two_ranks_one_line_same_code(dataset, tmp_path):
    """Under horovodrun, which terminates the other ranks when one exits: one line, code 4 on both."""
    bad_list = _with_val_entry(dataset, tmp_path, "missing.webm 0")
    out = tmp_path / "ranks"
    out.mkdir()
    args = ["--config", CONFIG, "--workdir", str(tmp_path / "w"), "--set", f"data.root={dataset}"]
    args += [a for s in [*TINY, f"data.val_list={bad_list}", "engine.name=horovod"] for a in ("--set", s)]
    rank = " ".join(shlex.quote(a) for a in [PYTHON, "-m", "tsm_dist.training.train", *args])
    script = (f"trap 'true' TERM; {rank} & pid=$!; while :; do wait $pid; rc=$?; kill -0 $pid 2>/dev/null || break; "
              f"done; echo $rc > {out}/rc.$HOROVOD_RANK")
    result = run_bounded(horovodrun(2, "bash", "-c", script), timeout=240,
                         env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO)
    lines = _error_lines(result.stdout, "data")
    assert len(lines) == 1 and "missing.webm" in lines[0] and "file not found" in lines[0], result.stdout[-3000:]
    codes = [(out / f"rc.{r}").read_text().strip() if (out / f"rc.{r}").exists() else "none" for r in (0, 1)]
    assert codes == ["4", "4"], result.stdout[-3000:]
    assert not _rank_traceback(result.stdout), result.stdout[-3000:]


@pytest.mark.multirank
def test_a_bad_training_video_found_mid_run_is_one_line_from_its_rank(dataset, tmp_path):
    """The start-up check only stats the training list (cheap); a corrupt training video is found by
    the rank whose shard reads it: that rank names it, the other exits quietly."""
    train = tmp_path / "train_bad.txt"
    train.write_text("corrupt.webm 1\n" + (dataset / "train.txt").read_text())
    result = _train(dataset, tmp_path / "w", f"data.train_list={train}", "engine.name=horovod", np=2)
    lines = _error_lines(result.stdout, "data")
    assert len(lines) == 1 and "corrupt.webm" in lines[0] and "not a readable video" in lines[0], \
        result.stdout[-3000:]
    assert "rank " in lines[0]  # only that rank knows: it says which it is
    assert not _rank_traceback(result.stdout), result.stdout[-3000:]  # the other rank exits quietly


def test_missing_file_list_names_path_root_and_the_command(dataset, tmp_path):
    result = _train(dataset, tmp_path / "w", "data.train_list=nothere.txt")
    lines = _error_lines(result.stdout, "data")
    assert result.returncode == EXIT_DATA and len(lines) == 1, result.stdout[-3000:]
    assert str(dataset / "nothere.txt") in lines[0] and f"data.root='{dataset}'" in lines[0]
    assert "tsm-dist make-synthetic --out" in lines[0] and _no_traceback(result.stdout)


def test_debug_shows_the_traceback(dataset, tmp_path):
    result = _train(dataset, tmp_path / "w", "data.train_list=nothere.txt", env={"TSM_DIST_DEBUG": "1"})
    assert result.returncode == EXIT_DATA and "Traceback (most recent call last)" in result.stdout
    result = _train(dataset, tmp_path / "w", "data.train_list=nothere.txt", extra=("--debug",))
    assert result.returncode == EXIT_DATA and "Traceback (most recent call last)" in result.stdout


def test_unknown_model_name_is_a_config_error(dataset, tmp_path):
    result = _train(dataset, tmp_path / "w", "model.name=tsm8f_r5")
    lines = _error_lines(result.stdout, "config")
    assert result.returncode == EXIT_CONFIG and len(lines) == 1 and "did you mean 'tsm8f_r50'" in lines[0]


def test_checkpoint_errors(dataset, tmp_path):
    workdir = tmp_path / "w"
    result = _train(dataset, workdir, extra=("--resume", str(tmp_path / "missing.pt")))
    lines = _error_lines(result.stdout, "checkpoint")
    assert result.returncode == EXIT_CHECKPOINT and len(lines) == 1 and "missing.pt" in lines[0]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    result = _train(dataset, workdir, extra=("--resume", str(bad)))
    lines = _error_lines(result.stdout, "checkpoint")
    assert result.returncode == EXIT_CHECKPOINT and len(lines) == 1 and "bad.pt cannot be read" in lines[0]
    assert _no_traceback(result.stdout)

    # a TSM checkpoint is refused by a TSN config: by eval and by resume, naming both models
    assert _train(dataset, workdir).returncode == 0
    saved = sorted((workdir / "checkpoints").glob("ckpt_*.pt"))[-1]
    sets = [a for s in [*TINY, f"data.root={dataset}", "model.name=tsn8f_r50"] for a in ("--set", s)]
    result = run_bounded([PYTHON, "-m", "tsm_dist.training.evaluate", "--config", CONFIG, "--checkpoint", str(saved), *sets],
                         timeout=240, env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO)
    lines = _error_lines(result.stdout, "checkpoint")
    assert result.returncode == EXIT_CHECKPOINT and len(lines) == 1, result.stdout[-3000:]
    assert "name=tsm8f_r50" in lines[0] and "name=tsn8f_r50" in lines[0]
    result = _train(dataset, workdir, "model.name=tsn8f_r50", "train.epochs=2", extra=("--resume", "auto"))
    assert result.returncode == EXIT_CHECKPOINT and "is for another model" in result.stdout
    result = _train(dataset, workdir, "model.num_frames=4", "train.epochs=2", extra=("--resume", "auto"))
    assert result.returncode == EXIT_CHECKPOINT and "num_frames=8" in result.stdout and "num_frames=4" in result.stdout


def test_check_data_probes_every_video_and_summarises(dataset, tmp_path):
    bad_list = _with_val_entry(dataset, tmp_path, "truncated.webm 0")
    sets = [a for s in [*TINY, f"data.root={dataset}", f"data.val_list={bad_list}"] for a in ("--set", s)]
    result = run_bounded([PYTHON, "-m", "tsm_dist.cli", "check-data", "--config", CONFIG, *sets], timeout=120,
                         env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO)
    assert result.returncode == EXIT_DATA, result.stdout[-3000:]
    assert "data.train_list" in result.stdout and "0 bad (none)" in result.stdout
    assert "1 bad (1 truncated)" in result.stdout and "truncated.webm" in result.stdout
    assert "videos probed" in result.stdout  # the progress (plain lines when not on a terminal)
    good = [a for s in [*TINY, f"data.root={dataset}"] for a in ("--set", s)]
    result = run_bounded([PYTHON, "-m", "tsm_dist.cli", "check-data", "--config", CONFIG, *good], timeout=120,
                         env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO)
    assert result.returncode == 0 and "every listed video is usable" in result.stdout, result.stdout[-2000:]


def test_yaml_exponent_numbers_are_floats(tmp_path):
    from tsm_dist.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(Path(CONFIG).read_text().replace("weight_decay: 1.0e-4", "weight_decay: 1e-4")
                    .replace("base_lr: 0.02", "base_lr: 5e-5"))
    cfg = load_config(path, ["engine.fusion_threshold_mb=1e6", "train.max_steps=1e3"])
    assert (cfg.optim.weight_decay, cfg.optim.base_lr, cfg.engine.fusion_threshold_mb) == (1e-4, 5e-5, 1e6)
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)

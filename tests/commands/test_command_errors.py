"""The newer commands under the one-line contract (issue 29): export, stream, early-recognition, pack,
the batch study and the trainer's data paths give one line with the documented code for bad input, and
an interrupt at any moment of a command's start is one line and 130 (SIGINT) / 143 (SIGTERM).

Every command runs as users run it (``tsm-dist ...``, ``python -m ...``) in a subprocess.
"""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, VENV_BIN, launcher_env, run_bounded
from tsm_dist.data.pack.format import read_meta
from tsm_dist.data.pack.write import main as pack_main
from tsm_dist.data.synthetic import make_synthetic
from tsm_dist.commands.exit_codes import EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DATA, EXIT_STORAGE

CONFIG = str(REPO / "configs" / "synthetic_tsm.yaml")
TINY = ["data.backend=random", "data.num_samples=8", "data.batch_size=4", "data.crop_size=32", "model.width=8",
        "model.num_frames=2", "train.epochs=1", "log.wandb=disabled", "log.progress=false", "engine.name=torch",
        "model.online=true"]


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return run_bounded([str(VENV_BIN / "tsm-dist"), *args], timeout=timeout, env=launcher_env(), cwd=REPO)


def _one_line(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert result.returncode == code and len(lines) == 1, (result.returncode, result.stdout[-3000:])
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


def _argparse_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """argparse's own form: the usage, then one error line naming the option; exit 2."""
    assert result.returncode == EXIT_CONFIG and "Traceback" not in result.stdout, result.stdout[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert all(word in last for word in words), last


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(str(root), videos_per_class=2, frames=12, size=32, seed=0)
    return root


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """An online ONNX export of a tiny trained TSM (and the checkpoint it came from, beside it)."""
    out = tmp_path_factory.mktemp("model")
    args = ["--config", CONFIG, "--workdir", str(out / "run"), *[a for s in TINY for a in ("--set", s)]]
    trained = run_bounded([PYTHON, "-m", "tsm_dist.training.train", *args], timeout=240,
                          env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO)
    assert trained.returncode == 0, trained.stdout[-3000:]
    exported = _run("export", "--checkpoint", str(out / "run" / "checkpoints" / "best.pt"), "--out",
                    str(out / "m.onnx"))
    assert exported.returncode == 0, exported.stdout[-3000:]
    return out / "m.onnx"


# ------------------------------------------------------------------- export
def test_export_to_a_directory_is_one_line(model, tmp_path):
    _one_line(_run("export", "--checkpoint", str(model.parent / "run" / "checkpoints" / "best.pt"), "--out",
                   str(tmp_path)), EXIT_CONFIG, "config error", f"--out {tmp_path} is a directory")


def test_export_torchscript_to_a_read_only_place_is_a_storage_error(model):
    _one_line(_run("export", "--checkpoint", str(model.parent / "run" / "checkpoints" / "best.pt"),
                   "--format", "torchscript", "--out", "/sys/tsm_dist_model.pt"), EXIT_STORAGE,
              "storage error", "cannot write /sys/tsm_dist_model.pt")


def test_export_size_0_is_refused(model):
    _argparse_error(_run("export", "--checkpoint", str(model.parent / "run" / "checkpoints" / "best.pt"),
                         "--size", "0", "--out", "x.onnx"), "--size", "must be >= 1")


# ------------------------------------------------------------------- stream, early recognition
@pytest.fixture()
def corrupt_model(model, tmp_path) -> Path:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a protobuf at all" * 20)
    (tmp_path / "bad.onnx.json").write_text((model.parent / "m.onnx.json").read_text())
    return bad


def test_stream_and_early_recognition_on_a_corrupt_model_are_one_line(corrupt_model, data):
    _one_line(_run("stream", "--model", str(corrupt_model), "--video", "synthetic:0"), EXIT_CHECKPOINT,
              "checkpoint error", f"model {corrupt_model} cannot be loaded by onnxruntime")
    _one_line(_run("early-recognition", "--model", str(corrupt_model), "--list", str(data / "val.txt")),
              EXIT_CHECKPOINT, "checkpoint error", f"model {corrupt_model} cannot be loaded by onnxruntime")


def test_stream_and_early_recognition_of_a_missing_model_name_the_model(data, tmp_path):
    missing = tmp_path / "absent.onnx"
    _one_line(_run("stream", "--model", str(missing), "--video", str(data / "x.webm")), EXIT_CONFIG,
              "config error", f"model {missing} does not exist")
    _one_line(_run("early-recognition", "--model", str(missing), "--list", str(data / "val.txt")), EXIT_CONFIG,
              "config error", f"model {missing} does not exist")


def test_stream_on_a_truncated_video_is_a_data_error(model, data, tmp_path):
    video = next((data / "videos").rglob("*.webm")).read_bytes()
    truncated = tmp_path / "truncated.webm"
    truncated.write_bytes(video[: len(video) * 3 // 10])  # the header and less than a frame
    line = _one_line(_run("stream", "--model", str(model), "--video", str(truncated), "--quiet"), EXIT_DATA,
                     "data error", str(truncated))
    assert "skip_corrupt" not in line  # a training option, no help here


def test_stream_on_a_video_cut_after_some_frames_streams_them_and_says_the_rest_is_missing(model, data, tmp_path):
    """FFmpeg decodes a cut-off file's frames and stops without an error: the stream shows the frames there
    are, then one data-error line with the counts (it exited 0 with fewer frames before)."""
    video = next((data / "videos").rglob("*.webm")).read_bytes()
    cut = tmp_path / "cut.webm"
    cut.write_bytes(video[: len(video) * 6 // 10])
    jsonl = tmp_path / "frames.jsonl"
    result = _run("stream", "--model", str(model), "--video", str(cut), "--quiet", "--every", "1", "--jsonl", str(jsonl))
    line = _one_line(result, EXIT_DATA, "data error", str(cut), "truncated", "frame(s) decoded", "promises")
    streamed = len(jsonl.read_text().splitlines())
    assert 0 < streamed and f"{streamed} frame(s) decoded" in line  # --every 1: every decoded frame streamed


@pytest.mark.parametrize("option, value, words", [("--frames", "0", ("--frames", "must be >= 1")),
                                                  ("--limit", "-1", ("--limit", "must be >= 0"))])
def test_early_recognition_refuses_bad_counts(model, data, option, value, words):
    _argparse_error(_run("early-recognition", "--model", str(model), "--list", str(data / "val.txt"), option,
                         value), *words)


# ------------------------------------------------------------------- pack, packed sets
def test_pack_out_equal_to_the_list_is_one_line(data):
    before = (data / "train.txt").read_bytes()
    _one_line(_run("pack", "--list", str(data / "train.txt"), "--root", str(data), "--out",
                   str(data / "train.txt"), "--no-progress"), EXIT_CONFIG, "the file list itself")
    assert (data / "train.txt").read_bytes() == before


def _train(data: Path, workdir: Path, *sets: str) -> subprocess.CompletedProcess:
    sets = ("model.width=8", "data.batch_size=2", "data.crop_size=32", "data.scale_size=32", "train.epochs=1",
            "log.wandb=disabled", "log.progress=false", "engine.name=torch", "data.backend=pyav",
            f"data.root={data}", *sets)
    return run_bounded([PYTHON, "-m", "tsm_dist.training.train", "--config", CONFIG, "--workdir", str(workdir),
                        *[a for s in sets for a in ("--set", s)]], timeout=240,
                       env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO)


@pytest.mark.parametrize("weights, words", [("foreign", "not a PyTorch file"),
                                            ("wide", "conv1.weight has shape (16, 3, 7, 7), the model needs (8, 3, 7, 7)")])
def test_a_pretrained_file_that_cannot_initialise_the_model_is_one_line(data, tmp_path, weights, words):
    import torch

    from tsm_dist.models import build_model

    path = tmp_path / f"{weights}.pth"
    if weights == "foreign":  # else: a wider network's weights
        path.write_text("not weights\n")
    else:
        torch.save(build_model("tsn8f_r50", 4, depth=18, width=16).state_dict(), path)
    _one_line(_train(data, tmp_path / "w", "model.depth=18", f"model.pretrained={path}"), EXIT_CHECKPOINT,
              "checkpoint error: model.pretrained:", str(path), words)


def test_training_on_a_directory_without_pack_json_says_what_it_is(data, tmp_path):
    folder = tmp_path / "train.pack"
    folder.mkdir()
    _one_line(_train(data, tmp_path / "w", f"data.train_list={folder}"), EXIT_DATA, "data error",
              f"{folder} is a directory without pack.json")


def test_a_missing_shard_is_fatal_even_with_skip_corrupt(data, tmp_path):
    """Decided (docs/data.md): skip_corrupt skips single bad videos; a missing shard is a set copied in part,
    and skipping it would train on a silently smaller set."""
    packed = tmp_path / "train.pack"
    assert pack_main(["--list", str(data / "train.txt"), "--root", str(data), "--out", str(packed),
                      "--shard-mb", "0.005", "--no-progress"]) == 0
    shards = read_meta(str(packed))["shards"]
    assert len(shards) >= 2
    (packed / shards[1]["file"]).unlink()
    line = _one_line(_train(data, tmp_path / "w", f"data.train_list={packed}", "data.skip_corrupt=true"),
                     EXIT_DATA, "data error", str(packed / shards[1]["file"]))
    assert "never a whole shard" in line


# ------------------------------------------------------------------- the batch study
def test_batch_study_out_that_is_a_file_is_one_line(tmp_path):
    out = tmp_path / "study"
    out.write_text("not a directory\n")
    _one_line(_run("batch-study", "--quick", "--out", str(out)), EXIT_CONFIG, f"--out {out} is a file")
    assert out.read_text() == "not a directory\n"


def test_batch_study_collect_with_a_plan_that_is_not_json_is_one_line(tmp_path):
    (tmp_path / "plan.json").write_text("{half a plan")
    result = run_bounded([PYTHON, "-m", "tsm_dist.batch_study", "collect", str(tmp_path)], timeout=120,
                         env=launcher_env(PYTHONPATH=str(REPO)), cwd=REPO)
    _one_line(result, EXIT_CONFIG, str(tmp_path / "plan.json"), "cannot be read as a study plan")


# ------------------------------------------------------------------- interrupts while a command starts
SWALLOWING_IMPORT = """
import os, signal, time
try:  # an import that catches everything, as one did half-way through numpy's
    os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
    time.sleep(5)
except BaseException:
    pass
"""


@pytest.mark.parametrize("name, code, line", [("SIGINT", 130, "tsm-dist: interrupted"),
                                              ("SIGTERM", 143, "tsm-dist: terminated (SIGTERM)")])
def test_an_interrupt_during_an_import_cannot_be_swallowed(tmp_path, name, code, line):
    (tmp_path / "swallowing.py").write_text(SWALLOWING_IMPORT)
    program = ("import sys; sys.argv[0] = '-m'; import tsm_dist; import swallowing; "  # as under python -m
               "print('went on after the interrupt')")
    result = subprocess.run([PYTHON, "-c", program], capture_output=True, text=True, timeout=60,
                            env=launcher_env(PYTHONPATH=f"{REPO}:{tmp_path}", SIGNAL=name))
    assert (result.returncode, result.stdout, result.stderr.strip()) == (code, "", line), result
    # outside an import, Ctrl-C stays the KeyboardInterrupt a command handles (cleanup, then one line)
    program = ("import sys, os, signal; sys.argv[0] = '-m'; import tsm_dist\ntry:\n    os.kill(os.getpid(), "
               "signal.SIGINT)\nexcept KeyboardInterrupt:\n    print('cleaned up')")
    result = subprocess.run([PYTHON, "-c", program], capture_output=True, text=True, timeout=60,
                            env=launcher_env(PYTHONPATH=str(REPO)))
    assert (result.returncode, result.stdout) == (0, "cleaned up\n"), result


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler: tsm_dist is imported (Python itself installs none)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.parametrize("name, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_an_interrupt_at_any_moment_of_the_trainer_start_is_one_line(name, code, tmp_path):
    """``python -m tsm_dist.training.train`` with a config that does not exist: it imports torch and numpy, then
    stops with exit 2. An interrupt anywhere in between is one line and 130/143; after it, the config error.
    (Python's own start, before the package is imported, ends by the signal itself; the interrupts here
    come after the package's first line, which the SIGTERM handler shows.)"""
    outcomes = []
    for delay in (0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.1, 1.5):
        proc = subprocess.Popen([PYTHON, "-m", "tsm_dist.training.train", "--config", str(tmp_path / "none.yaml")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                env=launcher_env(PYTHONPATH=str(REPO)))
        deadline = time.monotonic() + 30
        while proc.poll() is None and not _catches_sigterm(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        proc.send_signal(getattr(signal, name))
        output, _ = proc.communicate(timeout=60)
        lines = output.strip().splitlines()
        outcomes.append((delay, proc.returncode))
        assert proc.returncode in (code, EXIT_CONFIG) and len(lines) == 1, (delay, proc.returncode, output)
        assert "Traceback" not in output and lines[0].startswith("tsm-dist"), (delay, output)
        if proc.returncode == EXIT_CONFIG:
            assert "config error" in lines[0], (delay, output)
    assert sum(rc == code for _, rc in outcomes) >= 3, outcomes

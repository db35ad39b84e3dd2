"""Checkpoint files: keep the last N plus the best, atomic writes, corrupt and stale files, resume auto."""
from __future__ import annotations


import pytest
import torch

from tsm_dist.commands.exit_codes import CheckpointError
from tsm_dist.state import checkpoint as ckpt


def test_keep_last_n_plus_best_and_latest(tmp_path):
    for i, step in enumerate([10, 20, 30, 40]):
        ckpt.save_checkpoint(tmp_path, {"model": {"w": torch.tensor(float(step))}}, epoch=i + 1, step=step,
                             keep_last=2, is_best=step == 20)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pt", "ckpt_e0003_s00000030.pt", "ckpt_e0004_s00000040.pt"]
    assert ckpt.latest_checkpoint(tmp_path).name == "ckpt_e0004_s00000040.pt"
    assert ckpt.load_checkpoint(tmp_path / "best.pt")["model"]["w"].item() == 20.0
    assert ckpt.resolve_resume("auto", tmp_path.parent / "nothing") is None  # a fresh run


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    ckpt.atomic_save({"model": {}}, tmp_path / "a.pt")

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.atomic_save({"model": {}}, tmp_path / "b.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]  # no b.pt, no temp file


def test_corrupt_checkpoint_is_named(tmp_path):
    bad = tmp_path / "ckpt_e0001_s00000001.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=rf"checkpoint {bad} cannot be read \(not a PyTorch checkpoint: no zip"):
        ckpt.load_checkpoint(bad)
    good = tmp_path / "good.pt"
    ckpt.atomic_save({"model": {"w": torch.ones(1000)}}, good)
    bad.write_bytes(good.read_bytes()[:200])  # cut off in a copy
    with pytest.raises(CheckpointError, match="a damaged or truncated archive; RuntimeError: PytorchStreamReader"):
        ckpt.load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "missing.pt"), tmp_path)


def test_stale_temporaries_of_killed_writes_are_removed(tmp_path):
    ckpt.save_checkpoint(tmp_path, {"model": {}}, epoch=1, step=5, keep_last=2)
    stale = [tmp_path / ".ckpt_e0001_s00000009.pt.k2j3h4.tmp", tmp_path / ".best.pt.zz.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    (tmp_path / "notes.tmp").write_text("not ours")
    assert sorted(p.name for p in ckpt.remove_stale_temporaries(tmp_path)) == sorted(p.name for p in stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_e0001_s00000005.pt", "notes.tmp"]


def test_resume_auto_skips_an_unreadable_newest_checkpoint(tmp_path):
    directory = tmp_path / ckpt.CHECKPOINT_DIR
    ckpt.save_checkpoint(directory, {"model": {"w": torch.tensor(1.0)}}, epoch=1, step=10, keep_last=3)
    ckpt.save_checkpoint(directory, {"model": {"w": torch.tensor(2.0)}}, epoch=2, step=20, keep_last=3)
    newest = directory / ckpt.checkpoint_name(2, 20)
    newest.write_bytes(newest.read_bytes()[:100])  # a file system that lost the tail
    warnings: list[str] = []
    path, state = ckpt.load_resume("auto", tmp_path, warn=warnings.append)
    assert path.name == ckpt.checkpoint_name(1, 10) and state["model"]["w"].item() == 1.0
    assert len(warnings) == 1 and "skipped 1 unreadable" in warnings[0] and newest.name in warnings[0]
    (directory / ckpt.checkpoint_name(1, 10)).write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoint"):
        ckpt.load_resume("auto", tmp_path, warn=warnings.append)
    assert ckpt.load_resume("auto", tmp_path / "fresh") == (None, None)


def test_check_model_names_both_models():
    state = {"model": {}, "config": {"model": {"name": "tsm8f_r50", "num_classes": 4, "depth": 18, "width": 8,
                                               "num_frames": 8}}}
    ckpt.check_model(state, dict(state["config"]["model"]), "c.pt")  # the same model passes
    with pytest.raises(CheckpointError, match="it has name=tsm8f_r50, width=8, the config asks for "
                                              "name=tsn8f_r50, width=16"):
        ckpt.check_model(state, {**state["config"]["model"], "name": "tsn8f_r50", "width": 16}, "c.pt")
    ckpt.check_model({"model": {}}, {"name": "x"}, "old.pt")  # no recorded config: nothing to compare

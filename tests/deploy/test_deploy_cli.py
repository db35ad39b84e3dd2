"""A checkpoint of a real (tiny) online training run becomes a streaming model through the commands:
export (ONNX online/offline, TorchScript), stream, early-recognition; bad exports are one line, exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tsm_dist.cli import main as cli
from tsm_dist.config import load_config
from tsm_dist.models import build_model

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory) -> Path:
    """tsm8f_mbv2 with model.online=true, one epoch on the synthetic set through the trainer."""
    from tsm_dist.state.checkpoint import latest_checkpoint
    from tsm_dist.training.train import train

    workdir = tmp_path_factory.mktemp("mbv2")
    cfg = load_config(Path(__file__).parents[2] / "configs" / "synthetic_tsm_mbv2.yaml", [
        f"data.root={synthetic.root}", "data.crop_size=32", "data.scale_size=32", "data.batch_size=4",
        "model.num_frames=4", "model.width=8", "train.epochs=1", "train.eval_every_epochs=0",
        "engine.name=torch", "log.wandb=disabled", "log.progress=false", "data.num_threads=1"])
    assert train(cfg, workdir) == 0
    return latest_checkpoint(workdir / "checkpoints")


def _save(tmp_path: Path, name: str, **options) -> Path:
    """A checkpoint file as the trainer writes it (model state + resolved config), without training."""
    cfg = load_config(None, ["data.backend=random", "data.num_samples=4", f"model.name={name}",
                             "model.num_classes=3", "model.depth=18", "model.width=8",
                             *[f"model.{k}={v}" for k, v in options.items()]])
    model = build_model(name, 3, depth=18, width=8, **options)
    path = tmp_path / f"{name}.pt"
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    return path


def test_export_online_stream_and_early_recognition(trained, synthetic, tmp_path, capsys) -> None:
    out = tmp_path / "mbv2.onnx"
    assert cli(["export", "--checkpoint", str(trained), "--out", str(out)]) == 0
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert (meta["model"], meta["mode"], meta["num_frames"], meta["input_size"]) == ("tsm8f_mbv2", "online", 4, [32, 32])
    assert meta["classes"][1] == "sweeping left" and len(meta["caches"]) == 10
    assert meta["cache_bytes_per_stream"] == sum(4 * np.prod(c["shape"][1:]) for c in meta["caches"])
    jsonl = tmp_path / "frames.jsonl"
    assert cli(["stream", "--model", str(out), "--video", "synthetic:1:3", "--smooth", "2", "--jsonl", str(jsonl)]) == 0
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(32))
    assert all(r["name"] == meta["classes"][r["top1"]] and 0 < r["prob"] <= 1 for r in records)
    assert "32 frames" in capsys.readouterr().out
    prefix = tmp_path / "early"
    assert cli(["early-recognition", "--model", str(out), "--list", synthetic.val_list, "--out", str(prefix)]) == 0
    curve = json.loads(Path(f"{prefix}.json").read_text())
    assert curve["videos"] == 4 and curve["observed"] == [0.25, 0.5, 0.75, 1.0]
    assert Path(f"{prefix}.png").stat().st_size > 1000 and "| 100.0 % | 4 |" in Path(f"{prefix}.md").read_text()


def test_early_recognition_at_full_video_is_the_offline_clip_prediction(trained, synthetic, tmp_path) -> None:
    """At 100 % observed, the online running mean of logits is the offline uni-directional clip model."""
    from tsm_dist.deploy.early import early_curve
    from tsm_dist.deploy.export import trained_model
    from tsm_dist.deploy.frames import Preprocess, segment_frames
    from tsm_dist.streaming.onnx_stream import OnnxStream

    out = tmp_path / "m.onnx"
    assert cli(["export", "--checkpoint", str(trained), "--out", str(out)]) == 0
    model, cfg = trained_model(str(trained), None, [])
    videos = [(str(Path(synthetic.root) / f"videos/sweeping_left/{i:05d}.webm"), 1) for i in (4,)]
    prep = Preprocess(32, 32)
    clip = torch.from_numpy(prep(segment_frames(videos[0][0], 4)))[None]
    with torch.no_grad():
        offline_right = int(model(clip).argmax()) == 1
    assert early_curve(OnnxStream(out), videos, 4)[-1] == float(offline_right)


def test_export_offline_and_torchscript(trained, tmp_path) -> None:
    assert cli(["export", "--checkpoint", str(trained), "--mode", "offline", "--out", str(tmp_path / "c.onnx")]) == 0
    assert json.loads((tmp_path / "c.onnx.json").read_text())["shapes"]["clips"] == ["batch", 4, 3, 32, 32]
    assert cli(["export", "--checkpoint", str(trained), "--format", "torchscript", "--out", str(tmp_path / "s.pt")]) == 0
    assert (tmp_path / "s.pt").stat().st_size > 0


@pytest.mark.parametrize("name,options,message", [
    ("tsm8f_r50", {}, "shifts bi-directionally"),
    ("i3d3x1x1_r50", {}, "is a 3D model"),
])
def test_bad_online_exports_are_one_line_exit_2(tmp_path, capsys, name, options, message) -> None:
    ckpt = _save(tmp_path, name, **options)
    assert cli(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "x.onnx").exists()


def test_stream_refuses_an_offline_export_in_one_line(tmp_path, capsys) -> None:
    ckpt = _save(tmp_path, "tsm8f_r50")
    assert cli(["export", "--checkpoint", str(ckpt), "--mode", "offline", "--size", "32",
                "--out", str(tmp_path / "c.onnx")]) == 0
    capsys.readouterr()
    assert cli(["stream", "--model", str(tmp_path / "c.onnx"), "--video", "synthetic:0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "offline onnx export" in err[0]


def test_an_online_checkpoint_is_refused_for_an_offline_config(trained, synthetic, tmp_path, capsys) -> None:
    """model.online is part of the checkpoint's model identity: exporting with a config that builds the
    bi-directional model is refused (exit 5), naming the option."""
    config = Path(__file__).parents[2] / "configs" / "synthetic_tsm_mbv2.yaml"
    argv = ["export", "--checkpoint", str(trained), "--config", str(config), "--out", str(tmp_path / "x.onnx"),
            "--set", f"data.root={synthetic.root}", "--set", "model.num_frames=4", "--set", "model.width=8"]
    assert cli([*argv, "--set", "model.online=false"]) == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "online=True" in err[0] and "online=False" in err[0]
    assert cli(argv) == 0  # the config it was trained with


def test_sidecar_says_what_outputs_are_and_stream_takes_its_frame_spacing(tmp_path, capsys) -> None:
    cfg = load_config(None, ["data.backend=random", "data.num_samples=4", "data.sampling=dense", "data.stride=4",
                             "model.name=tsm8f_mbv2", "model.num_classes=3", "model.width=8", "model.online=true",
                             "data.crop_size=32"])
    ckpt = tmp_path / "dense.pt"
    torch.save({"model": build_model("tsm8f_mbv2", 3, width=8, online=True).state_dict(), "config": cfg.to_dict()}, ckpt)
    out = tmp_path / "m.onnx"
    assert cli(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["frame_spacing"]["every"] == 4 and meta["preprocess"]["resize"]["method"] == "bilinear"
    assert "before softmax" in meta["output_meaning"]["logits"] and "mean" in meta["output_meaning"]["logits"]
    assert meta["output_meaning"]["new_cache_03"].startswith("feed as cache_03")
    assert meta["shapes"]["logits"] == ["batch", 3] and meta["graph_form"] == "concat"  # auto for MobileNetV2
    capsys.readouterr()
    jsonl = tmp_path / "f.jsonl"
    assert cli(["stream", "--model", str(out), "--video", "synthetic:0", "--quiet", "--jsonl", str(jsonl)]) == 0
    assert [json.loads(r)["frame"] for r in jsonl.read_text().splitlines()] == list(range(0, 32, 4))
    assert cli(["stream", "--model", str(out), "--video", "synthetic:0", "--quiet", "--every", "1"]) == 0
    assert "32 frames" in capsys.readouterr().out


def test_graph_form_auto_per_architecture_and_split_where_it_applies(tmp_path, capsys) -> None:
    ckpt = _save(tmp_path, "tsm8f_r50", online="true")
    assert cli(["export", "--checkpoint", str(ckpt), "--size", "32", "--out", str(tmp_path / "r.onnx")]) == 0
    assert json.loads((tmp_path / "r.onnx.json").read_text())["graph_form"] == "split"
    cfg = load_config(None, ["data.backend=random", "data.num_samples=4", "model.name=tsm8f_mbv2",
                             "model.num_classes=3", "model.width=8", "model.online=true"])
    ckpt = tmp_path / "mbv2.pt"
    torch.save({"model": build_model("tsm8f_mbv2", 3, width=8, online=True).state_dict(), "config": cfg.to_dict()}, ckpt)
    capsys.readouterr()
    argv = ["export", "--checkpoint", str(ckpt), "--size", "32", "--out", str(tmp_path / "m.onnx")]
    assert cli(argv) == 0 and json.loads((tmp_path / "m.onnx.json").read_text())["graph_form"] == "concat"
    assert cli([*argv, "--graph-form", "split"]) == 0
    assert json.loads((tmp_path / "m.onnx.json").read_text())["graph_form"] == "split"
    inplace = _save(tmp_path, "tsm8f_r50", online="true", shift_place="inplace")  # the shift on the block input
    capsys.readouterr()
    argv = ["export", "--checkpoint", str(inplace), "--size", "32", "--out", str(tmp_path / "i.onnx")]
    assert cli([*argv, "--graph-form", "split"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--graph-form split" in err[0] and not (tmp_path / "i.onnx").exists()

"""Channels-last training on 2 ranks with both engines (Horovod through horovodrun, DDP through torchrun).

Horovod 0.28.1 refuses non-contiguous tensors in every collective, channels-last included, on CPU as on
GPU; DDP warns and copies when a gradient's strides differ from its parameter's. A real (small) TSM with
the fused shift trains 2 steps in channels-last with fp16 gradient compression, checkpoints, and resumes
for 2 more steps (so the optimizer's channels-last momentum is broadcast too); then a small I3D (5D
weights, channels_last_3d) trains 2 steps. Run as a script, this file is the per-rank program.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the rank processes start outside pytest
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import PYTHON, VENV_BIN, free_port, horovodrun, launcher_env, run_bounded  # noqa: E402
from tsm_dist.runlog.records import read_records  # noqa: E402

pytestmark = pytest.mark.multirank

SETTINGS = {"model.name": "tsm8f_r50", "model.num_classes": 4, "model.num_frames": 4, "model.depth": 26,
            "model.width": 8, "model.dropout": 0.0, "data.backend": "random",
            "data.num_samples": 8, "data.batch_size": 2, "data.crop_size": 32, "train.channels_last": True,
            "train.eval_every_epochs": 0, "train.checkpoint_every_epochs": 1, "optim.base_batch": 4,
            "engine.fp16_compression": True, "log.interval": 1, "log.wandb": "disabled", "log.progress": False}


def rank_main(engine_name: str, out: Path) -> None:
    from tsm_dist.config import load_config
    from tsm_dist.distributed.engine import Engine
    from tsm_dist.models import build_model
    from tsm_dist.training.train import train

    settings = {**SETTINGS, "engine.name": engine_name}
    engine = Engine(load_config(None, [f"{k}={v}" for k, v in settings.items()]).engine).init()
    built = []

    def model_builder(name, **kwargs):
        built.append(build_model(name, **kwargs))
        return built[-1]

    codes = []
    for epochs, resume in ((1, None), (2, "auto")):  # 2 steps, checkpoint, then resume for 2 more
        cfg = load_config(None, [f"{k}={v}" for k, v in {**settings, "train.epochs": epochs}.items()])
        codes.append(train(cfg, out / "run", resume=resume, model_builder=model_builder))
    model = built[-1]
    i3d = load_config(None, [f"{k}={v}" for k, v in {**settings, "train.epochs": 1, "model.name": "i3d3x3x3_r50",
                                                      "model.depth": 18, "model.num_frames": 8}.items()])
    codes.append(train(i3d, out / "i3d", model_builder=model_builder))
    torch.save({"codes": codes, "params": {k: v.detach().clone() for k, v in model.named_parameters()},
                "params_3d": {k: v.detach().clone() for k, v in built[-1].named_parameters()},
                "strides_kept": all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters()
                                    if p.dim() == 4)
                and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in built[-1].parameters()
                        if p.dim() == 5)},
               out / f"rank{engine.rank}.pt")
    engine.shutdown()


@pytest.mark.parametrize("engine", ["horovod", "torch"])
def test_channels_last_trains_and_resumes_on_two_ranks(engine: str, tmp_path: Path) -> None:
    script = [PYTHON, __file__, engine, str(tmp_path)]
    cmd = (horovodrun(2, *script) if engine == "horovod" else
           [str(VENV_BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()), *script[1:]])
    result = run_bounded(cmd, timeout=240, env=launcher_env(PYTHONWARNINGS="default"))
    assert result.returncode == 0, result.stdout[-5000:]
    assert "contiguous" not in result.stdout, result.stdout[-3000:]
    assert "Grad strides do not match" not in result.stdout  # DDP's warning for a stride mismatch
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["codes"] for r in ranks] == [[0, 0, 0], [0, 0, 0]]
    assert all(r["strides_kept"] for r in ranks)  # Horovod's grad.set_() kept the parameters' layout
    for key in ("params", "params_3d"):  # (BN statistics are per rank between evaluations)
        for name, tensor in ranks[0][key].items():
            assert torch.equal(tensor, ranks[1][key][name]), name
    headers = [r for r in read_records(tmp_path / "run" / "metrics.jsonl") if r["type"] == "header"]
    assert [h["memory_format"] for h in headers] == ["channels_last", "channels_last"]
    assert headers[1]["resumed_from"]
    ends = [r for r in read_records(tmp_path / "run" / "metrics.jsonl") if r["type"] == "end"]
    assert [e["step"] for e in ends] == [2, 4]
    i3d = read_records(tmp_path / "i3d" / "metrics.jsonl")
    assert i3d[0]["memory_format"] == "channels_last_3d" and i3d[-1]["step"] == 2


if __name__ == "__main__":
    rank_main(sys.argv[1], Path(sys.argv[2]))

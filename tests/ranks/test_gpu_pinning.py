"""Review fixes that decide which GPU a rank runs on and how: checked on CPU with the GPU facts given."""
from __future__ import annotations

import pytest
import torch

from tsm_dist.training.build import amp_dtype
from tsm_dist.config import ConfigError, load_config
from tsm_dist.distributed.engine import shared_gpus
from tsm_dist.commands.exit_codes import EXIT_CONFIG, CoordinatedError

from conftest import REPO


def _cfg(amp: str):
    return load_config(str(REPO / "configs" / "synthetic_tsm.yaml"), [f"train.amp={amp}"])


def test_bf16_on_a_gpu_without_bf16_convolutions_is_one_line() -> None:
    cuda = torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"^train.amp: bf16 needs a GPU of compute capability >= 8.0, cuda:0 is 7.0"):
        amp_dtype(_cfg("bf16"), cuda, capability=lambda device: (7, 0))
    assert amp_dtype(_cfg("bf16"), cuda, capability=lambda device: (8, 0)) is torch.bfloat16
    assert amp_dtype(_cfg("fp16"), cuda, capability=lambda device: (7, 0)) is torch.float16
    assert amp_dtype(_cfg("bf16"), torch.device("cpu")) is torch.bfloat16
    assert amp_dtype(_cfg("none"), cuda, capability=lambda device: (7, 0)) is None


def test_ranks_sharing_a_gpu_are_named() -> None:
    own = [("n1", "GPU-a", 0), ("n1", "GPU-b", 1), ("n2", "GPU-a", 2), ("n2", "GPU-b", 3)]
    assert shared_gpus(own) == ""  # the same UUID text on two nodes is two GPUs
    line = shared_gpus([("n1", "GPU-a", 0), ("n1", "GPU-b", 1), ("n1", "GPU-a", 2)])
    assert line.startswith("ranks 0, 2 share GPU GPU-a on n1") and "\n" not in line


def test_a_shared_gpu_stops_every_rank_with_a_config_exit_code(monkeypatch) -> None:
    """The engine's check after pinning: every rank raises the same coordinated error (rank 0 prints)."""
    from tsm_dist.config import EngineConfig
    from tsm_dist.distributed.engine import Engine

    engine = Engine(EngineConfig(name="torch"))
    engine.device, engine._layout = torch.device("cuda", 0), (1, 2, 1, 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"uuid": "GPU-a"})())
    monkeypatch.setattr(engine, "allgather_object", lambda obj: [(obj[0], "GPU-a", 0), obj])
    with pytest.raises(CoordinatedError, match="ranks 0, 1 share GPU GPU-a") as err:
        engine._refuse_shared_gpu()
    assert err.value.code == EXIT_CONFIG
    monkeypatch.setattr(engine, "allgather_object", lambda obj: [(obj[0], "GPU-b", 0), obj])
    engine._refuse_shared_gpu()
    # the acceptance kit's deliberate two ranks on one GPU: the refusal is off only when asked
    engine.cfg.allow_shared_gpu = True
    monkeypatch.setattr(engine, "allgather_object", lambda obj: [(obj[0], "GPU-a", 0), obj])
    engine._refuse_shared_gpu()

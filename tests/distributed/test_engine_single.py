"""The engine on one process: launcher layouts, and both engines' collectives degenerate correctly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tsm_dist.config import EngineConfig
from tsm_dist.distributed.engine import Engine
from tsm_dist.ranks.layout import launcher_layout


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1, 0, 1)),
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, (3, 4, 1, 2)),  # torchrun
    ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2"}, (1, 2, 1, 2)),
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "12", "OMPI_COMM_WORLD_LOCAL_RANK": "5",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "6"}, (5, 12, 5, 6)),
])
def test_launcher_layout(env, expected):
    assert launcher_layout(env) == expected


def test_torch_engine_alone_needs_no_process_group():
    engine = Engine(EngineConfig(name="torch")).init()
    assert (engine.rank, engine.size, engine.is_root, engine.device.type) == (0, 1, True, "cpu")
    assert engine.allreduce_mean(torch.tensor([2.0, 4.0])).tolist() == [2.0, 4.0]
    assert engine.broadcast_object({"a": 1}) == {"a": 1}
    assert engine.allgather_object(7) == [7]
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine.broadcast_state(model, opt)
    train_model, opt2 = engine.distribute(model, opt, accumulate=2)
    assert train_model is model and opt2 is opt
    engine.shutdown()

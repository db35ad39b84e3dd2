"""Runs on 2 ranks: a channels-last parameter gets a gradient on rank 0 only (rank 1 skips its branch).

usage: missing_grad_worker.py [--raw-horovod]
Every rank prints its averaged gradient's checksum per element position; with the engine's optimizer the
ranks agree, with Horovod's own (``--raw-horovod``) rank 1 reads the sum in another element order. The
weight is 6x3x3x3, so its channels-last view has the contiguous shape and Horovod cannot notice (with
other shapes it stops with "Mismatched ALLREDUCE tensor shapes").
"""
import sys

import torch
from torch import nn

from tsm_dist.config import EngineConfig
from tsm_dist.distributed.engine import started

with started(EngineConfig(name="horovod")) as engine:
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Conv2d(3, 6, 3), "branch": nn.Conv2d(3, 6, 3, bias=False)})
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if "--raw-horovod" in sys.argv:
        import horovod.torch as hvd
        from tsm_dist.distributed.gradients import DenseViewCompressor

        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                             compression=DenseViewCompressor(hvd.Compression.none))
    else:
        _, optimizer = engine.distribute(model, optimizer, accumulate=1)
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5).to(memory_format=torch.channels_last)
    out = model["used"](x).sum()
    if engine.rank == 0:
        out = out + (model["branch"](x) * torch.arange(6.0).view(1, 6, 1, 1)).sum()
    out.backward()
    engine.synchronize(optimizer)
    grad = model["branch"].weight.grad
    grads = engine.allgather_object(grad.contiguous().tolist())
    same = all(g == grads[0] for g in grads)
    strides = grad.stride() == model["branch"].weight.stride()
    if engine.rank == 0:
        print(f"RANKS_AGREE={same} STRIDES_KEPT={strides}", flush=True)

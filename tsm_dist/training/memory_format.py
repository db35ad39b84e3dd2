"""The memory format a model runs in (contiguous, channels-last 2D or 3D) and the format it actually has.

How channels-last gradients reach Horovod's collectives is :mod:`tsm_dist.distributed.gradients`.
"""
from __future__ import annotations

import torch
from torch import nn


def model_memory_format(model: nn.Module) -> str:
    """How the model's convolution weights are stored: "channels_last", "channels_last_3d" or
    "contiguous" (also for a model without 4D/5D weights)."""
    for p in model.parameters():
        if p.dim() == 4 and p.shape[1] > 1 and p.is_contiguous(memory_format=torch.channels_last) \
                and not p.is_contiguous():
            return "channels_last"
        if p.dim() == 5 and p.shape[1] > 1 and p.is_contiguous(memory_format=torch.channels_last_3d) \
                and not p.is_contiguous():
            return "channels_last_3d"
    return "contiguous"


def to_memory_format(model: nn.Module, channels_last: bool) -> tuple[nn.Module, str]:
    """The model in its own channels-last format (2D or 3D, ``model.memory_format``) when asked, and the
    format it actually has afterwards (what the run header records)."""
    if channels_last:
        model = model.to(memory_format=getattr(model, "memory_format", torch.channels_last))
    return model, model_memory_format(model)

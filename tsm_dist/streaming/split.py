"""The "split" graph form of a ResNet's online step: no copy of a block input at any shift point.

onnxruntime's CPU provider runs convs in a blocked channel layout (NCHWc) and fuses into each conv its bias,
one Add (a second input summed into the output) and a ReLU; a Slice or Concat on the channel axis runs in
plain NCHW, so slicing the cache off a block input costs a layout round trip of the whole tensor. Here every
block input is carried as two tensors, its first ``fold`` channels (the next frame's cache, as they are) and
the rest: the convs that write a block output are cut by output rows (each part keeps its fused Add and
ReLU), the shifted conv by input columns, ``conv(rest, W[:, fold:]) + conv(cache, W[:, :fold])`` (the Add
fused into the first). Linear rewrites of the same function on BN-folded weights; no extra MACs but at the
first block, whose input comes whole from the stem (there the new cache is a one-hot 1x1 conv and the
cached columns of the first conv are zero). docs/deploy.md has the measurements.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from tsm_dist.streaming.slots import select_channels

Pair = tuple[Tensor, Tensor]  # (head, tail): a block input's first `fold` channels and the rest


def applies(model: nn.Module) -> bool:
    """A ResNet whose shifts sit at the residual branch (the paper's placement), without temporal pooling."""
    blocks = [b for name in ("layer1", "layer2", "layer3", "layer4") for b in getattr(model, name, ())]
    return (bool(blocks) and all(getattr(b, "shift_place", None) == "residual" for b in blocks)
            and isinstance(getattr(model, "pool2", None), nn.Identity))

def _conv(x: Tensor, conv: nn.Conv2d, rows: slice = slice(None), cols: slice = slice(None),
          bias: bool = True) -> Tensor:
    """``conv`` restricted to output channels ``rows`` and input channels ``cols``."""
    b = conv.bias[rows] if bias and conv.bias is not None else None
    return F.conv2d(x, conv.weight[rows, cols], b, conv.stride, conv.padding, conv.dilation)


def _rows_of(conv: nn.Conv2d, x: Tensor | Pair, rows: slice, fold: int) -> Tensor:
    """``conv(x)[:, rows]`` for a tensor or a pair split at ``fold`` (linear: the sum of its parts)."""
    if not isinstance(x, tuple):
        return _conv(x, conv, rows)
    head, tail = x
    return _conv(tail, conv, rows, slice(fold, None)) + _conv(head, conv, rows, slice(0, fold), bias=False)


def split_block(block: nn.Module, x: Tensor | Pair, cached: Tensor | None, fold: int) -> tuple[Tensor | Pair, Tensor]:
    """``(output, new cache)`` of one BN-folded residual block shifted at its first conv's input. The
    output is a pair split at the next block's fold when the block writes it through convs (it has a
    downsample conv, or its input is a pair), else a tensor."""
    conv1 = block.conv1
    if isinstance(x, tuple):
        new_cache, first = x[0], _conv(x[1], conv1, cols=slice(fold, None))
    else:  # the input comes whole from the stem
        new_cache = select_channels(x, fold)
        zeroed = torch.cat((torch.zeros_like(conv1.weight[:, :fold]), conv1.weight[:, fold:]), 1)
        first = F.conv2d(x, zeroed, conv1.bias, conv1.stride, conv1.padding, conv1.dilation)
    cached = torch.zeros_like(new_cache) if cached is None else cached
    out = block.relu(first + _conv(cached, conv1, cols=slice(0, fold), bias=False))
    last = getattr(block, "conv3", None)
    if last is None:  # basic block: conv2 is the last conv
        last = block.conv2
    else:
        out = block.relu(block.conv2(out))
    ((_, g, _),) = block.shift.shift.groups(last.out_channels)
    if block.downsample is not None:
        down = block.downsample[0]
        identity = (_rows_of(down, x, slice(0, g), fold), _rows_of(down, x, slice(g, None), fold))
    elif isinstance(x, tuple):
        identity = x
    else:
        return block.relu(last(out) + x), new_cache
    parts = (slice(0, g), slice(g, None))
    return (block.relu(_conv(out, last, parts[0]) + identity[0]),
            block.relu(_conv(out, last, parts[1]) + identity[1])), new_cache


def split_step(model: nn.Module, frame: Tensor, caches: list[Tensor | None]) -> tuple[Tensor, list[Tensor]]:
    """``(logits, new caches)`` of a BN-folded online ResNet for ``frame``, every shifted block in the split
    form; ``caches[i]`` is shift point i's input (None: zeros)."""
    x: Tensor | Pair = model.maxpool(model.relu(model.conv1(frame)))
    new_caches: list[Tensor] = []
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            if block.shift is None:
                x = block(torch.cat(x, 1) if isinstance(x, tuple) else x)
                continue
            ((_, fold, _),) = block.shift.shift.groups(block.conv1.in_channels)
            x, cache = split_block(block, x, caches[len(new_caches)], fold)
            new_caches.append(cache)
    feats = torch.cat(x, 1) if isinstance(x, tuple) else x  # one concatenation, of the last 7x7 output
    return model.fc(model.dropout(model.avgpool(feats).flatten(1))), new_caches

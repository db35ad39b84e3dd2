"""MobileNetV2's "split" graph form: the shifted blocks' inputs carried as two tensors, no mask op.

MobileNetV2 shifts the input of its expand conv, which ends in a ReLU6 (Clip). onnxruntime fuses a Clip into
a conv in its blocked layout only when nothing stands between them, so ResNet's cut of the shifted conv by
input columns (:mod:`tsm_dist.streaming.split`: ``conv(rest) + conv(cache)``, an Add before the Clip) would
send the 6x wider expanded tensor out of the blocked layout and back at every shift point. Here the shifted
input is instead assembled before the expand conv, from a pair carried between the shifted blocks of a run:
``head``, the block input's first ``fold`` channels (the next frame's cache, as they are), and ``rest``, the
block input with those channels zero, both written by the previous block's projection conv (cut by output
rows; the identity added part by part). The shifted input is then ``place(cached) + rest`` (a one-hot 1x1 conv
with the Add fused), and the expand conv keeps its Clip. Per shift point that is two small ops (the head conv,
the placement) where the mask form has three (select, mask, placement), plus one placement where a run of
shifted blocks ends. Linear rewrites on BN-folded weights, exact.

Measured slower than the mask form all the same (docs/deploy.md), so ``--graph-form auto`` keeps mask for
MobileNetV2: onnxruntime computes a blocked conv's output channels 16 at a time, so the head conv (3 to 20
rows) reads the 6x wider expanded tensor at the cost of 16 rows, up to 2/3 of the projection conv at 56x56,
where the mask form's select conv reads the block input only.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

Pair = tuple[Tensor, Tensor]  # (head, rest): a block input's first `fold` channels, and the input with them zero


def applies(model: nn.Module) -> bool:
    """A MobileNetV2 whose runs of shifted (residual) blocks each follow a block without identity, whose
    projection conv alone then writes the pair (the official placement at any width)."""
    blocks = list(getattr(model, "features", ()))[1:-1]
    shifted = [getattr(b, "shift", None) is not None for b in blocks]
    return (bool(blocks) and any(shifted) and not shifted[0]
            and all(getattr(b, "use_res_connect", None) is not None for b in blocks)
            and all(blocks[i].use_res_connect for i, s in enumerate(shifted) if s)
            and all(shifted[i - 1] or not blocks[i - 1].use_res_connect for i, s in enumerate(shifted) if s))


def _place(x: Tensor, channels: int) -> Tensor:
    """``x`` as the first channels of a ``channels``-wide tensor (zeros after): a one-hot 1x1 conv, exact."""
    return F.conv2d(x, torch.eye(channels, int(x.shape[1]), dtype=x.dtype, device=x.device)[:, :, None, None])


def _project(conv: nn.Conv2d, h: Tensor, fold: int, identity: Pair | None) -> Pair:
    """``(head, rest)`` of ``conv(h) (+ identity)``, cut by output rows (the rest's head rows zero)."""
    w, b = conv.weight, conv.bias
    head = F.conv2d(h, w[:fold], b[:fold])
    # zero rows by concatenation: the exporter folds it into a constant (an in-place write would be ScatterND)
    rest = F.conv2d(h, torch.cat((torch.zeros_like(w[:fold]), w[fold:])),
                    torch.cat((torch.zeros_like(b[:fold]), b[fold:])))
    if identity is None:
        return head, rest
    return head + identity[0], rest + identity[1]


def _fold(block: nn.Module) -> int:
    ((_, fold, _),) = block.shift.shift.groups(block.conv[0][0].in_channels)
    return fold


def split_step(model: nn.Module, frame: Tensor, caches: list[Tensor | None]) -> tuple[Tensor, list[Tensor]]:
    """``(logits, new caches)`` of a BN-folded online MobileNetV2 for ``frame``; ``caches[i]`` is shift point
    i's input (None: zeros)."""
    features = list(model.features)
    blocks = features[1:-1]
    x: Tensor | Pair = features[0](frame)
    new_caches: list[Tensor] = []
    for i, block in enumerate(blocks):
        follower = blocks[i + 1] if i + 1 < len(blocks) else None
        pair_out = follower is not None and follower.shift is not None
        *branch, project, _ = block.conv  # the BN after the projection is folded (Identity)
        if block.shift is None:  # x is a whole tensor here (a run of shifted blocks ends with one)
            if not pair_out:
                x = block(x)
                continue
            h = nn.Sequential(*branch)(x)
            x = _project(project, h, _fold(follower), None)  # no identity: applies() checked
            continue
        head, rest = x
        cached = caches[len(new_caches)]
        cached = torch.zeros_like(head) if cached is None else cached
        # the placement conv first: onnxruntime fuses an Add into the conv of its first input
        h = nn.Sequential(*branch)(_place(cached, int(rest.shape[1])) + rest)
        if pair_out:
            x = _project(project, h, _fold(follower), (head, rest))
        else:
            x = project(h) + (_place(head, int(rest.shape[1])) + rest)
        new_caches.append(head)
    feats = features[-1](x)
    return model.fc(model.dropout(model.avgpool(feats).flatten(1))), new_caches

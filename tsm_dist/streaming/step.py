"""One time step of an online model as a pure function, with every shift cache an explicit tensor:
``(frame (N, 3, H, W), *caches) -> (logits (N, K), *new caches)``. ``tsm-dist export`` traces it (the forms
"concat", "mask" and "sub" of :mod:`tsm_dist.streaming.slots`, and "split": ResNet's, :mod:`tsm_dist.streaming.split`, and
MobileNetV2's, :mod:`tsm_dist.streaming.split_mbv2`);
:class:`~tsm_dist.streaming.online.OnlineTSM` runs it in PyTorch (the form "swap").
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from tsm_dist.streaming.slots import SLOT_FORMS, CacheBoard, CacheSlot, NoShift, check_streamable, replace_shifts
from tsm_dist.streaming.split import applies as resnet_split_applies, split_step as resnet_split_step
from tsm_dist.streaming.split_mbv2 import applies as mbv2_split_applies, split_step as mbv2_split_step

# the forms a graph can carry ("swap" writes into tensors, which a graph does not express); docs/deploy.md
# has their per-frame timings
GRAPH_FORMS = ("concat", "mask", "sub", "split")


def split_applies(model: nn.Module) -> bool:
    """Whether the "split" form has a step for ``model``'s architecture (ResNet or MobileNetV2)."""
    return resnet_split_applies(model) or mbv2_split_applies(model)


def auto_form(model: nn.Module) -> str:
    """The graph form measured cheapest per frame in onnxruntime for the architecture (docs/deploy.md): split for
    ResNet, concat otherwise (on MobileNetV2 concat measured level with sub or up to 1 % faster, both ahead of
    mask and split)."""
    return "split" if resnet_split_applies(model) else "concat"


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d (``convK``/``bnK`` of a block, or
    neighbours in a Sequential) into the conv's weight and bias, in place; the BN becomes Identity."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for parent in list(model.modules()):
        if isinstance(parent, nn.Sequential):
            pairs = [(str(i), str(i + 1)) for i in range(len(parent) - 1)]
        else:
            pairs = [(f"conv{k}", f"bn{k}") for k in (1, 2, 3)]
        for conv_name, bn_name in pairs:
            conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(parent, bn_name, nn.Identity())
    return model


def copy_sharing_tensors(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules whose parameters and buffers are ``model``'s own (no second copy of the
    weights, and later in-place updates of the model show in the copy); its modules can be replaced freely."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


class ExplicitCacheTSM(nn.Module):
    """``(frame (N, 3, H, W), *caches) -> (logits (N, K), *new caches)``: the online model as a pure function.

    ``caches[i]`` holds shift point i's first ``C_i / fold_div`` channels of the previous frame,
    ``(N, C_i / fold_div, H_i, W_i)`` (:meth:`cache_shapes`); no caches (or zeros) start a stream. Shift points
    are numbered in module order. ``with_shift=False`` gives the same network without any shift (no caches).
    The model is not changed: this module streams a copy of it that shares its weights ("split" folds the
    BNs into new conv weights of its own). It takes the model's mode and runs in eval mode only.
    """

    def __init__(self, model: nn.Module, *, with_shift: bool = True, form: str = "concat") -> None:
        super().__init__()
        if with_shift:
            check_streamable(model)
        if form not in (*SLOT_FORMS, "split"):
            raise ValueError(f"form must be one of {(*SLOT_FORMS, 'split')}, got {form!r}")
        if form == "split" and with_shift and not split_applies(model):
            raise ValueError("the split form needs a ResNet or MobileNetV2 shifted at the residual branch")
        self.form = form
        self.model = copy_sharing_tensors(model)
        self.train(model.training)  # the model's mode; forward refuses train mode
        if form == "split":  # its convs are cut into parts, each with its share of the BN
            fold_batchnorm(self.model.eval())
        if not with_shift:
            replace_shifts(self.model, lambda shift, i: NoShift())
            self._board = CacheBoard(0)
            return
        self._board = CacheBoard(len(model.shift_modules()))
        slot_form = "concat" if form == "split" else form  # split_step reads the slots' shifts only
        replace_shifts(self.model, lambda shift, i: CacheSlot(shift, self._board, i, slot_form))

    @property
    def num_caches(self) -> int:
        return len(self._board)

    def cache_names(self) -> list[str]:
        return [f"cache_{i:02d}" for i in range(self.num_caches)]

    def new_cache_names(self) -> list[str]:
        """The graph outputs paired with :meth:`cache_names`, in the same order."""
        return [f"new_{name}" for name in self.cache_names()]

    @torch.no_grad()
    def cache_shapes(self, frame_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Each cache's shape for frames of ``frame_shape`` ``(N, 3, H, W)`` (one forward on the meta device)."""
        with torch.device("meta"):
            meta = copy.deepcopy(self).to("meta")
            outputs = meta(torch.empty(frame_shape))
        return [tuple(t.shape) for t in outputs[1:]]

    def forward(self, frame: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        if self.training:  # a frame alone cannot reproduce a clip's batch statistics (nor can a traced graph)
            raise ValueError("an online step runs the model in eval mode; call .eval() first")
        if frame.dim() != 4 or frame.shape[1] != 3:
            raise ValueError(f"expected one frame per stream shaped (N, 3, H, W), got {tuple(frame.shape)}")
        board = self._board
        board.start(caches)
        try:
            if self.form == "split" and len(board):
                step = resnet_split_step if resnet_split_applies(self.model) else mbv2_split_step
                logits, board.outputs = step(self.model, frame, board.inputs)
            else:
                logits = self.model.backbone_logits(frame)
        finally:
            new_caches = board.finish()
        return (logits, *new_caches)

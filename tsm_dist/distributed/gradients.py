"""Gradients as Horovod's collectives need them: channels-last tensors as contiguous views of themselves, and
every rank sending each gradient in its parameter's element order.

A channels-last tensor (``(N, C, H, W)`` stored as N, H, W, C) is *dense* but not *contiguous* in
PyTorch's sense, and Horovod 0.28.1 refuses non-contiguous tensors in every collective ("Tensor is
required to be contiguous"), on CPU and GPU alike. Any dense tensor is, however, a contiguous tensor
with its dimensions permuted: :func:`dense_view` returns that permuted view of the same storage, so an
in-place allreduce or broadcast of the view is one of the original tensor, with no copy. Element-wise
collectives (sum, average, broadcast) do not care about the order of the elements as long as every rank
uses the same order, which holds because every rank builds the same model in the same format.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

Permutation = tuple[int, ...]


def dense_permutation(tensor: Tensor) -> Permutation | None:
    """The permutation whose view of ``tensor`` is contiguous; None if ``tensor`` is contiguous already.

    Raises ValueError for a tensor that is not dense (overlapping or with gaps), which no permutation
    makes contiguous.
    """
    if tensor.is_contiguous():
        return None
    order = tuple(sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), d)))
    if not tensor.permute(order).is_contiguous():
        raise ValueError(f"tensor of shape {tuple(tensor.shape)} with strides {tensor.stride()} is not dense: "
                         "no view of it is contiguous")
    return order


def inverse(order: Permutation) -> Permutation:
    out = [0] * len(order)
    for position, dim in enumerate(order):
        out[dim] = position
    return tuple(out)


def dense_view(tensor: Tensor) -> Tensor:
    """A contiguous view of ``tensor``'s storage (``tensor`` itself when contiguous); writes go through."""
    order = dense_permutation(tensor)
    return tensor if order is None else tensor.permute(order)


class DenseViewCompressor:
    """A Horovod compressor that hands the allreduce a contiguous view of each gradient.

    Wraps Horovod's own compressor (none or fp16): the permutation is applied before it, so an fp16
    copy is contiguous too, and undone after decompression, so ``p.grad.set_(...)`` in Horovod's
    ``synchronize`` gives the gradient back its parameter's shape and strides. No data is copied.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def compress(self, tensor: Tensor) -> tuple[Tensor, tuple[Permutation | None, Any]]:
        order = dense_permutation(tensor)
        wire, ctx = self.inner.compress(tensor if order is None else tensor.permute(order))
        return wire, (order, ctx)

    def decompress(self, tensor: Tensor, ctx: tuple[Permutation | None, Any]) -> Tensor:
        order, inner_ctx = ctx
        out = self.inner.decompress(tensor, inner_ctx)
        return out if order is None else out.permute(inverse(order))


def element_order(tensor: Tensor) -> tuple[int, ...]:
    """The dims of ``tensor`` from outermost to innermost in memory, size-1 dims left out (their strides
    do not change where any element is): two dense tensors of one shape with the same order hold their
    elements in the same sequence, which is what a collective on their :func:`dense_view` sends."""
    return tuple(sorted((d for d in range(tensor.dim()) if tensor.shape[d] != 1), key=lambda d: -tensor.stride(d)))


def send_gradients_in_parameter_order(optimizer: Any) -> None:
    """Make Horovod's ``DistributedOptimizer`` allreduce every gradient in its parameter's element order.

    The allreduce adds the ranks' buffers element by element, so every rank must send one gradient in one
    order. Horovod fills a parameter that got no gradient on a rank (a branch that rank did not use) with
    a *contiguous* zero tensor while the other ranks send their channels-last gradient's order: the sum
    would be scrambled. Every gradient Horovod sends passes through ``_allreduce_grad_async`` (from the
    backward hooks and for the missing ones in ``synchronize``); this wraps it so that a missing gradient
    becomes zeros in the parameter's layout and a gradient in another order is copied into it first.
    """
    send = optimizer._allreduce_grad_async

    def send_in_parameter_order(p: Tensor) -> Any:
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # preserve_format: the parameter's strides
        elif element_order(p.grad) != element_order(p):
            p.grad = torch.empty_like(p).copy_(p.grad)
        return send(p)

    optimizer._allreduce_grad_async = send_in_parameter_order

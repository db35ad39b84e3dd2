"""The optimizer of a run: momentum SGD, LARS or LAMB (``optim.name``), and its parameter groups.

LARS (You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks") scales each
layer's step by a trust ratio ``eta * ||w|| / (||g|| + wd * ||w||)``; with ``trust_clip`` (NVIDIA's
LARC) the ratio is capped so that no layer moves faster than plain SGD at the global rate, which keeps
small batches plain SGD and only reins in the layers a large rate would blow up. LAMB (You et al. 2019,
"Large Batch Optimization for Deep Learning: Training BERT in 76 minutes", Algorithm 2) applies the ratio
``||w|| / ||r||`` to the bias-corrected Adam step ``r`` (plus weight decay). BN scales and shifts and
biases (the 1-D parameters) are excluded from the adaptation and from weight decay, as in both papers.

The learning rate is set per step by the trainer (warmup and decay as for SGD, :mod:`tsm_dist.training.lr_schedule`).
Both optimizers take their parameters alone (``cls(param_groups)``, every setting defaulted) because
Horovod's ``DistributedOptimizer`` rebuilds the optimizer that way; their state is ordinary per-parameter
tensors, so checkpoints and the engine's optimizer-state broadcast carry it like SGD's momentum.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from tsm_dist.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float, no_bn_bias_decay: bool,
                 layer_adaptation: bool = False) -> list[dict[str, Any]]:
    """With ``no_bn_bias_decay``, BN scales/shifts and biases (the 1-D parameters) get no weight decay.

    ``layer_adaptation`` (LARS, LAMB): always two groups, and only the weights' group (``adapt=True``)
    gets the trust ratio and the decay.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not (no_bn_bias_decay or layer_adaptation):
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if layer_adaptation:
        groups[0]["adapt"], groups[1]["adapt"] = True, False
    return groups


def _norm(t: torch.Tensor) -> torch.Tensor:
    # half-precision sums of squares overflow; float32 and float64 keep their own precision
    return torch.linalg.vector_norm(t.detach().float() if t.dtype in (torch.float16, torch.bfloat16) else t.detach())


def _closure_loss(closure: Optional[Callable[[], float]]) -> Optional[float]:
    """torch's optimizer protocol: re-evaluate the loss with gradients enabled when a closure is given."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _norms(p: torch.Tensor, update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm(p), _norm(update)


class LARS(torch.optim.Optimizer):
    """Momentum SGD with the layer-wise trust ratio of You et al. 2017 (see the module docstring).

    Per parameter of an ``adapt`` group: ``d = (g + wd * w) * ratio``, ``buf = momentum * buf + d``
    (``buf = d`` on the first step, as torch's SGD), ``w -= lr * buf``; other groups take ratio 1.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, trust_clip: bool = True, adapt: bool = True) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "trust_coefficient": trust_coefficient, "trust_clip": trust_clip, "adapt": adapt})

    def trust_ratio(self, group: dict[str, Any], p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The factor on this layer's decayed gradient (1 outside ``adapt`` groups or at a zero norm)."""
        one = torch.ones((), device=p.device)
        if not group["adapt"]:
            return one
        w_norm, g_norm = _norms(p, grad)
        wd = group["weight_decay"]
        ratio = torch.where((w_norm > 0) & (g_norm > 0),
                            group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm), one)
        if group["trust_clip"] and group["lr"] > 0:
            ratio = torch.clamp(ratio / group["lr"], max=1.0)
        return ratio

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        loss = _closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                # the ratio uses the raw gradient's norm; wd * ||w|| in its denominator stands for the decay
                ratio = self.trust_ratio(group, p, p.grad).to(p.grad.dtype)
                update = p.grad.add(p, alpha=group["weight_decay"]).mul_(ratio)
                state = self.state[p]
                if group["momentum"]:
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = update.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                    update = state["momentum_buffer"]
                p.add_(update, alpha=-group["lr"])
        return loss


class LAMB(torch.optim.Optimizer):
    """Adam's step scaled by the layer-wise trust ratio ``||w|| / ||r||`` (You et al. 2019, Algorithm 2).

    ``momentum`` is beta1 and ``beta2`` the second-moment decay; ``r = m_hat / (sqrt(v_hat) + eps) + wd * w``
    and ``w -= lr * ratio * r``, ratio 1 outside ``adapt`` groups or at a zero norm.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-6, weight_decay: float = 0.0, adapt: bool = True) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "beta2": beta2, "eps": eps,
                                  "weight_decay": weight_decay, "adapt": adapt})

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        loss = _closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["momentum"], group["beta2"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                state["exp_avg"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                update = (state["exp_avg"] / (1 - beta1 ** t)).div_(denom)
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                ratio = torch.ones((), device=p.device)
                if group["adapt"]:
                    w_norm, r_norm = _norms(p, update)
                    ratio = torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm, ratio)
                p.add_(update * ratio.to(update.dtype), alpha=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, optim: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """``optim.name``'s optimizer over ``model``'s parameter groups, starting at ``lr``."""
    if optim.name == "sgd":
        return torch.optim.SGD(param_groups(model, optim.weight_decay, optim.no_bn_bias_decay),
                               lr=lr, momentum=optim.momentum)
    groups = param_groups(model, optim.weight_decay, optim.no_bn_bias_decay, layer_adaptation=True)
    if optim.name == "lars":
        return LARS(groups, lr=lr, momentum=optim.momentum, trust_coefficient=optim.trust_coefficient,
                    trust_clip=optim.trust_clip)
    if optim.name == "lamb":
        return LAMB(groups, lr=lr, momentum=optim.momentum, beta2=optim.beta2, eps=optim.eps)
    raise ValueError(f"unknown optimizer {optim.name!r}")

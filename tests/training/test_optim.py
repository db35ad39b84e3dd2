"""LARS and LAMB against steps computed by hand from their papers' formulas, their parameter groups,
and their state through a checkpoint (save, load, continue = never stopped)."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from tsm_dist.config import ConfigError, OptimConfig, load_config
from tsm_dist.training.optim import LAMB, LARS, build_optimizer, param_groups

W, G = [3.0, 4.0], [0.6, 0.8]  # ||w|| = 5, ||g|| = 1


def _one_step(optimizer_cls, w=W, g=G, group=None, **kwargs):
    p = nn.Parameter(torch.tensor([w], dtype=torch.float64))  # 2-D: a weight
    opt = optimizer_cls([{"params": [p], **(group or {})}], **kwargs)
    p.grad = torch.tensor([g], dtype=torch.float64)
    opt.step()
    return p.detach()[0].tolist(), opt


def test_lars_step_is_the_trust_ratio_times_the_decayed_gradient():
    lr, eta, wd = 0.1, 0.001, 0.1
    ratio = eta * 5 / (1 + wd * 5)  # eta ||w|| / (||g|| + wd ||w||)
    expected = [w - lr * ratio * (g + wd * w) for w, g in zip(W, G)]
    got, _ = _one_step(LARS, lr=lr, trust_coefficient=eta, weight_decay=wd, trust_clip=False)
    assert got == pytest.approx(expected, rel=1e-12)
    # LARC's clip: the ratio over the global rate, at most 1 -> here ratio / lr
    got, _ = _one_step(LARS, lr=lr, trust_coefficient=eta, weight_decay=wd, trust_clip=True)
    assert got == pytest.approx([w - ratio * (g + wd * w) for w, g in zip(W, G)], rel=1e-12)
    # a ratio above the rate is clipped to plain SGD
    got, _ = _one_step(LARS, lr=lr, trust_coefficient=1.0, weight_decay=wd, trust_clip=True)
    assert got == pytest.approx([w - lr * (g + wd * w) for w, g in zip(W, G)], rel=1e-12)


def test_lars_momentum_over_two_steps_and_zero_weights():
    lr, eta, mom = 0.5, 0.01, 0.9
    p = nn.Parameter(torch.tensor([W], dtype=torch.float64))
    opt = LARS([p], lr=lr, momentum=mom, trust_coefficient=eta, trust_clip=False)
    w, buf = list(W), None
    for _ in range(2):
        p.grad = torch.tensor([G], dtype=torch.float64)
        opt.step()
        ratio = eta * math.hypot(*w) / 1.0
        d = [ratio * g for g in G]
        buf = d if buf is None else [mom * b + x for b, x in zip(buf, d)]
        w = [a - lr * b for a, b in zip(w, buf)]
    assert p.detach()[0].tolist() == pytest.approx(w, rel=1e-12)
    got, _ = _one_step(LARS, w=[0.0, 0.0], lr=lr, trust_coefficient=eta, trust_clip=False)  # ||w|| = 0: ratio 1
    assert got == pytest.approx([-lr * g for g in G], rel=1e-12)


def test_excluded_groups_are_plain_momentum_sgd():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))
    b.data.copy_(a.data)
    lars = LARS([{"params": [a], "adapt": False, "weight_decay": 0.0}], lr=0.3, momentum=0.9)
    sgd = torch.optim.SGD([b], lr=0.3, momentum=0.9)
    for step in range(3):
        grad = torch.randn(5, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = grad.clone(), grad.clone()
        lars.step()
        sgd.step()
    assert torch.allclose(a, b, atol=1e-7)


def test_lamb_step_is_the_trust_ratio_times_the_adam_step():
    lr, wd, eps = 0.01, 0.1, 1e-6
    # step 1: bias-corrected moments are g and g^2, so the Adam step is g / (|g| + eps)
    r = [g / (abs(g) + eps) + wd * w for w, g in zip(W, G)]
    ratio = 5 / math.hypot(*r)
    got, _ = _one_step(LAMB, lr=lr, weight_decay=wd, eps=eps)
    assert got == pytest.approx([w - lr * ratio * x for w, x in zip(W, r)], rel=1e-9)
    got, _ = _one_step(LAMB, lr=lr, group={"adapt": False}, eps=eps)  # excluded: the Adam step
    assert got == pytest.approx([w - lr * g / (abs(g) + eps) for w, g in zip(W, G)], rel=1e-9)


def test_lamb_second_step_uses_bias_corrected_moments():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-6
    p = nn.Parameter(torch.tensor([W], dtype=torch.float64))
    opt = LAMB([p], lr=lr, momentum=b1, beta2=b2, eps=eps)
    grads = [G, [0.1, -0.3]]
    w, m, v = list(W), [0.0, 0.0], [0.0, 0.0]
    for t, g in enumerate(grads, 1):
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        m = [b1 * a + (1 - b1) * x for a, x in zip(m, g)]
        v = [b2 * a + (1 - b2) * x * x for a, x in zip(v, g)]
        r = [(a / (1 - b1 ** t)) / (math.sqrt(c / (1 - b2 ** t)) + eps) for a, c in zip(m, v)]
        ratio = math.hypot(*w) / math.hypot(*r)
        w = [a - lr * ratio * x for a, x in zip(w, r)]
    assert p.detach()[0].tolist() == pytest.approx(w, rel=1e-9)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def test_bn_and_bias_are_excluded_from_adaptation_and_decay():
    net = Net()
    decay, rest = param_groups(net, 1e-4, no_bn_bias_decay=False, layer_adaptation=True)
    assert decay["adapt"] and decay["weight_decay"] == 1e-4 and not rest["adapt"] and rest["weight_decay"] == 0
    assert {id(p) for p in decay["params"]} == {id(net.conv.weight), id(net.fc.weight)}
    assert {id(p) for p in rest["params"]} == {id(net.conv.bias), id(net.bn.weight), id(net.bn.bias), id(net.fc.bias)}
    assert len(param_groups(net, 1e-4, no_bn_bias_decay=False)) == 1  # plain SGD: one group
    for name, cls in (("sgd", torch.optim.SGD), ("lars", LARS), ("lamb", LAMB)):
        assert type(build_optimizer(net, OptimConfig(name=name), lr=0.1)) is cls


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.name='adam' is not one of sgd, lars, lamb"):
        load_config(None, ["data.backend=random", "data.num_samples=8", "optim.name=adam"])


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_state_through_a_checkpoint_continues_as_if_never_stopped(name):
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, 5, 5), torch.tensor([0, 1, 0, 1, 1, 0])
    cfg = OptimConfig(name=name, weight_decay=1e-3)

    def steps(net, opt, n):
        for _ in range(n):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

    net = Net()
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    straight = build_optimizer(net, cfg, lr=0.05)
    steps(net, straight, 4)
    resumed_net = Net()
    resumed_net.load_state_dict(saved)
    first = build_optimizer(resumed_net, cfg, lr=0.05)
    steps(resumed_net, first, 2)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    second = build_optimizer(resumed_net, cfg, lr=0.05)
    second.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    steps(resumed_net, second, 2)
    for a, b in zip(net.parameters(), resumed_net.parameters()):
        assert torch.equal(a, b)
    fresh = Net()
    fresh.load_state_dict(saved)
    restarted = build_optimizer(fresh, cfg, lr=0.05)
    steps(fresh, restarted, 2)
    steps(fresh, build_optimizer(fresh, cfg, lr=0.05), 2)  # state lost: the check can fail
    assert not all(torch.equal(a, b) for a, b in zip(net.parameters(), fresh.parameters()))

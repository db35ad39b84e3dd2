"""LR schedule values at the iterations that matter: warmup start/middle/end, decay boundaries, cosine."""
from __future__ import annotations

import pytest

from tsm_dist.config import OptimConfig
from tsm_dist.training.lr_schedule import LRSchedule


def paper(global_batch: int, **kw) -> LRSchedule:
    optim = OptimConfig(base_lr=0.01, base_batch=64, warmup_epochs=kw.pop("warmup_epochs", 5),
                        decay_epochs=[40, 80], **kw)
    return LRSchedule.from_config(optim, global_batch=global_batch, steps_per_epoch=100, epochs=100)


def test_linear_scaling_rule_uses_the_effective_batch():
    # 256 nodes x 6 GPUs x 8 clips = 12288 (the paper's Table 12); accumulation counts the same way
    assert paper(12288).peak_lr == pytest.approx(0.01 * 12288 / 64)
    assert paper(64).peak_lr == pytest.approx(0.01)


def test_warmup_is_linear_per_iteration_from_the_base_rate():
    s = paper(1024)  # peak 0.16, warmup 5 epochs = 500 iterations
    assert s(0) == pytest.approx(0.01)
    assert s(250) == pytest.approx(0.01 + (0.16 - 0.01) / 2)
    assert s(499) == pytest.approx(0.01 + 0.15 * 499 / 500)
    assert s(500) == pytest.approx(0.16)
    assert s(1) - s(0) == pytest.approx(s(2) - s(1))  # per iteration, not per epoch


def test_step_decay_at_epochs_40_and_80():
    s = paper(1024)
    assert s(3999) == pytest.approx(0.16)
    assert s(4000) == pytest.approx(0.016)
    assert s(7999) == pytest.approx(0.016)
    assert s(8000) == pytest.approx(0.0016)
    assert s(9999) == pytest.approx(0.0016)


def test_no_warmup_at_the_base_batch_and_when_disabled():
    assert paper(64)(0) == pytest.approx(0.01)
    assert paper(1024, warmup_epochs=0)(0) == pytest.approx(0.16)


def test_cosine_after_warmup():
    s = paper(1024, schedule="cosine")
    assert s(500) == pytest.approx(0.16)
    assert s(500 + 9500 // 2) == pytest.approx(0.08)
    assert s(10000) == pytest.approx(0.0, abs=1e-12)
    assert s(3000) > s(6000) > s(9000)


def few_steps(global_batch: int, **kw) -> LRSchedule:
    """The batch study's shape: 4,096 clips, base batch 16, 2 warmup epochs with a floor of 8 steps, 6 epochs."""
    optim = OptimConfig(**{"base_lr": 0.02, "base_batch": 16, "warmup_epochs": 2, "schedule": "cosine", **kw})
    return LRSchedule.from_config(optim, global_batch=global_batch, steps_per_epoch=4096 // global_batch, epochs=6)


def test_warmup_has_a_floor_in_steps_but_at_most_half_the_run():
    assert few_steps(256, warmup_min_steps=8).warmup_steps == 32  # 2 epochs of 16 steps: above the floor
    assert few_steps(1024, warmup_min_steps=8).warmup_steps == 8  # 2 epochs of 4 steps: the floor
    assert few_steps(2048, warmup_min_steps=8).warmup_steps == 6  # 12 steps in all: half of them
    assert few_steps(2048, warmup_min_steps=0).warmup_steps == 4
    assert few_steps(2048, warmup_min_steps=8, warmup_epochs=0).warmup_steps == 0  # no warmup stays none
    s = few_steps(4096, warmup_min_steps=8)  # 1 step per epoch, 6 in all: 3 of warmup
    assert [round(s(i), 4) for i in range(4)] == [0.02, round(0.02 + (5.12 - 0.02) / 3, 4),
                                                 round(0.02 + 2 * (5.12 - 0.02) / 3, 4), 5.12]


def test_lamb_scales_the_rate_by_the_square_root_of_the_batch():
    assert few_steps(1024, name="lamb").peak_lr == pytest.approx(0.02 * 8)  # sqrt(64)
    assert few_steps(1024, name="lars").peak_lr == pytest.approx(0.02 * 64)
    assert few_steps(1024, name="lamb", lr_scaling="linear").peak_lr == pytest.approx(0.02 * 64)
    assert few_steps(1024, name="sgd", lr_scaling="sqrt").peak_lr == pytest.approx(0.02 * 8)

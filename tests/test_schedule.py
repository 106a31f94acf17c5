"""The paper's schedule as pure functions: warmup, steps, and parameter groups."""

from __future__ import annotations

import pytest
from torch import nn

from pipeline.config import TrainConfig
from pipeline.schedule import learning_rate, parameter_groups


def test_linear_warmup_from_the_per_image_lr_then_steps_at_epochs_8_and_11():
    cfg = TrainConfig(base_lr_per_image=0.00125, lr_steps=[8, 11], lr_gamma=0.1)
    ipe, batch = 100, 32
    assert learning_rate(0, cfg, batch, ipe) == pytest.approx(0.00125)  # the per-image lr
    assert learning_rate(50, cfg, batch, ipe) == pytest.approx(0.00125 + (0.04 - 0.00125) / 2)
    assert learning_rate(100, cfg, batch, ipe) == pytest.approx(0.04)  # 0.00125 x 32 after one epoch
    assert learning_rate(8 * ipe - 1, cfg, batch, ipe) == pytest.approx(0.04)
    assert learning_rate(8 * ipe, cfg, batch, ipe) == pytest.approx(0.004)
    assert learning_rate(11 * ipe, cfg, batch, ipe) == pytest.approx(0.0004)
    short = TrainConfig(warmup_iterations=10)
    assert learning_rate(10, short, batch, ipe) == pytest.approx(0.04)


def test_parameter_groups_without_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    plain = parameter_groups(model, TrainConfig())
    assert len(plain) == 1 and len(plain[0]["params"]) == 6
    groups = parameter_groups(model, TrainConfig(no_decay_on_norm_and_bias=True, weight_decay=1e-4))
    decay, no_decay = groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(no_decay["params"]) == 4  # conv bias, BN weight and bias, linear bias

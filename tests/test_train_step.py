"""One optimizer step (``pipeline.train.train_step``): applied when finite, skipped otherwise."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.train import train_step


class _Toy(nn.Module):
    """A "detector" whose loss is sqrt(|p|): finite at p = 0, with a non-finite gradient there."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor([value]))

    def forward(self, images, targets):
        return {"loss_toy": torch.sqrt(self.p.abs()).sum() * len(images)}


def _step(value: float):
    model = _Toy(value)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = train_step(model, optimizer, scaler, [torch.zeros(1)] * 2, [{}] * 2, grad_accumulation=2)
    return model, step


def test_a_finite_step_is_applied():
    model, step = _step(4.0)
    assert step.finite and step.applied
    assert step.grad_norm == 0.25  # 2 micro-batches x d/dp sqrt(p) = 0.25, each divided by 2
    assert math.isclose(model.p.item(), 4.0 - 0.1 * 0.25, rel_tol=1e-6)
    assert math.isclose(step.losses["loss_toy"].item(), 2.0)


def test_a_finite_loss_with_a_non_finite_gradient_is_skipped_not_applied():
    model, step = _step(0.0)
    assert not step.finite and not step.applied
    assert not math.isfinite(step.grad_norm)
    assert model.p.item() == 0.0 and model.p.grad is None

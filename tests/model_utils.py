"""Small helpers shared by the model tests: the tiny config and a toy batch."""

from __future__ import annotations

import torch

from pipeline.config import load_config
from tests.conftest import REPO
from tsd_model.config import ModelConfig


def tiny_model_config(*overrides: str) -> ModelConfig:
    return load_config(REPO / "configs" / "tiny.yaml", [f"model.{o}" for o in overrides]).model


def toy_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 255, (3, 120, 160), dtype=torch.uint8, generator=g),
              torch.randint(0, 255, (3, 140, 130), dtype=torch.uint8, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 20, 60, 80], [70, 30, 150, 110]]), "labels": torch.tensor([3, 5])},
               {"boxes": torch.tensor([[5.0, 5, 100, 120]]), "labels": torch.tensor([8])}]
    return images, targets

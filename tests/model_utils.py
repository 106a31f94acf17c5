"""Small helpers shared by the model tests: the tiny config and a toy batch."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class HostReads(TorchDispatchMode):
    """Records the ATen calls, made under it, whose result the host must read before it goes on:
    on a GPU each waits for every kernel queued before it. Data-dependent sizes (``nonzero``,
    ``unique``, ``masked_select``, indexing by a bool mask) and values read back (``item``).
    What the CPU cannot show, a device-to-host copy, ``tests/test_cuda.py`` checks under
    ``torch.cuda.set_sync_debug_mode``."""

    READS = {"nonzero", "_local_scalar_dense", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
             "masked_select", "equal", "is_nonzero"}
    INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in self.READS or (name in self.INDEXING and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))

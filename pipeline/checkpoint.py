"""The checkpoint format of `tsd train` and where checkpoints are found.

A checkpoint is a directory (Ray Train's) holding ``state.pt`` (model, optimizer, scaler,
iteration, sampler state; ``torch.load(weights_only=True)``-safe) and ``config.yaml`` (the run's
resolved config). A run directory holds ``checkpoint_*`` directories, the latest last by name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data_prep.errors import InputError

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"


def resolve_checkpoint(checkpoint: str) -> Path:
    """The state file of a checkpoint given as a state file, a checkpoint directory or a run
    directory (then its latest checkpoint)."""
    path = Path(checkpoint)
    if path.is_dir() and not (path / STATE_FILE).is_file():
        candidates = sorted(p for p in path.glob("checkpoint_*") if (p / STATE_FILE).is_file())
        if candidates:
            path = candidates[-1]
    if path.is_dir():
        path = path / STATE_FILE
    if not path.is_file():
        raise InputError(f"{checkpoint}: no checkpoint found (give a run directory, a checkpoint directory "
                         f"or its {STATE_FILE})")
    return path


def load_state(checkpoint: str) -> dict:
    path = resolve_checkpoint(checkpoint)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: not a checkpoint of `tsd train` ({type(exc).__name__})") from None



def checkpoint_iteration(checkpoint: str) -> int | None:
    return load_state(checkpoint).get("iteration")

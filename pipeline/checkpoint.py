"""The checkpoint format of `tsd train` and where checkpoints are found.

A checkpoint is a directory (Ray Train's) holding ``state.pt`` (model, optimizer, scaler,
iteration, sampler state; ``torch.load(weights_only=True)``-safe) and ``config.yaml`` (the run's
resolved config). A run directory holds ``checkpoint_*`` directories, the latest last by name.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import torch

from data_prep.errors import InputError
from data_prep.storage import is_s3

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"


def resolve_checkpoint(checkpoint: str, endpoint_url: str | None = None) -> Path:
    """The local state file of a checkpoint given as a state file, a checkpoint directory or a run
    directory (then its latest checkpoint), on local disk or in S3 (``s3://bucket/runs/NAME``, as
    the paper configs store them: the state file and the config beside it are copied once into
    ``$TSD_CACHE`` or ``~/.cache/tsd/checkpoints``, keyed by the object's address and size)."""
    if is_s3(checkpoint):
        return _remote_checkpoint(checkpoint, endpoint_url)
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


def write_checkpoint(directory: str | os.PathLike, state: dict, config_text: str) -> None:
    """Fill a checkpoint directory (Ray Train uploads it): the training state and the run's config."""
    directory = Path(directory)
    torch.save(state, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(config_text)


def read_checkpoint(directory: str | os.PathLike) -> dict:
    """The training state of a checkpoint directory (``torch.load`` with ``weights_only``: no code runs)."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def is_remote(checkpoint: str) -> bool:
    return is_s3(checkpoint)


def _remote_checkpoint(uri: str, endpoint_url: str | None) -> Path:
    from data_prep.storage import open_storage, write_atomically
    from pipeline.weights_files import local_copy

    root = uri.rstrip("/")
    if root.endswith("/" + STATE_FILE):
        root = root[: -len(STATE_FILE) - 1]
    storage = open_storage(root, endpoint_url)
    if not storage.exists(STATE_FILE):  # a run: its latest checkpoint_* holding a state file
        states = sorted(o.name for o in storage.list("") if PurePosixPath(o.name).name == STATE_FILE
                        and PurePosixPath(o.name).parent.name.startswith("checkpoint_")
                        and len(PurePosixPath(o.name).parts) == 2)
        if not states:
            raise InputError(f"{uri}: no checkpoint found (give a run, a checkpoint_* prefix or its {STATE_FILE})")
        root = f"{root}/{PurePosixPath(states[-1]).parent}"
        storage = open_storage(root, endpoint_url)
    cache = Path(os.environ.get("TSD_CACHE") or Path.home() / ".cache" / "tsd") / "checkpoints"
    state = Path(local_copy(f"{root}/{STATE_FILE}", endpoint_url, cache))
    if storage.exists(CONFIG_FILE):
        config = Path(local_copy(f"{root}/{CONFIG_FILE}", endpoint_url, cache))
        if config.parent != state.parent:  # the config beside the state file, as in a local checkpoint
            text = config.read_bytes()
            write_atomically(state.parent / CONFIG_FILE, lambda f: f.write(text))
    return state


def load_state(checkpoint: str, endpoint_url: str | None = None) -> dict:
    path = resolve_checkpoint(checkpoint, endpoint_url)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: not a checkpoint of `tsd train` ({type(exc).__name__})") from None


def checkpoint_iteration(checkpoint: str, endpoint_url: str | None = None) -> int | None:
    return load_state(checkpoint, endpoint_url).get("iteration")

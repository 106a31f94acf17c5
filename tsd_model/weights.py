"""Loading weights from local files only: ImageNet backbones and full detector checkpoints.

``torch.load(..., weights_only=True)`` everywhere: a weights file can never run code. Backbone
files may use torchvision's names (``conv1.weight``, ``layer1.0.conv1.weight``, MobileNet's
``features.N``) or timm's/Cadene's (same ResNet names; SENet's ``layer0.conv1``, ``se_module``),
optionally nested under ``state_dict``/``model`` and prefixed with ``module.``/``backbone.``.
Classifier weights (``fc``, ``last_linear``, ``classifier``) are ignored; anything else that
does not fit is an error that names the key.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from data_prep.errors import InputError

CLASSIFIER_PREFIXES = ("fc.", "last_linear.", "classifier.", "head.")


def _read_state(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{path}: weights file not found (weights are never downloaded; give a local path)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path}: not a readable weights file ({type(exc).__name__}: {exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _strip(key: str) -> str:
    for prefix in ("module.", "backbone.body.", "backbone.", "body.", "features."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_backbone_weights(model: nn.Module, path: str) -> dict[str, list[str]]:
    """Load ImageNet weights into ``model.backbone.body``; returns the keys left untouched.

    New modules (FPN, DCN offset convs) stay as initialised and are reported under ``missing``.
    """
    body = model.backbone.body
    own = body.state_dict()
    state = {_strip(k): v for k, v in _read_state(path).items()}
    loaded, unexpected = {}, []
    for key, value in state.items():
        if key.startswith(CLASSIFIER_PREFIXES) or key.endswith("num_batches_tracked"):
            continue
        if key not in own:
            unexpected.append(key)
            continue
        if own[key].shape != value.shape:
            raise InputError(f"{path}: '{key}' has shape {tuple(value.shape)}, the backbone expects "
                             f"{tuple(own[key].shape)} (wrong architecture?)")
        loaded[key] = value
    if unexpected:
        raise InputError(f"{path}: {len(unexpected)} keys do not belong to this backbone, e.g. '{unexpected[0]}'")
    if not loaded:
        raise InputError(f"{path}: no key matches the backbone")
    body.load_state_dict(loaded, strict=False)
    missing = sorted(k for k in own if k not in loaded and not k.endswith("num_batches_tracked"))
    return {"loaded": sorted(loaded), "missing": missing}


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a full detector state dict (ours, or under ``model``/``state_dict``); strict."""
    state = {k.removeprefix("module."): v for k, v in _read_state(path).items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        first = (result.missing_keys or result.unexpected_keys)[0]
        raise InputError(f"{path}: checkpoint does not match the model ({len(result.missing_keys)} missing, "
                         f"{len(result.unexpected_keys)} unexpected keys, e.g. '{first}')")

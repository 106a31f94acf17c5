"""Loading weights from local files only: ImageNet backbones and full detector checkpoints.

``torch.load(..., weights_only=True)`` everywhere: a weights file can never run code. Backbone
files may use torchvision's names (``conv1.weight``, ``layer1.0.conv1.weight``, MobileNet's
``features.N``) or timm's/Cadene's (same ResNet names; SENet's ``layer0.conv1``, ``se_module``),
optionally nested under ``state_dict``/``model`` and prefixed with ``module.``/``backbone.``.
Classifier weights (``fc``, ``last_linear``, ``classifier``) are ignored; anything else that
does not fit is an error that names the key.

``IMAGENET_FILES`` names, for every backbone, the official ImageNet file the paper configs
expect under ``weights/`` and where its publisher puts it; ``check_backbone_weights`` refuses a
config that would silently train an ImageNet backbone from random init. A file that carries its
official name is checked against the sha256 prefix in that name (the publishers' convention,
which ``torch.hub`` checks too) when it is loaded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from torch import nn

from data_prep.errors import ConfigError, InputError

CLASSIFIER_PREFIXES = ("fc.", "last_linear.", "classifier.", "head.")


@dataclass(frozen=True)
class ImageNetFile:
    """An official ImageNet weights file: its name, where it is published, its sha256 prefix."""

    file_name: str
    url: str
    sha256_prefix: str | None  # the leading hex digits of its sha256 as its publisher states them (None: unstated)


def _torchvision_file(weights) -> ImageNetFile:
    name = PurePosixPath(weights.url).name
    return ImageNetFile(name, weights.url, name.rsplit("-", 1)[1].removesuffix(".pth"))


def _imagenet_files() -> dict[str, ImageNetFile]:
    from torchvision import models as m  # the URLs come from torchvision's own weight tables

    return {
        "resnet50": _torchvision_file(m.ResNet50_Weights.IMAGENET1K_V1),
        "resnet101": _torchvision_file(m.ResNet101_Weights.IMAGENET1K_V1),
        "resnet152": _torchvision_file(m.ResNet152_Weights.IMAGENET1K_V1),
        "resnext101_64x4d": _torchvision_file(m.ResNeXt101_64X4D_Weights.IMAGENET1K_V1),
        "mobilenet_v2": _torchvision_file(m.MobileNet_V2_Weights.IMAGENET1K_V1),
        # Cadene's pretrainedmodels, the weights the SENet-154 entries of the challenge started from; its
        # loader does not check a hash, so none is taken from the name
        "senet154": ImageNetFile("senet154-c7b49a05.pth",
                                 "http://data.lip6.fr/cadene/pretrainedmodels/senet154-c7b49a05.pth", None),
    }


IMAGENET_FILES = _imagenet_files()
NO_IMAGENET_WEIGHTS = ("tiny",)  # backbones for tests and the demo: from scratch by design


def check_backbone_weights(model_cfg, exists) -> None:
    """Refuse to train a backbone that the config means to start from ImageNet without its file.

    ``exists(path) -> bool`` answers for local paths and ``s3://`` URIs alike. A config must name
    a backbone weights file (or a full checkpoint), or say ``model.weights.from_scratch: true``.
    """
    w, name = model_cfg.weights, model_cfg.backbone.name
    official = IMAGENET_FILES.get(name)
    where = (f"the official file is {official.file_name}, published at {official.url}" if official else
             "no official file is known for it")
    if w.from_scratch:
        if w.backbone:
            raise ConfigError(f"model.weights.from_scratch is true but model.weights.backbone names {w.backbone}: "
                              "choose one")
        return
    if w.checkpoint:
        if not exists(w.checkpoint):
            raise ConfigError(f"model.weights.checkpoint: {w.checkpoint} not found")
        return
    if name in NO_IMAGENET_WEIGHTS:
        return
    if not w.backbone:
        raise ConfigError(f"model.weights.backbone is not set: the {name} backbone would train from random init, "
                          f"and the paper's numbers need ImageNet weights ({where}; put it under weights/ and set "
                          f"model.weights.backbone=weights/{official.file_name if official else 'FILE'}); to train "
                          f"from scratch on purpose, set model.weights.from_scratch=true")
    if not exists(w.backbone):
        raise ConfigError(f"model.weights.backbone: {w.backbone} not found ({where}; weights are never downloaded: "
                          f"copy it there, or set model.weights.from_scratch=true to train from scratch)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_official_file(path: str) -> None:
    """A file named like an official ImageNet file must have that file's sha256 prefix."""
    p = Path(path)
    official = next((f for f in IMAGENET_FILES.values() if f.file_name == p.name), None)
    if official is None or official.sha256_prefix is None:
        return
    digest = _sha256(p)
    if not digest.startswith(official.sha256_prefix):
        raise InputError(f"{path}: sha256 {digest[:16]}... does not start with {official.sha256_prefix}, the "
                         f"published {official.file_name} ({official.url}); the file is damaged or another one")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a weights file (nested under ``state_dict`` or ``model``, or at the top level)."""
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
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: expected a state dict of tensors")
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
    state = {_strip(k): v for k, v in read_state_dict(path).items()}
    verify_official_file(path)
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
    state = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        first = (result.missing_keys or result.unexpected_keys)[0]
        raise InputError(f"{path}: checkpoint does not match the model ({len(result.missing_keys)} missing, "
                         f"{len(result.unexpected_keys)} unexpected keys, e.g. '{first}')")

"""Weights files named by a config, wherever they live: the check before a run starts, and a local
copy of ``s3://`` files for ``tsd_model`` (which reads local paths only).

Nothing is downloaded from the internet: an ``s3://`` path is the user's own bucket (or any
S3-compatible store, ``data.s3_endpoint_url``), read with the same storage layer as the shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

from data_prep.storage import is_s3, s3_object, write_atomically
from tsd_model.config import ModelConfig
from tsd_model.weights import check_backbone_weights


def _exists(uri: str, endpoint_url: str | None) -> bool:
    if not is_s3(uri):
        return Path(uri).is_file()
    storage, name = s3_object(uri, endpoint_url)
    return storage.exists(name)


def check_weights(model: ModelConfig, endpoint_url: str | None) -> None:
    """Refuse a config whose weights files are missing, or that would silently train an ImageNet
    backbone from random init (see ``tsd_model.weights.check_backbone_weights``)."""
    check_backbone_weights(model, lambda uri: _exists(uri, endpoint_url))


def local_copy(uri: str, endpoint_url: str | None, cache_dir: str | os.PathLike) -> str:
    """A local path with the bytes of ``uri``: the path itself when it is local, else a copy in
    ``cache_dir`` (kept by the object's name and size, so that every worker of a node shares one)."""
    if not is_s3(uri):
        return uri
    storage, name = s3_object(uri, endpoint_url)
    size = storage.size(name)
    tag = hashlib.sha256(f"{uri}:{size}".encode()).hexdigest()[:12]
    target = Path(cache_dir) / tag / name  # the official file name is kept: its sha256 prefix is checked on load
    if target.is_file() and target.stat().st_size == size:
        return str(target)
    data = storage.read_bytes(name)
    write_atomically(target, lambda f: f.write(data))  # workers of one node may fetch it at once
    return str(target)


def with_local_weights(model: ModelConfig, endpoint_url: str | None, cache_dir: str | os.PathLike) -> ModelConfig:
    """``model`` with its weights paths replaced by local copies."""
    w = model.weights
    local = dataclasses.replace(
        w, backbone=local_copy(w.backbone, endpoint_url, cache_dir) if w.backbone else None,
        checkpoint=local_copy(w.checkpoint, endpoint_url, cache_dir) if w.checkpoint else None)
    return dataclasses.replace(model, weights=local)

"""The classes a model is trained on and detects: the data's whole label space, or a subset of it
(a class-subset expert, ``model.classes`` / ``model.classes_band``).

The shards always carry label ids of the data's label space (what ``tsd prep`` wrote); a model
works in its own ids ``0..K-1``. This module owns the mapping both ways: the loader and the
samplers map targets into the model's ids (boxes of other classes are dropped: background for the
expert), and inference maps detections back to the data's ids, so that evaluation, submissions and
ensembles only ever see the data's label space. The model's hierarchy is the data's restricted to
its classes (``Hierarchy.ancestor_matrix`` skips ancestors outside a label space).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from data_prep.errors import ConfigError
from data_prep.hierarchy import Hierarchy
from data_prep.labels import LabelSpace


@dataclass(frozen=True)
class ModelClasses:
    data: LabelSpace  # the shards' label space
    hierarchy: Hierarchy
    model: LabelSpace  # the model's classes, in its output order
    to_data: np.ndarray  # [K] int64: the data id of each model class

    @property
    def is_subset(self) -> bool:
        return len(self.model) < len(self.data)

    def data_to_model(self) -> np.ndarray:
        """``[C]`` int64: the model id of each data class, -1 for classes the model does not have."""
        out = np.full(len(self.data), -1, dtype=np.int64)
        out[self.to_data] = np.arange(len(self.to_data))
        return out

    def covers(self) -> np.ndarray:
        """``[C]`` bool: the data classes this model detects."""
        out = np.zeros(len(self.data), dtype=bool)
        out[self.to_data] = True
        return out

    def model_ancestor_matrix(self) -> np.ndarray:
        """``[K, K]``: ancestors among the model's own classes (what its expansion and multi-label targets use)."""
        return self.hierarchy.ancestor_matrix(self.model)


def band_classes(class_stats: list[dict], lo: float, hi: float) -> list[str]:
    """The MIDs whose rank by training boxes (rarest first; ties by label index) lies in
    ``[lo, hi)`` of the label space, from a prep manifest's ``splits.<train>.classes`` list."""
    if not 0.0 <= lo < hi <= 1.0:
        raise ConfigError(f"model.classes_band: [{lo}, {hi}] is not a range inside [0, 1] with lo < hi")
    ranked = sorted(class_stats, key=lambda c: (c["boxes"], c["index"]))
    n = len(ranked)
    picked = ranked[int(round(lo * n)) : int(round(hi * n))]
    if not picked:
        raise ConfigError(f"model.classes_band: [{lo}, {hi}] of {n} classes selects none")
    return [c["mid"] for c in sorted(picked, key=lambda c: c["index"])]


def _shards_manifest(cfg) -> tuple[str, dict]:
    """The address of the prep manifest of the config's shards, and its content ({} before `tsd
    prep` has written it)."""
    from data_prep.prep import MANIFEST_FILE, read_manifest
    from data_prep.storage import open_storage

    shards = open_storage(cfg.data.shards, cfg.data.s3_endpoint_url)
    return shards.uri(MANIFEST_FILE), read_manifest(shards)


def resolve_class_selection(cfg, subset_of_the_shards: bool = False):
    """The config with ``model.classes_band`` resolved into ``model.classes`` (from the prep
    manifest of the training split) and ``model.num_classes`` set to the selection's size. With
    no selection and ``subset_of_the_shards`` (``tsd train``), shards prepared for a class subset
    (``prep.classes``) give their kept classes. Evaluation takes a model's classes from its
    checkpoint's config, never from the shards it is evaluated on. Runs write the resolved config, so a
    checkpoint's ``config.yaml`` names its classes explicitly."""

    model = cfg.model
    classes = list(model.classes)
    if subset_of_the_shards and not classes and model.classes_band is None:  # shards of prep.classes
        classes = list((_shards_manifest(cfg)[1].get("class_subset") or {}).get("classes", []))
    if model.classes_band is not None:
        if classes:
            raise ConfigError("model.classes and model.classes_band: give one of them")
        if len(model.classes_band) != 2:
            raise ConfigError("model.classes_band: give [lo, hi], e.g. [0.0, 0.2] for the rarest 20 %")
        where, manifest = _shards_manifest(cfg)
        if not manifest:
            raise ConfigError(f"model.classes_band: {where} is missing or unreadable (run `tsd prep`)")
        split = cfg.train.split
        stats = manifest.get("splits", {}).get(split, {}).get("classes")
        if not stats:
            raise ConfigError(f"model.classes_band: the prep manifest has no class statistics for split '{split}'")
        classes = band_classes(stats, *model.classes_band)
    if not classes:
        return cfg
    model = dataclasses.replace(model, classes=classes, classes_band=None, num_classes=len(classes))
    return dataclasses.replace(cfg, model=model)


def model_classes(cfg) -> ModelClasses:
    """The data's label space and hierarchy, and the model's classes within it."""
    from data_prep.prep import load_label_space

    data, hierarchy = load_label_space(cfg.data)
    if cfg.model.classes_band is not None:
        raise ConfigError("model.classes_band is resolved by `tsd train`; give the run's config.yaml "
                          "(or model.classes) here")
    if not cfg.model.classes:
        return ModelClasses(data, hierarchy, data, np.arange(len(data), dtype=np.int64))
    ids = data.lookup(list(cfg.model.classes), "model.classes")
    if cfg.model.num_classes != len(ids):
        raise ConfigError(f"model.num_classes is {cfg.model.num_classes} but model.classes lists {len(ids)}")
    model = LabelSpace(tuple(data.mids[i] for i in ids), tuple(data.names[i] for i in ids))
    return ModelClasses(data, hierarchy, model, ids)

"""Experiment configuration: YAML files in ``configs/`` validated into typed dataclasses.

Every section is a dataclass owned by the package it configures (``data_prep.config`` for data
and sharding; the model and training sections are added by their packages). Loading is strict:
an unknown key is an error naming its full path (``prep.shard_sise``) with the closest valid
key, a wrong type names the expected one. ``--set a.b=c`` overrides any key (the value is parsed
as YAML: ``--set prep.seed=3``, ``--set prep.splits=[train]``). Every run writes the resolved
config next to its outputs.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from data_prep.config import DataConfig, PrepConfig
from data_prep.errors import ConfigError
from tsd_model.config import ModelConfig

T = TypeVar("T")


@dataclass
class LoaderConfig:
    """Data loading on every training worker (image sizes come from ``model.input``)."""

    mode: Literal["index", "streaming"] = "index"  # random access via the prep index, or webdataset streaming
    sampler: Literal["uniform", "class_aware", "repeat_factor"] = "uniform"
    num_sample_class: int = 1  # class-aware: images drawn per class visit
    repeat_threshold: float = 0.001  # repeat-factor: t
    group_by_aspect: bool = True
    flip_prob: float = 0.5
    # also train on the boxes prep added for ancestor classes (copies of the leaf box: a softmax head
    # matches a RoI to the first of identical boxes, so they teach it nothing; they stay in the shards
    # for the metric). Off: train on the annotated classes, and expand detections at test instead.
    use_expanded_labels: bool = False
    num_workers: int = 2  # DataLoader processes per training worker
    # S3 shards: range requests in flight per DataLoader process, for its next samples (the sampler
    # knows them); 0 = one request at a time. bench/bench_s3_latency.py measures it at 25-50 ms.
    read_ahead: int = 16
    prefetch_factor: int = 2


@dataclass
class TrainConfig:
    """The schedule, distribution and bookkeeping of `tsd train`."""

    split: str = "train"
    run_name: str | None = None  # default: the config's name
    storage_path: str = "runs"  # checkpoints: local dir or s3://bucket/prefix (Ray Train storage)
    local_dir: str = "runs"  # TensorBoard events and worker status files, written on each rank's node...
    sync_every_s: float = 60.0  # ...and copied into storage_path/<run>/ this often (and at checkpoints)
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    # elastic: go on with as few as this many workers when nodes go away (and grow back to num_workers);
    # the global batch and the lr stay those of num_workers (pipeline.train.batch_plan)
    min_workers: int | None = None
    elastic_resize_interval_s: float = 60.0  # how often a shrunk run checks for room to grow back
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # SPREAD: over nodes
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    images_per_worker: int = 2
    grad_accumulation: int = 1  # micro-batches per optimizer step (for small-memory GPUs)
    epochs: int = 13
    iterations_per_epoch: int | None = None  # default: images in the split / global batch
    max_iterations: int | None = None  # stop early (tests, smoke runs); default epochs x iterations_per_epoch
    base_lr_per_image: float = 0.00125  # lr = 0.00125 x global batch (0.04 at 32)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    no_decay_on_norm_and_bias: bool = False
    warmup_iterations: int | None = None  # linear warmup from the per-image lr; default: one epoch
    lr_steps: list[int] = field(default_factory=lambda: [8, 11])  # epochs at which lr /= 10
    lr_gamma: float = 0.1
    grad_clip_norm: float | None = None
    amp: Literal["off", "fp16", "bf16"] = "off"  # fp16 with a GradScaler on CUDA; bf16 on CPU or CUDA
    sync_bn: bool = True  # SyncBatchNorm when training on several GPUs
    deterministic: bool = False  # torch deterministic algorithms (slow roi_align backward on CUDA)
    seed: int = 0
    checkpoint_every: int = 500  # iterations; also at every epoch end and at the end
    keep_checkpoints: int = 3
    max_failures: int = 3  # worker failures survived by restarting from the last checkpoint
    log_every: int = 20
    image_log_every: int = 500  # TensorBoard image with ground truth and predictions
    max_nonfinite_in_row: int = 5  # abort after this many consecutive non-finite losses
    eval_every_epochs: int = 0  # evaluate on eval_split with the official metric every N epochs (0: never)
    eval_split: str = "validation"


@dataclass
class InferenceConfig:
    """The resources of `tsd evaluate` and `tsd submission`: Ray tasks, each scoring a contiguous
    range of the images (evaluation during training runs on the training workers instead)."""

    use_gpu: bool | None = None  # None: one GPU per task when the cluster has GPUs, else CPUs
    num_tasks: int | None = None  # None: one per GPU of the cluster (GPU), or per cpus_per_task CPUs
    cpus_per_task: float = 1.0
    images_per_batch: int = 2  # images per forward (also of evaluation during training)


@dataclass
class EnsembleMember:
    """One model of an ensemble. Its model section comes from ``config`` if given, else from the
    ``config.yaml`` saved beside its checkpoint (so an expert brings its own ``model.classes``),
    else from the ensemble's config; ``model.test`` is always the ensemble's, with the TTA
    overrides below (the same checkpoint twice with different TTA is two members)."""

    checkpoint: str
    weight: float = 1.0
    config: str | None = None
    tta_flip: bool | None = None
    tta_scales: list[int] | None = None


@dataclass
class EnsembleConfig:
    """How ``tsd evaluate`` / ``tsd submission`` merge several models (``pipeline.ensemble``)."""

    method: Literal["wbf", "vote"] = "wbf"  # weighted boxes fusion, or box voting with the best score
    iou: float = 0.55  # boxes of one class overlapping more than this are one object
    skip_score: float = 0.0  # member detections below this are dropped before merging
    # the members; or give `--checkpoint` several times (weight 1 each, or `weights` in that order)
    members: list[EnsembleMember] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    """The root of every config file."""

    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    prep: PrepConfig = field(default_factory=PrepConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__}")
        (item_tp, *rest) = get_args(tp) or (Any,)
        items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_convert(k, key_tp, path): _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ``ConfigError``."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(names)})"
            raise ConfigError(f"unknown config key '{key_path}'{hint}")
        kwargs[key] = _convert(value, hints[key], key_path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML-ready data of a config dataclass."""
    return dataclasses.asdict(cfg)


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 (and every user) does: PyYAML follows YAML
    1.1, where ``1e-4`` or ``5e3`` (no dot in the mantissa) are strings."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """YAML text as data, numbers as YAML 1.2 reads them (``1e-4``, ``1E-4``, ``1.0e-4``, ``5e3``)."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to the raw mapping (values parsed as YAML)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        try:
            value = parse_yaml(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from None
        node = raw
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{'.'.join(parts[: i + 1])}' is not a section")
            node = child
        node[parts[-1]] = value
    return raw


BASE_KEY = "_base_"  # mmdetection's name: a config (or a list of them) this one starts from
DELETE_KEY = "_delete_"  # in a mapping: replace the base's mapping instead of merging into it


def merge_configs(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings merge key by key (unless the child's says ``_delete_: true``),
    anything else (lists included) is replaced."""
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and value.get(DELETE_KEY):
            out[key] = {k: v for k, v in value.items() if k != DELETE_KEY}
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_configs(out[key], value)
        else:
            out[key] = value
    return out


def read_config_file(path: str | Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping with its ``_base_`` files merged under it (paths relative to the file)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found" + (f" (a {BASE_KEY} of {chain[-1]})" if chain else ""))
    if p.resolve() in chain:
        raise ConfigError(f"{path}: {BASE_KEY} files include each other: "
                          + " -> ".join(str(c) for c in (*chain, p.resolve())))
    try:
        raw = parse_yaml(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    bases = raw.pop(BASE_KEY, [])
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else list(bases):
        merged = merge_configs(merged, read_config_file(p.parent / base, (*chain, p.resolve())))
    return merge_configs(merged, raw)


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                cls: type[T] = ExperimentConfig) -> T:
    """Read a YAML config (or the defaults when ``path`` is None) with its ``_base_`` files, apply
    overrides, validate."""
    raw: dict[str, Any] = read_config_file(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides or []))
    try:
        return from_dict(cls, raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

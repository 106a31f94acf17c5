"""Distributed training on Ray Train: the worker loop and the driver.

The two halves of a Ray Train program. ``train_worker`` runs on every worker: build the model and
its DDP wrapper, the data and the hooks, resume from ``ray.train.get_checkpoint()`` if there is
one, then run the loop (``pipeline.trainer``: a short step with the paper's schedule, AMP and
gradient accumulation, and the periodic hooks of ``pipeline.hooks``); every ``checkpoint_every``
iterations, at every epoch end and at the end, every rank calls ``ray.train.report`` (rank 0 with
the checkpoint). Rank 0 alone writes TensorBoard. The driver,
``run_training``, only builds the ``TorchTrainer`` (scaling, storage, failure and checkpoint
configs) and calls ``fit()``; a worker failure restarts the group from the last checkpoint
(``FailureConfig``), and ``--resume`` continues a killed job: the same run name and storage make
Ray Train hand the latest checkpoint back.

Reproducibility: the data order is a pure function of (seed, epoch) (``pipeline.sampler``), the
learning rate a pure function of the iteration (``pipeline.schedule``), and the torch RNG of each
rank is reseeded from (seed, rank, iteration) at every checkpoint, so a resumed run continues
exactly as an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_prep.errors import ConfigError, TsdError
from pipeline.checkpoint import CONFIG_FILE, read_checkpoint
from pipeline.config import ExperimentConfig, dump_config, from_dict, to_dict
from pipeline.files import write_text_atomic


class TrainingError(TsdError):
    """Training stopped for a reason the user must look at (non-finite losses, a failed worker)."""


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------


def _reseed(seed: int, rank: int, iteration: int) -> None:
    torch.manual_seed(hash((seed, rank, iteration)) % (2**63))


def _all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return values


@dataclass
class StepResult:
    """What one optimizer step did.

    ``finite`` is False when the loss, or (without a GradScaler) a gradient, was not finite: such
    steps are skipped and count towards ``max_nonfinite_in_row``. ``applied`` is False for every
    skipped step, also the fp16 overflow steps that the GradScaler skips by design.
    """

    finite: bool
    losses: dict[str, torch.Tensor]
    grad_norm: float
    applied: bool = False


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], grad_accumulation: int = 1,
               amp_dtype: torch.dtype | None = None, grad_clip_norm: float | None = None) -> StepResult:
    """One optimizer step over a batch in ``grad_accumulation`` micro-batches, under autocast when
    ``amp_dtype`` is set. A non-finite loss on any rank makes every rank skip the step together
    (no DDP hang); the caller counts the skips. Shared by the Ray worker loop and ``bench/``."""
    core = model.module if hasattr(model, "module") else model
    device = images[0].device
    micro = max(1, len(images) // grad_accumulation)
    loss_sums: dict[str, torch.Tensor] = {}
    optimizer.zero_grad(set_to_none=True)
    for m in range(grad_accumulation):
        sl = slice(m * micro, (m + 1) * micro)
        accumulating = m < grad_accumulation - 1 and hasattr(model, "no_sync")
        with model.no_sync() if accumulating else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                losses = model(images[sl], targets[sl])
            total = sum(losses.values()) / grad_accumulation
            bad = torch.tensor([0.0 if torch.isfinite(total).item() else 1.0], device=device)
            if _all_reduce(bad, "max").item() > 0:
                optimizer.zero_grad(set_to_none=True)
                return StepResult(False, {}, float("nan"), applied=False)
            scaler.scale(total).backward()
        for k, v in losses.items():
            loss_sums[k] = loss_sums.get(k, 0.0) + v.detach().float() / grad_accumulation
    scaler.unscale_(optimizer)
    norm = float(torch.nn.utils.clip_grad_norm_(core.parameters(), grad_clip_norm or float("inf")))
    if scaler.is_enabled():  # fp16: the scaler skips overflowing steps and lowers its scale; not an error
        scaler.step(optimizer)
        scaler.update()
        return StepResult(True, loss_sums, norm, applied=math.isfinite(norm))
    if not math.isfinite(norm):  # the same norm on every rank (after DDP's all-reduce): all skip
        optimizer.zero_grad(set_to_none=True)
        return StepResult(False, loss_sums, norm, applied=False)
    optimizer.step()
    return StepResult(True, loss_sums, norm, applied=True)


def label_ancestors(cfg: ExperimentConfig) -> torch.Tensor | None:
    """The label space's ancestor matrix, for a multi-label classifier (``model.roi.classification:
    sigmoid``) to train against; None for the softmax."""
    if cfg.model.roi.classification != "sigmoid":
        return None
    from pipeline.classes import model_classes

    return torch.from_numpy(model_classes(cfg).model_ancestor_matrix())


def label_map(cfg: ExperimentConfig) -> np.ndarray | None:
    """Data id -> model id for a class-subset expert (``model.classes``); None for a full label space."""
    if not cfg.model.classes:
        return None
    from pipeline.classes import model_classes

    return model_classes(cfg).data_to_model()


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int  # images per optimizer step, over all workers
    images_per_rank: int
    micro_batches: int  # forward/backward passes per step on each worker


def batch_plan(tc, world: int) -> BatchPlan:
    """How a step is cut for ``world`` workers. The rule for an elastic run (``train.min_workers``):
    the global batch is always that of the configured ``train.num_workers`` (``images_per_worker`` x
    ``grad_accumulation`` x ``num_workers``), so the learning rate, the iterations per epoch and
    the sampler's global batches (the same images in the same steps) do not change when workers
    come or go; fewer workers each take more images, in more micro-batches of ``images_per_worker``."""
    global_batch = tc.images_per_worker * tc.grad_accumulation * tc.num_workers
    if world < 1 or global_batch % world:
        raise ConfigError(f"train: a global batch of {global_batch} images cannot be split over {world} workers; "
                          f"choose train.min_workers so that every possible world size divides it")
    per_rank = global_batch // world
    micro = per_rank // tc.images_per_worker if per_rank % tc.images_per_worker == 0 else tc.grad_accumulation
    return BatchPlan(global_batch, per_rank, micro)


def make_loader(cfg: ExperimentConfig, dataset, sampler, epoch: int, start: int, rank: int, world: int,
                to_model: np.ndarray | None = None):
    """The DataLoader of one rank for one epoch from ``start``: the sampler's batches in index mode, or
    webdataset streaming; the same for `tsd train` and `bench/`. ``to_model``: the expert's label
    map (``label_map(cfg)``, computed once by the caller; recomputed here when not given)."""
    from torch.utils.data import DataLoader

    from pipeline.loader import collate, streaming_dataset

    lc = cfg.loader
    workers = lc.num_workers
    extra = {"prefetch_factor": lc.prefetch_factor} if workers > 0 else {}
    if lc.mode == "streaming":
        per_rank = sampler.b  # images per rank and step (pipeline.train.batch_plan)
        stream = streaming_dataset(cfg.data.shards, cfg.train.split, cfg.model.input.min_size,
                                   cfg.model.input.max_size, (sampler.iterations_per_epoch - start) * per_rank,
                                   seed=cfg.train.seed + 1000 * epoch + rank, flip_prob=lc.flip_prob,
                                   use_expanded_labels=lc.use_expanded_labels,
                                   label_map=to_model if to_model is not None else label_map(cfg))
        return DataLoader(stream, batch_size=per_rank, collate_fn=collate, num_workers=workers,
                          pin_memory=cfg.train.use_gpu, **extra)
    batches = list(sampler.rank_batches(epoch, start))
    dataset.plan_batches(batches)  # what each loader process will be asked for: read ahead from S3
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                      pin_memory=cfg.train.use_gpu, **extra)


def _quiet_ray_train_worker_logs() -> None:
    """Ray Train logs a line per rank and report on every worker from a logger named after its
    source file, outside ``ray.train``, so ``RunConfig(logging_config=...)`` does not reach it:
    keep that logger at warnings too."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_worker(loop_config: dict) -> None:
    """One Ray Train worker: build the model, the optimizer, the data and the hooks, resume from
    ``ray.train.get_checkpoint()`` if there is one, and run the loop (``pipeline.trainer``)."""
    import ray.train
    import ray.train.torch
    from torch import nn

    from pipeline import hooks
    from pipeline.loader import ShardDataset
    from pipeline.sampler import GlobalBatchSampler, SamplerSpec
    from pipeline.schedule import parameter_groups
    from pipeline.trainer import Trainer, TrainState
    from pipeline.weights_files import with_local_weights
    from tsd_model.build import build_model

    cfg = from_dict(ExperimentConfig, loop_config["config"])
    tc = cfg.train
    run_name = loop_config["run_name"]
    if not loop_config.get("verbose"):
        _quiet_ray_train_worker_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    # 1. the model, identical on every rank, wrapped for DDP by Ray
    torch.manual_seed(tc.seed)
    model = build_model(with_local_weights(cfg.model, cfg.data.s3_endpoint_url, Path(tc.local_dir) / "weights-cache"),
                        label_ancestors=label_ancestors(cfg))
    if tc.use_gpu and world > 1 and tc.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model)
    core = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.SGD(parameter_groups(core, tc), lr=tc.base_lr_per_image, momentum=tc.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.amp == "fp16" and device.type == "cuda")

    # 2. data: the same global batches whatever the number of workers
    to_model = label_map(cfg)
    dataset = ShardDataset(cfg.data.shards, tc.split, cfg.model.input.min_size, cfg.model.input.max_size,
                           cfg.data.s3_endpoint_url, cfg.loader.use_expanded_labels, to_model,
                           read_ahead=cfg.loader.read_ahead)
    if dataset.skipped and rank == 0:
        print(f"[tsd train] left out {sum(dataset.skipped.values())} samples of missing or truncated shards: "
              f"{dataset.skipped} (re-run `tsd prep` to restore them)", flush=True)
    if rank == 0 and cfg.model.roi.compile != "eager":
        print(f"[tsd train] RoI stages compiled (model.roi.compile={cfg.model.roi.compile}): the first step with each "
              f"RoI count bucket compiles (tens of seconds)", flush=True)
    plan = batch_plan(tc, world)
    if rank == 0 and world != tc.num_workers:
        print(f"[tsd train] {world} of {tc.num_workers} workers: the global batch stays {plan.global_batch} images "
              f"({plan.images_per_rank} per worker in {plan.micro_batches} micro-batches), and the learning rate "
              f"with it", flush=True)
    ipe = tc.iterations_per_epoch or max(1, math.ceil(len(dataset) / plan.global_batch))
    landscape = dataset.index.widths >= dataset.index.heights
    sampler = GlobalBatchSampler(dataset.sample_labels, landscape, cfg.model.num_classes, plan.images_per_rank, world,
                                 rank, tc.seed, ipe, SamplerSpec(cfg.loader.sampler, cfg.loader.num_sample_class,
                                                                 cfg.loader.repeat_threshold,
                                                                 cfg.loader.group_by_aspect, cfg.loader.flip_prob))

    # 3. resume
    state = TrainState(0, tc.max_iterations or tc.epochs * ipe, ipe)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = read_checkpoint(d)
        core.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        state.iteration, state.nonfinite_skipped = saved["iteration"], saved["nonfinite_skipped"]
        state.restarts = saved.get("restarts", 0) + 1
    _reseed(tc.seed, rank, state.iteration)

    # 4. the loop and its hooks
    trainer = Trainer(cfg, model, core, optimizer, scaler, dataset, sampler, plan, device, rank, world,
                      {"fp16": torch.float16, "bf16": torch.bfloat16}.get(tc.amp), state, to_model)
    files = hooks.RunFiles(trainer, run_name)
    trainer.hooks = [hooks.MetricsWriter(files, run_name), hooks.StatusWriter(files), hooks.ImageWriter(files),
                     *([hooks.PeriodicEvaluator(files)] if tc.eval_every_epochs else []),
                     hooks.PeriodicCheckpointer(files, dump_config(cfg))]
    trainer.train()


# ---------------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------------


def storage_for_ray(storage_path: str, endpoint_url: str | None):
    """``(storage_path, storage_filesystem)`` for ``RunConfig``; S3 with a custom endpoint gets its own
    pyarrow filesystem (how a moto server or MinIO is reached)."""
    if not storage_path.startswith("s3://") or not endpoint_url:
        return (storage_path if storage_path.startswith("s3://") else str(Path(storage_path).resolve())), None
    from urllib.parse import urlparse

    import pyarrow.fs

    url = urlparse(endpoint_url)
    fs = pyarrow.fs.S3FileSystem(endpoint_override=url.netloc, scheme=url.scheme or "https",
                                 region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return storage_path[len("s3://"):], fs


def _run_exists(storage_path: str, name: str, endpoint_url: str | None) -> bool:
    from data_prep.storage import join, open_storage

    storage = open_storage(join(storage_path, name), endpoint_url)
    return any(True for _ in storage.list())


def run_training(cfg: ExperimentConfig, address: str | None = None, resume: bool = False, verbose: bool = False) -> dict:
    """Train with Ray Train; returns a summary (run name, final metrics, checkpoint, TensorBoard dir).

    Ray Train's own console logging (a line per rank and report) is kept at warnings unless
    ``verbose``; our progress bar, summaries and errors are unaffected."""
    import dataclasses

    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from data_prep.index import index_name
    from data_prep.ray_runtime import init_ray, shutdown_ray
    from data_prep.storage import is_s3, open_storage
    from pipeline.classes import model_classes, resolve_class_selection
    from pipeline.weights_files import check_weights

    # an expert's classes (or those of class-subset shards), named in the config the run writes
    cfg = resolve_class_selection(cfg, subset_of_the_shards=True)
    # workers do not share the driver's working directory: make every local path absolute
    absolute = lambda p: p if is_s3(p) else str(Path(p).resolve())  # noqa: E731
    weights = cfg.model.weights
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, shards=absolute(cfg.data.shards),
                                                           root=absolute(cfg.data.root)),
                              train=dataclasses.replace(cfg.train, local_dir=absolute(cfg.train.local_dir),
                                                        storage_path=absolute(cfg.train.storage_path)),
                              model=dataclasses.replace(cfg.model, weights=dataclasses.replace(
                                  weights, backbone=weights.backbone and absolute(weights.backbone),
                                  checkpoint=weights.checkpoint and absolute(weights.checkpoint))))
    check_weights(cfg.model, cfg.data.s3_endpoint_url)  # before anything starts: no silent training from random init
    if cfg.model.classes:
        model_classes(cfg)  # an expert's unknown classes or a wrong num_classes: said before any worker starts
    tc = cfg.train
    name = tc.run_name or cfg.name
    shards = open_storage(cfg.data.shards, cfg.data.s3_endpoint_url)
    if tc.images_per_worker < 1 or tc.num_workers < 1 or tc.grad_accumulation < 1:
        raise ConfigError("train.images_per_worker, train.num_workers and train.grad_accumulation must be >= 1")
    if tc.min_workers is not None:
        if not 1 <= tc.min_workers <= tc.num_workers:
            raise ConfigError(f"train.min_workers must be between 1 and train.num_workers ({tc.num_workers})")
        for world in range(tc.min_workers, tc.num_workers + 1):
            batch_plan(tc, world)  # every world size the run may shrink to splits the global batch
    if not shards.exists(index_name(tc.split)):  # a user error: say it before any worker starts
        raise ConfigError(f"{shards.uri(index_name(tc.split))}: no index for split '{tc.split}' (run `tsd prep`)")
    exists = _run_exists(tc.storage_path, name, cfg.data.s3_endpoint_url)
    if exists and not resume:
        raise ConfigError(f"run '{name}' already exists in {tc.storage_path}: pass --resume to continue it, or "
                          f"--set train.run_name=NEW for a new run")
    if resume and not exists:
        raise ConfigError(f"--resume: no run '{name}' in {tc.storage_path}")
    local_run = Path(tc.local_dir) / name
    local_run.mkdir(parents=True, exist_ok=True)
    write_text_atomic(local_run / CONFIG_FILE, dump_config(cfg))
    storage_path, filesystem = storage_for_ray(tc.storage_path, cfg.data.s3_endpoint_url)
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": to_dict(cfg), "run_name": name, "verbose": verbose},
        scaling_config=ScalingConfig(
            num_workers=(tc.min_workers, tc.num_workers) if tc.min_workers is not None else tc.num_workers,
            use_gpu=tc.use_gpu, resources_per_worker=resources, placement_strategy=tc.placement_strategy,
            elastic_resize_monitor_interval_s=tc.elastic_resize_interval_s),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
                             logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING")),
    )
    started = init_ray(address)
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; show the root cause in one line
        raise TrainingError(f"training of '{name}' failed: {_root_cause(exc)}") from exc
    finally:
        shutdown_ray(started)
    if result.error is not None:
        raise TrainingError(f"training of '{name}' failed: {_root_cause(result.error)}")
    summary = {
        "run": name,
        "metrics": result.metrics,
        "checkpoint": (None if result.checkpoint is None else
                       ("s3://" if tc.storage_path.startswith("s3://") and filesystem is not None else "")
                       + result.checkpoint.path),
        "storage": tc.storage_path,
        "tensorboard": str((local_run / "tensorboard").resolve()),
        "config": str((local_run / CONFIG_FILE).resolve()),
    }
    write_text_atomic(local_run / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary


def _root_cause(exc: BaseException) -> str:
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    lines = [line for line in str(seen).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(seen).__name__
    for prefix in ("data_prep.errors.", "pipeline.train."):  # "module.Class: message" -> "Class: message"
        last = last.replace(prefix, "")
    return last

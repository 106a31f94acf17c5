"""The periodic work of the training loop, one hook each (``pipeline.trainer.HookBase``).

In the order ``train_worker`` installs them, which is the order they run after a step:

- ``MetricsWriter`` (rank 0): TensorBoard scalars every ``log_every`` iterations (losses, lr,
  gradient norm, images/s and the data-wait share over the window, skipped steps, GPU memory) and
  the progress bar;
- ``StatusWriter``: each rank's status file every ``log_every`` iterations, the run's monitoring
  files copied into its storage (``RunFiles.sync``), "finished" at the end;
- ``ImageWriter`` (rank 0): detections and TSD's proposals on the batch's first image;
- ``PeriodicEvaluator``: the official metric on ``train.eval_split`` every ``eval_every_epochs``;
- ``PeriodicCheckpointer``: a checkpoint and a ``ray.train.report`` every ``checkpoint_every``
  iterations, at every epoch end and at the end (every rank reports; rank 0 with the checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

from pipeline.trainer import HookBase, Trainer


class RunFiles:
    """The run's monitoring files on this node (TensorBoard events on rank 0, this rank's status
    file) and their periodic copy into the run's storage, readable from any machine."""

    def __init__(self, trainer: Trainer, run_name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from pipeline.run_sync import DirectorySync, run_storage

        tc = trainer.cfg.train
        self.dir = Path(tc.local_dir) / run_name
        (self.dir / "workers").mkdir(parents=True, exist_ok=True)
        self.status_path = self.dir / "workers" / f"rank{trainer.rank}.json"
        self.rank = trainer.rank
        self.writer = (SummaryWriter(str(self.dir / "tensorboard"), purge_step=trainer.state.iteration)
                       if trainer.rank == 0 else None)
        remote = run_storage(tc.storage_path, run_name, tc.local_dir, trainer.cfg.data.s3_endpoint_url)
        self._syncs = [DirectorySync(self.dir / "workers", remote, "workers", tc.sync_every_s,
                                     pattern=f"rank{trainer.rank}.json")]
        if trainer.rank == 0:
            self._syncs.append(DirectorySync(self.dir / "tensorboard", remote, "tensorboard", tc.sync_every_s))

    def write_status(self, iteration: int, state: str) -> None:
        """``workers/rank{r}.json``: pid, host and progress of this worker, for ops."""
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(),
                                   "iteration": iteration, "state": state, "time": time.time()}))
        os.replace(tmp, self.status_path)

    def sync(self, force: bool = False) -> None:
        if self.writer is not None:
            self.writer.flush()
        for s in self._syncs:
            s(force)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MetricsWriter(HookBase):
    def __init__(self, files: RunFiles, run_name: str) -> None:
        self.files, self.run_name = files, run_name
        self.window = {"images": 0, "wait": 0.0, "time": 0.0}
        self.bar = None

    def before_train(self, trainer: Trainer) -> None:
        from tqdm import tqdm

        state = trainer.state
        if self.files.writer is not None:
            self.files.writer.add_scalar("data/samples_left_out", sum(trainer.dataset.skipped.values()),
                                         state.iteration)
        if trainer.rank == 0:
            self.bar = tqdm(total=state.max_iterations, initial=state.iteration, desc=f"train {self.run_name}",
                            unit="it", mininterval=2)

    def after_step(self, trainer: Trainer) -> None:
        state, w = trainer.state, self.window
        w["images"] += len(state.images) * trainer.world
        w["wait"] += state.data_seconds
        w["time"] += state.step_seconds
        writer = self.files.writer
        if writer is not None and (state.iteration % trainer.cfg.train.log_every == 0 or state.finished):
            ips = w["images"] / max(w["time"], 1e-9)
            wait = w["wait"] / max(w["time"], 1e-9)
            for k, v in state.losses.items():
                writer.add_scalar(f"loss/{k}", v, state.iteration)
            writer.add_scalar("loss/total", sum(state.losses.values()), state.iteration)
            writer.add_scalar("train/lr", state.lr, state.iteration)
            if math.isfinite(state.grad_norm):
                writer.add_scalar("train/grad_norm", state.grad_norm, state.iteration)
            writer.add_scalar("train/images_per_s", ips, state.iteration)
            writer.add_scalar("train/data_wait_fraction", wait, state.iteration)
            writer.add_scalar("train/nonfinite_skipped", state.nonfinite_skipped, state.iteration)
            if trainer.device.type == "cuda":
                writer.add_scalar("train/gpu_memory_gb", torch.cuda.max_memory_allocated(trainer.device) / 2**30,
                                  state.iteration)
            self.bar.set_postfix(loss=f"{sum(state.losses.values()):.3f}", lr=f"{state.lr:.4g}", img_s=f"{ips:.1f}",
                                 wait=f"{wait:.0%}")
            self.window = {"images": 0, "wait": 0.0, "time": 0.0}
        if self.bar is not None:
            self.bar.update(1)

    def after_train(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()


class StatusWriter(HookBase):
    def __init__(self, files: RunFiles) -> None:
        self.files = files

    def before_train(self, trainer: Trainer) -> None:
        self.files.write_status(trainer.state.iteration, "running")

    def after_step(self, trainer: Trainer) -> None:
        if trainer.state.iteration % trainer.cfg.train.log_every == 0:
            self.files.write_status(trainer.state.iteration, "running")
            self.files.sync()

    def after_train(self, trainer: Trainer) -> None:
        self.files.write_status(trainer.state.iteration, "finished")
        self.files.sync(force=True)
        self.files.close()


class ImageWriter(HookBase):
    """Rank 0, every ``image_log_every`` iterations (and the first): detections on the batch's first
    image, and for TSD its P, P-hat-r and the P-hat-c sampling points (paper Fig. 5)."""

    def __init__(self, files: RunFiles) -> None:
        self.files = files

    def after_step(self, trainer: Trainer) -> None:
        from pipeline.visualize import draw_detections, draw_tsd, tsd_geometry

        state, every = trainer.state, trainer.cfg.train.image_log_every
        if self.files.writer is None or not every or not (state.iteration % every == 0 or state.iteration == 1):
            return
        core, image = trainer.core, state.images[0]
        core.eval()
        with torch.no_grad():
            pred = core([image])[0]
        core.train()
        writer = self.files.writer
        writer.add_image("train/detections", draw_detections(image, state.targets[0]["boxes"], pred["boxes"],
                                                             pred["scores"]), state.iteration)
        if trainer.cfg.model.roi.head == "tsd":
            writer.add_image("train/tsd_proposals", draw_tsd(image, tsd_geometry(core, image)), state.iteration)


class PeriodicEvaluator(HookBase):
    """Every ``train.eval_every_epochs`` epochs: every rank detects its slice of ``train.eval_split``
    (the one inference loop), rank 0 scores the gathered parts with the official metric, whose
    ground truth it read once, before training."""

    def __init__(self, files: RunFiles) -> None:
        self.files = files
        self.evaluator = None
        self.images = 0

    def before_train(self, trainer: Trainer) -> None:
        from data_prep.index import ShardIndex
        from data_prep.storage import open_storage
        from pipeline.evaluators import OIDEvaluator

        cfg = trainer.cfg
        self.images = len(ShardIndex.load(open_storage(cfg.data.shards, cfg.data.s3_endpoint_url),
                                          cfg.train.eval_split))
        if trainer.rank == 0:
            self.evaluator = OIDEvaluator(cfg, cfg.train.eval_split)

    def after_step(self, trainer: Trainer) -> None:
        state, every = trainer.state, trainer.cfg.train.eval_every_epochs
        state.eval_metrics = {}
        if state.at_epoch_end and every and state.epoch % every == 0:
            state.eval_metrics = self.evaluate(trainer)

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """This rank's contiguous slice detected; on rank 0 the gathered parts scored, logged and
        returned as ``{"val_mAP": ...}`` ({} on the other ranks)."""
        import torch.distributed as dist

        from pipeline.inference import detect_range

        cfg, rank, world = trainer.cfg, trainer.rank, trainer.world
        split, iteration = cfg.train.eval_split, trainer.state.iteration
        trainer.core.eval()
        part = detect_range(trainer.core, cfg, split, self.images * rank // world, self.images * (rank + 1) // world,
                            cfg.inference.images_per_batch, trainer.device)
        trainer.core.train()
        parts = [part]
        if dist.is_available() and dist.is_initialized() and world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, part)
        if rank != 0:
            return {}
        self.evaluator.reset()
        for p in parts:
            self.evaluator.process(p)
        value = self.evaluator.evaluate().mean_ap()
        if self.files.writer is not None:
            self.files.writer.add_scalar(f"eval/{split}_mAP@0.5", value, iteration)
        print(f"[tsd train] iteration {iteration}: {split} mAP@0.5 = {value:.4f}", flush=True)
        return {"val_mAP": round(value, 6)}


class PeriodicCheckpointer(HookBase):
    def __init__(self, files: RunFiles, config_text: str) -> None:
        self.files, self.config_text = files, config_text

    def after_step(self, trainer: Trainer) -> None:
        state = trainer.state
        if state.iteration % trainer.cfg.train.checkpoint_every == 0 or state.at_epoch_end or state.finished:
            self.files.sync(force=True)
            self.save_and_report(trainer)

    def save_and_report(self, trainer: Trainer) -> None:
        """Rank 0 writes the checkpoint (``pipeline.checkpoint``); every rank reports, so that Ray
        Train keeps the ranks in step; then each rank's RNG is reseeded from (seed, rank, iteration),
        which a resumed run reproduces."""
        import ray.train

        from pipeline.checkpoint import write_checkpoint
        from pipeline.train import _reseed

        state, tc = trainer.state, trainer.cfg.train
        metrics = {**state.eval_metrics, "iteration": state.iteration, "epoch": state.epoch, "lr": state.lr,
                   "nonfinite_skipped": state.nonfinite_skipped, "restarts": state.restarts,
                   **{k: round(v, 6) for k, v in state.losses.items()}}
        ckpt = None
        with tempfile.TemporaryDirectory() as d:
            if trainer.rank == 0:
                write_checkpoint(d, {"model": trainer.core.state_dict(), "optimizer": trainer.optimizer.state_dict(),
                                     "scaler": trainer.scaler.state_dict(), "iteration": state.iteration,
                                     "epoch": state.epoch, "nonfinite_skipped": state.nonfinite_skipped,
                                     "restarts": state.restarts, "world_size": trainer.world,
                                     "sampler": {"seed": tc.seed, "mode": trainer.cfg.loader.sampler,
                                                 "iterations_per_epoch": state.iterations_per_epoch,
                                                 "global_batch": trainer.plan.global_batch}},
                                 self.config_text)
                if self.files.writer is not None:
                    self.files.writer.flush()
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)
        _reseed(tc.seed, trainer.rank, state.iteration)

"""The training loop of one Ray Train worker: a short step, and periodic hooks around it.

detectron2's shape: ``Trainer.train`` iterates over the sampler's batches epoch by epoch, calls
``run_step`` (learning rate, one optimizer step with AMP and gradient accumulation, the non-finite
guard, the losses averaged over ranks) and then every hook's ``after_step``; everything periodic
(TensorBoard scalars and the progress bar, the worker status files and their copy into the run's
storage, images, evaluation, checkpoints) is a hook in ``pipeline.hooks`` that reads the
``TrainState``. ``pipeline.train.train_worker`` builds the pieces and the hooks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.config import ExperimentConfig


@dataclass
class TrainState:
    """What the loop knows after a step; hooks read it (and the evaluation hook adds its metrics)."""

    iteration: int
    max_iterations: int
    iterations_per_epoch: int
    nonfinite_skipped: int = 0
    nonfinite_in_row: int = 0
    restarts: int = 0
    lr: float = 0.0
    grad_norm: float = float("nan")
    losses: dict[str, float] = field(default_factory=dict)  # the last finite step's, mean over ranks
    data_seconds: float = 0.0  # the last step's wait for its batch
    step_seconds: float = 0.0  # the last step's wait plus compute
    images: list[torch.Tensor] = field(default_factory=list)  # the last batch (for the image hook)
    targets: list[dict] = field(default_factory=list)
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation's, for the report

    @property
    def epoch(self) -> int:
        return self.iteration // self.iterations_per_epoch

    @property
    def at_epoch_end(self) -> bool:
        return self.iteration % self.iterations_per_epoch == 0

    @property
    def finished(self) -> bool:
        return self.iteration >= self.max_iterations


class HookBase:
    """Called by ``Trainer.train``: ``before_train``, ``after_step`` after every step, ``after_train``."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass


@dataclass
class Trainer:
    cfg: ExperimentConfig
    model: torch.nn.Module  # the DDP-wrapped model
    core: torch.nn.Module  # the model itself
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dataset: Any
    sampler: Any
    plan: Any  # pipeline.train.BatchPlan
    device: torch.device
    rank: int
    world: int
    amp_dtype: torch.dtype | None
    state: TrainState
    label_map: Any = None  # data id -> model id of a class-subset expert (None: the whole label space)
    hooks: list[HookBase] = field(default_factory=list)

    def train(self) -> None:
        from pipeline.train import make_loader

        for hook in self.hooks:
            hook.before_train(self)
        state = self.state
        while not state.finished:
            epoch, start = divmod(state.iteration, state.iterations_per_epoch)
            loader = make_loader(self.cfg, self.dataset, self.sampler, epoch, start, self.rank, self.world,
                                 self.label_map)
            self.model.train()
            t_end = time.perf_counter()
            for batch in loader:
                t_data = time.perf_counter()
                self.run_step(batch)
                now = time.perf_counter()
                state.data_seconds, state.step_seconds = t_data - t_end, now - t_end
                t_end = now
                for hook in self.hooks:
                    hook.after_step(self)
                if state.finished or state.at_epoch_end:
                    break
        for hook in self.hooks:
            hook.after_train(self)

    def run_step(self, batch: dict) -> None:
        """One optimizer step on ``batch``: the schedule's lr, the step, the non-finite guard."""
        from pipeline.loader import unpack
        from pipeline.schedule import learning_rate
        from pipeline.train import TrainingError, _all_reduce, train_step

        tc, state = self.cfg.train, self.state
        state.lr = learning_rate(state.iteration, tc, self.plan.global_batch, state.iterations_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = state.lr
        images, targets = unpack(batch, self.device)
        step = train_step(self.model, self.optimizer, self.scaler, images, targets, self.plan.micro_batches,
                          self.amp_dtype, tc.grad_clip_norm)
        if step.finite:
            state.nonfinite_in_row = 0
        else:
            state.nonfinite_in_row += 1
            state.nonfinite_skipped += 1
            if self.rank == 0:
                print(f"[tsd train] iteration {state.iteration}: non-finite loss, step skipped "
                      f"({state.nonfinite_in_row} in a row, {state.nonfinite_skipped} in total)", flush=True)
            if state.nonfinite_in_row >= tc.max_nonfinite_in_row:
                raise TrainingError(f"{state.nonfinite_in_row} consecutive iterations with a non-finite loss at "
                                    f"iteration {state.iteration}: lower the learning rate or check the data")
        state.iteration += 1
        state.grad_norm, state.images, state.targets = step.grad_norm, images, targets
        if step.losses:
            names = sorted(step.losses)
            mean = _all_reduce(torch.stack([step.losses[k] for k in names])) / self.world
            state.losses = dict(zip(names, mean.tolist(), strict=True))

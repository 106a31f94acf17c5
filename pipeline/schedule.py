"""The paper's optimisation recipe as pure functions of the iteration (so resume needs no state)."""

from __future__ import annotations

from torch import nn

from pipeline.config import TrainConfig


def learning_rate(iteration: int, cfg: TrainConfig, global_batch: int, iterations_per_epoch: int) -> float:
    """Linear warmup from the per-image lr to ``base_lr_per_image x global_batch`` over the first
    epoch (or ``warmup_iterations``), then /10 at the epochs in ``lr_steps``."""
    base = cfg.base_lr_per_image * global_batch
    warmup = cfg.warmup_iterations if cfg.warmup_iterations is not None else iterations_per_epoch
    if iteration < warmup:
        start = cfg.base_lr_per_image
        return start + (base - start) * iteration / max(1, warmup)
    epoch = iteration // max(1, iterations_per_epoch)
    return base * cfg.lr_gamma ** sum(epoch >= s for s in cfg.lr_steps)


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """SGD parameter groups; with ``no_decay_on_norm_and_bias``, norm weights and biases get no decay."""
    if not cfg.no_decay_on_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": cfg.weight_decay}]
    decay, no_decay = [], []
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (no_decay if isinstance(module, norm_types) or name == "bias" else decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

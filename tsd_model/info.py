"""What users compare heads by: parameter counts (total, per module, used at inference) and FLOPs."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tsd_model.build import modules_skipped_at_inference
from tsd_model.detector import TSDDetector


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_info(model: TSDDetector, flops_image: tuple[int, int] | None = (800, 1216)) -> dict:
    """Parameter counts and (optionally) inference FLOPs for one image of ``flops_image`` (h, w).

    ``inference_params`` is the total minus the modules trained but skipped at inference (TSD's
    sibling heads). FLOPs count multiply-adds as two operations over convolutions and matrix
    products (``torch.utils.flop_counter``); the image is run at exactly this size (the resize is
    bypassed) and the bilinear sampling of the pooling layers is not counted.
    """
    skipped = modules_skipped_at_inference(model)
    modules = dict(model.named_modules())
    skipped_params = sum(_params(modules[name]) for name in skipped)
    info = {
        "total_params": _params(model),
        "inference_params": _params(model) - skipped_params,
        "params_by_module": {name: _params(child) for name, child in model.named_children()},
        "skipped_at_inference": skipped,
    }
    if flops_image is not None:
        h, w = flops_image
        was_training = model.training
        saved = (model.transform.min_size, model.transform.max_size)
        model.eval()
        model.transform.min_size, model.transform.max_size = (min(h, w),), max(h, w)
        try:
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                model([torch.rand(3, h, w)])
            info["flops"] = int(counter.get_total_flops())
            info["flops_image"] = [h, w]
        finally:
            model.transform.min_size, model.transform.max_size = saved
            model.train(was_training)
    return info

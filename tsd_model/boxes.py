"""Box helpers of the detector: coding against proposals, paired IoU, the TSD translation.

Boxes are ``(x1, y1, x2, y2)`` in pixels of the network input. Deltas use the standard R-CNN
parametrisation with target stds (0.1, 0.1, 0.2, 0.2) by default, i.e. torchvision's
``BoxCoder`` with weights 1/std.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder


def box_coder(stds: list[float]) -> BoxCoder:
    """A coder whose deltas are normalised by ``stds`` (means 0), clamped as torchvision does."""
    return BoxCoder(weights=tuple(1.0 / s for s in stds), bbox_xform_clip=math.log(1000.0 / 16))


def paired_iou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of ``a[i]`` with ``b[i]`` for ``[N, 4]`` boxes; differentiable."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    return inter / (area_a + area_b - inter).clamp(min=eps)


def box_wh(boxes: Tensor) -> Tensor:
    """``[N, 2]`` widths and heights."""
    return boxes[:, 2:] - boxes[:, :2]


def translate(boxes: Tensor, shift: Tensor) -> Tensor:
    """Move both corners of each box by ``shift[i] = (dx, dy)``: TSD's P-hat-r."""
    return boxes + shift.repeat(1, 2)

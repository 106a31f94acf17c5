"""Box helpers of the detector: coding against proposals, paired IoU, the TSD translation.

Boxes are ``(x1, y1, x2, y2)`` in pixels of the network input. Deltas use the standard R-CNN
parametrisation with target stds (0.1, 0.1, 0.2, 0.2) by default, i.e. torchvision's
``BoxCoder`` with weights 1/std (``BoxCoder`` here computes the same numbers with fewer operations).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class BoxCoder:
    """R-CNN box deltas ``(dx, dy, dw, dh) / stds`` against reference boxes.

    The numbers of torchvision's ``BoxCoder`` with weights 1/std (tested against it), in a third
    of its tensor operations and without its per-call host-to-device copy: the RoI head codes
    boxes several times per step, and on a GPU each operation costs a kernel launch.
    """

    def __init__(self, stds: list[float], clip: float = math.log(1000.0 / 16)) -> None:
        self.weights = tuple(1.0 / s for s in stds)
        self.clip = clip
        self._weights: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _weight_tensor(self, like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        if key not in self._weights:
            with torch.inference_mode(False):  # kept for training too, so never an inference tensor
                self._weights[key] = torch.tensor(self.weights, dtype=like.dtype, device=like.device)
        return self._weights[key]

    def encode_single(self, gt_boxes: Tensor, reference: Tensor) -> Tensor:
        """Deltas ``[N, 4]`` that move ``reference[i]`` onto ``gt_boxes[i]``."""
        gt_boxes = gt_boxes.to(reference.dtype)
        wh = reference[:, 2:] - reference[:, :2]
        ctr = reference[:, :2] + 0.5 * wh
        gt_wh = gt_boxes[:, 2:] - gt_boxes[:, :2]
        gt_ctr = gt_boxes[:, :2] + 0.5 * gt_wh
        return torch.cat([(gt_ctr - ctr) / wh, torch.log(gt_wh / wh)], dim=1) * self._weight_tensor(reference)

    def decode_single(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """Boxes ``[..., 4]`` from ``deltas [..., 4]`` and broadcastable ``reference [..., 4]``; dw, dh
        are clamped at log(1000/16) so that no box explodes."""
        reference = reference.to(deltas.dtype)
        wh = reference[..., 2:] - reference[..., :2]
        ctr = reference[..., :2] + 0.5 * wh
        d = deltas / self._weight_tensor(deltas)
        pred_ctr = d[..., :2] * wh + ctr
        half = 0.5 * (torch.exp(d[..., 2:].clamp(max=self.clip)) * wh)
        return torch.cat([pred_ctr - half, pred_ctr + half], dim=-1)


def box_coder(stds: list[float]) -> BoxCoder:
    """A coder whose deltas are normalised by ``stds`` (means 0), clamped as torchvision does."""
    return BoxCoder(stds)


def paired_iou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of ``a[..., i, :]`` with ``b[..., i, :]`` for broadcastable ``[..., N, 4]`` boxes; differentiable."""
    wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    size_a = (a[..., 2:] - a[..., :2]).clamp(min=0)
    size_b = (b[..., 2:] - b[..., :2]).clamp(min=0)
    union = size_a[..., 0] * size_a[..., 1] + size_b[..., 0] * size_b[..., 1] - inter
    return inter / union.clamp(min=eps)


def box_wh(boxes: Tensor) -> Tensor:
    """``[N, 2]`` widths and heights."""
    return boxes[:, 2:] - boxes[:, :2]


def translate(boxes: Tensor, shift: Tensor) -> Tensor:
    """Move both corners of each box by ``shift[i] = (dx, dy)``: TSD's P-hat-r."""
    return boxes + shift.repeat(1, 2)


def large_enough(boxes: Tensor, min_size: float) -> Tensor:
    """Mask of the boxes whose width and height are both at least ``min_size``: torchvision's
    ``remove_small_boxes`` as a mask, so that a caller can join it to its other tests and select
    once (each selection is a host sync on a GPU)."""
    return (box_wh(boxes) >= min_size).all(dim=1)

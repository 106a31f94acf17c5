"""Detections for every level of the class hierarchy: each detection copied to all its ancestors.

The OID metric expands the ground truth to every ancestor class but never the detections
(``oid_metric``), so a detector that outputs leaf classes only scores AP 0 on every parent class.
What challenge entries did, and what this does: every detection of class c is copied, with its
box and score, to each ancestor of c over every path (a class with two parents appears under
both, and under their ancestors once each), then the copies that land on one class of one image
are deduplicated:

- ``nms``: per-class NMS at ``iou`` (a parent class keeps one box where its children overlap);
- ``max``: only copies with the same box (e.g. one box detected as two sibling classes) are merged,
  keeping the highest score.

The ancestor matrix comes from ``Hierarchy.ancestor_matrix`` (``M[i, j]``: j is i or an ancestor
of i), so the label space and the hierarchy are the same objects prep and the metric use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms


@dataclass
class AncestorExpansion:
    """Expands one image's detections (``boxes [N, 4]``, ``labels [N]``, ``scores [N]``) up the hierarchy."""

    up: Tensor  # [C, C] bool: up[i, j] is True when class j is class i or one of its ancestors
    dedup: Literal["nms", "max"] = "nms"
    iou: float = 0.5

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, dedup: Literal["nms", "max"] = "nms", iou: float = 0.5
                    ) -> AncestorExpansion:
        return cls(torch.from_numpy(np.asarray(matrix, dtype=bool)), dedup, iou)

    @property
    def has_parents(self) -> bool:
        """Whether any class has an ancestor in the label space (else expansion changes nothing)."""
        return bool(self.up.sum() > self.up.shape[0])

    def __call__(self, detections: dict[str, Tensor]) -> dict[str, Tensor]:
        boxes, labels, scores = detections["boxes"], detections["labels"], detections["scores"]
        up = self.up.to(labels.device)
        source, label = torch.nonzero(up[labels.long()], as_tuple=True)  # every (detection, class-or-ancestor)
        boxes, scores, label = boxes[source], scores[source], label.to(labels.dtype)
        if self.dedup == "nms":
            keep = batched_nms(boxes.float(), scores.float(), label, self.iou)
        else:
            keep = _keep_max_of_identical(boxes, scores, label)
        keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
        return {**detections, "boxes": boxes[keep], "labels": label[keep], "scores": scores[keep]}


def _keep_max_of_identical(boxes: Tensor, scores: Tensor, labels: Tensor) -> Tensor:
    """Indices that keep, among rows with the same class and the same box, the best-scoring one."""
    if len(scores) == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    order = torch.argsort(scores, descending=True, stable=True)
    rows = torch.cat([labels[order, None].to(boxes.dtype), boxes[order]], dim=1)
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(order), dtype=torch.long, device=scores.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(order), device=scores.device), reduce="amin")
    return order[first]

"""Ensembles: the detections of several models (checkpoints, TTA variants, class-subset experts)
merged per image and class.

Every member's detections are pooled, each score multiplied by the member's weight, and grouped
into clusters per image and class by a greedy pass in score order (a box joins the best-scoring
cluster leader of its class that it overlaps by more than ``iou``; the leaders are exactly the
boxes a hard NMS at ``iou`` keeps, so the pass is one ``batched_nms`` plus one IoU matrix instead
of a Python loop over boxes). Each cluster becomes one detection:

- ``wbf`` (weighted boxes fusion, Solovyev et al. 2021): coordinates = the score-weighted mean of
  the cluster's boxes; confidence = sum over members of the member's best weighted score in the
  cluster, divided by the summed weights of the members that *can* detect the class. A box found
  by one of two equal members keeps half its score; one found by both keeps the mean.
- ``vote`` (box voting across models): coordinates voted as in ``wbf``; confidence = the best
  weighted score in the cluster over the best weight (no penalty for members that missed it).

The denominator is per class: an expert trained on a subset of classes (``model.classes``) is
counted only for its own classes, so merging it never dilutes the scores of the others. The one
difference from the ``ensemble-boxes`` package is that clusters are matched against their leader
box instead of the running fused box; ``bench/bench_postprocess.py`` measures both (speed and AP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou

from pipeline.detections import Detections


@dataclass
class MemberDetections:
    """One member's detections over a split (classes in the ensemble's label space) and what it may
    vote on."""

    detections: Detections
    weight: float
    covers: np.ndarray  # [C] bool: the classes this member detects (all but an expert's others)


def fuse_image(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, member: torch.Tensor,
               weights: torch.Tensor, coverage: torch.Tensor, method: Literal["wbf", "vote"], iou: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ``(boxes, scores, labels)`` of one image from its pooled member detections.

    ``member[i]`` is the member of detection i, ``weights[m]`` that member's weight and
    ``coverage[c]`` the summed weight of the members that detect class c.
    """
    if len(scores) == 0:
        return boxes.reshape(0, 4), scores, labels
    boxes = boxes.double()
    weighted = scores.double() * weights[member]
    leaders = batched_nms(boxes, weighted, labels, iou)  # in descending weighted score
    # each box joins the first (best) leader of its class it overlaps by more than iou: the one
    # that suppressed it in the NMS above (a leader joins itself: IoU 1, and no better leader overlaps it)
    joins = (box_iou(boxes[leaders], boxes) > iou) & (labels[leaders][:, None] == labels[None, :])
    cluster = torch.argmax(joins.to(torch.int8), dim=0)  # first True along the leaders
    k = len(leaders)
    total = torch.zeros(k, dtype=torch.float64).index_add_(0, cluster, weighted)
    fused = torch.zeros(k, 4, dtype=torch.float64).index_add_(0, cluster, boxes * weighted[:, None])
    fused = fused / total.clamp(min=1e-12)[:, None]
    fused_labels = labels[leaders]
    best_per_member = torch.zeros(k * len(weights), dtype=torch.float64).scatter_reduce_(
        0, cluster * len(weights) + member, weighted, reduce="amax").view(k, len(weights))
    if method == "wbf":
        fused_scores = best_per_member.sum(dim=1) / coverage[fused_labels].clamp(min=1e-12)
    else:
        fused_scores = best_per_member.max(dim=1).values / weights.max()
    order = torch.argsort(fused_scores, descending=True, stable=True)
    return fused[order], fused_scores[order], fused_labels[order]


def fuse(members: list[MemberDetections], method: Literal["wbf", "vote"] = "wbf", iou: float = 0.55,
         skip_score: float = 0.0, max_detections: int | None = None) -> Detections:
    """The members' detections merged per image and class; images in order of first appearance.
    ``skip_score`` drops member detections below it before merging."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    weights = torch.tensor([m.weight for m in members], dtype=torch.float64)
    coverage = torch.from_numpy(np.stack([m.covers.astype(np.float64) * m.weight for m in members]).sum(axis=0))
    codes: dict[str, int] = {}
    dets = [m.detections for m in members]
    per_member_codes = [np.array([codes.setdefault(k, len(codes)) for k in d.keys], dtype=np.int64) for d in dets]
    image = np.concatenate(per_member_codes)
    member = np.concatenate([np.full(len(d), i, np.int64) for i, d in enumerate(dets)])
    classes = np.concatenate([d.classes for d in dets]).astype(np.int64)
    scores = np.concatenate([d.scores for d in dets]).astype(np.float64)
    boxes = np.concatenate([np.asarray(d.boxes, np.float64).reshape(-1, 4) for d in dets])
    keep = scores >= skip_score
    image, member, classes, scores, boxes = image[keep], member[keep], classes[keep], scores[keep], boxes[keep]
    order = np.argsort(image, kind="stable")
    bounds = np.searchsorted(image[order], np.arange(len(codes) + 1))
    t_member, t_classes = torch.from_numpy(member[order]), torch.from_numpy(classes[order])
    t_scores, t_boxes = torch.from_numpy(scores[order]), torch.from_numpy(boxes[order])
    keys = list(codes)
    out_keys: list[str] = []
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for code in range(len(codes)):
        lo, hi = int(bounds[code]), int(bounds[code + 1])
        b, s, c = fuse_image(t_boxes[lo:hi], t_scores[lo:hi], t_classes[lo:hi], t_member[lo:hi], weights, coverage,
                             method, iou)
        if max_detections is not None:
            b, s, c = b[:max_detections], s[:max_detections], c[:max_detections]
        out_keys.extend([keys[code]] * len(s))
        parts.append((b, s, c))
    if not parts:
        return Detections.empty()
    return Detections(out_keys, torch.cat([p[2] for p in parts]).numpy(), torch.cat([p[1] for p in parts]).numpy(),
                      torch.cat([p[0] for p in parts]).numpy())

"""From per-RoI class scores and boxes to detections: thresholds, NMS / Soft-NMS / adj-NMS / box voting, top-k."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, nms

from tsd_model.boxes import large_enough
from tsd_model.config import TestConfig

# candidates per NMS call in ``top_class_nms``: an NMS of n boxes builds an n x n/64-word mask, 3 MB
# here, 78 MB at the 25,000 boxes up to which torchvision's batched_nms makes one call on CUDA
NMS_CHUNK = 5000
MIN_BOX_SIZE = 1e-2  # pixels: narrower or lower boxes are dropped before NMS


def soft_nms(boxes: Tensor, scores: Tensor, iou_threshold: float, sigma: float, method: str,
             score_threshold: float) -> tuple[Tensor, Tensor]:
    """Soft-NMS (Bodla et al. 2017) of one class: decays overlapping scores instead of removing.

    ``method`` is ``"linear"`` (score *= 1 - IoU above the threshold) or ``"gaussian"``
    (score *= exp(-IoU^2 / sigma)). Returns the kept indices (in selection order) and their
    decayed scores; boxes whose score falls below ``score_threshold`` are dropped.
    """
    scores = scores.clone()
    remaining = torch.arange(len(scores), device=scores.device)
    keep, kept_scores = [], []
    while remaining.numel():
        top = torch.argmax(scores[remaining])
        best = remaining[top]
        keep.append(best)
        kept_scores.append(scores[best])
        remaining = torch.cat([remaining[:top], remaining[top + 1 :]])
        if remaining.numel() == 0:
            break
        iou = box_iou(boxes[best][None], boxes[remaining])[0]
        if method == "linear":
            decay = torch.where(iou > iou_threshold, 1 - iou, torch.ones_like(iou))
        else:
            decay = torch.exp(-(iou * iou) / sigma)
        scores[remaining] = scores[remaining] * decay
        remaining = remaining[scores[remaining] >= score_threshold]
    if not keep:
        return torch.zeros(0, dtype=torch.long, device=boxes.device), scores[:0]
    return torch.stack(keep), torch.stack(kept_scores)


def vote_boxes(kept: Tensor, kept_labels: Tensor, boxes: Tensor, scores: Tensor, labels: Tensor,
               iou_threshold: float, top_k: int) -> Tensor:
    """Box voting: each kept box becomes the score-weighted mean of the ``top_k`` best boxes of its
    class that overlap it by at least ``iou_threshold`` (itself included); the 2nd place of OID 2019
    used such top-k voting after NMS."""
    if len(kept) == 0 or len(boxes) == 0:
        return kept
    order = torch.argsort(scores, descending=True)
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    near = (box_iou(kept, boxes) >= iou_threshold) & (kept_labels[:, None] == labels[None, :])  # [K, N]
    near &= torch.cumsum(near.int(), dim=1) <= top_k  # the top_k best of the neighbours
    weights = near.to(scores.dtype) * scores[None, :]
    voted = (weights @ boxes) / weights.sum(dim=1, keepdim=True).clamp(min=1e-12)
    return torch.where(near.any(dim=1, keepdim=True), voted, kept)


def top_class_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float, wanted: int,
                  chunk: int = NMS_CHUNK) -> Tensor:
    """Per-class hard NMS, like ``batched_nms``, but only as far as its ``wanted`` best kept boxes:
    their indices come first, by descending score, exactly as ``batched_nms`` orders them.

    Greedy NMS keeps a box or not by the higher-scoring boxes alone, so the candidates can be
    taken best first, ``chunk`` at a time, each chunk suppressed by itself and by the boxes kept
    so far, until ``wanted`` are kept. Each class is offset into its own region (torchvision's
    coordinate trick), so one NMS call serves every class. ``batched_nms`` runs one NMS per class
    when there are more than 25,000 boxes on CUDA (the authors' COCO setting, score threshold 0,
    gives 1,000 RoIs x 80 classes): two host syncs per class, where this takes one per chunk.
    """
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True)
    shifted = boxes + (labels.to(boxes) * (boxes.max() + 1))[:, None]
    kept = order[:0]
    for start in range(0, len(order), chunk):
        candidates = torch.cat([kept, order[start : start + chunk]])
        kept = candidates[nms(shifted[candidates], scores[candidates], iou_threshold)]
        if len(kept) >= wanted:
            break
    return kept


def class_aware_nms(boxes: Tensor, scores: Tensor, labels: Tensor, cfg: TestConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class suppression (``cfg.nms``); returns the kept indices sorted by (new) score, their
    scores and their boxes (on CUDA, hard NMS stops once the best ``cfg.max_detections`` are
    known: the callers keep no more):

    - ``nms``: hard NMS at ``nms_iou``;
    - ``soft_linear`` / ``soft_gaussian``: Soft-NMS (scores decayed instead of boxes removed);
    - ``adj``: Soft-NMS (Gaussian) scores, then a hard NMS at ``nms_iou`` on them (the "adj-NMS" of
      OID 2019's 1st place: soft-NMS inside per-class NMS);
    - ``voting``: hard NMS, then every kept box voted from its ``vote_top_k`` best overlapping boxes
      (IoU >= ``vote_iou``) of the same class.
    """
    if cfg.nms in ("nms", "voting"):
        # on CUDA one NMS call per chunk, not per class; on the CPU torchvision's per-class NMS is faster
        keep = (top_class_nms(boxes, scores, labels, cfg.nms_iou, cfg.max_detections) if boxes.is_cuda
                else batched_nms(boxes, scores, labels, cfg.nms_iou))
        kept = boxes[keep]
        if cfg.nms == "voting":
            kept = vote_boxes(kept, labels[keep], boxes, scores, labels, cfg.vote_iou, cfg.vote_top_k)
        return keep, scores[keep], kept
    # offset each class into its own region so that one pass never mixes classes (as batched_nms does)
    offset = labels.to(boxes) * (boxes.max() + 1)
    method = "gaussian" if cfg.nms == "adj" else cfg.nms.removeprefix("soft_")
    keep, new_scores = soft_nms(boxes + offset[:, None], scores, cfg.nms_iou, cfg.soft_nms_sigma, method,
                                cfg.score_thresh)
    if cfg.nms == "adj":
        hard = batched_nms(boxes[keep], new_scores, labels[keep], cfg.nms_iou)
        keep, new_scores = keep[hard], new_scores[hard]
    order = torch.argsort(new_scores, descending=True)
    return keep[order], new_scores[order], boxes[keep[order]]


def postprocess_detections(boxes: Tensor, scores: Tensor, image_size: tuple[int, int], cfg: TestConfig
                           ) -> dict[str, Tensor]:
    """One image: ``boxes`` ``[R, K, 4]`` (K = C + 1, or 1 when class-agnostic), ``scores`` ``[R, C + 1]``.

    Returns ``boxes`` (x1, y1, x2, y2 in network-input pixels), ``scores`` and ``labels`` as 0-based
    foreground class indices (the data layer's indices).
    """
    num_classes = scores.shape[1] - 1
    if boxes.shape[1] == 1:
        boxes = boxes.expand(-1, num_classes + 1, 4)
    boxes = clip_boxes_to_image(boxes.reshape(-1, 4), image_size).view(-1, num_classes + 1, 4)
    labels = torch.arange(num_classes, device=scores.device).view(1, -1).expand(len(scores), -1)
    boxes, scores = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1)
    labels = labels.reshape(-1)
    # one selection (one host sync), not one for the scores and one for the sizes
    idx = torch.nonzero((scores > cfg.score_thresh) & large_enough(boxes, MIN_BOX_SIZE)).flatten()
    boxes, scores, labels = boxes[idx], scores[idx], labels[idx]
    keep, kept_scores, kept_boxes = class_aware_nms(boxes, scores, labels, cfg)
    n = cfg.max_detections
    return {"boxes": kept_boxes[:n], "scores": kept_scores[:n], "labels": labels[keep[:n]]}

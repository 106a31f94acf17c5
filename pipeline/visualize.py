"""Drawing detections for TensorBoard and PNG files."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes


def draw_detections(image: Tensor, gt_boxes: Tensor | None, pred_boxes: Tensor | None,
                    pred_scores: Tensor | None = None, score_thresh: float = 0.3) -> Tensor:
    """uint8 ``[3, H, W]`` with ground truth in green and predictions above ``score_thresh`` in red."""
    out = image.detach().to("cpu", torch.uint8)
    if gt_boxes is not None and len(gt_boxes):
        out = draw_bounding_boxes(out, gt_boxes.detach().cpu().float(), colors="lime", width=2)
    if pred_boxes is not None and len(pred_boxes):
        keep = pred_scores.detach().cpu() >= score_thresh if pred_scores is not None else slice(None)
        boxes = pred_boxes.detach().cpu().float()[keep]
        if len(boxes):
            out = draw_bounding_boxes(out, boxes, colors="red", width=1)
    return out

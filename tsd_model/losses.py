"""Loss functions of the RoI heads, including TSD's progressive constraint (PC).

Free functions on tensors, as torchvision's ``fastrcnn_loss``: the heads only gather inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tsd_model.boxes import paired_iou


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Softmax cross-entropy over all sampled RoIs (label 0 = background)."""
    return F.cross_entropy(logits.float(), labels)


def box_regression_loss(deltas: Tensor, targets: Tensor, labels: Tensor, beta: float) -> Tensor:
    """Smooth-L1 on the deltas of each positive RoI's own class, averaged over all sampled RoIs.

    ``deltas`` is ``[R, num_classes + 1, 4]`` (class-specific) or ``[R, 1, 4]`` (class-agnostic);
    the normalisation by the number of sampled RoIs follows mmdetection, the TSD authors' base.
    """
    pos = torch.nonzero(labels > 0).flatten()
    if pos.numel() == 0:
        return deltas.sum() * 0.0
    cls = labels[pos] if deltas.shape[1] > 1 else torch.zeros_like(labels[pos])
    pred = deltas[pos, cls].float()
    loss = F.smooth_l1_loss(pred, targets[pos].float(), beta=beta, reduction="sum")
    return loss / max(1, labels.numel())


def pc_cls_loss(logits_tsd: Tensor, logits_sibling: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Mcls = mean over RoIs of relu(p_sib[y] + m_c' - p_tsd[y]), m_c' = min(1 - p_sib[y], m_c).

    p is the softmax probability of the RoI's target class y (background for negatives); the
    sibling side is detached: the constraint pushes TSD above the sibling, never the reverse.
    """
    p_tsd = F.softmax(logits_tsd.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    p_sib = F.softmax(logits_sibling.detach().float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    m = torch.clamp(1.0 - p_sib, max=margin)
    return F.relu(p_sib + m - p_tsd).mean()


def pc_loc_loss(boxes_tsd: Tensor, boxes_sibling: Tensor, gt_boxes: Tensor, margin: float) -> Tensor:
    """Mloc = mean over positives of relu(IoU(B, gt) + m_r' - IoU(B_D, gt)), m_r' = min(1 - IoU(B, gt), m_r).

    ``boxes_tsd`` are decoded from P-hat-r with the TSD deltas of the target class, ``boxes_sibling``
    from P with the sibling's; the sibling side is detached.
    """
    if boxes_tsd.numel() == 0:
        return boxes_tsd.sum() * 0.0
    iou_sib = paired_iou(boxes_sibling.detach().float(), gt_boxes.float())
    iou_tsd = paired_iou(boxes_tsd.float(), gt_boxes.float())
    m = torch.clamp(1.0 - iou_sib, max=margin)
    return F.relu(iou_sib + m - iou_tsd).mean()

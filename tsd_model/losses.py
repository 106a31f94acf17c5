"""Loss functions of the RoI heads, including TSD's progressive constraint (PC).

Free functions on tensors, as torchvision's ``fastrcnn_loss``: the heads only gather inputs.
Every loss takes optional per-RoI ``weights`` summing to 1; the heads pass weights that make each
loss the mean over images of a per-image mean (``per_image_weights``), so that a global batch
gives the same gradients however it is split across data-parallel workers.

Nothing here indexes by the positives: box losses run over every sampled RoI and are masked by
``labels > 0``. A ``nonzero`` of the positives would wait for the GPU and give a data-dependent
shape, which would keep the losses out of a compiled RoI stage (``compiled_stage``); masked,
they join its graph. The callers give negatives finite stand-in targets (``safe_gt``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tsd_model.boxes import paired_iou


def per_image_weights(counts: list[int], mask: Tensor | None = None, device: torch.device | None = None) -> Tensor:
    """Weights of concatenated per-image items such that a weighted sum is the mean over images
    of per-image means; with ``mask``, only masked items count (images without any are left out).

    Made on ``device`` (``mask``'s) from fills, not from a tensor of ``counts``: on a GPU a tensor
    made from host numbers is a copy that waits for every queued kernel."""
    device = mask.device if mask is not None else device
    if mask is None:  # every item counts: the weights are known on the host
        share = 1.0 / max(sum(1 for c in counts if c), 1)
        return torch.cat([torch.full((c,), share / c if c else 0.0, device=device) for c in counts])
    image = torch.cat([torch.full((c,), i, dtype=torch.long, device=device) for i, c in enumerate(counts)])
    per_image = torch.zeros(len(counts), device=device).index_add_(0, image, mask.float())  # no bincount: it syncs
    images_with_items = (per_image > 0).sum().clamp(min=1)
    return torch.where(mask, 1.0 / (per_image[image].clamp(min=1) * images_with_items), torch.zeros((), device=device))


def _reduce(values: Tensor, weights: Tensor | None) -> Tensor:
    return values.mean() if weights is None else (values * weights).sum()


def classification_loss(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Softmax cross-entropy over all sampled RoIs (label 0 = background)."""
    return _reduce(F.cross_entropy(logits.float(), labels, reduction="none"), weights)


def multilabel_targets(labels: Tensor, ancestors: Tensor) -> Tensor:
    """``[R, C]`` 0/1 targets of a multi-label head: each positive RoI's class and all its ancestors
    (``ancestors[i, j]``: class j is class i or an ancestor of it), all zeros for background."""
    targets = ancestors[(labels - 1).clamp(min=0)].float()
    return targets * (labels > 0).float()[:, None]


def sigmoid_classification_loss(logits: Tensor, labels: Tensor, ancestors: Tensor,
                                weights: Tensor | None = None) -> Tensor:
    """Binary cross-entropy of every foreground class (``logits[:, 1:]``; the background logit is
    unused) against ``multilabel_targets``, summed over classes, averaged over RoIs."""
    per_roi = F.binary_cross_entropy_with_logits(logits[:, 1:].float(), multilabel_targets(labels, ancestors),
                                                 reduction="none").sum(dim=1)
    return _reduce(per_roi, weights)


def safe_gt(gt_boxes: Tensor, labels: Tensor, stand_in: Tensor) -> Tensor:
    """Each positive's gt box, and ``stand_in`` (its own box) for every other RoI: a negative has no
    gt box, and encoding the all-zero boxes of an image without boxes gives a log-size target of
    -inf (0 * inf is NaN in the backward pass, masked or not), as in the authors' code, which
    regresses positives only."""
    return torch.where((labels > 0)[:, None], gt_boxes.to(stand_in.dtype), stand_in)


def deltas_of(deltas: Tensor, labels: Tensor) -> Tensor:
    """``[R, 4]`` each RoI's deltas for its class, or row 0 when ``deltas`` is class-agnostic
    (``[R, 1, 4]``), by a gather: no index tensor."""
    rows = labels if deltas.shape[1] > 1 else torch.zeros_like(labels)
    return deltas.gather(1, rows[:, None, None].expand(-1, 1, deltas.shape[2]))[:, 0]


def box_regression_loss(deltas: Tensor, targets: Tensor, labels: Tensor, beta: float,
                        weights: Tensor | None = None) -> Tensor:
    """Smooth-L1 on the deltas of each positive RoI's own class, normalised by all sampled RoIs.

    ``deltas`` is ``[R, num_classes + 1, 4]`` (class-specific) or ``[R, 1, 4]`` (class-agnostic);
    ``targets`` ``[R, 4]``, of which only the positives' count (give negatives finite ones, see
    ``safe_gt``). The normalisation by the number of sampled RoIs (not positives) follows
    mmdetection, the TSD authors' base. ``weights`` are the sampled RoIs' weights (see
    ``per_image_weights``).
    """
    per_roi = F.smooth_l1_loss(deltas_of(deltas, labels).float(), targets.float(), beta=beta,
                               reduction="none").sum(dim=1)
    per_roi = torch.where(labels > 0, per_roi, torch.zeros((), device=per_roi.device))
    if weights is None:
        return per_roi.sum() / max(1, labels.numel())
    return (per_roi * weights).sum()


def pc_cls_loss(logits_tsd: Tensor, logits_sibling: Tensor, labels: Tensor, margin: float,
                weights: Tensor | None = None, multilabel: bool = False) -> Tensor:
    """Mcls = mean over RoIs of relu(p_sib[y] + m_c' - p_tsd[y]), m_c' = min(1 - p_sib[y], m_c).

    p is the softmax probability of the RoI's target class y (background for negatives), or with
    ``multilabel`` the sigmoid probability of y (pass weights of the positives only: a multi-label
    head has no background probability); the sibling side is detached: the constraint pushes
    TSD above the sibling, never the reverse.
    """
    logits = torch.stack([logits_tsd.float(), logits_sibling.detach().float()])  # both in one pass
    probs = torch.sigmoid(logits) if multilabel else F.softmax(logits, dim=2)
    p_tsd, p_sib = probs.gather(2, labels[None, :, None].expand(2, -1, 1))[..., 0].unbind(0)
    m = torch.clamp(1.0 - p_sib, max=margin)
    return _reduce(F.relu(p_sib + m - p_tsd), weights)


def pc_loc_loss(boxes_tsd: Tensor, boxes_sibling: Tensor, gt_boxes: Tensor, margin: float,
                weights: Tensor | None = None) -> Tensor:
    """Mloc = mean over positives of relu(IoU(B, gt) + m_r' - IoU(B_D, gt)), m_r' = min(1 - IoU(B, gt), m_r).

    ``boxes_tsd`` are decoded from P-hat-r with the TSD deltas of the target class, ``boxes_sibling``
    from P with the sibling's; the sibling side is detached. Over all sampled RoIs, pass
    ``weights`` that are zero for the negatives and ``gt_boxes`` from ``safe_gt``.
    """
    if boxes_tsd.numel() == 0:
        return boxes_tsd.sum() * 0.0
    iou_sib, iou_tsd = paired_iou(torch.stack([boxes_sibling.detach().float(), boxes_tsd.float()]),
                                  gt_boxes.float()).unbind(0)
    m = torch.clamp(1.0 - iou_sib, max=margin)
    return _reduce(F.relu(iou_sib + m - iou_tsd), weights)

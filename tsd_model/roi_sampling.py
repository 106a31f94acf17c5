"""Which proposals a training RoI stage learns from (and which anchors the RPN learns from): IoU
matching and a fixed-size balanced draw.

torchvision's ``BalancedPositiveNegativeSampler`` finds the positives and the negatives with
``nonzero`` and permutes each; with the indices kept that is three reads of data-dependent sizes
per image, and on a GPU each waits for every kernel queued before it. ``RoISampler`` makes the
same draw without them: up to ``positive_fraction`` of ``batch_size_per_image`` uniformly among
the positives, the rest uniformly among the negatives, as two ``topk``s over random priorities (a
uniform subset is the ``k`` largest of i.i.d. uniform keys).

Every image gives ``min(batch_size_per_image, candidates)`` RoIs, a number the host knows without
asking the GPU. Where the positives and negatives do not fill it (ignored proposals between the
IoU thresholds, positives beyond the cap, candidates excluded by the caller), the remaining
places are fill-ins: real proposals marked not ``valid``, which the stage gives loss weight 0
and a background label, so that the losses are those of the variable-size draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORED = -1  # a proposal's label between the IoU thresholds, or excluded: never drawn
BACKGROUND = 0


@dataclass(frozen=True)
class RoISampler:
    """A stage's matching thresholds and its balanced draw of training RoIs.

    Args:
        fg_iou: a proposal whose best IoU with a gt box is at least this is a positive of that box's class.
        bg_iou: below this it is background; in between it is ignored.
        batch_size_per_image: RoIs drawn per image (fewer only when there are fewer proposals).
        positive_fraction: the largest share of them that are positives.
        allow_low_quality_matches: a proposal that is some gt box's best (ties included) is also a
            positive, of its own best gt box, whatever its IoU (torchvision's matcher, for the RPN).
    """

    fg_iou: float
    bg_iou: float
    batch_size_per_image: int
    positive_fraction: float
    allow_low_quality_matches: bool = False

    def labels(self, iou: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor]:
        """Each proposal's label (gt class + 1, ``BACKGROUND`` or ``IGNORED``) and the index of its
        best-matching gt box, from the ``[G, N]`` IoU matrix (``G`` ≥ 1). ``torch.where`` only: a
        masked assignment would be an index with a host read behind it."""
        best, matched = iou.max(dim=0)
        positive = gt_labels[matched] + 1
        labels = torch.where(best < self.bg_iou, BACKGROUND, torch.where(best >= self.fg_iou, positive, IGNORED))
        if self.allow_low_quality_matches:
            is_a_gts_best = (iou == iou.max(dim=1, keepdim=True).values).any(dim=0)
            labels = torch.where(is_a_gts_best, positive, labels)
        return labels, matched

    def draw(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Indices of the drawn RoIs into ``labels`` (``min(batch_size_per_image, len(labels))`` of
        them) and whether each is a real draw (``valid``) or a fill-in; no host sync."""
        n = len(labels)
        priority = torch.rand(n, device=labels.device) + 1.0  # in [1, 2): above the 0 of the left-out
        zero = torch.zeros((), device=labels.device)
        cap = min(int(self.batch_size_per_image * self.positive_fraction), n)
        pos_keys, pos_idx = torch.topk(torch.where(labels > 0, priority, zero), cap, sorted=False)
        chosen_pos = torch.zeros(n, dtype=torch.bool, device=labels.device).scatter(0, pos_idx, pos_keys > 0)
        # the chosen positives first (key 3), then the negatives in random order, then the rest (0)
        keys = torch.where(chosen_pos, 3.0, torch.where(labels == BACKGROUND, priority, zero))
        keys, keep = torch.topk(keys, min(self.batch_size_per_image, n), sorted=False)
        return keep, keys > 0

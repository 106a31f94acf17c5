"""torchvision's RegionProposalNetwork with its losses averaged per image.

torchvision normalises the RPN losses over all anchors sampled in the batch; here each image's
losses are normalised over its own samples and then averaged over images (as the RoI losses are),
so that splitting a global batch across data-parallel workers does not change the gradients.
Anchor sampling, matching and proposals are torchvision's, unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.rpn import RegionProposalNetwork


class PerImageLossRPN(RegionProposalNetwork):
    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        counts = [len(lab) for lab in labels]  # anchors per image (equal within a padded batch)
        obj, box = [], []
        for o, d, lab, tgt in zip(objectness.split(counts), pred_bbox_deltas.split(counts), labels,
                                  regression_targets, strict=True):
            lo, lb = super().compute_loss(o, d, [lab], [tgt])
            obj.append(lo)
            box.append(lb)
        return torch.stack(obj).mean(), torch.stack(box).mean()

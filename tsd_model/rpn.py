"""torchvision's RegionProposalNetwork, its training targets made without host reads and its
losses averaged per image.

torchvision normalises the RPN losses over all anchors sampled in the batch; here each image's
losses are normalised over its own samples and then averaged over images (as the RoI losses are),
so that splitting a global batch across data-parallel workers does not change the gradients.

The anchors' labels are torchvision's (its matcher's thresholds, and its low-quality matches: an
anchor that is some gt box's best, ties included, is a positive of its own best gt box), computed
by ``torch.where`` instead of masked assignments and ``nonzero``; the balanced draw is
``roi_sampling.RoISampler``'s (the same draw as torchvision's sampler, at a fixed count per image,
without its ``nonzero``s), and the losses are masked by the drawn positives instead of indexed by
them. Per training step that is five host reads per image fewer, each a wait for the GPU. The
proposals are torchvision's (per-level top-k, clipped, small and low-scoring boxes dropped, NMS
per level, the best ``post_nms_top_n``), their two tests made in one selection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import batched_nms, clip_boxes_to_image

from tsd_model.boxes import large_enough
from tsd_model.roi_sampling import RoISampler


class PerImageLossRPN(RegionProposalNetwork):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        m, s = self.proposal_matcher, self.fg_bg_sampler
        self.sampler = RoISampler(m.high_threshold, m.low_threshold, s.batch_size_per_image, s.positive_fraction,
                                  allow_low_quality_matches=m.allow_low_quality_matches)

    def assign_targets_to_anchors(self, anchors: list[Tensor], targets: list[dict[str, Tensor]]
                                  ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image, each anchor's label (1 object, 0 background, -1 ignored: float, as torchvision's)
        and its matched gt box."""
        labels, matched_boxes = [], []
        for anchors_per_image, target in zip(anchors, targets, strict=True):
            gt_boxes = target["boxes"]
            if gt_boxes.numel() == 0:  # an image without boxes: every anchor is background
                labels.append(torch.zeros(len(anchors_per_image), device=anchors_per_image.device))
                matched_boxes.append(torch.zeros_like(anchors_per_image, dtype=torch.float32))
                continue
            one_class = torch.zeros(len(gt_boxes), dtype=torch.long, device=gt_boxes.device)  # object: label 1
            label, matched = self.sampler.labels(self.box_similarity(gt_boxes, anchors_per_image), one_class)
            labels.append(label.float())
            matched_boxes.append(gt_boxes[matched])
        return labels, matched_boxes

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Objectness BCE over each image's drawn anchors, smooth-L1 (beta 1/9) over its drawn
        positives normalised by all drawn anchors (torchvision's), then the mean over images."""
        counts = [len(lab) for lab in labels]  # anchors per image (equal within a padded batch)
        obj, box = [], []
        for o, d, lab, tgt in zip(objectness.flatten().split(counts), pred_bbox_deltas.split(counts), labels,
                                  regression_targets, strict=True):
            keep, valid = self.sampler.draw(lab)
            lab, zero = lab[keep], torch.zeros((), device=lab.device)
            positive = valid & (lab > 0)
            drawn = valid.sum().clamp(min=1)
            bce = F.binary_cross_entropy_with_logits(o[keep], lab.clamp(min=0), reduction="none")
            obj.append(torch.where(valid, bce, zero).sum() / drawn)
            # the targets of all but the positives stand in as 0: an image without boxes encodes -inf
            target = torch.where(positive[:, None], tgt[keep], zero)
            l1 = F.smooth_l1_loss(d[keep], target, beta=1 / 9, reduction="none").sum(dim=1)
            box.append(torch.where(positive, l1, zero).sum() / drawn)
        return torch.stack(obj).mean(), torch.stack(box).mean()

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]],
                         num_anchors_per_level: list[int]) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's proposals and scores per image, with the minimum-size and the score tests
        made in one selection: two host syncs per image (it and the NMS), torchvision's three."""
        num_images, device = proposals.shape[0], proposals.device
        objectness = objectness.detach().reshape(num_images, -1)
        level = torch.cat([torch.full((n,), k, dtype=torch.int64, device=device)
                           for k, n in enumerate(num_anchors_per_level)])
        top = self._get_top_n_idx(objectness, num_anchors_per_level)  # [images, candidates], per level
        rows = torch.arange(num_images, device=device)[:, None]
        candidates, scores, levels = proposals[rows, top], objectness[rows, top].sigmoid(), level[top]
        kept_boxes, kept_scores = [], []
        for boxes, score, lvl, shape in zip(candidates, scores, levels, image_shapes, strict=True):
            boxes = clip_boxes_to_image(boxes, shape)
            keep = torch.where(large_enough(boxes, self.min_size) & (score >= self.score_thresh))[0]
            boxes, score, lvl = boxes[keep], score[keep], lvl[keep]
            keep = batched_nms(boxes, score, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            kept_boxes.append(boxes[keep])
            kept_scores.append(score[keep])
        return kept_boxes, kept_scores

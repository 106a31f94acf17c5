"""The two-stage detector: resize/normalise -> backbone + FPN -> RPN -> RoI heads -> detections.

Reads like torchvision's ``GeneralizedRCNN.forward``: training returns a dict of named losses,
evaluation one dict per image with ``boxes`` (x1, y1, x2, y2 in the pixels of the image as
given), ``labels`` (0-based class indices of the data layer) and ``scores``. Images may be
``uint8`` (0-255) or float (0-1) ``[3, H, W]`` tensors; targets hold ``boxes`` in the pixels of
the given image and 0-based ``labels``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from tsd_model.config import TestConfig
from tsd_model.postprocess import class_aware_nms
from tsd_model.roi_heads import RoIHeads


class TSDDetector(nn.Module):
    def __init__(self, transform: GeneralizedRCNNTransform, backbone: nn.Module, rpn: RegionProposalNetwork,
                 roi_heads: RoIHeads) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        if self.training and targets is None:
            raise ValueError("training needs targets")
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        images = [img.float().div(255) if img.dtype == torch.uint8 else img for img in images]
        if targets is not None:
            targets = [{"boxes": t["boxes"].float(), "labels": t["labels"].long()} for t in targets]
        batch, targets = self.transform(images, targets)
        features = self.backbone(batch.tensors)
        proposals, rpn_losses = self.rpn(batch, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    @torch.no_grad()
    def detect_tta(self, images: list[Tensor], scales: list[int], flip: bool, test: TestConfig
                   ) -> list[dict[str, Tensor]]:
        """Test-time augmentation: every shorter-side scale, with and without a horizontal flip;
        the detections of all passes (in original-image pixels) are merged by per-class (Soft-)NMS."""
        was_training = self.training
        self.eval()
        saved = self.transform.min_size
        passes: list[list[dict[str, Tensor]]] = []
        try:
            for scale in scales or [saved[-1]]:
                self.transform.min_size = (scale,)
                for flipped in ([False, True] if flip else [False]):
                    inputs = [img.flip(-1) if flipped else img for img in images]
                    outs = self.forward(inputs)
                    if flipped:
                        for out, img in zip(outs, images, strict=True):
                            w = img.shape[-1]
                            b = out["boxes"].clone()
                            out["boxes"] = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
                    passes.append(outs)
        finally:
            self.transform.min_size = saved
            self.train(was_training)
        merged = []
        for i in range(len(images)):
            boxes = torch.cat([p[i]["boxes"] for p in passes])
            scores = torch.cat([p[i]["scores"] for p in passes])
            labels = torch.cat([p[i]["labels"] for p in passes])
            keep, kept_scores, kept_boxes = class_aware_nms(boxes, scores, labels, test)
            n = test.max_detections
            merged.append({"boxes": kept_boxes[:n], "scores": kept_scores[:n], "labels": labels[keep[:n]]})
        return merged

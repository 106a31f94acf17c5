"""RoI heads: proposal sampling, the sibling / double / TSD heads, their losses, cascade stages.

One ``RoIStage`` is a Fast R-CNN stage: it samples RoIs from proposals, pools their features and
runs its head. With ``head="tsd"`` it also derives TSD's two task-specific proposals from each
sampled proposal P (both predicted from P's RoI feature):

- P-hat-c: P's k x k grid with every bin moved by ``gamma * dC * (w, h)``, pooled by deformable
  RoI pooling, feeds the classification branch;
- P-hat-r: P translated by ``gamma * dR * (w, h)``, feeds the regression branch, whose deltas are
  encoded and decoded against P-hat-r.

During training the classical sibling head runs on the same sampled RoIs (``tsd.joint_sibling``)
and the progressive constraints compare the two; at inference the sibling is not computed.
``RoIHeads`` chains one stage (Faster R-CNN) or several (Cascade R-CNN, each stage refining the
previous stage's boxes without gradient between stages, scores averaged over stages at test).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou

from tsd_model import losses as L
from tsd_model.boxes import box_coder, box_wh, translate
from tsd_model.config import ModelConfig
from tsd_model.heads import DoubleHead, SiblingHead, TSDHead
from tsd_model.ops import MultiScaleDeformRoIPool, rois_of
from tsd_model.postprocess import postprocess_detections

FEATMAP_NAMES = ["0", "1", "2", "3"]


class RoIStage(nn.Module):
    def __init__(self, cfg: ModelConfig, in_channels: int, stds: list[float], fg_iou: float, bg_iou: float,
                 class_agnostic: bool, name_suffix: str = "") -> None:
        super().__init__()
        roi, tsd = cfg.roi, cfg.tsd
        k = roi.pool_size
        self.head_type = roi.head
        self.tsd_cfg = tsd
        self.beta = roi.smooth_l1_beta
        self.suffix = name_suffix
        self.add_gt = roi.add_gt_as_proposals
        num_outputs = cfg.num_classes + 1
        num_reg = 1 if class_agnostic else num_outputs
        self.pool = MultiScaleDeformRoIPool(FEATMAP_NAMES, k, roi.sampling_ratio)
        self.coder = box_coder(stds)
        self.matcher = det_utils.Matcher(fg_iou, bg_iou, allow_low_quality_matches=False)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(roi.batch_size_per_image, roi.positive_fraction)
        self.sibling = self.dhead = self.tsd = None
        if roi.head == "sibling" or (roi.head == "tsd" and tsd.joint_sibling):
            self.sibling = SiblingHead(in_channels, k, roi.representation_size, num_outputs, num_reg)
        if roi.head == "double":
            self.dhead = DoubleHead(in_channels, k, roi.representation_size, num_outputs, num_reg)
        if roi.head == "tsd":
            self.tsd = TSDHead(in_channels, k, roi.representation_size, num_outputs, num_reg, tsd.offset_hidden)
            self.deform_pool = MultiScaleDeformRoIPool(FEATMAP_NAMES, k, tsd.samples_per_bin)

    # -- training targets -------------------------------------------------------------------
    def sample(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]
               ) -> tuple[list[Tensor], Tensor, Tensor]:
        """Sampled RoIs per image, their labels (0 = background) and matched gt boxes (concatenated)."""
        sampled, labels_out, gt_out = [], [], []
        for props, target in zip(proposals, targets, strict=True):
            gt_boxes, gt_labels = target["boxes"], target["labels"]
            if self.add_gt and len(gt_boxes):
                props = torch.cat([props, gt_boxes.to(props.dtype)])
            if len(gt_boxes) == 0:
                matched = torch.full((len(props),), -1, dtype=torch.long, device=props.device)
                labels = torch.zeros(len(props), dtype=torch.long, device=props.device)
                gts = torch.zeros_like(props)
            else:
                matched = self.matcher(box_iou(gt_boxes, props))
                gts = gt_boxes[matched.clamp(min=0)]
                labels = gt_labels[matched.clamp(min=0)] + 1
                labels[matched == det_utils.Matcher.BELOW_LOW_THRESHOLD] = 0
                labels[matched == det_utils.Matcher.BETWEEN_THRESHOLDS] = -1
            pos, neg = self.sampler([labels])
            keep = torch.nonzero(pos[0] | neg[0]).flatten()
            sampled.append(props[keep])
            labels_out.append(labels[keep].clamp(min=0))
            gt_out.append(gts[keep])
        return sampled, torch.cat(labels_out), torch.cat(gt_out)

    # -- the heads --------------------------------------------------------------------------
    def run(self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
            with_sibling: bool) -> dict[str, Tensor]:
        """Raw head outputs for the RoIs ``proposals`` (concatenated over images in ``'boxes'``)."""
        rois = rois_of(proposals)
        boxes = rois[:, 1:]
        table = self.pool.table(features, _padded_size(image_sizes, features))  # shared by P, P-hat-c, P-hat-r
        levels = table.levels_of(boxes)  # P-hat-c and P-hat-r are pooled at the level of their P
        pooled = self.pool(table, rois, levels).to(features[FEATMAP_NAMES[0]].dtype)
        out: dict[str, Tensor] = {"boxes": boxes}
        if self.sibling is not None and (with_sibling or self.head_type == "sibling"):
            out["sibling_logits"], out["sibling_deltas"] = self.sibling(pooled)
        if self.dhead is not None:
            out["logits"], out["deltas"] = self.dhead.classify(pooled), self.dhead.regress(pooled)
            out["reg_boxes"] = boxes
        if self.tsd is not None:
            k = self.deform_pool.output_size
            delta_c, delta_r = self.tsd.offsets(pooled)
            wh = box_wh(boxes).to(delta_c.dtype)
            offsets_c = self.tsd_cfg.gamma * delta_c * wh[:, None, None, :]  # per-bin pixels
            shift_r = self.tsd_cfg.gamma * delta_r * wh  # one translation per RoI
            # P-hat-c and P-hat-r (a translation = the same offset in every bin) in one pass
            feat_c, feat_r = self.deform_pool(
                table, rois, levels, torch.stack([offsets_c, shift_r[:, None, None, :].expand(-1, k, k, 2)])).unbind(0)
            out["logits"] = self.tsd.branches.classify(feat_c.to(pooled.dtype))
            out["deltas"] = self.tsd.branches.regress(feat_r.to(pooled.dtype))
            out["reg_boxes"] = translate(boxes, shift_r.to(boxes.dtype))  # P-hat-r
            out["delta_c"], out["delta_r"] = delta_c, delta_r
        if "logits" not in out:  # plain sibling head
            out["logits"], out["deltas"], out["reg_boxes"] = out["sibling_logits"], out["sibling_deltas"], boxes
        return out

    def losses(self, out: dict[str, Tensor], labels: Tensor, gt_boxes: Tensor, counts: list[int]
               ) -> dict[str, Tensor]:
        """Named losses; each is a mean over the images of per-image means (``counts``: RoIs per image)."""
        boxes = out["boxes"]
        w = L.per_image_weights(counts).to(boxes.device)
        pos = torch.nonzero(labels > 0).flatten()  # once: each nonzero waits for the device
        losses: dict[str, Tensor] = {}
        if "sibling_logits" in out:
            targets = self.coder.encode_single(gt_boxes[pos], boxes[pos])  # positives only
            losses["loss_sibling_cls"] = L.classification_loss(out["sibling_logits"], labels, w)
            losses["loss_sibling_box"] = L.box_regression_loss(out["sibling_deltas"], targets, labels, self.beta, w,
                                                               pos)
        if self.head_type == "sibling":
            return {k + self.suffix: v for k, v in losses.items()}
        name = self.head_type
        reg_boxes = out["reg_boxes"]
        if self.tsd is not None and not self.tsd_cfg.delta_r_grad_through_targets:
            reg_boxes = reg_boxes.detach()
        targets = self.coder.encode_single(gt_boxes[pos], reg_boxes[pos])  # positives only
        losses[f"loss_{name}_cls"] = L.classification_loss(out["logits"], labels, w)
        losses[f"loss_{name}_box"] = L.box_regression_loss(out["deltas"], targets, labels, self.beta, w, pos)
        if self.tsd is not None and "sibling_logits" in out:
            if self.tsd_cfg.pc_cls:
                losses["loss_pc_cls"] = L.pc_cls_loss(out["logits"], out["sibling_logits"], labels,
                                                      self.tsd_cfg.margin_cls, w)
            if self.tsd_cfg.pc_loc:
                w_pos = L.per_image_weights(counts, labels > 0)[pos]
                cls = L.regression_classes(out["deltas"], labels, pos)
                boxes_tsd, boxes_sib = self.coder.decode_single(  # B_D from P-hat-r and B from P, in one go
                    torch.stack([out["deltas"][pos, cls], out["sibling_deltas"][pos, cls]]).float(),
                    torch.stack([out["reg_boxes"][pos], boxes[pos]]).float()).unbind(0)
                losses["loss_pc_loc"] = L.pc_loc_loss(boxes_tsd, boxes_sib, gt_boxes[pos], self.tsd_cfg.margin_loc,
                                                      w_pos)
        return {k + self.suffix: v for k, v in losses.items()}

    def decode(self, out: dict[str, Tensor]) -> Tensor:
        """``[R, K, 4]`` boxes of every class (K = 1 when class-agnostic), decoded against their RoI."""
        deltas = out["deltas"].float()
        ref = out["reg_boxes"].float()
        return self.coder.decode_single(deltas, ref[:, None, :])

    def refine(self, out: dict[str, Tensor], labels: Tensor | None) -> Tensor:
        """The next cascade stage's proposals (no gradient): each RoI's box for ``labels`` (train) or
        its best foreground class (test)."""
        boxes = self.decode(out).detach()
        if boxes.shape[1] == 1:
            return boxes[:, 0]
        if labels is None:
            labels = out["logits"][:, 1:].argmax(dim=1) + 1
        labels = labels.clamp(min=1)
        return boxes[torch.arange(len(boxes), device=boxes.device), labels]


def _padded_size(image_sizes: list[tuple[int, int]], features: dict[str, Tensor]) -> tuple[int, int]:
    """The padded batch size in pixels, from the finest map (stride 4), for the scale inference."""
    h, w = features[FEATMAP_NAMES[0]].shape[-2:]
    return int(h * 4), int(w * 4)


class RoIHeads(nn.Module):
    """One Fast R-CNN stage, or a cascade of them, and the post-processing of their detections."""

    def __init__(self, cfg: ModelConfig, in_channels: int) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.cascade.enabled:
            c = cfg.cascade
            self.stages = nn.ModuleList([
                RoIStage(cfg, in_channels, stds, iou, iou, class_agnostic=True, name_suffix=f"_s{i}")
                for i, (stds, iou) in enumerate(zip(c.stage_stds, c.iou_thresholds, strict=True))])
            self.stage_weights = list(c.stage_weights)
        else:
            self.stages = nn.ModuleList([RoIStage(cfg, in_channels, cfg.roi.target_stds, cfg.roi.fg_iou,
                                                  cfg.roi.bg_iou, class_agnostic=False)])
            self.stage_weights = [1.0]

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None):
        if self.training:
            assert targets is not None
            losses: dict[str, Tensor] = {}
            for i, (stage, weight) in enumerate(zip(self.stages, self.stage_weights, strict=True)):
                sampled, labels, gt_boxes = stage.sample(proposals, targets)
                out = stage.run(features, sampled, image_sizes, with_sibling=True)
                for name, value in stage.losses(out, labels, gt_boxes, [len(s) for s in sampled]).items():
                    losses[name] = value * weight
                if i + 1 < len(self.stages):
                    proposals = list(stage.refine(out, labels).split([len(s) for s in sampled]))
            return [], losses
        counts = [len(p) for p in proposals]
        score_sum = None
        for i, stage in enumerate(self.stages):
            out = stage.run(features, proposals, image_sizes, with_sibling=False)
            scores = torch.softmax(out["logits"].float(), dim=1)
            score_sum = scores if score_sum is None else score_sum + scores
            if i + 1 < len(self.stages):
                proposals = list(stage.refine(out, None).split(counts))
        scores = score_sum / len(self.stages)
        boxes = self.stages[-1].decode(out)
        detections = []
        for b, s, size in zip(boxes.split(counts), scores.split(counts), image_sizes, strict=True):
            detections.append(postprocess_detections(b, s, size, self.cfg.test))
        return detections, {}

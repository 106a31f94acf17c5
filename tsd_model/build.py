"""``build_model(cfg)``: constructors called with the config's values; no registry."""

from __future__ import annotations

from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from tsd_model.backbones import build_backbone
from tsd_model.config import ModelConfig
from tsd_model.detector import TSDDetector
from tsd_model.roi_heads import RoIHeads
from tsd_model.rpn import PerImageLossRPN
from tsd_model.weights import load_backbone_weights, load_checkpoint


def anchor_generator(cfg: ModelConfig) -> AnchorGenerator:
    """Anchors of size stride x scale for every FPN level (P2-P6), ratios h/w as in mmdetection."""
    sizes = tuple(tuple(float(stride * s) for s in cfg.rpn.anchor_scales) for stride in cfg.rpn.anchor_strides)
    ratios = (tuple(float(r) for r in cfg.rpn.anchor_ratios),) * len(sizes)
    return AnchorGenerator(sizes, ratios)


def build_model(cfg: ModelConfig) -> TSDDetector:
    backbone = build_backbone(cfg.backbone)
    anchors = anchor_generator(cfg)
    r = cfg.rpn
    rpn = PerImageLossRPN(
        anchors, RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=r.fg_iou, bg_iou_thresh=r.bg_iou, batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction,
        pre_nms_top_n={"training": r.pre_nms_top_n_train, "testing": r.pre_nms_top_n_test},
        post_nms_top_n={"training": r.post_nms_top_n_train, "testing": r.post_nms_top_n_test},
        nms_thresh=r.nms_iou)
    i = cfg.input
    transform = GeneralizedRCNNTransform(i.min_size, i.max_size, i.mean, i.std, size_divisible=i.size_divisible)
    model = TSDDetector(transform, backbone, rpn, RoIHeads(cfg, backbone.out_channels))
    if cfg.weights.backbone:
        load_backbone_weights(model, cfg.weights.backbone)
    if cfg.weights.checkpoint:
        load_checkpoint(model, cfg.weights.checkpoint)
    return model


def modules_skipped_at_inference(model: TSDDetector) -> list[str]:
    """Names of the modules that are trained but not run at inference: TSD's sibling heads."""
    return sorted(f"roi_heads.stages.{i}.sibling" for i, stage in enumerate(model.roi_heads.stages)
                  if stage.sibling is not None and stage.head_type != "sibling")

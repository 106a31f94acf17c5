"""``build_model(cfg)``: constructors called with the config's values; no registry."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from tsd_model.backbones import ROI_FEATURE_MAPS, ROI_FEATURE_STRIDES, build_backbone
from tsd_model.boxes import box_coder
from tsd_model.compiled_stage import CompileOptions
from tsd_model.config import ModelConfig
from tsd_model.detector import TSDDetector
from tsd_model.heads import DoubleHead, SiblingHead, TSDHead
from tsd_model.ops import AUTHORS_DEFORM, RULES, MultiScaleDeformRoIPool
from tsd_model.roi_heads import RoIHeads, RoIStage
from tsd_model.roi_sampling import RoISampler
from tsd_model.rpn import PerImageLossRPN
from tsd_model.weights import load_backbone_weights, load_checkpoint


def anchor_generator(cfg: ModelConfig) -> AnchorGenerator:
    """Anchors of size stride x scale for every FPN level (P2-P6), ratios h/w as in mmdetection."""
    sizes = tuple(tuple(float(stride * s) for s in cfg.rpn.anchor_scales) for stride in cfg.rpn.anchor_strides)
    ratios = (tuple(float(r) for r in cfg.rpn.anchor_ratios),) * len(sizes)
    return AnchorGenerator(sizes, ratios)


def build_stage(cfg: ModelConfig, in_channels: int, stds: list[float], fg_iou: float, bg_iou: float,
                class_agnostic: bool, name_suffix: str = "") -> RoIStage:
    """One Fast R-CNN stage with the head ``cfg.roi.head`` (and TSD's jointly trained sibling)."""
    roi, tsd = cfg.roi, cfg.tsd
    k = roi.pool_size
    num_outputs = cfg.num_classes + 1
    num_reg = 1 if class_agnostic else num_outputs
    pool = MultiScaleDeformRoIPool(ROI_FEATURE_MAPS, ROI_FEATURE_STRIDES, k, roi.sampling_ratio, RULES[roi.pooling],
                                   kernel=roi.pool_kernel)
    sibling = None
    if roi.head == "sibling" or (roi.head == "tsd" and tsd.joint_sibling):
        sibling = SiblingHead(in_channels, k, roi.representation_size, num_outputs, num_reg, roi.fc_init)
    if roi.head == "sibling":
        head, sibling = sibling, None
    elif roi.head == "double":
        head = DoubleHead(in_channels, k, roi.representation_size, num_outputs, num_reg, roi.fc_init)
    else:
        deform_rule = AUTHORS_DEFORM if tsd.pooling == "authors" else RULES["aligned"]
        deform_pool = MultiScaleDeformRoIPool(ROI_FEATURE_MAPS, ROI_FEATURE_STRIDES, k, tsd.samples_per_bin,
                                              deform_rule)
        head = TSDHead(in_channels, k, roi.representation_size, num_outputs, num_reg, tsd.offset_hidden, tsd.gamma,
                       deform_pool, tsd.offset_init, roi.fc_init)
    with_pc = roi.head == "tsd" and sibling is not None
    return RoIStage(
        head, pool, box_coder(stds), RoISampler(fg_iou, bg_iou, roi.batch_size_per_image, roi.positive_fraction),
        sibling=sibling, add_gt_as_proposals=roi.add_gt_as_proposals, smooth_l1_beta=roi.smooth_l1_beta,
        pc_cls_margin=tsd.margin_cls if with_pc and tsd.pc_cls else None,
        pc_loc_margin=tsd.margin_loc if with_pc and tsd.pc_loc else None,
        delta_r_grad_through_targets=tsd.delta_r_grad_through_targets, name_suffix=name_suffix,
        compile=None if roi.compile == "eager" else CompileOptions(roi.compile, roi.compile_backend))


def build_roi_heads(cfg: ModelConfig, in_channels: int, label_ancestors: Tensor | None = None) -> RoIHeads:
    """One stage (Faster R-CNN) or the cascade of ``cfg.cascade`` (Cascade R-CNN)."""
    c = cfg.cascade
    ancestors = None
    if cfg.roi.classification == "sigmoid":
        n = cfg.num_classes
        ancestors = torch.eye(n, dtype=torch.bool) if label_ancestors is None else torch.as_tensor(label_ancestors)
        if ancestors.shape != (n, n):
            raise ValueError(f"label_ancestors is {tuple(ancestors.shape)}, the model has {n} classes")
    if not c.enabled:
        stage = build_stage(cfg, in_channels, cfg.roi.target_stds, cfg.roi.fg_iou, cfg.roi.bg_iou, class_agnostic=False)
        return RoIHeads([stage], [1.0], cfg.test, label_ancestors=ancestors)
    stages = [build_stage(cfg, in_channels, stds, iou, iou, c.class_agnostic, name_suffix=f"_s{i}")
              for i, (stds, iou) in enumerate(zip(c.stage_stds, c.iou_thresholds, strict=True))]
    return RoIHeads(stages, list(c.stage_weights), cfg.test, score_average=c.score_average,
                    refine_with_background=c.refine_with_background, drop_gt_before_refine=c.drop_gt_before_refine,
                    clip_refined=c.clip_refined, label_ancestors=ancestors)


def build_model(cfg: ModelConfig, load_weights: bool = True, label_ancestors: Tensor | None = None) -> TSDDetector:
    """The detector of ``cfg``; with ``load_weights``, the weights files it names are loaded (local paths).

    ``label_ancestors`` (``[C, C]`` bool, ``Hierarchy.ancestor_matrix``) is what a multi-label
    classifier (``roi.classification: sigmoid``) trains against; a checkpoint carries it, so
    inference may leave it out.
    """
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
    model = TSDDetector(transform, backbone, rpn, build_roi_heads(cfg, backbone.out_channels, label_ancestors))
    if load_weights and cfg.weights.backbone:
        load_backbone_weights(model, cfg.weights.backbone)
    if load_weights and cfg.weights.checkpoint:
        load_checkpoint(model, cfg.weights.checkpoint)
    return model


def modules_skipped_at_inference(model: TSDDetector) -> list[str]:
    """Names of the modules that are trained but not run at inference: TSD's sibling heads."""
    return sorted(f"roi_heads.stages.{i}.sibling" for i, stage in enumerate(model.roi_heads.stages)
                  if stage.joint_sibling)

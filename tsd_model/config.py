"""Model configuration: every architectural choice of the detector, with the paper's defaults.

``num_classes`` counts foreground classes (COCO 80, OID 500); the heads add background, so the
COCO heads have 81 outputs. Choices the paper leaves open are explicit fields. Where the TSD
authors' code (Sense-X/TSD) did something else than the default, the field offers their choice
by name and its comment says which it is; the paper configs in ``configs/`` select the authors'
choices, and the README lists every default that differs and why. Only ``build.py`` reads
this config: the modules take explicit constructor arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class BackboneConfig:
    name: Literal["resnet50", "resnet101", "resnet152", "resnext101_32x4d", "resnext101_64x4d", "senet154",
                  "mobilenet_v2", "tiny"] = "resnet50"
    dcn: Literal["none", "v1", "v2"] = "none"  # deformable 3x3 convs in the bottlenecks of dcn_stages
    dcn_stages: list[int] = field(default_factory=lambda: [3, 4, 5])  # c3-c5
    # the deformable conv's implementation (tsd_model/deform_conv.py): auto = grid_sample + matmul
    # on the CPU (3.9-5.4x torchvision's there, same results), torchvision's kernel on CUDA
    dcn_kernel: Literal["auto", "torchvision", "grid_sample"] = "auto"
    norm: Literal["bn", "frozen_bn"] = "bn"  # frozen_bn for fine-tuning from ImageNet; SyncBN is set by training
    frozen_stages: int = 0  # stem and the first N stages get no gradient (1 with ImageNet weights)
    fpn_channels: int = 256
    tiny_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # only for name=tiny


@dataclass
class RPNConfig:
    anchor_scales: list[float] = field(default_factory=lambda: [8.0])  # x stride; OID: [8, 11, 14]
    anchor_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # h/w; OID: [0.1, .5, 1, 2, 4, 8]
    anchor_strides: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])  # P2-P6
    fg_iou: float = 0.7
    bg_iou: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_top_n_train: int = 2000
    post_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_test: int = 1000
    nms_iou: float = 0.7


@dataclass
class RoIConfig:
    head: Literal["sibling", "double", "tsd"] = "tsd"
    pool_size: int = 7
    sampling_ratio: int = 2
    # how P is pooled: roi_align(aligned=True); torchvision's Faster R-CNN (roi_align aligned=False);
    # or mmdetection v1's RoIAlign (extent x2 + 1 - x1, sizes + 1 for the level), the TSD authors'
    pooling: Literal["aligned", "torchvision_legacy", "mmdet_v1_roi_align"] = "aligned"
    # what computes P's pooling: the table gather (ops.pool_table), torchvision's roi_align (for
    # aligned / torchvision_legacy; the same values), or auto: roi_align on CUDA, the gather on the CPU
    pool_kernel: Literal["auto", "table", "roi_align"] = "auto"
    # torch.compile of each stage's pooling and heads as one graph (tsd_model/compiled_stage.py), RoI
    # counts and feature rows padded to buckets: "eager" (not compiled), or torch.compile's mode ("reduce-overhead"
    # adds CUDA graphs); compile_backend "aot_eager" captures the same graph without generating code
    compile: Literal["eager", "default", "reduce-overhead", "max-autotune"] = "eager"
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    representation_size: int = 1024  # width of the 2fc branches
    # "softmax" over the annotated classes, or "sigmoid": multi-label over each class and its ancestors
    # (the hierarchy's; background = all zeros), whose scores cover every level without expansion
    classification: Literal["softmax", "sigmoid"] = "softmax"
    fc_init: Literal["pytorch_default", "kaiming_normal"] = "pytorch_default"  # authors: kaiming_normal (a=1)
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou: float = 0.5
    bg_iou: float = 0.5
    target_stds: list[float] = field(default_factory=lambda: [0.1, 0.1, 0.2, 0.2])
    smooth_l1_beta: float = 1.0  # mmdetection v1 (the authors' base); torchvision uses 1/9
    add_gt_as_proposals: bool = True


@dataclass
class TSDConfig:
    gamma: float = 0.1  # offsets in units of the proposal's (w, h)
    offset_hidden: int = 256  # shared first fc and the hidden layer of the dC/dR nets
    # how P-hat-c / P-hat-r are pooled: "aligned" = roi_align(aligned=True) plus offsets (P-hat = P at
    # zero offsets); "authors" = mmdetection v1's deformable RoI pooling (ops.AUTHORS_DEFORM)
    pooling: Literal["aligned", "authors"] = "aligned"
    samples_per_bin: int = 2  # s x s bilinear samples averaged per bin (the authors used 4x4)
    offset_init: Literal["kaiming_normal", "zero"] = "zero"  # authors: kaiming_normal (offsets start random)
    joint_sibling: bool = True  # train the classical sibling head jointly (dropped at inference)
    pc_cls: bool = True  # progressive constraint on classification (Mcls)
    pc_loc: bool = True  # progressive constraint on localization (Mloc)
    margin_cls: float = 0.2  # m_c (paper ablations 0.2; its test-dev runs 0.5; authors' configs 0.3)
    margin_loc: float = 0.2  # m_r
    delta_r_grad_through_targets: bool = True  # authors: regression targets encoded against P-hat-r keep grad


@dataclass
class CascadeConfig:
    enabled: bool = False
    iou_thresholds: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7])
    stage_stds: list[list[float]] = field(default_factory=lambda: [
        [0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]])
    stage_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # TSD authors; classical 1/.5/.25
    class_agnostic: bool = False  # the TSD authors regress class-specific boxes in every stage
    score_average: Literal["logits", "probs"] = "logits"  # authors: stage logits averaged, then softmax
    refine_with_background: bool = True  # authors: refine with the argmax over all classes (test) / the
    #                                      target label, background included (train)
    drop_gt_before_refine: bool = True  # authors: the gt boxes added as proposals are not refined
    clip_refined: bool = True  # authors: refined boxes are clipped to the image


@dataclass
class TestConfig:
    __test__ = False  # not a pytest test class

    score_thresh: float = 0.05  # the authors: 0.01 for OID, 0.0 for COCO (what the paper configs use)
    nms: Literal["nms", "soft_linear", "soft_gaussian", "adj", "voting"] = "nms"  # postprocess.class_aware_nms
    nms_iou: float = 0.5
    soft_nms_sigma: float = 0.5
    vote_iou: float = 0.7  # voting: boxes of the class overlapping a kept box this much vote its coordinates
    vote_top_k: int = 5  # voting: at most this many (the best-scoring) voters per kept box
    max_detections: int = 100
    tta_scales: list[int] = field(default_factory=list)  # shorter sides for multi-scale test; empty = off
    tta_flip: bool = False
    # copy every detection to all ancestors of its class (the OID metric scores parents too and never
    # expands detections); None = on whenever the label space has a hierarchy with parent classes
    expand_to_ancestors: bool | None = None
    expand_dedup: Literal["nms", "max"] = "nms"  # copies on one class: per-class NMS at nms_iou, or same-box max


@dataclass
class InputConfig:
    min_size: int = 800
    max_size: int = 1333
    size_divisible: int = 32
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # on [0, 1] RGB
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class WeightsConfig:
    backbone: str | None = None  # ImageNet weights (torchvision or timm names), a local path or s3://; never downloaded
    checkpoint: str | None = None  # a full detector checkpoint (ours, or converted by `tsd weights convert`)
    from_scratch: bool = False  # `tsd train` refuses an ImageNet backbone without weights unless this says so


@dataclass
class ModelConfig:
    num_classes: int = 80  # the label space's classes (background not counted)
    # a class-subset expert: the MIDs or display names it is trained on and detects (empty = every class
    # of the data's label space); `classes_band` picks them by training-box frequency instead
    classes: list[str] = field(default_factory=list)
    # [lo, hi): the classes whose rank by training boxes (rarest first, from the prep manifest) falls in
    # this fraction of the label space, e.g. [0.0, 0.2] = the rarest 20 %; resolved into `classes` by `tsd train`
    classes_band: list[float] | None = None
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi: RoIConfig = field(default_factory=RoIConfig)
    tsd: TSDConfig = field(default_factory=TSDConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    test: TestConfig = field(default_factory=TestConfig)
    input: InputConfig = field(default_factory=InputConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)

"""Checkpoints of other code bases as ours: torchvision's Faster R-CNN and the TSD authors' releases.

Pure key renaming (plus the one layout change the authors' offsets need); values are never
altered otherwise. Each converter returns the state dict in our names and the model settings
under which it reproduces the source model (``--set`` overrides), so that a user can run it:

- ``torchvision_faster_rcnn``: ``fasterrcnn_resnet50_fpn`` (torchvision's names ``backbone.body``,
  ``backbone.fpn``, ``rpn.head``, ``roi_heads.box_head``, ``roi_heads.box_predictor``) into the
  sibling-head model; with ``roi.pooling=torchvision_legacy`` it gives torchvision's detections.
- ``mmdet_v1_tsd``: the authors' mmdetection-v1 checkpoints (Sense-X/TSD, ``TSDSharedFCBBoxHead``:
  ``backbone.``, ``neck.lateral_convs/fpn_convs``, ``rpn_head.rpn_conv/rpn_cls/rpn_reg``,
  ``bbox_head[.i].shared_fc/delta_c/delta_r`` (offset nets), ``shared_fcs``/``fc_cls``/``fc_reg``
  (the sibling), ``TSD_pc_fcs``/``TSD_fc_cls`` and ``TSD_pr_fcs``/``TSD_fc_reg`` (the TSD branches)).
  Their dC output is laid out ``[K, 2, k, k]`` (all x offsets, then all y); ours is
  ``[K, k, k, 2]``: the rows of the last dC layer are reordered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import Tensor

from data_prep.errors import InputError
from tsd_model.weights import read_state_dict


@dataclass
class Converted:
    """A state dict in our names and what our config must say to run it as the source did."""

    state: dict[str, Tensor]
    overrides: list[str] = field(default_factory=list)  # `--set` overrides (model.*)
    skipped: list[str] = field(default_factory=list)  # source keys that have no place in ours (none expected)


def _stage_prefix(stage: int | None) -> str:
    return f"roi_heads.stages.{stage or 0}."


def torchvision_faster_rcnn(state: dict[str, Tensor]) -> Converted:
    """torchvision's Faster R-CNN (R50-FPN, any number of classes) into our sibling-head model."""
    if "roi_heads.box_predictor.cls_score.weight" not in state:
        raise InputError("not a torchvision Faster R-CNN state dict (no 'roi_heads.box_predictor.cls_score.weight')")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("roi_heads.box_head."):
            key = "roi_heads.stages.0.sibling.box_head." + key.removeprefix("roi_heads.box_head.")
        elif key.startswith("roi_heads.box_predictor."):
            key = "roi_heads.stages.0.sibling." + key.removeprefix("roi_heads.box_predictor.")
        elif not key.startswith(("backbone.", "rpn.")):
            raise InputError(f"unexpected key '{key}' in a torchvision Faster R-CNN state dict")
        out[key] = value
    num_classes = state["roi_heads.box_predictor.cls_score.weight"].shape[0] - 1
    overrides = [f"model.num_classes={num_classes}", "model.roi.head=sibling", "model.roi.pooling=torchvision_legacy",
                 "model.backbone.name=resnet50", "model.backbone.norm=frozen_bn", "model.input.min_size=800",
                 "model.input.max_size=1333", "model.test.score_thresh=0.05", "model.test.nms_iou=0.5",
                 "model.test.max_detections=100"]
    return Converted(out, overrides)


_MMDET_HEAD = {  # the authors' TSDSharedFCBBoxHead names -> ours, under roi_heads.stages.<i>.
    "shared_fc.0.": "tsd.offsets.shared.0.",
    "delta_c.0.": "tsd.offsets.delta_c.0.",
    "delta_c.2.": "tsd.offsets.delta_c.2.",
    "delta_r.0.": "tsd.offsets.delta_r.0.",
    "delta_r.2.": "tsd.offsets.delta_r.2.",
    "shared_fcs.0.": "sibling.box_head.fc6.",
    "shared_fcs.1.": "sibling.box_head.fc7.",
    "fc_cls.": "sibling.cls_score.",
    "fc_reg.": "sibling.bbox_pred.",
    "TSD_pc_fcs.0.": "tsd.branches.cls_branch.fc6.",
    "TSD_pc_fcs.1.": "tsd.branches.cls_branch.fc7.",
    "TSD_pr_fcs.0.": "tsd.branches.reg_branch.fc6.",
    "TSD_pr_fcs.1.": "tsd.branches.reg_branch.fc7.",
    "TSD_fc_cls.": "tsd.branches.cls_score.",
    "TSD_fc_reg.": "tsd.branches.bbox_pred.",
}
_MMDET_RPN = {"rpn_head.rpn_conv.": "rpn.head.conv.0.0.", "rpn_head.rpn_cls.": "rpn.head.cls_logits.",
              "rpn_head.rpn_reg.": "rpn.head.bbox_pred."}


def delta_c_rows_to_ours(value: Tensor, grid: int) -> Tensor:
    """Reorder the rows of the last dC layer (weight ``[2 k^2, H]`` or bias ``[2 k^2]``) from the
    authors' ``[2, k, k]`` output layout to our ``[k, k, 2]``."""
    rows = value.shape[0]
    if rows != 2 * grid * grid:
        raise InputError(f"the last dC layer has {rows} outputs, expected 2 x {grid} x {grid}")
    return value.view(2, grid, grid, *value.shape[1:]).movedim(0, 2).reshape(value.shape).contiguous()


def _mmdet_backbone_key(rest: str) -> str:
    # DCN: the authors' ResNet keeps a deformable conv's offset conv beside it as `conv2_offset`
    rest = re.sub(r"^(layer\d+\.\d+)\.conv2_offset\.", r"\1.conv2.offset_conv.", rest)
    return "backbone.body." + rest


def mmdet_v1_tsd(state: dict[str, Tensor], grid: int = 7) -> Converted:
    """The authors' mmdetection-v1 TSD checkpoint (Faster or Cascade R-CNN) into ours."""
    if not any(k.startswith("bbox_head.") and ".delta_c." in k for k in state):
        raise InputError("not a TSD checkpoint of mmdetection v1 (no 'bbox_head[.i].delta_c' keys)")
    out: dict[str, Tensor] = {}
    skipped: list[str] = []
    stages: set[int] = set()
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.startswith("backbone."):
            out[_mmdet_backbone_key(key.removeprefix("backbone."))] = value
            continue
        m = re.match(r"^neck\.(lateral_convs|fpn_convs)\.(\d+)\.conv\.(weight|bias)$", key)
        if m:
            blocks = "inner_blocks" if m.group(1) == "lateral_convs" else "layer_blocks"
            out[f"backbone.fpn.{blocks}.{m.group(2)}.0.{m.group(3)}"] = value
            continue
        rpn = next((p for p in _MMDET_RPN if key.startswith(p)), None)
        if rpn:
            out[_MMDET_RPN[rpn] + key.removeprefix(rpn)] = value
            continue
        m = re.match(r"^bbox_head\.(?:(\d+)\.)?(.*)$", key)
        if m:
            stage = int(m.group(1) or 0)
            rest = m.group(2)
            part = next((p for p in _MMDET_HEAD if rest.startswith(p)), None)
            if part is None:
                skipped.append(key)
                continue
            stages.add(stage)
            if part == "delta_c.2.":
                value = delta_c_rows_to_ours(value, grid)
            out[_stage_prefix(stage) + _MMDET_HEAD[part] + rest.removeprefix(part)] = value
            continue
        skipped.append(key)
    if skipped:
        raise InputError(f"{len(skipped)} keys of the checkpoint have no place in our model, e.g. '{skipped[0]}'")
    num_classes = out[_stage_prefix(0) + "tsd.branches.cls_score.weight"].shape[0] - 1
    agnostic = out[_stage_prefix(0) + "tsd.branches.bbox_pred.weight"].shape[0] == 4
    overrides = [f"model.num_classes={num_classes}", "model.roi.head=tsd", "model.tsd.pooling=authors",
                 "model.tsd.samples_per_bin=4", "model.roi.pooling=mmdet_v1_roi_align", "model.roi.sampling_ratio=2"]
    if len(stages) > 1:
        overrides += ["model.cascade.enabled=true", f"model.cascade.class_agnostic={str(agnostic).lower()}"]
    return Converted(out, overrides)


CONVERTERS = {"torchvision": torchvision_faster_rcnn, "mmdet-v1-tsd": mmdet_v1_tsd}


def convert_file(source: str, path: str) -> Converted:
    """Read ``path`` and convert it from ``source`` (a key of ``CONVERTERS``)."""
    if source not in CONVERTERS:
        raise InputError(f"unknown source '{source}' (one of: {', '.join(CONVERTERS)})")
    return CONVERTERS[source]({k.removeprefix("module."): v for k, v in read_state_dict(path).items()})

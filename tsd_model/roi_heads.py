"""RoI heads: proposal sampling, running a head on the sampled RoIs, its losses, cascade stages.

One ``RoIStage`` is a Fast R-CNN stage: it samples RoIs from proposals (``sample``), pools their
features and runs its head (``run``: ``RoIFeatures`` in, ``HeadOutput`` out; TSD's head derives
P-hat-c and P-hat-r itself, see ``heads.TSDHead``), and turns the outputs into named losses
(``losses``). During training the classical sibling head runs on the same sampled RoIs (TSD's
joint training) and the progressive constraints compare the two; at inference the sibling is not
computed. ``RoIHeads`` chains one stage (Faster R-CNN) or several (Cascade R-CNN: each stage
refines the previous stage's boxes without gradient between stages; at test the stages' scores
are combined and the boxes come from the last stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou, clip_boxes_to_image

from tsd_model import losses as L
from tsd_model.boxes import BoxCoder
from tsd_model.compiled_stage import CompileOptions, LossInputs, run_compiled
from tsd_model.config import TestConfig
from tsd_model.heads import DoubleHead, HeadOutput, RoIFeatures, SiblingHead, TSDHead
from tsd_model.ops import MultiScaleDeformRoIPool, rois_of
from tsd_model.postprocess import postprocess_detections
from tsd_model.roi_sampling import BACKGROUND, IGNORED, RoISampler

# the attribute a stage keeps its main head under (the checkpoint's key names) and the loss names' prefix
_HEAD_NAMES = {SiblingHead: ("sibling", "sibling"), DoubleHead: ("dhead", "double"), TSDHead: ("tsd", "tsd")}


@dataclass
class SampledRoIs:
    """The RoIs a training stage learns from, and their targets."""

    boxes: list[Tensor]  # per image [n_i, 4], network-input pixels
    labels: Tensor  # [R] class index + 1, 0 = background
    gt_boxes: Tensor  # [R, 4] the matched gt box (meaningful for positives only)
    from_gt: Tensor  # [R] bool: a gt box added as a proposal
    valid: Tensor  # [R] bool: drawn by the sampler; False for a fill-in (background, loss weight 0)

    @property
    def counts(self) -> list[int]:
        return [len(b) for b in self.boxes]


@dataclass
class StageOutput:
    """One stage's run over RoIs: the main head's output, and the sibling's when it ran."""

    rois: RoIFeatures
    main: HeadOutput
    sibling: HeadOutput | None = None


class RoIStage(nn.Module):
    """A Fast R-CNN stage around one head (sibling, double or TSD), optionally with the sibling
    head trained jointly (TSD) and the progressive constraints.

    Args:
        head: the head whose outputs are used at inference.
        pool: the pooling of the proposals P (its strides name the FPN levels).
        coder: box deltas against the head's ``reg_boxes``, with this stage's target stds.
        sampler: the IoU matching and the balanced draw of training RoIs (a fixed count per image).
        sibling: the classical head trained alongside ``head`` (TSD's joint training), or None.
        add_gt_as_proposals: gt boxes join the proposals in training.
        smooth_l1_beta: of the box losses.
        pc_cls_margin, pc_loc_margin: margins of Mcls / Mloc, None to leave a constraint out.
        delta_r_grad_through_targets: dR also gets gradient through the targets coded against P-hat-r.
        name_suffix: appended to every loss name (``_s1`` for a cascade's second stage).
        compile: run the pooling and heads as one compiled graph (``compiled_stage``), or None (eager).
    """

    def __init__(self, head: nn.Module, pool: MultiScaleDeformRoIPool, coder: BoxCoder, sampler: RoISampler, *,
                 sibling: SiblingHead | None = None, add_gt_as_proposals: bool = True, smooth_l1_beta: float = 1.0,
                 pc_cls_margin: float | None = None, pc_loc_margin: float | None = None,
                 delta_r_grad_through_targets: bool = True,
                 name_suffix: str = "", compile: CompileOptions | None = None) -> None:
        super().__init__()
        self.head_attr, self.head_type = _HEAD_NAMES[type(head)]
        if sibling is not None and self.head_attr == "sibling":
            raise ValueError("a sibling head needs no second sibling")
        self.sibling = self.dhead = self.tsd = None
        setattr(self, self.head_attr, head)
        if sibling is not None:
            self.sibling = sibling
        self.pool = pool
        self.coder = coder
        self.sampler = sampler
        self.add_gt = add_gt_as_proposals
        self.beta = smooth_l1_beta
        self.pc_cls_margin, self.pc_loc_margin = pc_cls_margin, pc_loc_margin
        self.delta_r_grad_through_targets = delta_r_grad_through_targets
        self.suffix = name_suffix
        self.compile = compile

    @property
    def head(self) -> nn.Module:
        return getattr(self, self.head_attr)

    @property
    def joint_sibling(self) -> bool:
        """Whether a classical sibling head is trained alongside a different main head."""
        return self.sibling is not None and self.head_attr != "sibling"

    # -- training targets -------------------------------------------------------------------
    def sample(self, proposals: list[Tensor], targets: list[dict[str, Tensor]],
               excluded: list[Tensor] | None = None) -> SampledRoIs:
        """Sampled RoIs per image (``RoISampler.draw``: a count the host knows), their labels
        (0 = background) and matched gt boxes. ``excluded`` (per image, bool over ``proposals``)
        are never drawn: a cascade's RoIs that the previous stage did not learn from."""
        sampled, labels_out, gt_out, from_gt_out, valid_out = [], [], [], [], []
        for i, (props, target) in enumerate(zip(proposals, targets, strict=True)):
            gt_boxes, gt_labels = target["boxes"], target["labels"]
            from_gt = torch.zeros(len(props), dtype=torch.bool, device=props.device)
            skip = excluded[i] if excluded is not None else torch.zeros_like(from_gt)
            if self.add_gt and len(gt_boxes):
                props = torch.cat([props, gt_boxes.to(props.dtype)])
                from_gt = torch.cat([from_gt, torch.ones(len(gt_boxes), dtype=torch.bool, device=props.device)])
                skip = torch.cat([skip, torch.zeros(len(gt_boxes), dtype=torch.bool, device=props.device)])
            if len(gt_boxes) == 0:  # an image without boxes: every proposal is a negative
                labels = torch.zeros(len(props), dtype=torch.long, device=props.device)
                gts = torch.zeros_like(props)
            else:
                labels, matched = self.sampler.labels(box_iou(gt_boxes, props), gt_labels)
                gts = gt_boxes[matched]
            keep, valid = self.sampler.draw(torch.where(skip, IGNORED, labels))
            sampled.append(props[keep])
            labels_out.append(torch.where(valid, labels[keep], BACKGROUND))  # fill-ins: background, weight 0
            gt_out.append(gts[keep])
            from_gt_out.append(from_gt[keep])
            valid_out.append(valid)
        return SampledRoIs(sampled, torch.cat(labels_out), torch.cat(gt_out), torch.cat(from_gt_out),
                           torch.cat(valid_out))

    # -- the heads --------------------------------------------------------------------------
    def run(self, features: dict[str, Tensor], proposals: list[Tensor], with_sibling: bool) -> StageOutput:
        """The head's outputs for the RoIs ``proposals`` (per image, concatenated in the outputs)."""
        rois = rois_of(proposals)
        sibling = self.sibling if with_sibling and self.joint_sibling else None
        if self.compile is not None:
            return StageOutput(*run_compiled(self.pool, self.head, sibling, features, rois, self.compile)[:3])
        table = self.pool.table(features)  # shared by P, P-hat-c and P-hat-r
        levels = self.pool.levels_of(table, rois[:, 1:])  # P-hat-c and P-hat-r are pooled at the level of P
        pooled = self.pool(table, rois, levels).to(features[self.pool.featmap_names[0]].dtype)
        roi_features = RoIFeatures(rois, levels, pooled, table)
        main = self.head(roi_features)
        return StageOutput(roi_features, main, sibling(roi_features) if sibling is not None else None)

    def run_with_losses(self, features: dict[str, Tensor], sampled: SampledRoIs,
                        ancestors: Tensor | None = None) -> tuple[StageOutput, dict[str, Tensor]]:
        """A training stage: ``run`` on the sampled RoIs (with the sibling) and ``losses``; compiled,
        the losses are computed in the stage's graph."""
        if self.compile is None:
            out = self.run(features, sampled.boxes, with_sibling=True)
            return out, self.losses(out, sampled, ancestors)
        w, w_pos = self.loss_weights(sampled, ancestors)
        targets = LossInputs(sampled.labels, sampled.gt_boxes, w, w_pos, ancestors)
        sibling = self.sibling if self.joint_sibling else None
        *out, losses = run_compiled(self.pool, self.head, sibling, features, rois_of(sampled.boxes), self.compile,
                                    self.loss_terms, targets)
        return StageOutput(*out), losses

    def loss_weights(self, sampled: SampledRoIs, ancestors: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The sampled RoIs' loss weights (``losses.per_image_weights``), and those of the positives
        alone where a loss averages over positives (``Mloc``, a multi-label ``Mcls``), else None."""
        counts, labels = sampled.counts, sampled.labels
        w = L.per_image_weights(counts, sampled.valid)  # fill-ins weigh 0
        needs_pos = self.joint_sibling and (self.pc_loc_margin is not None or
                                            (ancestors is not None and self.pc_cls_margin is not None))
        return w, (L.per_image_weights(counts, labels > 0) if needs_pos else None)

    def losses(self, out: StageOutput, sampled: SampledRoIs, ancestors: Tensor | None = None) -> dict[str, Tensor]:
        """Named losses; each is a mean over the images of per-image means. With ``ancestors`` (the
        ``[C, C]`` ancestor matrix), classification is multi-label: sigmoid BCE over the class and its
        ancestors (``losses.multilabel_targets``) instead of the softmax over classes."""
        w, w_pos = self.loss_weights(sampled, ancestors)
        return self.loss_terms(out.main, out.sibling, out.rois.boxes, sampled.labels, sampled.gt_boxes, w, w_pos,
                               ancestors)

    def loss_terms(self, main: HeadOutput, sibling: HeadOutput | None, boxes: Tensor, labels: Tensor,
                   gt_boxes: Tensor, w: Tensor, w_pos: Tensor | None, ancestors: Tensor | None) -> dict[str, Tensor]:
        """The losses of ``losses`` from tensors alone: no host sync and no data-dependent shape, so
        that a compiled stage (``compiled_stage``) computes them in its graph, on RoIs padded with
        weight 0. Every RoI is regressed against ``losses.safe_gt``, masked by the positives."""

        def classification(logits: Tensor) -> Tensor:
            if ancestors is None:
                return L.classification_loss(logits, labels, w)
            return L.sigmoid_classification_loss(logits, labels, ancestors, w)

        losses: dict[str, Tensor] = {}
        gt_or_own = L.safe_gt(gt_boxes, labels, boxes)  # P's targets: the sibling's box loss and Mloc
        if sibling is not None:
            targets = self.coder.encode_single(gt_or_own, boxes)
            losses["loss_sibling_cls"] = classification(sibling.logits)
            losses["loss_sibling_box"] = L.box_regression_loss(sibling.deltas, targets, labels, self.beta, w)
        reg_boxes = main.reg_boxes
        if main.geometry is not None and not self.delta_r_grad_through_targets:
            reg_boxes = reg_boxes.detach()
        targets = self.coder.encode_single(L.safe_gt(gt_boxes, labels, reg_boxes.detach()), reg_boxes)
        name = self.head_type
        losses[f"loss_{name}_cls"] = classification(main.logits)
        losses[f"loss_{name}_box"] = L.box_regression_loss(main.deltas, targets, labels, self.beta, w)
        if sibling is None:
            return {k + self.suffix: v for k, v in losses.items()}
        if self.pc_cls_margin is not None:
            losses["loss_pc_cls"] = L.pc_cls_loss(main.logits, sibling.logits, labels, self.pc_cls_margin,
                                                  w if ancestors is None else w_pos, multilabel=ancestors is not None)
        if self.pc_loc_margin is not None:
            boxes_tsd, boxes_sib = self.coder.decode_single(  # B_D from P-hat-r and B from P, in one go
                torch.stack([L.deltas_of(main.deltas, labels), L.deltas_of(sibling.deltas, labels)]).float(),
                torch.stack([main.reg_boxes, boxes]).float()).unbind(0)
            losses["loss_pc_loc"] = L.pc_loc_loss(boxes_tsd, boxes_sib, gt_or_own, self.pc_loc_margin, w_pos)
        return {k + self.suffix: v for k, v in losses.items()}

    def decode(self, out: HeadOutput) -> Tensor:
        """``[R, K, 4]`` boxes of every class (K = 1 when class-agnostic), decoded against their RoI."""
        return self.coder.decode_single(out.deltas.float(), out.reg_boxes.float()[:, None, :])

    def boxes_for(self, out: HeadOutput, labels: Tensor) -> Tensor:
        """``[R, 4]`` each RoI's box for its class in ``labels`` (0 = background's deltas), no gradient."""
        boxes = self.decode(out).detach()
        if boxes.shape[1] == 1:
            return boxes[:, 0]
        return boxes[torch.arange(len(boxes), device=boxes.device), labels]


class RoIHeads(nn.Module):
    """One Fast R-CNN stage, or a cascade of them, and the post-processing of their detections.

    Args:
        stages: one ``RoIStage`` (Faster R-CNN) or several (Cascade R-CNN, in order).
        stage_weights: each stage's loss weight.
        test: thresholds, NMS and detections per image at inference.
        score_average: how a cascade combines its stages' scores at test: ``"logits"`` averages the
            logits and takes one softmax (the TSD authors), ``"probs"`` averages the softmax scores.
        refine_with_background: a stage refines each RoI with the deltas of its target label in
            training and of its argmax over all classes at test, background included (the
            authors); otherwise with the best foreground class (training: the label, clamped to 1).
        drop_gt_before_refine: in training, gt boxes added as proposals are not passed on to the
            next stage (the authors).
        clip_refined: refined boxes are clipped to the image (the authors).
        label_ancestors: ``[C, C]`` bool ancestor matrix of the label space for a multi-label
            (sigmoid) classifier over each class and its ancestors; None for the softmax over
            classes. Kept as a buffer, so that a checkpoint carries the hierarchy it was trained with.
    """

    def __init__(self, stages: list[RoIStage], stage_weights: list[float], test: TestConfig, *,
                 score_average: Literal["logits", "probs"] = "logits", refine_with_background: bool = True,
                 drop_gt_before_refine: bool = True, clip_refined: bool = True,
                 label_ancestors: Tensor | None = None) -> None:
        super().__init__()
        self.multilabel = label_ancestors is not None
        if label_ancestors is not None:
            self.register_buffer("label_ancestors", label_ancestors.to(torch.bool))
        if len(stages) != len(stage_weights):
            raise ValueError(f"{len(stages)} stages but {len(stage_weights)} stage weights")
        self.stages = nn.ModuleList(stages)
        self.stage_weights = list(stage_weights)
        self.test = test
        self.score_average = score_average
        self.refine_with_background = refine_with_background
        self.drop_gt_before_refine = drop_gt_before_refine
        self.clip_refined = clip_refined

    def probabilities(self, logits: Tensor) -> Tensor:
        """``[R, C + 1]`` class scores: the softmax, or per-class sigmoids (background 0) when multi-label."""
        if not self.multilabel:
            return torch.softmax(logits, dim=1)
        scores = torch.sigmoid(logits)
        scores[:, 0] = 0.0
        return scores

    def refine(self, stage: RoIStage, out: StageOutput, image_sizes: list[tuple[int, int]], counts: list[int],
               sampled: SampledRoIs | None = None) -> list[Tensor]:
        """The next stage's proposals per image (``counts`` RoIs each) from this stage's output, no
        gradient. In training all of them are kept (a count the host knows); ``excluded_from_next``
        says which the next stage must not draw."""
        if sampled is not None:  # training: each RoI's target label
            labels = sampled.labels if self.refine_with_background else sampled.labels.clamp(min=1)
        else:
            logits = out.main.logits
            with_background = self.refine_with_background and not self.multilabel  # sigmoid: no background score
            labels = logits.argmax(dim=1) if with_background else logits[:, 1:].argmax(dim=1) + 1
        boxes = stage.boxes_for(out.main, labels)
        per_image = list(boxes.split(counts))
        if self.clip_refined:
            per_image = [clip_boxes_to_image(b, size) for b, size in zip(per_image, image_sizes, strict=True)]
        return per_image

    def excluded_from_next(self, sampled: SampledRoIs) -> list[Tensor]:
        """Per image, the refined RoIs the next training stage must not draw: the fill-ins, and with
        ``drop_gt_before_refine`` the gt boxes added as proposals. Masked, not dropped, so that
        the next stage's proposal count needs no host read; the draw is the same as if they were
        dropped (they are never drawn, only taken as weight-0 fill-ins)."""
        excluded = ~sampled.valid
        if self.drop_gt_before_refine:
            excluded = excluded | sampled.from_gt
        return list(excluded.split(sampled.counts))

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None):
        for stage in self.stages:
            if stage.compile is not None:
                stage.compile.begin_step()
        if self.training:
            assert targets is not None
            losses: dict[str, Tensor] = {}
            excluded = None
            for i, (stage, weight) in enumerate(zip(self.stages, self.stage_weights, strict=True)):
                sampled = stage.sample(proposals, targets, excluded)
                ancestors = self.label_ancestors if self.multilabel else None
                out, stage_losses = stage.run_with_losses(features, sampled, ancestors)
                for name, value in stage_losses.items():
                    losses[name] = value * weight
                if i + 1 < len(self.stages):
                    proposals = self.refine(stage, out, image_sizes, sampled.counts, sampled)
                    excluded = self.excluded_from_next(sampled)
            return [], losses
        counts = [len(p) for p in proposals]
        combined = None
        for i, stage in enumerate(self.stages):
            out = stage.run(features, proposals, with_sibling=False)
            logits = out.main.logits.float()
            scores = logits if self.score_average == "logits" else self.probabilities(logits)
            combined = scores if combined is None else combined + scores
            if i + 1 < len(self.stages):
                proposals = self.refine(stage, out, image_sizes, counts)
        combined = combined / len(self.stages)
        scores = self.probabilities(combined) if self.score_average == "logits" else combined
        boxes = self.stages[-1].decode(out.main)
        detections = []
        for b, s, size in zip(boxes.split(counts), scores.split(counts), image_sizes, strict=True):
            detections.append(postprocess_detections(b, s, size, self.test))
        return detections, {}

"""The RoI heads' layers and their one contract: ``RoIFeatures`` in, ``HeadOutput`` out.

The classical sibling head, the double head and TSD's head each take the pooled features of the
proposals P (``RoIFeatures``) and return their class logits, box deltas and the boxes those
deltas are coded against (``HeadOutput``). TSD's head also owns its geometry: its offset nets
predict dC and dR from P's feature, it pools P-hat-c and P-hat-r itself and returns them in
``TSDGeometry`` (what visualisation draws). Matching, sampling, box coding and losses live in
``roi_heads.py`` and ``losses.py``. Layer names follow torchvision (``fc6``/``fc7`` as in its
``TwoMLPHead``, ``cls_score``, ``bbox_pred``) so that a torchvision Faster R-CNN checkpoint loads
into the sibling head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tsd_model.boxes import box_wh, translate
from tsd_model.ops import FeatureTable, MultiScaleDeformRoIPool, bin_centres

FcInit = Literal["pytorch_default", "kaiming_normal"]


@dataclass
class RoIFeatures:
    """What the pooling of the proposals P gives a head: P's features, and what pooling again needs."""

    rois: Tensor  # [R, 5] (batch index, x1, y1, x2, y2) in network-input pixels: the proposals P
    levels: Tensor  # [R] FPN level index of each RoI
    pooled: Tensor  # [R, C, k, k] P's RoI feature (channels-last memory)
    table: FeatureTable  # the FPN maps, laid out once per run for every pooling

    @property
    def boxes(self) -> Tensor:
        return self.rois[:, 1:]


@dataclass
class TSDGeometry:
    """TSD's task-specific proposals derived from P, in network-input pixels."""

    boxes: Tensor  # [R, 4] P
    delta_c: Tensor  # [R, k, k, 2] the pointwise deformation dC as predicted (before gamma)
    delta_r: Tensor  # [R, 2] the translation dR as predicted (before gamma)
    boxes_r: Tensor  # [R, 4] P-hat-r = P translated by gamma * dR * (w, h)
    pool: MultiScaleDeformRoIPool  # how P-hat-c was pooled (grid, samples, sampling rule)
    gamma: float

    def centres_c(self) -> Tensor:
        """``[R, k, k, 2]`` where each bin of P-hat-c samples (the mean of its samples), (x, y)."""
        p = self.pool
        return bin_centres(self.boxes.float(), self.gamma * self.delta_c.float(), p.output_size, p.sampling_ratio,
                           p.rule)


@dataclass
class HeadOutput:
    """A head's raw predictions for R RoIs."""

    logits: Tensor  # [R, C + 1] class logits, background at 0
    deltas: Tensor  # [R, K, 4] box deltas, K = C + 1 (class-specific) or 1 (class-agnostic)
    reg_boxes: Tensor  # [R, 4] the boxes ``deltas`` are coded against: P, or P-hat-r for TSD
    geometry: TSDGeometry | None = None  # TSD's P-hat-c and P-hat-r


def init_fc(layer: nn.Linear, how: FcInit) -> None:
    """``kaiming_normal``: ``kaiming_normal_(a=1)`` and zero bias, the TSD authors' init of every fc
    of the branches and offset nets; ``pytorch_default`` keeps ``nn.Linear``'s own (torchvision's)."""
    if how == "kaiming_normal":
        nn.init.kaiming_normal_(layer.weight, a=1)
        nn.init.zeros_(layer.bias)


class PooledLinear(nn.Linear):
    """A Linear layer on pooled RoI features ``[K, C, k, k]`` that reads them in either memory layout.

    The weight keeps the usual ``(C, k, k)`` input order (checkpoints of torchvision and of the
    classical heads load unchanged). RoI pooling produces channels-last features; flattening
    them in ``(C, k, k)`` order would copy every RoI's ``C*k*k`` values, so instead the weight is
    read in ``(k, k, C)`` order: a copy that is kept while the weight is unchanged when no
    gradient is needed (inference: the features of every RoI are never reordered; the price is
    one more copy of this weight in memory, dropped when a forward with gradient runs), and made
    per call in training when it is smaller than the features it saves reordering.
    """

    def __init__(self, channels: int, grid: int, out_features: int) -> None:
        super().__init__(channels * grid * grid, out_features)
        self.channels, self.grid = channels, grid
        self._cached: tuple[tuple, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x.flatten(1))
        flat = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # a view: no copy
        if torch.compiler.is_compiling():  # in a compiled graph the reordered weight is one fused copy
            return F.linear(flat, self._channels_last_weight(), self.bias)
        if torch.is_grad_enabled():
            self._cached = None  # training: the kept copy would go stale at the next step
            if x.shape[0] < self.out_features:  # reordering the features is the smaller copy
                return super().forward(x.contiguous().flatten(1))
            return F.linear(flat, self._channels_last_weight(), self.bias)
        if self.weight.is_inference():
            # made under torch.inference_mode: no version counter tells when it changes, so no copy is kept
            return F.linear(flat, self._channels_last_weight(), self.bias)
        key = (self.weight.data_ptr(), self.weight._version, self.weight.dtype, self.weight.device)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._channels_last_weight().detach())
        return F.linear(flat, self._cached[1], self.bias)

    def _channels_last_weight(self) -> Tensor:
        c, k = self.channels, self.grid
        return self.weight.view(-1, c, k, k).permute(0, 2, 3, 1).reshape(self.out_features, -1)


class TwoFCHead(nn.Module):
    """Two fc layers with ReLU on pooled RoI features; torchvision's ``TwoMLPHead`` (same parameter
    names, so its checkpoints load), with the first layer reading channels-last features."""

    def __init__(self, channels: int, grid: int, representation: int, fc_init: FcInit = "pytorch_default") -> None:
        super().__init__()
        self.fc6 = PooledLinear(channels, grid, representation)
        self.fc7 = nn.Linear(representation, representation)
        for layer in (self.fc6, self.fc7):
            init_fc(layer, fc_init)

    def forward(self, pooled: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(pooled))))


def _init_predictors(cls_score: nn.Linear, bbox_pred: nn.Linear) -> None:
    nn.init.normal_(cls_score.weight, std=0.01)
    nn.init.normal_(bbox_pred.weight, std=0.001)
    nn.init.zeros_(cls_score.bias)
    nn.init.zeros_(bbox_pred.bias)


class SiblingHead(nn.Module):
    """The classical head H*: one 2fc branch shared by classification and regression."""

    def __init__(self, channels: int, grid: int, representation: int, num_outputs: int, num_reg: int,
                 fc_init: FcInit = "pytorch_default") -> None:
        super().__init__()
        self.box_head = TwoFCHead(channels, grid, representation, fc_init)
        self.cls_score = nn.Linear(representation, num_outputs)
        self.bbox_pred = nn.Linear(representation, num_reg * 4)
        _init_predictors(self.cls_score, self.bbox_pred)

    def forward(self, features: RoIFeatures) -> HeadOutput:
        x = self.box_head(features.pooled)
        return HeadOutput(self.cls_score(x), self.bbox_pred(x).view(x.shape[0], -1, 4), features.boxes)


class DoubleHead(nn.Module):
    """Two separate 2fc branches (the paper's Dhead); TSD feeds them different features."""

    def __init__(self, channels: int, grid: int, representation: int, num_outputs: int, num_reg: int,
                 fc_init: FcInit = "pytorch_default") -> None:
        super().__init__()
        self.cls_branch = TwoFCHead(channels, grid, representation, fc_init)
        self.reg_branch = TwoFCHead(channels, grid, representation, fc_init)
        self.cls_score = nn.Linear(representation, num_outputs)
        self.bbox_pred = nn.Linear(representation, num_reg * 4)
        _init_predictors(self.cls_score, self.bbox_pred)

    def classify(self, pooled: Tensor) -> Tensor:
        return self.cls_score(self.cls_branch(pooled))

    def regress(self, pooled: Tensor) -> Tensor:
        x = self.reg_branch(pooled)
        return self.bbox_pred(x).view(x.shape[0], -1, 4)

    def forward(self, features: RoIFeatures) -> HeadOutput:
        return HeadOutput(self.classify(features.pooled), self.regress(features.pooled), features.boxes)


class TSDOffsets(nn.Module):
    """Predicts TSD's pointwise deformation dC (k x k x 2) and proposal-wise translation dR (2).

    A shared fc on the proposal's RoI feature, then a 2-layer net each. ``init="kaiming_normal"``
    is the authors' (every layer ``kaiming_normal_(a=1)``: the offsets start random);
    ``"zero"`` starts the last layers at zero, so that training begins with P-hat-c = P-hat-r = P
    (as DCN offsets start), the other layers as ``kaiming_normal``.
    """

    def __init__(self, channels: int, hidden: int, grid: int,
                 init: Literal["kaiming_normal", "zero"] = "kaiming_normal") -> None:
        super().__init__()
        self.grid = grid
        self.shared = nn.Sequential(PooledLinear(channels, grid, hidden), nn.ReLU(inplace=True))
        self.delta_c = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, grid * grid * 2))
        self.delta_r = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2))
        for layer in (self.shared[0], self.delta_c[0], self.delta_c[2], self.delta_r[0], self.delta_r[2]):
            init_fc(layer, "kaiming_normal")
        if init == "zero":
            for last in (self.delta_c[-1], self.delta_r[-1]):
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """``([R, k, k, 2], [R, 2])`` offsets (x, y) in units of the proposal's width and height."""
        x = self.shared(pooled)
        return self.delta_c(x).view(-1, self.grid, self.grid, 2), self.delta_r(x)


class TSDHead(nn.Module):
    """TSD: classification on P-hat-c, regression on P-hat-r, both derived from the proposal P.

    From P's RoI feature the offset nets predict dC and dR; P-hat-c is P's k x k grid with every bin
    moved by ``gamma * dC`` of P's extent, P-hat-r is P translated by ``gamma * dR * (w, h)``. Both
    are pooled by ``deform_pool`` at P's level (P-hat-r as a pooling whose every bin moves by the
    same dR, which is how the authors pool it), in one pass. The regression deltas are coded
    against P-hat-r.
    """

    def __init__(self, channels: int, grid: int, representation: int, num_outputs: int, num_reg: int,
                 hidden: int, gamma: float, deform_pool: MultiScaleDeformRoIPool,
                 offset_init: Literal["kaiming_normal", "zero"] = "kaiming_normal",
                 fc_init: FcInit = "pytorch_default") -> None:
        super().__init__()
        if deform_pool.output_size != grid:
            raise ValueError(f"the deformable pooling gives {deform_pool.output_size}x{deform_pool.output_size} "
                             f"bins, the head reads {grid}x{grid}")
        self.gamma = gamma
        self.deform_pool = deform_pool
        self.offsets = TSDOffsets(channels, hidden, grid, offset_init)
        self.branches = DoubleHead(channels, grid, representation, num_outputs, num_reg, fc_init)

    def forward(self, features: RoIFeatures) -> HeadOutput:
        k = self.deform_pool.output_size
        boxes = features.boxes
        delta_c, delta_r = self.offsets(features.pooled)
        shift = self.gamma * delta_r  # [R, 2] in units of P's extent
        # P-hat-c and P-hat-r (a translation = the same offset in every bin) in one pass
        offsets = torch.stack([self.gamma * delta_c, shift[:, None, None, :].expand(-1, k, k, 2)])
        feat_c, feat_r = self.deform_pool(features.table, features.rois, features.levels, offsets).unbind(0)
        extent = box_wh(boxes) + (1.0 if self.deform_pool.rule.plus_one else 0.0)  # the authors' w = x2 - x1 + 1
        boxes_r = translate(boxes, (shift * extent.to(shift.dtype)).to(boxes.dtype))
        dtype = features.pooled.dtype
        geometry = TSDGeometry(boxes, delta_c, delta_r, boxes_r, self.deform_pool, self.gamma)
        return HeadOutput(self.branches.classify(feat_c.to(dtype)), self.branches.regress(feat_r.to(dtype)), boxes_r,
                          geometry)

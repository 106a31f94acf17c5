"""The layers of the RoI heads: the classical sibling head, the double head and TSD's branches.

Layers only; matching, sampling, coding and losses live in ``roi_heads.py`` and ``losses.py``.
Layer names follow torchvision (``fc6``/``fc7`` as in its ``TwoMLPHead``, ``cls_score``, ``bbox_pred``)
so that a torchvision Faster R-CNN checkpoint loads into the sibling head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
        if torch.is_grad_enabled():  # training: the kept copy would go stale at the next step
            self._cached = None
        if x.dim() == 2 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x.flatten(1))
        flat = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # a view: no copy
        if torch.is_grad_enabled():
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

    def __init__(self, channels: int, grid: int, representation: int) -> None:
        super().__init__()
        self.fc6 = PooledLinear(channels, grid, representation)
        self.fc7 = nn.Linear(representation, representation)

    def forward(self, pooled: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(pooled))))


def _init_predictors(cls_score: nn.Linear, bbox_pred: nn.Linear) -> None:
    nn.init.normal_(cls_score.weight, std=0.01)
    nn.init.normal_(bbox_pred.weight, std=0.001)
    nn.init.zeros_(cls_score.bias)
    nn.init.zeros_(bbox_pred.bias)


class SiblingHead(nn.Module):
    """The classical head H*: one 2fc branch shared by classification and regression."""

    def __init__(self, channels: int, grid: int, representation: int, num_outputs: int, num_reg: int) -> None:
        super().__init__()
        self.box_head = TwoFCHead(channels, grid, representation)
        self.cls_score = nn.Linear(representation, num_outputs)
        self.bbox_pred = nn.Linear(representation, num_reg * 4)
        _init_predictors(self.cls_score, self.bbox_pred)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        x = self.box_head(pooled)
        return self.cls_score(x), self.bbox_pred(x).view(x.shape[0], -1, 4)


class DoubleHead(nn.Module):
    """Two separate 2fc branches (the paper's Dhead); TSD feeds them different features."""

    def __init__(self, channels: int, grid: int, representation: int, num_outputs: int, num_reg: int) -> None:
        super().__init__()
        self.cls_branch = TwoFCHead(channels, grid, representation)
        self.reg_branch = TwoFCHead(channels, grid, representation)
        self.cls_score = nn.Linear(representation, num_outputs)
        self.bbox_pred = nn.Linear(representation, num_reg * 4)
        _init_predictors(self.cls_score, self.bbox_pred)

    def classify(self, pooled: Tensor) -> Tensor:
        return self.cls_score(self.cls_branch(pooled))

    def regress(self, pooled: Tensor) -> Tensor:
        x = self.reg_branch(pooled)
        return self.bbox_pred(x).view(x.shape[0], -1, 4)


class TSDOffsets(nn.Module):
    """Predicts TSD's pointwise deformation dC (k x k x 2) and proposal-wise translation dR (2).

    A shared fc on the proposal's RoI feature, then a 2-layer net each. The last layers start at
    zero, so that training begins with P-hat-c = P-hat-r = P.
    """

    def __init__(self, channels: int, hidden: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.shared = nn.Sequential(PooledLinear(channels, grid, hidden), nn.ReLU(inplace=True))
        self.delta_c = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, grid * grid * 2))
        self.delta_r = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2))
        for last in (self.delta_c[-1], self.delta_r[-1]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """``([R, k, k, 2], [R, 2])`` offsets in units of the proposal's width and height."""
        x = self.shared(pooled)
        return self.delta_c(x).view(-1, self.grid, self.grid, 2), self.delta_r(x)


class TSDHead(nn.Module):
    """TSD's task-specific branches: classification on P-hat-c, regression on P-hat-r."""

    def __init__(self, channels: int, grid: int, representation: int, num_outputs: int, num_reg: int,
                 hidden: int) -> None:
        super().__init__()
        self.offsets = TSDOffsets(channels, hidden, grid)
        self.branches = DoubleHead(channels, grid, representation, num_outputs, num_reg)

"""The layers of the RoI heads: the classical sibling head, the double head and TSD's branches.

Layers only; matching, sampling, coding and losses live in ``roi_heads.py`` and ``losses.py``.
Layer names follow torchvision (``fc6``/``fc7`` in ``TwoMLPHead``, ``cls_score``, ``bbox_pred``)
so that a torchvision Faster R-CNN checkpoint loads into the sibling head.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead


def _init_predictors(cls_score: nn.Linear, bbox_pred: nn.Linear) -> None:
    nn.init.normal_(cls_score.weight, std=0.01)
    nn.init.normal_(bbox_pred.weight, std=0.001)
    nn.init.zeros_(cls_score.bias)
    nn.init.zeros_(bbox_pred.bias)


class SiblingHead(nn.Module):
    """The classical head H*: one 2fc branch shared by classification and regression."""

    def __init__(self, in_features: int, representation: int, num_outputs: int, num_reg: int) -> None:
        super().__init__()
        self.box_head = TwoMLPHead(in_features, representation)
        self.cls_score = nn.Linear(representation, num_outputs)
        self.bbox_pred = nn.Linear(representation, num_reg * 4)
        _init_predictors(self.cls_score, self.bbox_pred)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        x = self.box_head(pooled)
        return self.cls_score(x), self.bbox_pred(x).view(x.shape[0], -1, 4)


class DoubleHead(nn.Module):
    """Two separate 2fc branches (the paper's Dhead); TSD feeds them different features."""

    def __init__(self, in_features: int, representation: int, num_outputs: int, num_reg: int) -> None:
        super().__init__()
        self.cls_branch = TwoMLPHead(in_features, representation)
        self.reg_branch = TwoMLPHead(in_features, representation)
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

    def __init__(self, in_features: int, hidden: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.shared = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True))
        self.delta_c = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, grid * grid * 2))
        self.delta_r = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2))
        for last in (self.delta_c[-1], self.delta_r[-1]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """``([R, k, k, 2], [R, 2])`` offsets in units of the proposal's width and height."""
        x = self.shared(pooled.flatten(1))
        return self.delta_c(x).view(-1, self.grid, self.grid, 2), self.delta_r(x)


class TSDHead(nn.Module):
    """TSD's task-specific branches: classification on P-hat-c, regression on P-hat-r."""

    def __init__(self, in_features: int, representation: int, num_outputs: int, num_reg: int, hidden: int,
                 grid: int) -> None:
        super().__init__()
        self.offsets = TSDOffsets(in_features, hidden, grid)
        self.branches = DoubleHead(in_features, representation, num_outputs, num_reg)

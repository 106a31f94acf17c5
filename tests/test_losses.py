"""Progressive constraint losses on hand-computed numbers; regression loss normalisation."""

from __future__ import annotations

import math

import pytest
import torch

from tsd_model.boxes import paired_iou
from tsd_model.losses import box_regression_loss, pc_cls_loss, pc_loc_loss, per_image_weights


def test_pc_cls_hand_computed():
    sibling = torch.zeros(2, 3)  # p = 1/3 for every class
    tsd = torch.tensor([[math.log(2.0), 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])  # p = (.5, .25, .25)
    labels = torch.tensor([0, 1])
    # RoI 0: relu(1/3 + .2 - .5) = 1/30; RoI 1: relu(1/3 + .2 - .25) = 17/60
    assert pc_cls_loss(tsd, sibling, labels, 0.2).item() == pytest.approx((1 / 30 + 17 / 60) / 2, abs=1e-6)


def test_pc_cls_margin_is_capped_so_the_target_never_exceeds_one():
    sibling = torch.tensor([[math.log(9.0), 0.0]])  # p_sib[0] = 0.9
    tsd = torch.tensor([[math.log(3.0), 0.0]])  # p_tsd[0] = 0.75
    # m' = min(1 - .9, .5) = .1 -> target 1.0 -> loss .25 (an uncapped margin would give .65)
    assert pc_cls_loss(tsd, sibling, torch.tensor([0]), 0.5).item() == pytest.approx(0.25, abs=1e-6)


def test_pc_cls_gradient_reaches_tsd_only():
    sibling = torch.zeros(1, 3, requires_grad=True)
    tsd = torch.zeros(1, 3, requires_grad=True)
    pc_cls_loss(tsd, sibling, torch.tensor([2]), 0.2).backward()
    assert sibling.grad is None or sibling.grad.abs().sum() == 0
    assert tsd.grad[0, 2] < 0  # raising the target logit lowers the loss


def test_pc_loc_hand_computed():
    gt = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10]])
    sibling = torch.tensor([[0.0, 0, 10, 8], [0.0, 0, 10, 9]])  # IoU .8 and .9
    tsd = torch.tensor([[0.0, 0, 10, 9], [0.0, 0, 10, 9]], requires_grad=True)  # IoU .9 and .9
    # box 0: m' = .2 -> relu(.8 + .2 - .9) = .1; box 1: m' = min(.1, .2) -> relu(.9 + .1 - .9) = .1
    loss = pc_loc_loss(tsd, sibling, gt, 0.2)
    assert loss.item() == pytest.approx(0.1, abs=1e-6)
    loss.backward()
    assert tsd.grad.abs().sum() > 0


def test_pc_loc_is_zero_when_tsd_beats_the_margin_and_empty_is_zero():
    gt = torch.tensor([[0.0, 0, 10, 10]])
    assert pc_loc_loss(gt.clone(), torch.tensor([[0.0, 0, 10, 5]]), gt, 0.2).item() == 0.0
    assert pc_loc_loss(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4), 0.2).item() == 0.0


def test_paired_iou():
    a = torch.tensor([[0.0, 0, 2, 2], [0.0, 0, 1, 1]])
    b = torch.tensor([[1.0, 1, 3, 3], [2.0, 2, 3, 3]])
    torch.testing.assert_close(paired_iou(a, b), torch.tensor([1 / 7, 0.0]))


def test_box_loss_uses_the_target_class_and_averages_over_all_rois():
    deltas = torch.zeros(4, 3, 4)
    deltas[0, 2] = 1.0  # the prediction for RoI 0's class
    deltas[0, 1] = 5.0  # another class: ignored
    deltas[1, 0] = 7.0  # a negative's (background) deltas: not regressed
    targets = torch.zeros(4, 4)
    targets[2:] = 3.0  # negatives' targets: masked out
    labels = torch.tensor([2, 0, 0, 0])
    # smooth-L1 with beta 1 of 1.0 = 0.5 per coordinate, 4 coordinates, / 4 RoIs
    assert box_regression_loss(deltas, targets, labels, beta=1.0).item() == pytest.approx(0.5)
    agnostic = torch.zeros(4, 1, 4)
    agnostic[0, 0] = 1.0
    assert box_regression_loss(agnostic, targets, labels, beta=1.0).item() == pytest.approx(0.5)


def test_box_coder_gives_torchvisions_numbers():
    from torchvision.models.detection._utils import BoxCoder as TorchvisionBoxCoder

    from tsd_model.boxes import box_coder

    g = torch.Generator().manual_seed(0)
    ref = torch.rand(50, 2, generator=g) * 300
    ref = torch.cat([ref, ref + torch.rand(50, 2, generator=g) * 200 + 1], dim=1)
    gt = ref + torch.randn(50, 4, generator=g) * 10
    gt[:, 2:] = torch.maximum(gt[:, 2:], gt[:, :2] + 1)
    stds = [0.1, 0.1, 0.2, 0.2]
    ours, theirs = box_coder(stds), TorchvisionBoxCoder(tuple(1 / s for s in stds), math.log(1000 / 16))
    torch.testing.assert_close(ours.encode_single(gt, ref), theirs.encode_single(gt, ref))
    deltas = torch.randn(50, 4, generator=g)
    deltas[0, 2] = 20.0  # clamped
    torch.testing.assert_close(ours.decode_single(deltas, ref), theirs.decode_single(deltas, ref))
    per_class = torch.randn(50, 3, 4, generator=g)  # [R, K, 4] against [R, 1, 4]
    torch.testing.assert_close(ours.decode_single(per_class, ref[:, None, :]),
                               theirs.decode_single(per_class.reshape(50, 12), ref).view(50, 3, 4))


@pytest.mark.parametrize("masked", [False, True])
def test_per_image_weights_give_the_mean_over_images_of_per_image_means(masked):
    counts = [3, 0, 5, 2]
    values = torch.arange(10.0) ** 2
    mask = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0, 0, 0], dtype=torch.bool) if masked else None  # image 3: none
    weights = per_image_weights(counts, mask)
    means = []
    for chunk, keep in zip(values.split(counts), (mask if masked else torch.ones(10, dtype=torch.bool)).split(counts),
                           strict=True):
        if keep.any():
            means.append(chunk[keep].mean())
    assert weights.sum().item() == pytest.approx(1.0)
    assert (weights * values).sum().item() == pytest.approx(torch.stack(means).mean().item())
    if masked:
        assert weights[~mask].eq(0).all()

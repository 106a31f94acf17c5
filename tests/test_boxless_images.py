"""Images without boxes (OID keeps images that carry only image-level labels, and prep keeps them)
train like any other: every RoI of such an image is a negative, and nothing of it may reach the
regression targets (an all-zero gt box encoded against a RoI is log(0) = -inf)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.train import train_step
from tests.model_utils import tiny_model_config, toy_batch
from tsd_model.build import build_model

HEADS = {
    "tsd": (),
    "sibling": ("roi.head=sibling",),
    "double": ("roi.head=double",),
    "tsd-cascade": ("cascade.enabled=true",),
    "tsd-cascade-agnostic": ("cascade.enabled=true", "cascade.class_agnostic=true"),
    "tsd-authors": ("tsd.pooling=authors", "tsd.samples_per_bin=4", "tsd.offset_init=kaiming_normal",
                    "roi.pooling=mmdet_v1_roi_align", "roi.fc_init=kaiming_normal"),
}


def _boxless_batch():
    images, targets = toy_batch()
    g = torch.Generator().manual_seed(9)
    extra = [torch.randint(0, 255, (3, 100, 150), dtype=torch.uint8, generator=g) for _ in range(2)]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    # box, no box | box, no box: each micro-batch of two mixes both kinds
    return [images[0], extra[0], images[1], extra[1]], [targets[0], empty, targets[1], dict(empty)]


@pytest.mark.parametrize("head", sorted(HEADS))
def test_a_batch_mixing_images_with_and_without_boxes_trains(head):
    torch.manual_seed(0)
    model = build_model(tiny_model_config(*HEADS[head])).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images, targets = _boxless_batch()
    for _ in range(3):  # from the second step on, the offset nets' last layers are no longer zero
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        step = train_step(model, optimizer, scaler, images, targets, grad_accumulation=2)
        assert step.finite and step.applied, head
        assert math.isfinite(step.grad_norm) and step.grad_norm > 0
        assert all(math.isfinite(v.item()) for v in step.losses.values()), step.losses
        for name, p in model.named_parameters():
            assert torch.isfinite(p).all(), name
        moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert any(".offsets." in n for n in moved) or head in ("sibling", "double"), moved


def test_a_batch_of_only_boxless_images_has_zero_box_losses():
    torch.manual_seed(0)
    model = build_model(tiny_model_config()).train()
    images, _ = toy_batch()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = model(images, empty)
    for name in ("loss_tsd_box", "loss_sibling_box", "loss_pc_loc"):
        assert losses[name].item() == 0.0, name
    assert losses["loss_tsd_cls"].item() > 0
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_the_multilabel_head_trains_on_every_level_of_the_hierarchy():
    """``roi.classification: sigmoid``: a RoI's targets are its class and all its ancestors."""
    from tsd_model.losses import multilabel_targets

    ancestors = torch.eye(12, dtype=torch.bool)
    ancestors[3, 7] = ancestors[3, 9] = ancestors[7, 9] = True  # class 3 -> 7 -> 9, and 3 -> 9
    targets = multilabel_targets(torch.tensor([0, 4, 8]), ancestors)  # background, class 3, class 7
    assert targets[0].sum() == 0
    assert targets[1].nonzero().flatten().tolist() == [3, 7, 9]
    assert targets[2].nonzero().flatten().tolist() == [7, 9]
    for overrides in ((), ("cascade.enabled=true",)):
        torch.manual_seed(0)
        model = build_model(tiny_model_config("roi.classification=sigmoid", *overrides),
                            label_ancestors=ancestors).train()
        assert torch.equal(model.state_dict()["roi_heads.label_ancestors"], ancestors)  # the checkpoint carries it
        images, targets_ = _boxless_batch()
        step = train_step(model, torch.optim.SGD(model.parameters(), lr=0.01), torch.amp.GradScaler("cpu", enabled=False),
                          images, targets_)
        assert step.finite and step.applied
        model.eval()
        with torch.no_grad():
            out = model(images[:2])
        assert all(((o["scores"] > 0) & (o["scores"] <= 1)).all() for o in out)

"""``RoISampler``: the balanced draw of training RoIs at a fixed count per image, without host reads.

It must draw what torchvision's ``BalancedPositiveNegativeSampler`` draws (as many positives and
negatives, each uniformly), its fill-ins must change no loss, and a training step of the RoI
heads must not wait for the GPU anywhere (counted on the CPU by ``host_reads.HostReads``).
"""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from tests.model_utils import tiny_model_config, toy_batch
from tsd_model.build import build_model
from tsd_model.host_reads import HostReads
from tsd_model.roi_heads import SampledRoIs
from tsd_model.roi_sampling import BACKGROUND, IGNORED, RoISampler


def _labels(pos: int, neg: int, ignored: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.randint(1, 5, (pos,), generator=g), torch.full((neg,), BACKGROUND),
                        torch.full((ignored,), IGNORED)])
    return labels[torch.randperm(len(labels), generator=g)]


@pytest.mark.parametrize(("pos", "neg", "ignored"), [(300, 1700, 0), (5, 2000, 0), (40, 10, 0), (10, 20, 30),
                                                     (0, 100, 0), (0, 0, 7), (0, 0, 0), (600, 0, 0)])
def test_the_draw_takes_as_many_positives_and_negatives_as_torchvision(pos, neg, ignored):
    labels = _labels(pos, neg, ignored)
    sampler = RoISampler(0.5, 0.5, batch_size_per_image=512, positive_fraction=0.25)
    torch.manual_seed(0)
    tv_pos, tv_neg = BalancedPositiveNegativeSampler(512, 0.25)([labels.clone()])
    keep, valid = sampler.draw(labels)
    assert len(keep) == len(valid) == min(512, len(labels))  # known to the host: no read of the labels
    assert len(set(keep.tolist())) == len(keep)
    drawn = labels[keep[valid]]
    assert int((drawn > 0).sum()) == int(tv_pos[0].sum())
    assert int((drawn == BACKGROUND).sum()) == int(tv_neg[0].sum())
    assert not (drawn == IGNORED).any()
    assert (labels[keep[~valid]] != BACKGROUND).all()  # no negative is left as a fill-in


def test_the_draw_is_uniform_among_the_positives_and_among_the_negatives():
    labels = _labels(40, 200, 20, seed=1)
    sampler = RoISampler(0.5, 0.5, batch_size_per_image=64, positive_fraction=0.25)
    torch.manual_seed(0)
    draws = 3000
    counts = torch.zeros(len(labels))
    for _ in range(draws):
        keep, valid = sampler.draw(labels)
        counts[keep[valid]] += 1
    for mask, p in ((labels > 0, 16 / 40), (labels == BACKGROUND, 48 / 200)):
        freq = counts[mask] / draws
        sigma = (p * (1 - p) / draws) ** 0.5
        assert (freq - p).abs().max() < 5 * sigma, (freq.min(), freq.max(), p)
    assert counts[labels == IGNORED].sum() == 0


def test_matching_labels_by_the_two_iou_thresholds():
    iou = torch.tensor([[0.7, 0.45, 0.2, 0.5], [0.1, 0.55, 0.3, 0.0]])
    labels, matched = RoISampler(0.5, 0.4, 512, 0.25).labels(iou, torch.tensor([3, 7]))
    assert labels.tolist() == [4, 8, BACKGROUND, 4]  # 0.45 and 0.55: the best, 0.55, is a positive of class 7
    assert matched.tolist()[:2] == [0, 1]
    labels, _ = RoISampler(0.6, 0.4, 512, 0.25).labels(iou, torch.tensor([3, 7]))
    assert labels.tolist() == [4, IGNORED, BACKGROUND, IGNORED]


def _inputs(model, images, targets):
    """The RoI heads' inputs of a training step: features, proposals, image sizes, targets."""
    model.train()
    images = [img.float().div(255) for img in images]
    batch, targets = model.transform(images, [{"boxes": t["boxes"].float(), "labels": t["labels"]} for t in targets])
    features = model.backbone(batch.tensors)
    proposals, _ = model.rpn(batch, features, targets)
    return features, proposals, batch.image_sizes, targets


def test_fill_ins_change_no_loss():
    """With fewer proposals than the draw's size and more positives than its cap, a third of the
    draw is fill-ins: the losses are those of the valid RoIs alone (the variable-size draw)."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config("tsd.offset_init=kaiming_normal", "roi.batch_size_per_image=48"))
    stage = model.roi_heads.stages[0]
    images, targets = toy_batch()
    features, _, _, targets = _inputs(model, images, targets)
    g = torch.Generator().manual_seed(0)
    proposals = []
    for t in targets:  # 30 jittered copies of the gt boxes (positives) and 6 far-off boxes (negatives)
        gt = t["boxes"].repeat(30 // len(t["boxes"]), 1)
        far = torch.tensor([[0.0, 0, 8, 8]]).repeat(6, 1) + torch.rand(6, 1, generator=g) * 4
        proposals.append(torch.cat([gt + torch.randn(gt.shape, generator=g), far]))
    sampled = stage.sample(proposals, targets)
    assert sampled.counts == [len(p) + len(t["boxes"]) for p, t in zip(proposals, targets, strict=True)]
    assert 0 < int(sampled.valid.sum()) < len(sampled.valid) * 2 // 3  # 12 positives + 6 negatives per image
    valid = sampled.valid.split(sampled.counts)
    only_valid = SampledRoIs([b[v] for b, v in zip(sampled.boxes, valid, strict=True)], sampled.labels[sampled.valid],
                             sampled.gt_boxes[sampled.valid], sampled.from_gt[sampled.valid],
                             sampled.valid[sampled.valid])
    with_fill = stage.losses(stage.run(features, sampled.boxes, with_sibling=True), sampled)
    without = stage.losses(stage.run(features, only_valid.boxes, with_sibling=True), only_valid)
    assert with_fill.keys() == without.keys() and "loss_pc_loc" in with_fill
    for name in with_fill:
        torch.testing.assert_close(with_fill[name], without[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("overrides", [(), ("roi.head=sibling",), ("cascade.enabled=true",),
                                       ("roi.classification=sigmoid",)], ids=["tsd", "sibling", "cascade", "sigmoid"])
def test_a_training_step_of_the_roi_heads_reads_nothing_back(overrides):
    """Sampling, losses and the backward of the RoI heads issue no call whose result the host
    reads: on a GPU none of them waits for the kernels queued before it (an image without boxes in
    the batch too)."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config(*overrides))
    images, targets = toy_batch()
    targets.append({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)})
    images.append(images[0].clone())
    features, proposals, sizes, targets = _inputs(model, images, targets)
    with HostReads() as reads:
        _, losses = model.roi_heads(features, proposals, sizes, targets)
        sum(losses.values()).backward()
    assert len(losses) >= 2 and all(torch.isfinite(v) for v in losses.values())
    assert reads.calls == []
    with HostReads() as reads:  # the counter sees what torchvision's sampler would have read
        BalancedPositiveNegativeSampler(512, 0.25)([torch.zeros(10, dtype=torch.long)])
    assert "nonzero" in reads.calls


def _rpn_inputs(overrides=()):
    """A tiny model's RPN on the toy batch and an image without boxes (last): the RPN, the batch,
    its features, the head's per-level outputs and the targets."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config(*overrides)).train()
    images, targets = toy_batch()
    images.append(images[0].clone())
    targets.append({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)})
    batch, targets = model.transform([img.float().div(255) for img in images], targets)
    features = list(model.backbone(batch.tensors).values())
    return model.rpn, batch, features, model.rpn.head(features), targets


def _rpn_targets(overrides=()):
    """A tiny model's RPN and what its training targets are made from: anchors, head outputs, targets
    (an image without boxes last)."""
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    rpn, batch, features, head, targets = _rpn_inputs(overrides)
    objectness, deltas = concat_box_prediction_layers(*head)
    return rpn, rpn.anchor_generator(batch, features), objectness, deltas, targets


def test_the_rpn_labels_and_losses_are_torchvisions():
    """Drawing every anchor (a batch larger than the anchors, positive fraction 1) makes the draw
    deterministic: then the labels, matched boxes and per-image losses are torchvision's own, low-
    quality matches (an anchor that is a gt box's best, under the IoU threshold) included."""
    from torchvision.models.detection.rpn import RegionProposalNetwork

    rpn, anchors, objectness, deltas, targets = _rpn_targets(("rpn.batch_size_per_image=100000",
                                                               "rpn.positive_fraction=1.0"))
    labels, matched = rpn.assign_targets_to_anchors(anchors, targets)
    tv_labels, tv_matched = RegionProposalNetwork.assign_targets_to_anchors(rpn, anchors, targets)
    low_quality = 0
    for i, target in enumerate(targets):
        assert torch.equal(labels[i], tv_labels[i])
        positive = labels[i] == 1  # the others' matched box is never read (torchvision's: gt box 0)
        assert torch.equal(matched[i][positive], tv_matched[i][positive])
        if len(target["boxes"]):
            best = rpn.box_similarity(target["boxes"], anchors[i]).max(dim=0).values
            low_quality += int(((labels[i] == 1) & (best < rpn.sampler.fg_iou)).sum())
            assert (labels[i] == -1).any() and (labels[i] == 0).any()
    assert low_quality > 0  # the case where matching by the thresholds alone would differ
    regression = [rpn.box_coder.encode_single(m, a) for m, a in zip(matched, anchors, strict=True)]
    counts = [len(a) for a in anchors]
    for i, (o, d) in enumerate(zip(objectness.split(counts), deltas.split(counts), strict=True)):
        ours = rpn.compute_loss(o, d, [labels[i]], [regression[i]])
        theirs = RegionProposalNetwork.compute_loss(rpn, o, d, [labels[i]], [regression[i]])
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_rpn_training_targets_and_losses_read_nothing_back():
    """Matching, the draw, the losses and their backward: no host read (an image without boxes too)."""
    from torchvision.models.detection.rpn import RegionProposalNetwork

    rpn, anchors, objectness, deltas, targets = _rpn_targets()
    with HostReads() as reads:
        labels, matched = rpn.assign_targets_to_anchors(anchors, targets)
        regression = rpn.box_coder.encode(matched, anchors)
        obj, box = rpn.compute_loss(objectness, deltas, labels, regression)
        (obj + box).backward()
    assert reads.calls == []
    assert torch.isfinite(obj) and torch.isfinite(box) and box > 0
    assert all(torch.isfinite(p.grad).all() for p in rpn.head.parameters())
    with HostReads() as reads:  # torchvision's own reads
        RegionProposalNetwork.compute_loss(rpn, objectness.detach(), deltas.detach(), labels, list(regression))
    assert reads.calls.count("nonzero") >= 2


@pytest.mark.parametrize("training", [True, False])
def test_the_rpn_proposals_are_torchvisions_with_one_selection_per_image_fewer(training):
    """Per-level top-k, clipping, the minimum size and the score threshold (both made to drop
    boxes here), NMS per level, the best ``post_nms_top_n``: torchvision's proposals and scores,
    with the size and score tests in one selection (one ``nonzero`` per image, torchvision's two)."""
    from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers

    rpn, batch, features, (head_objectness, head_deltas), _ = _rpn_inputs()
    rpn.train(training)
    rpn.min_size, rpn.score_thresh = 30.0, 0.5  # an untrained head: scores 0.496-0.510, boxes from 21 px
    per_level = [o[0].numel() for o in head_objectness]
    objectness, deltas = concat_box_prediction_layers(head_objectness, head_deltas)
    anchors = rpn.anchor_generator(batch, features)
    proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
    with HostReads() as ours_reads:
        boxes, scores = rpn.filter_proposals(proposals, objectness, batch.image_sizes, per_level)
    with HostReads() as theirs_reads:
        tv_boxes, tv_scores = RegionProposalNetwork.filter_proposals(rpn, proposals, objectness, batch.image_sizes,
                                                                     per_level)
    kept = 0
    for b, sc, tb, ts in zip(boxes, scores, tv_boxes, tv_scores, strict=True):
        assert torch.equal(b, tb) and torch.equal(sc, ts)
        kept += len(b)
    top = rpn._get_top_n_idx(objectness.detach().reshape(len(anchors), -1), per_level)
    rows = torch.arange(len(anchors))[:, None]
    candidate_boxes, candidate_scores = proposals[rows, top], objectness.detach().reshape(len(anchors), -1)[rows, top]
    small = ((candidate_boxes[..., 2:] - candidate_boxes[..., :2]) < rpn.min_size).any(dim=-1)
    low = candidate_scores.sigmoid() < rpn.score_thresh
    assert (small & ~low).any() and (low & ~small).any() and (~small & ~low).any()  # each test drops boxes of its own
    assert kept > 0
    # the same NMS reads; the size and score tests: one selection per image, torchvision's two
    assert theirs_reads.calls.count("nonzero") - ours_reads.calls.count("nonzero") == len(anchors)

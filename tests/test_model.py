"""The detector: the paper's parameter counts, a training step, inference paths, cascade, weights."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torchvision

from data_prep.errors import InputError
from tests.model_utils import tiny_model_config, toy_batch
from tsd_model.build import build_model, modules_skipped_at_inference
from tsd_model.config import ModelConfig, TestConfig
from tsd_model.host_reads import HostReads
from tsd_model.postprocess import postprocess_detections, soft_nms


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _coco(head: str, joint: bool = True) -> ModelConfig:
    cfg = ModelConfig(num_classes=80)
    cfg.roi.head, cfg.tsd.joint_sibling = head, joint
    return cfg


def test_parameter_counts_are_the_papers():
    sibling = build_model(_coco("sibling"))
    assert _count(sibling) == 41_757_156
    tv = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=81)
    assert _count(tv) == _count(sibling)
    assert round(_count(build_model(_coco("double"))) / 1e6, 2) == 55.65
    assert round(_count(build_model(_coco("tsd", joint=False))) / 1e6, 2) == 59.02
    tsd = build_model(_coco("tsd"))
    assert round(_count(tsd) / 1e6, 2) == 73.33
    skipped = modules_skipped_at_inference(tsd)
    assert skipped == ["roi_heads.stages.0.sibling"]
    skipped_params = sum(p.numel() for p in tsd.roi_heads.stages[0].sibling.parameters())
    assert round((_count(tsd) - skipped_params) / 1e6, 2) == 59.02


# a torchvision Faster R-CNN checkpoint in our model: tests/test_convert.py (same detections, not just keys)


def test_training_step_losses_and_gradients():
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    images, targets = toy_batch()
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_sibling_cls", "loss_sibling_box",
                           "loss_tsd_cls", "loss_tsd_box", "loss_pc_cls", "loss_pc_loc"}
    assert all(math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()
    # the last layers of the dC/dR nets start at zero (P-hat = P), so the layers before them get
    # gradient from the second step on: take one step, then look at every part of the network
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    model.zero_grad()
    sum(model(images, targets).values()).backward()
    params = dict(model.named_parameters())
    for name in ("roi_heads.stages.0.tsd.offsets.delta_c.2.weight", "roi_heads.stages.0.tsd.offsets.delta_r.2.weight",
                 "roi_heads.stages.0.tsd.offsets.shared.0.weight", "roi_heads.stages.0.tsd.branches.cls_branch.fc6.weight",
                 "roi_heads.stages.0.tsd.branches.reg_branch.fc6.weight", "roi_heads.stages.0.sibling.box_head.fc6.weight",
                 "backbone.body.layer1.0.0.weight", "backbone.fpn.inner_blocks.0.0.weight", "rpn.head.conv.0.0.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name


def test_inference_skips_the_sibling_and_returns_image_coordinates():
    model = build_model(tiny_model_config())
    calls = []
    model.roi_heads.stages[0].sibling.register_forward_hook(lambda *a: calls.append(1))
    images, targets = toy_batch()
    model.train()
    model(images, targets)
    assert calls == [1]
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert calls == [1]  # not run at inference
    for out, image in zip(outputs, images, strict=True):
        h, w = image.shape[-2:]
        assert out["boxes"].shape[1] == 4 and len(out["boxes"]) == len(out["scores"]) == len(out["labels"])
        assert (out["boxes"][:, 2] <= w + 1e-3).all() and (out["boxes"][:, 3] <= h + 1e-3).all()
        assert ((out["labels"] >= 0) & (out["labels"] < 12)).all()
        assert (out["scores"][:-1] >= out["scores"][1:]).all()


def test_tsd_regression_is_decoded_against_the_translated_proposal():
    model = build_model(tiny_model_config())
    stage = model.roi_heads.stages[0]
    with torch.no_grad():
        stage.tsd.offsets.delta_r[-1].bias.copy_(torch.tensor([0.5, -0.25]))
    model.eval()
    images, _ = toy_batch()
    batch, _ = model.transform([i.float() / 255 for i in images])
    features = model.backbone(batch.tensors)
    proposals = [torch.tensor([[10.0, 10, 50, 90]]), torch.tensor([[0.0, 0, 20, 40]])]
    out = stage.run(features, proposals, with_sibling=False).main
    expected = torch.tensor([[12.0, 8, 52, 88], [1.0, -1, 21, 39]])  # gamma .1 * (w, h) * (.5, -.25)
    torch.testing.assert_close(out.reg_boxes, expected)
    torch.testing.assert_close(out.geometry.boxes_r, expected)
    decoded = stage.decode(dataclasses.replace(out, deltas=out.deltas * 0))
    torch.testing.assert_close(decoded[:, 0], expected)


@pytest.mark.parametrize("through_targets", [True, False])
def test_delta_r_gradient_through_regression_targets_is_a_switch(through_targets):
    torch.manual_seed(0)
    model = build_model(tiny_model_config(f"tsd.delta_r_grad_through_targets={str(through_targets).lower()}"))
    branches = model.roi_heads.stages[0].tsd.branches
    with torch.no_grad():  # zero regression output: the only path from dR to the box loss is the targets
        branches.bbox_pred.weight.zero_()
        branches.bbox_pred.bias.zero_()
    images, targets = toy_batch()
    model.train()
    model(images, targets)["loss_tsd_box"].backward()
    grad = model.roi_heads.stages[0].tsd.offsets.delta_r[-1].weight.grad
    assert (grad is not None and grad.abs().sum() > 0) == through_targets


def test_cascade_trains_with_stage_losses():
    model = build_model(tiny_model_config("cascade.enabled=true", "cascade.stage_weights=[1.0,0.5,0.25]"))
    images, targets = toy_batch()
    model.train()
    losses = model(images, targets)
    for i in range(3):
        assert {f"loss_tsd_cls_s{i}", f"loss_tsd_box_s{i}", f"loss_pc_cls_s{i}", f"loss_pc_loc_s{i}"} <= set(losses)
    assert all(math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()


@pytest.mark.parametrize("average", ["logits", "probs"])
def test_cascade_combines_the_stages_scores_as_configured(average, monkeypatch):
    """The authors average the stages' logits and take one softmax; "probs" averages the softmax
    scores. The scores that reach post-processing are checked against the stages' own logits."""
    import tsd_model.roi_heads as roi_heads_module

    torch.manual_seed(0)
    model = build_model(tiny_model_config("cascade.enabled=true", f"cascade.score_average={average}")).eval()
    for stage in model.roi_heads.stages:  # distinct, confident stages, so that the two rules differ
        torch.nn.init.normal_(stage.tsd.branches.cls_score.weight, std=0.5)
    stage_logits, post_scores = [], []
    for stage in model.roi_heads.stages:
        stage.tsd.register_forward_hook(lambda m, i, out: stage_logits.append(out.logits.detach().float()))
    real = roi_heads_module.postprocess_detections
    monkeypatch.setattr(roi_heads_module, "postprocess_detections",
                        lambda b, s, size, cfg: post_scores.append(s) or real(b, s, size, cfg))
    images, _ = toy_batch()
    with torch.no_grad():
        model(images)
    assert len(stage_logits) == 3
    mean_logits = torch.softmax(sum(stage_logits) / 3, dim=1)
    mean_probs = sum(torch.softmax(x, dim=1) for x in stage_logits) / 3
    expected, other = (mean_logits, mean_probs) if average == "logits" else (mean_probs, mean_logits)
    got = torch.cat(post_scores)
    torch.testing.assert_close(got, expected)
    assert (got - other).abs().max() > 1e-3  # the two rules are told apart by this test


def _stage_boxes_and_labels(model, images, targets):
    """What the second cascade stage is given in training, and what it draws: the first stage's
    sampled RoIs, the refined proposals with the mask of those the second stage must not draw,
    and the second stage's sample."""
    seen = {}
    stage0, stage1 = model.roi_heads.stages[:2]
    real_sample = stage0.sample
    stage0.sample = lambda p, t, e: seen.setdefault("sampled", real_sample(p, t, e))

    def second_sample(p, t, e):
        seen.update(proposals=p, excluded=e)
        seen["drawn"] = stage1.__class__.sample(stage1, p, t, e)
        return seen["drawn"]

    stage1.sample = second_sample
    model.train()
    model(images, targets)
    return seen["sampled"], seen["proposals"], seen["excluded"], seen["drawn"]


@pytest.mark.parametrize("drop_gt", [True, False])
def test_cascade_training_refines_without_the_gt_proposals_and_clips_to_the_image(drop_gt):
    """The gt boxes added as proposals are not passed on (the authors): the next stage never draws
    them (they stay in its proposals, masked, so that no count waits for the GPU)."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config("cascade.enabled=true", f"cascade.drop_gt_before_refine={str(drop_gt).lower()}"))
    with torch.no_grad():  # large deltas: refined boxes leave the image unless clipped
        model.roi_heads.stages[0].tsd.branches.bbox_pred.bias.fill_(3.0)
    images, targets = toy_batch()
    sampled, refined, excluded, drawn = _stage_boxes_and_labels(model, images, targets)
    for i, boxes in enumerate(refined):
        from_gt = sampled.from_gt.split(sampled.counts)[i]
        valid = sampled.valid.split(sampled.counts)[i]
        assert (from_gt & valid).sum() > 0  # the gt boxes were sampled as positives...
        assert len(boxes) == sampled.counts[i]
        assert excluded[i].tolist() == ((from_gt if drop_gt else torch.zeros_like(from_gt)) | ~valid).tolist()
        # ...and the second stage draws none of the excluded, refined boxes (it may add the gt again)
        own = drawn.boxes[i][drawn.valid.split(drawn.counts)[i] & ~drawn.from_gt.split(drawn.counts)[i]]
        same = (own[:, None, :] == boxes[None, :, :]).all(dim=2)  # [drawn, refined]
        assert same.any(dim=1).all()
        assert not (same & excluded[i][None, :]).any()
        assert (same & ~excluded[i][None, :] & from_gt[None, :]).any() == (not drop_gt)
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert sampled.from_gt.sum() > 0


def test_cascade_test_refines_with_the_argmax_over_all_classes_background_included():
    from tsd_model.heads import HeadOutput
    from tsd_model.roi_heads import RoIHeads, StageOutput

    model = build_model(tiny_model_config("cascade.enabled=true"))
    heads: RoIHeads = model.roi_heads
    stage = heads.stages[0]
    logits = torch.tensor([[5.0, 1.0, 2.0] + [0.0] * 10, [0.0, 1.0, 4.0] + [0.0] * 10])  # RoI 0: background wins
    deltas = torch.zeros(2, 13, 4)
    deltas[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # background's deltas grow the box
    boxes = torch.tensor([[10.0, 10, 30, 30], [40.0, 40, 60, 60]])
    out = StageOutput(None, HeadOutput(logits, deltas, boxes))
    refined = heads.refine(stage, out, [(100, 100)], [2])[0]
    assert (refined[0, 2:] - refined[0, :2] > 20.0).all()  # RoI 0 moved by background's deltas (w * e^{0.2})
    torch.testing.assert_close(refined[1], boxes[1])  # RoI 1 by class 2's zero deltas
    heads.refine_with_background = False
    refined = heads.refine(stage, out, [(100, 100)], [2])[0]
    torch.testing.assert_close(refined[0], boxes[0])  # RoI 0 by class 2 (best foreground): zero deltas


@pytest.mark.parametrize("head", ["sibling", "double"])
def test_baseline_heads_train_and_infer(head):
    model = build_model(tiny_model_config(f"roi.head={head}"))
    images, targets = toy_batch()
    model.train()
    losses = model(images, targets)
    assert f"loss_{head}_cls" in losses and "loss_pc_cls" not in losses
    model.eval()
    with torch.no_grad():
        assert len(model(images)) == 2


@pytest.mark.parametrize("dcn", ["v1", "v2"])
def test_dcn_backbones_start_as_the_plain_network(dcn):
    cfg = ModelConfig(num_classes=3)
    cfg.backbone.dcn = dcn
    plain_cfg = ModelConfig(num_classes=3)
    torch.manual_seed(0)
    plain = build_model(plain_cfg).backbone.eval()
    deformable = build_model(cfg).backbone.eval()
    convs = [m for m in deformable.modules() if type(m).__name__ == "DeformableConv2d"]
    assert len(convs) == 4 + 6 + 3  # every bottleneck of c3-c5 in ResNet-50
    deformable.load_state_dict(plain.state_dict(), strict=False)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = plain(x), deformable(x)
    if dcn == "v1":
        torch.testing.assert_close(a["0"], b["0"], atol=1e-4, rtol=1e-4)
    assert all(torch.isfinite(v).all() for v in b.values())


def test_autocast_bf16_training_step_on_cpu():
    model = build_model(tiny_model_config())
    images, targets = toy_batch()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(v.dtype == torch.float32 and math.isfinite(v.item()) for v in losses.values())
    sum(losses.values()).backward()


def test_soft_nms_decays_instead_of_removing():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep, new = soft_nms(boxes, scores, 0.3, 0.5, "linear", 0.001)
    iou = 90 / 110
    assert keep.tolist() == [0, 2, 1]
    torch.testing.assert_close(new, torch.tensor([0.9, 0.7, 0.8 * (1 - iou)]))
    keep_g, new_g = soft_nms(boxes, scores, 0.3, 0.5, "gaussian", 0.001)
    torch.testing.assert_close(new_g[2], torch.tensor(0.8 * math.exp(-(iou**2) / 0.5)))


def test_postprocess_threshold_nms_and_max_detections():
    boxes = torch.tensor([[[0.0, 0, 1, 1], [0, 0, 10, 10], [0, 0, 10, 10]],
                          [[0.0, 0, 1, 1], [1, 0, 11, 10], [20, 20, 30, 30]]])
    scores = torch.tensor([[0.1, 0.8, 0.04], [0.1, 0.7, 0.6]])
    out = postprocess_detections(boxes, scores, (100, 100), TestConfig(score_thresh=0.05, nms_iou=0.5))
    assert out["labels"].tolist() == [0, 1] and out["scores"].tolist() == pytest.approx([0.8, 0.6])
    capped = postprocess_detections(boxes, scores, (100, 100), TestConfig(score_thresh=0.05, max_detections=1))
    assert len(capped["scores"]) == 1
    soft = postprocess_detections(boxes, scores, (100, 100), TestConfig(score_thresh=0.05, nms="soft_gaussian"))
    assert len(soft["scores"]) == 3  # the overlapping class-0 box is decayed, not removed


def _crowded_detections(n: int, classes: int, seed: int = 0):
    """Many overlapping boxes over few positions, many classes, distinct scores (no ties)."""
    g = torch.Generator().manual_seed(seed)
    corner = torch.randint(0, 6, (n, 2), generator=g).float() * 4
    size = 8 + torch.randint(0, 3, (n, 2), generator=g).float() * 2
    boxes = torch.cat([corner, corner + size], dim=1)
    return boxes, torch.randperm(n, generator=g).float() / n, torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("chunk", [1, 7, 100, 5000])
@pytest.mark.parametrize("wanted", [1, 25, 100, 10_000])
def test_top_class_nms_gives_the_best_boxes_batched_nms_keeps_in_its_order(chunk, wanted):
    """One NMS call per chunk of candidates (best first), each suppressed by the boxes kept so far:
    the first ``wanted`` kept are ``batched_nms``'s, whether one chunk or hundreds are needed."""
    from torchvision.ops import batched_nms

    from tsd_model.postprocess import top_class_nms

    boxes, scores, labels = _crowded_detections(3000, 40)
    reference = batched_nms(boxes, scores, labels, 0.5)
    assert 200 < len(reference) < 2000  # some suppressed, more kept than the smaller ``wanted``
    kept = top_class_nms(boxes, scores, labels, 0.5, wanted, chunk=chunk)
    assert len(kept) >= min(wanted, len(reference))
    assert kept[:wanted].tolist() == reference[:wanted].tolist()
    if wanted >= len(reference):
        assert kept.tolist() == reference.tolist()
    assert top_class_nms(boxes[:0], scores[:0], labels[:0], 0.5, wanted).numel() == 0


def test_postprocess_drops_boxes_below_the_score_or_size_in_one_selection():
    boxes = torch.tensor([[[0.0, 0, 5, 5], [0, 0, 5, 5], [10, 10, 10.005, 20], [30, 30, 40, 40]]]).expand(3, -1, -1)
    boxes = boxes + torch.arange(3.0).view(3, 1, 1) * 45  # three RoIs far apart: nothing suppressed
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.04]]).expand(3, -1) * torch.tensor([[1.0], [0.9], [0.8]])
    with HostReads() as reads:
        out = postprocess_detections(boxes, scores, (200, 200), TestConfig(score_thresh=0.05, nms_iou=0.5))
    # class 0 kept in each RoI, class 1 too narrow (5e-3 px), class 2 below the score threshold
    assert out["labels"].tolist() == [0, 0, 0]
    torch.testing.assert_close(out["scores"], torch.tensor([0.9, 0.81, 0.72]))
    assert reads.calls.count("nonzero") == 1, reads.summary()  # the score and size tests: one selection


def test_tta_merges_scales_and_flips():
    model = build_model(tiny_model_config())
    images, _ = toy_batch()
    out = model.detect_tta(images, scales=[128, 160], flip=True, test=TestConfig(score_thresh=0.0, max_detections=30))
    assert len(out) == 2
    for o, image in zip(out, images, strict=True):
        assert len(o["boxes"]) == 30 and (o["boxes"][:, 2] <= image.shape[-1] + 1e-3).all()
    assert model.transform.min_size == (160,)  # restored


def test_tta_mirrors_the_flipped_pass_back():
    """TTA of a mirrored image is the mirror of TTA of the image: the flipped pass's boxes were mapped
    back (without that, both would be the same set of unmirrored boxes)."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config()).eval()
    image = toy_batch()[0][0]
    test = TestConfig(score_thresh=0.0, max_detections=40)
    plain = model.detect_tta([image], scales=[160], flip=True, test=test)[0]
    mirrored = model.detect_tta([image.flip(-1)], scales=[160], flip=True, test=test)[0]
    w = image.shape[-1]
    b = plain["boxes"]
    mirror = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    order_a = torch.argsort(plain["scores"] * 1000 + plain["labels"])
    order_b = torch.argsort(mirrored["scores"] * 1000 + mirrored["labels"])
    torch.testing.assert_close(mirrored["scores"][order_b], plain["scores"][order_a], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mirrored["boxes"][order_b], mirror[order_a], atol=1e-3, rtol=1e-4)
    assert (mirror - b).abs().max() > 1.0  # not symmetric by accident


def test_backbone_weights_load_by_name_and_errors_are_clear(tmp_path):
    resnet = torchvision.models.resnet50(weights=None)
    path = tmp_path / "r50.pth"
    torch.save({"state_dict": resnet.state_dict()}, path)
    cfg = ModelConfig(num_classes=3)
    cfg.backbone.dcn = "v1"
    cfg.weights.backbone = str(path)
    model = build_model(cfg)
    torch.testing.assert_close(model.backbone.body.layer3[0].conv2.weight, resnet.layer3[0].conv2.weight)
    torch.testing.assert_close(model.backbone.body.conv1.weight, resnet.conv1.weight)
    cfg.weights.backbone = str(tmp_path / "missing.pth")
    with pytest.raises(InputError, match="weights file not found"):
        build_model(cfg)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    cfg.weights.backbone = str(tmp_path / "r18.pth")
    with pytest.raises(InputError, match="shape"):
        build_model(cfg)


def test_full_checkpoint_round_trip(tmp_path):
    model = build_model(tiny_model_config())
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict()}, path)
    again = build_model(tiny_model_config(f"weights.checkpoint={path}"))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    with pytest.raises(InputError, match="does not match"):
        build_model(tiny_model_config("roi.head=double", f"weights.checkpoint={path}"))


def test_gradients_do_not_depend_on_how_a_batch_is_split():
    """Losses are per-image means averaged over images: one batch of two images gives the mean of
    the two single-image gradients, which is what data-parallel workers average."""
    overrides = ("backbone.norm=frozen_bn", "rpn.batch_size_per_image=100000", "roi.batch_size_per_image=100000",
                 "rpn.positive_fraction=1.0", "roi.positive_fraction=1.0")
    torch.manual_seed(0)
    model = build_model(tiny_model_config(*overrides)).train()
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 255, (3, 128, 160), dtype=torch.uint8, generator=g) for _ in range(2)]
    _, targets = toy_batch()

    def grads(imgs, tgts):
        model.zero_grad()
        sum(model(imgs, tgts).values()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    together = grads(images, targets)
    first, second = grads(images[:1], targets[:1]), grads(images[1:], targets[1:])
    for name, grad in together.items():
        torch.testing.assert_close(grad, (first[name] + second[name]) / 2, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("rois", [2, 7])  # fewer / more RoIs than outputs: either copy is the smaller
def test_pooled_linear_reads_channels_last_features_like_flattened_ones(rois):
    from tsd_model.heads import PooledLinear

    torch.manual_seed(0)
    layer = PooledLinear(8, 3, 5)
    pooled = torch.randn(rois, 3, 3, 8).permute(0, 3, 1, 2)  # [K, C, k, k], channels-last memory
    assert pooled.is_contiguous(memory_format=torch.channels_last) and not pooled.is_contiguous()
    plain = pooled.contiguous().requires_grad_()
    pooled.requires_grad_()

    def reference(x):
        return torch.nn.functional.linear(x.flatten(1), layer.weight, layer.bias)

    out = layer(pooled)
    torch.testing.assert_close(out, reference(plain))
    grad = torch.randn_like(out)
    out.backward(grad)
    weight_grad, layer.weight.grad = layer.weight.grad.clone(), None
    reference(plain).backward(grad)
    torch.testing.assert_close(pooled.grad, plain.grad)
    torch.testing.assert_close(weight_grad, layer.weight.grad)
    with torch.no_grad():  # inference keeps the reordered weight while the weight is unchanged...
        torch.testing.assert_close(layer(pooled), reference(plain))
        layer.weight.mul_(2)  # ...and notices an update (an optimizer step, a loaded checkpoint)
        torch.testing.assert_close(layer(pooled), reference(plain))


def test_pooled_linear_built_under_inference_mode():
    from tsd_model.heads import PooledLinear

    with torch.inference_mode():  # parameters made here are inference tensors (no version counter)
        layer = PooledLinear(4, 2, 3)
        pooled = torch.randn(5, 2, 2, 4).permute(0, 3, 1, 2)
        expected = torch.nn.functional.linear(pooled.contiguous().flatten(1), layer.weight, layer.bias)
        torch.testing.assert_close(layer(pooled), expected)


def test_adj_nms_rescoring_with_soft_nms_then_a_hard_nms():
    from tsd_model.postprocess import class_aware_nms

    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 12], [50, 50, 60, 60]])
    scores = torch.tensor([0.9, 0.8, 0.75, 0.7])
    labels = torch.tensor([0, 0, 1, 0])
    keep, new, kept = class_aware_nms(boxes, scores, labels, TestConfig(nms="adj", nms_iou=0.5, soft_nms_sigma=0.5,
                                                                        score_thresh=0.01))
    # class 0: box 1 (IoU 9/11 with box 0) is decayed to .8 exp(-(9/11)^2 / .5), then removed by the hard NMS;
    # box 2 is alone in class 1; box 3 overlaps nothing
    assert keep.tolist() == [0, 2, 3]
    torch.testing.assert_close(new, torch.tensor([0.9, 0.75, 0.7]))
    torch.testing.assert_close(kept, boxes[[0, 2, 3]])


def test_voting_moves_a_kept_box_to_the_weighted_mean_of_its_top_k_neighbours():
    from tsd_model.postprocess import class_aware_nms

    boxes = torch.tensor([[0.0, 0, 10, 10], [2, 0, 12, 10], [0, 1, 10, 11], [1, 0, 11, 10], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.6, 0.3, 0.1, 0.8])
    labels = torch.tensor([0, 0, 0, 0, 1])  # the last box is another class: no vote
    cfg = TestConfig(nms="voting", nms_iou=0.5, vote_iou=0.6, vote_top_k=3)
    keep, new, kept = class_aware_nms(boxes, scores, labels, cfg)
    assert keep.tolist() == [0, 4]
    # voters of box 0 (IoU >= .6, best 3): itself (.9), box 1 (.6, IoU 8/12), box 2 (.3, IoU 9/11); box 3 is the 4th
    expected = (0.9 * boxes[0] + 0.6 * boxes[1] + 0.3 * boxes[2]) / 1.8
    torch.testing.assert_close(kept[0], expected)
    torch.testing.assert_close(kept[1], boxes[4])
    torch.testing.assert_close(new, torch.tensor([0.9, 0.8]))

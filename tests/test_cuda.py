"""The CUDA paths: pooling and the detector agree with the CPU, and an fp16 AMP training step works.

Skipped where there is no GPU (CI); run on a GPU machine with ``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torchvision.ops import roi_align

from pipeline.train import train_step
from tests import pooling_reference as ref
from tests.model_utils import tiny_model_config, toy_batch
from tests.test_ops import _border_case
from tsd_model.build import build_model
from tsd_model.ops import RULES, deform_roi_pool

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@contextmanager
def syncs_are_errors() -> Iterator[None]:
    """Any call under it that synchronises with the GPU raises, at that call (the queue is drained first)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 16, 50, 60, generator=g)
    xy = torch.rand(64, 2, generator=g) * 150
    wh = torch.rand(64, 2, generator=g) * 80 + 4
    rois = torch.cat([torch.randint(0, 2, (64, 1), generator=g).float(), xy, xy + wh], dim=1)
    offsets = torch.randn(64, 7, 7, 2, generator=g) * 0.05  # of the RoI's extent
    return features, rois, offsets


@pytest.mark.parametrize("rule", sorted(RULES))
def test_deform_roi_pool_on_cuda_equals_cpu_forward_and_backward(rule):
    features, rois, offsets = _inputs()
    results = {}
    for device in ("cpu", "cuda"):
        f = features.to(device, copy=True).requires_grad_(True)
        o = offsets.to(device, copy=True).requires_grad_(True)
        out = deform_roi_pool(f, rois.to(device), o, 7, 0.25, 4, RULES[rule])
        out.pow(2).sum().backward()
        results[device] = [t.detach().cpu() for t in (out, f.grad, o.grad)]
    for cpu, gpu in zip(results["cpu"], results["cuda"], strict=True):
        torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rule", ["aligned", "authors_deform"])
def test_float64_pooling_on_cuda_equals_the_loop_reference(rule):
    features, rois, offsets = _border_case()
    got = deform_roi_pool(features.to(CUDA), rois.to(CUDA), offsets.to(CUDA), 3, 0.5, 4, RULES[rule]).cpu()
    if rule == "aligned":
        expected = ref.roi_align(features, rois, offsets, 3, 0.5, 4, aligned=True)
    else:
        expected = ref.authors_deform(features, rois, offsets, 3, 0.5, 4)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_zero_offsets_equal_roi_align_on_cuda():
    features, rois, _ = _inputs(1)
    features, rois = features.to(CUDA), rois.to(CUDA)
    expected = roi_align(features, rois, 7, spatial_scale=0.25, sampling_ratio=2, aligned=True)
    got = deform_roi_pool(features, rois, torch.zeros(64, 7, 7, 2, device=CUDA), 7, 0.25, 2)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)  # float32 sums in another order


def test_pooling_keeps_float32_under_fp16_autocast():
    features, rois, offsets = _inputs(2)
    with torch.autocast("cuda", dtype=torch.float16):
        out = deform_roi_pool(features.to(CUDA).half(), rois.to(CUDA), offsets.to(CUDA), 7, 0.25, 2)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_detector_inference_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = build_model(tiny_model_config()).eval()
    images, _ = toy_batch()
    with torch.no_grad():
        cpu = model(images)
        gpu = model.to(CUDA)([im.to(CUDA) for im in images])
    for c, g in zip(cpu, gpu, strict=True):
        assert g["boxes"].device.type == "cuda"
        n = min(len(c["scores"]), len(g["scores"]), 10)  # the top detections; ties may reorder the tail
        torch.testing.assert_close(g["scores"][:n].cpu(), c["scores"][:n], atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(g["boxes"][:n].cpu(), c["boxes"][:n], atol=1e-2, rtol=1e-3)


def test_fp16_amp_training_steps_with_grad_scaler_are_finite_and_learn():
    torch.manual_seed(0)
    model = build_model(tiny_model_config()).to(CUDA).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")
    images, targets = toy_batch()
    images = [im.to(CUDA) for im in images]
    targets = [{k: v.to(CUDA) for k, v in t.items()} for t in targets]
    totals, applied = [], 0
    for _ in range(30):
        step = train_step(model, optimizer, scaler, images, targets, 1, torch.float16, 10.0)
        assert step.finite  # fp16 overflows are the scaler's business, not non-finite losses
        assert all(v.dtype == torch.float32 for v in step.losses.values())
        assert math.isfinite(step.grad_norm) == step.applied
        applied += step.applied
        totals.append(float(sum(step.losses.values())))
    assert applied >= 25  # the scaler skips a few steps while it finds its scale
    assert sum(totals[-5:]) / 5 < 0.75 * sum(totals[:5]) / 5
    assert {"loss_tsd_cls", "loss_pc_cls", "loss_pc_loc", "loss_sibling_cls"} <= set(step.losses)


@pytest.mark.parametrize("modulated", [False, True])
def test_sampled_deform_conv_on_cuda_equals_torchvision_s_kernel(modulated):
    """The grid_sample + matmul deformable conv against torchvision's CUDA kernel: float64 to
    rounding, forward and backward; under fp16 autocast within AMP tolerance."""
    from torchvision.ops import deform_conv2d as torchvision_deform_conv2d

    from tests.test_deform_conv import _inputs as dcn_inputs
    from tsd_model.deform_conv import deform_conv2d_sampled

    x, offset, weight, bias, mask, _ = dcn_inputs(2, 32, 14, 18, 16, 4, 1, 3, 1, 1, 1, modulated)
    tensors = [t.detach().to(CUDA).requires_grad_(True) if t is not None else None for t in (x, offset, weight, bias, mask)]
    x, offset, weight, bias, mask = tensors
    ours = deform_conv2d_sampled(x, offset, weight, bias, 1, 1, 1, mask)
    reference = torchvision_deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask)
    torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)
    inputs = [t for t in tensors if t is not None]
    grad_out = torch.randn_like(reference)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad_out), torch.autograd.grad(reference, inputs, grad_out),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)
    half = [t.detach().float().requires_grad_(True) if t is not None else None for t in tensors]
    with torch.autocast("cuda", dtype=torch.float16):
        ours16 = deform_conv2d_sampled(half[0], half[1], half[2], half[3], 1, 1, 1, half[4])
    torch.testing.assert_close(ours16.float(), reference.float(), rtol=2e-2, atol=2e-1)
    ours16.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in half if t is not None)


def test_p_pooled_by_roi_align_on_cuda_equals_the_table_gather():
    """``roi.pool_kernel: auto`` pools P with roi_align's CUDA kernel: the same values and
    gradients as the table gather on the same device."""
    from tests.test_ops import p_pooling_case, pool_p
    from tsd_model.ops import ALIGNED

    case = p_pooling_case(200, 8)
    table_out, table_grads, _, table_took_roi_align = pool_p(*case, ALIGNED, "table", "cuda")
    out, grads, _, took_roi_align = pool_p(*case, ALIGNED, "auto", "cuda")
    assert took_roi_align and not table_took_roi_align
    torch.testing.assert_close(out, table_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, table_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_roi_stages_on_cuda_equal_eager_under_amp(mode):
    """``roi.compile`` with inductor (and CUDA graphs): the eager model's losses, gradients and
    detections within fp16 tolerance, over steps that replay the compiled graphs."""
    from tests.test_compiled_stage import eager_and_compiled
    from tsd_model.compiled_stage import CompileOptions

    images, targets = toy_batch()
    images = [im.to(CUDA) for im in images]
    targets = [{k: v.to(CUDA) for k, v in t.items()} for t in targets]
    runs = []
    for model in eager_and_compiled(options=CompileOptions(mode, "inductor")):
        model.to(CUDA)
        steps = []
        for step in range(3):  # the first compiles (and records), the others replay
            model.train()
            torch.manual_seed(step)
            with torch.autocast("cuda", dtype=torch.float16):
                losses = model(images, targets)
            sum(losses.values()).backward()
            grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
            model.eval()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
                detections = model(images)
            steps.append(({k: v.float() for k, v in losses.items()}, grads, detections))
        runs.append(steps)
    for (losses, grads, detections), (c_losses, c_grads, c_detections) in zip(*runs, strict=True):
        assert losses.keys() == c_losses.keys() and grads.keys() == c_grads.keys()
        for name in losses:
            torch.testing.assert_close(c_losses[name], losses[name], rtol=2e-2, atol=2e-3, msg=name)
        for name in grads:
            scale = grads[name].abs().max().clamp(min=1e-6)
            assert (c_grads[name] - grads[name]).abs().max() <= 3e-2 * scale, name
        for eager, compiled in zip(detections, c_detections, strict=True):
            n = min(len(eager["scores"]), len(compiled["scores"]), 10)
            torch.testing.assert_close(compiled["scores"][:n], eager["scores"][:n], atol=1e-2, rtol=1e-2)


def test_the_feature_table_and_the_loss_weights_do_not_wait_for_the_gpu():
    """No host-to-device copies of Python numbers per step: each would wait for the GPU's queue."""
    from tsd_model.losses import per_image_weights
    from tsd_model.ops import FeatureTable

    maps = [torch.randn(2, 8, 40, 48, device=CUDA), torch.randn(2, 8, 20, 24, device=CUDA)]
    mask = torch.rand(8, device=CUDA) > 0.5
    FeatureTable.build(maps, [0.25, 0.125])  # the layout's small tensors are made once, here
    with syncs_are_errors():
        table = FeatureTable.build(maps, [0.25, 0.125], num_rows=FeatureTable.rows_needed(maps) + 64)
        weights = per_image_weights([3, 0, 5], device=CUDA)
        masked = per_image_weights([3, 0, 5], mask)
    assert table.rows.shape[0] == 2 * (40 * 48 + 20 * 24) + 64
    assert weights.device.type == masked.device.type == "cuda"


@pytest.mark.parametrize("overrides", [(), ("cascade.enabled=true",), ("roi.classification=sigmoid",)],
                         ids=["tsd", "cascade", "sigmoid"])
def test_a_training_step_of_the_roi_heads_does_not_wait_for_the_gpu(overrides):
    """Sampling (``RoISampler``), pooling by the table gather, heads, losses and backward: no call
    of the RoI heads synchronises with the GPU (the CPU twin, ``tests/test_roi_sampling.py``,
    counts data-dependent sizes; this one catches device-to-host copies too)."""
    from tests.test_roi_sampling import _inputs as roi_inputs

    torch.manual_seed(0)
    model = build_model(tiny_model_config("roi.pool_kernel=table", *overrides)).to(CUDA)
    images, targets = toy_batch()
    images = [img.to(CUDA) for img in images]
    targets = [{k: v.to(CUDA) for k, v in t.items()} for t in targets]
    features, proposals, sizes, targets = roi_inputs(model, images, targets)
    with syncs_are_errors():
        _, losses = model.roi_heads(features, proposals, sizes, targets)
        sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


def test_the_rpn_training_targets_and_losses_do_not_wait_for_the_gpu():
    """The RPN's matching, draw, losses and backward (an image without boxes too) never synchronise."""
    from tests.test_roi_sampling import _rpn_targets

    rpn, anchors, objectness, deltas, targets = _rpn_targets()
    rpn = rpn.to(CUDA)
    anchors = [a.to(CUDA) for a in anchors]
    objectness, deltas = objectness.detach().to(CUDA).requires_grad_(), deltas.detach().to(CUDA).requires_grad_()
    targets = [{k: v.to(CUDA) for k, v in t.items()} for t in targets]
    with syncs_are_errors():
        labels, matched = rpn.assign_targets_to_anchors(anchors, targets)
        obj, box = rpn.compute_loss(objectness, deltas, labels, rpn.box_coder.encode(matched, anchors))
        (obj + box).backward()
    assert torch.isfinite(obj) and torch.isfinite(box) and torch.isfinite(deltas.grad).all()


def test_cuda_syncs_counts_what_synchronises_and_nothing_else():
    """``host_reads.cuda_syncs`` (what ``bench/profile_model.py`` reports on CUDA) sees a ``nonzero``
    and an ``item``, and not an elementwise kernel."""
    from tsd_model.host_reads import cuda_syncs

    x = torch.arange(6.0, device=CUDA)
    torch.cuda.synchronize()
    with cuda_syncs() as quiet:
        (x * 2 + 1).exp_()
    with cuda_syncs() as syncs:
        x.nonzero()
        x.sum().item()
    assert quiet == [] and len(syncs) == 2, (quiet, syncs)


def test_postprocessing_on_cuda_equals_cpu_with_a_few_syncs_not_two_per_class():
    """The authors' COCO setting (score threshold 0: 1,000 RoIs x 80 classes) on CUDA: the same
    detections as on the CPU (torchvision's per-class NMS there), through ``top_class_nms``, with
    one selection and one NMS call per chunk instead of two syncs per class."""
    from tsd_model.config import TestConfig
    from tsd_model.host_reads import cuda_syncs
    from tsd_model.postprocess import postprocess_detections

    g = torch.Generator().manual_seed(0)
    corner = (torch.rand(1000, 1, 2, generator=g) * 700).expand(-1, 81, -1)  # one place per RoI, a box per class
    boxes = torch.cat([corner, corner + 20 + torch.rand(1000, 81, 2, generator=g) * 80], dim=2)
    scores = torch.randperm(1000 * 81, generator=g).float().view(1000, 81) / (1000 * 81)  # distinct: no ties to order
    cfg = TestConfig(score_thresh=0.0, max_detections=100)
    cpu = postprocess_detections(boxes, scores, (800, 800), cfg)
    on_gpu = boxes.to(CUDA), scores.to(CUDA)
    postprocess_detections(*on_gpu, (800, 800), cfg)  # warm-up
    torch.cuda.synchronize()
    with cuda_syncs() as syncs:
        gpu = postprocess_detections(*on_gpu, (800, 800), cfg)
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], atol=1e-4, rtol=1e-5)
    assert len(syncs) <= 6, syncs  # the selection and the NMS of each chunk (per class it was ~160)

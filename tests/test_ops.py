"""Deformable RoI pooling: every sampling rule equals a loop transcription of its kernel (forward and
gradients, non-zero offsets, borders), the aligned rule equals roi_align with zero offsets."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from tests import pooling_reference as ref
from tsd_model.ops import (
    ALIGNED,
    AUTHORS_DEFORM,
    MMDET_V1_ROI_ALIGN,
    TORCHVISION_LEGACY,
    MultiScaleDeformRoIPool,
    deform_roi_pool,
    fpn_levels,
    rois_of,
)

STRIDES = [4, 8, 16, 32]


def _rois(n: int, dtype=torch.float32, seed: int = 0, size: float = 100.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + 2
    batch = torch.randint(0, 2, (n, 1), generator=g).float()
    return torch.cat([batch, xy, xy + wh], dim=1).to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-12)])
@pytest.mark.parametrize("sampling", [1, 2, 4])
def test_zero_offsets_equal_roi_align(dtype, tol, sampling):
    features = torch.randn(2, 8, 40, 50, dtype=dtype, generator=torch.Generator().manual_seed(1))
    rois = _rois(30, dtype)
    expected = roi_align(features, rois, 7, spatial_scale=0.25, sampling_ratio=sampling, aligned=True)
    for offsets in (None, torch.zeros(30, 7, 7, 2, dtype=dtype)):
        got = deform_roi_pool(features, rois, offsets, 7, 0.25, sampling)
        assert got.dtype == dtype and got.shape == (30, 8, 7, 7)
        assert got.is_contiguous(memory_format=torch.channels_last)  # what the heads' first fc reads
        torch.testing.assert_close(got, expected, atol=tol, rtol=0)
    legacy = roi_align(features, rois, 7, spatial_scale=0.25, sampling_ratio=sampling, aligned=False)
    torch.testing.assert_close(deform_roi_pool(features, rois, None, 7, 0.25, sampling, TORCHVISION_LEGACY), legacy,
                               atol=tol, rtol=0)


def _reference(rule, features, rois, offsets, k, scale, s):
    if rule is AUTHORS_DEFORM:
        return ref.authors_deform(features, rois, offsets, k, scale, s)
    return ref.roi_align(features, rois, offsets, k, scale, s, aligned=rule is ALIGNED,
                         plus_one=rule is MMDET_V1_ROI_ALIGN)


def _border_case(seed: int = 7):
    """Small maps; RoIs inside, across every border and partly beyond, tiny ones; offsets of ~0.3 of
    the box, so that samples leave the map."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 3, 9, 11, dtype=torch.float64, generator=g)
    rois = torch.tensor([[0, 3.3, 4.1, 20.7, 25.2], [1, 10.2, 2.5, 30.9, 18.4], [0, -6.1, 1.7, 12.3, 30.6],
                         [1, 30.4, 20.2, 47.9, 39.6], [0, 14.6, 14.4, 15.1, 15.3], [1, -3.5, -2.5, 50.2, 41.5]],
                        dtype=torch.float64)
    offsets = torch.randn(len(rois), 3, 3, 2, dtype=torch.float64, generator=g) * 0.3
    return features, rois, offsets


@pytest.mark.parametrize("rule", [ALIGNED, TORCHVISION_LEGACY, MMDET_V1_ROI_ALIGN, AUTHORS_DEFORM], ids=lambda r: r.name)
@pytest.mark.parametrize("s", [2, 4])
def test_every_rule_equals_its_loop_reference_with_offsets(rule, s):
    features, rois, offsets = _border_case()
    features.requires_grad_()
    offsets.requires_grad_()
    got = deform_roi_pool(features, rois, offsets, 3, 0.5, s, rule)
    expected = _reference(rule, features, rois, offsets, 3, 0.5, s)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    upstream = torch.randn_like(got)
    grads = torch.autograd.grad(got, (features, offsets), upstream)
    expected_grads = torch.autograd.grad(expected, (features, offsets), upstream)
    for name, a, b in zip(("features", "offsets"), grads, expected_grads, strict=True):
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=name)
    zero = torch.zeros_like(offsets)
    torch.testing.assert_close(deform_roi_pool(features, rois, zero, 3, 0.5, s, rule),
                               _reference(rule, features, rois, zero, 3, 0.5, s), atol=1e-12, rtol=0)


def test_the_authors_rule_differs_from_roi_align_plus_offsets():
    """What ``tsd.pooling`` chooses between: the same offsets give clearly different features."""
    features, rois, offsets = _border_case(11)
    aligned = deform_roi_pool(features, rois, offsets, 3, 0.5, 4, ALIGNED)
    authors = deform_roi_pool(features, rois, offsets, 3, 0.5, 4, AUTHORS_DEFORM)
    assert (aligned - authors).abs().max() > 0.3


def test_the_authors_rule_averages_only_the_samples_inside():
    """A bin whose samples half leave the map averages the half that stays (not a division by s^2)."""
    features = torch.arange(1.0, 17.0, dtype=torch.float64).view(1, 1, 4, 4)
    # round(0) - 0.5 = -0.5 .. round(3) + 1 - 0.5 = 3.5: a 4-pixel RoI, one bin, 2x2 samples at -0.5 and 1.5
    rois = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]], dtype=torch.float64)
    shift_left = torch.tensor([-0.25, 0.0], dtype=torch.float64).view(1, 1, 1, 2)  # a pixel left: x = -1.5, 0.5
    out = deform_roi_pool(features, rois, shift_left, 1, 1.0, 2, AUTHORS_DEFORM)
    # samples kept: x = 0.5 at y = 0 (clamped from -0.5) and y = 1.5 -> mean of f(0, .5) and f(1.5, .5)
    expected = ((1.0 + 2.0) / 2 + (5.0 + 6.0 + 9.0 + 10.0) / 4) / 2
    assert out.item() == pytest.approx(expected)


@pytest.mark.parametrize("rule", [ALIGNED, AUTHORS_DEFORM], ids=lambda r: r.name)
def test_gradcheck_features_and_offsets(rule):
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 3, 9, 11, dtype=torch.float64, generator=g, requires_grad=True)
    rois = torch.tensor([[0, 3.3, 4.1, 20.7, 25.2], [1, 10.2, 2.5, 30.9, 18.4], [0, 1.1, 1.7, 12.3, 30.6]],
                        dtype=torch.float64)
    offsets = (torch.randn(3, 3, 3, 2, dtype=torch.float64, generator=g) * 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f, o: deform_roi_pool(f, rois, o, 3, 0.5, 2, rule), (features, offsets),
                                    eps=1e-6, atol=1e-5)


def test_a_whole_grid_shift_equals_pooling_the_translated_box():
    features = torch.randn(1, 4, 32, 32, dtype=torch.float64)
    rois = torch.tensor([[0, 20.0, 24.0, 60.0, 70.0]], dtype=torch.float64)
    shift = torch.tensor([6.5, -3.25], dtype=torch.float64)
    relative = shift / torch.tensor([40.0, 46.0], dtype=torch.float64)  # offsets are in units of the RoI's extent
    moved = deform_roi_pool(features, rois, relative.expand(1, 7, 7, 2), 7, 0.25, 2)
    translated = rois.clone()
    translated[0, 1:] += shift.repeat(2)
    torch.testing.assert_close(moved, deform_roi_pool(features, translated, None, 7, 0.25, 2))


def test_per_bin_offsets_move_only_their_bin():
    features = torch.randn(1, 2, 32, 32, dtype=torch.float64)
    rois = torch.tensor([[0, 20.0, 20.0, 90.0, 90.0]], dtype=torch.float64)
    offsets = torch.zeros(1, 7, 7, 2, dtype=torch.float64)
    offsets[0, 2, 5] = torch.tensor([0.1, 0.05])  # of the RoI's 70 pixels: 7 and 3.5
    base = deform_roi_pool(features, rois, None, 7, 0.25, 2)
    moved = deform_roi_pool(features, rois, offsets, 7, 0.25, 2)
    changed = (moved - base).abs().sum(dim=1)[0] > 1e-9
    assert changed[2, 5] and changed.sum() == 1


def test_boxes_reaching_outside_the_map_follow_roi_align():
    # roi_align clamps samples up to one pixel outside the map and zeroes those further out
    features = torch.randn(2, 3, 10, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    rois = torch.tensor([[0, -30.0, -20, 20, 25], [1, 30, 10, 70, 60], [0, -12, 35, 60, 39.5],
                         [1, 47, 39, 58, 44]], dtype=torch.float64)
    expected = roi_align(features, rois, 7, spatial_scale=0.25, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(deform_roi_pool(features, rois, None, 7, 0.25, 2), expected, atol=1e-12, rtol=0)


def test_multilevel_pool_equals_roi_align_at_each_boxs_level():
    g = torch.Generator().manual_seed(0)
    sizes = {"0": 64, "1": 32, "2": 16, "3": 8}
    features = {k: torch.randn(2, 4, s, s, generator=g) for k, s in sizes.items()}
    boxes = [torch.tensor([[4.0, 4, 30, 40], [10, 20, 200, 250]]), torch.tensor([[50.0, 60, 160, 130]])]
    pool = MultiScaleDeformRoIPool(list(sizes), STRIDES, 7, 2)
    table = pool.table(features)
    rois = rois_of(boxes)
    levels = pool.levels_of(table, rois[:, 1:])
    plain = pool(table, rois, levels)
    zero = pool(table, rois, levels, offsets=torch.zeros(3, 7, 7, 2))
    torch.testing.assert_close(zero, plain)
    for i, level in enumerate(levels.tolist()):
        expected = roi_align(features[str(level)], rois[i : i + 1], 7, 0.25 / 2**level, 2, aligned=True)
        torch.testing.assert_close(plain[i : i + 1], expected, atol=1e-5, rtol=0)
    level_ref = MultiScaleRoIAlign(list(sizes), 7, 2)  # same level assignment as torchvision's pooler
    assert level_ref.featmap_names == pool.featmap_names
    assert levels.tolist() == [0, 1, 0]  # two levels in use
    sides = torch.tensor([8.0, 56, 111, 112, 224, 448, 2000])
    levels = fpn_levels(torch.stack([torch.zeros(7), torch.zeros(7), sides, sides], dim=1), 2, 5)
    assert levels.tolist() == [0, 0, 0, 1, 2, 3, 3]  # FPN eq. 1: 224 px -> P4, clamped to P2-P5


def test_autocast_keeps_the_sampling_in_float32():
    features = torch.randn(1, 4, 16, 16)
    rois = _rois(5, size=50)
    rois[:, 0] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_roi_pool(features.bfloat16(), rois, torch.zeros(5, 7, 7, 2), 7, 0.25, 2)
    assert out.dtype == torch.float32


def test_several_offset_sets_in_one_pass_equal_separate_passes():
    g = torch.Generator().manual_seed(5)
    features = {k: torch.randn(2, 4, s, s, generator=g) for k, s in {"0": 64, "1": 32, "2": 16, "3": 8}.items()}
    pool = MultiScaleDeformRoIPool(list(features), STRIDES, 7, 2)
    table = pool.table(features)
    rois = rois_of([torch.tensor([[4.0, 4, 30, 40], [10, 20, 200, 250]]), torch.tensor([[50.0, 60, 160, 130]])])
    levels = table.levels_of(rois[:, 1:])
    offsets = torch.randn(2, 3, 7, 7, 2, generator=g) * 0.2
    both = pool(table, rois, levels, offsets)
    assert both.shape == (2, 3, 4, 7, 7)
    for v in range(2):
        torch.testing.assert_close(both[v], pool(table, rois, levels, offsets[v]))
    assert pool(table, rois[:0], levels[:0], offsets[:, :0]).shape == (2, 0, 4, 7, 7)


def p_pooling_case(num: int, channels: int, seed: int = 3):
    """Maps of the four FPN levels (2 images), ``num`` RoIs of many sizes (several levels) plus a
    tiny one and one reaching outside the map, and a gradient for the pooled output."""
    g = torch.Generator().manual_seed(seed)
    maps = {str(k): torch.randn(2, channels, 64 >> k, 64 >> k, generator=g) for k in range(4)}
    xy, wh = torch.rand(num, 2, generator=g) * 200, torch.rand(num, 2, generator=g) ** 2 * 500 + 2
    rois = torch.cat([torch.randint(0, 2, (num, 1), generator=g).float(), xy, xy + wh], dim=1)
    rois = torch.cat([rois, torch.tensor([[1.0, 3, 3, 3.5, 3.2], [0.0, -20, 200, 90, 300]])])
    return maps, rois, torch.randn(len(rois), channels, 7, 7, generator=g)


def pool_p(maps, rois, grad, rule, kernel: str, device: str = "cpu"):
    """P pooled with ``kernel`` on ``device``: the output, every level's gradient (zeros where none
    flowed: a level no RoI uses gets none from roi_align, zeros from the gather), the levels, and
    whether the pooling took roi_align."""
    features = {k: v.to(device).requires_grad_(True) for k, v in maps.items()}
    pool = MultiScaleDeformRoIPool(list(maps), STRIDES, 7, 2, rule, kernel=kernel)
    rois = rois.to(device)
    table = pool.table(features)
    levels = pool.levels_of(table, rois[:, 1:])
    out = pool(table, rois, levels)
    (out * grad.to(device)).sum().backward()
    grads = [torch.zeros_like(v) if v.grad is None else v.grad for v in features.values()]
    return out, grads, levels, pool._roi_align(rois)


@pytest.mark.parametrize("rule", [ALIGNED, TORCHVISION_LEGACY])
def test_the_roi_align_kernel_pools_p_as_the_table_does_forward_and_backward(rule):
    """P (no offsets) by roi_align per level, what ``pool_kernel: auto`` does on CUDA, equals the
    table gather: values and gradients, RoIs of several images and levels in mixed order, tiny
    boxes (legacy's extent of at least a pixel) and boxes reaching outside the map included."""
    case = p_pooling_case(40, 4)
    table_out, table_grads, levels, _ = pool_p(*case, rule, "table")
    out, grads, _, _ = pool_p(*case, rule, "roi_align")
    assert len(set(levels.tolist())) >= 3  # RoIs at three levels or more
    torch.testing.assert_close(out, table_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, table_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_roi_align_kernel_refuses_a_rule_it_does_not_implement():
    with pytest.raises(ValueError, match="does not implement the sampling rule 'authors_deform'"):
        MultiScaleDeformRoIPool(["0"], [4], 7, 2, AUTHORS_DEFORM, kernel="roi_align")
    auto = MultiScaleDeformRoIPool(["0"], [4], 7, 2, MMDET_V1_ROI_ALIGN, kernel="auto")
    assert not auto._roi_align(torch.zeros(1, 5))  # the table on the CPU, and for this rule anywhere

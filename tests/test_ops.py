"""Deformable RoI pooling: equals roi_align with zero offsets, gradients check out, offsets move samples."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from tsd_model.ops import MultiScaleDeformRoIPool, deform_roi_pool, fpn_levels, rois_of


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


def test_gradcheck_features_and_offsets():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 3, 9, 11, dtype=torch.float64, generator=g, requires_grad=True)
    rois = torch.tensor([[0, 3.3, 4.1, 20.7, 25.2], [1, 10.2, 2.5, 30.9, 18.4], [0, 1.1, 1.7, 12.3, 30.6]],
                        dtype=torch.float64)
    offsets = (torch.randn(3, 3, 3, 2, dtype=torch.float64, generator=g) * 2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f, o: deform_roi_pool(f, rois, o, 3, 0.5, 2), (features, offsets),
                                    eps=1e-6, atol=1e-5)


def test_a_whole_grid_shift_equals_pooling_the_translated_box():
    features = torch.randn(1, 4, 32, 32, dtype=torch.float64)
    rois = torch.tensor([[0, 20.0, 24.0, 60.0, 70.0]], dtype=torch.float64)
    shift = torch.tensor([6.5, -3.25], dtype=torch.float64)
    moved = deform_roi_pool(features, rois, shift.expand(1, 7, 7, 2), 7, 0.25, 2)
    translated = rois.clone()
    translated[0, 1:] += shift.repeat(2)
    torch.testing.assert_close(moved, deform_roi_pool(features, translated, None, 7, 0.25, 2))


def test_per_bin_offsets_move_only_their_bin():
    features = torch.randn(1, 2, 32, 32, dtype=torch.float64)
    rois = torch.tensor([[0, 20.0, 20.0, 90.0, 90.0]], dtype=torch.float64)
    offsets = torch.zeros(1, 7, 7, 2, dtype=torch.float64)
    offsets[0, 2, 5] = torch.tensor([8.0, 4.0])
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
    pool = MultiScaleDeformRoIPool(list(sizes), 7, 2)
    table = pool.table(features, (256, 256))
    rois = rois_of(boxes)
    levels = table.levels_of(rois[:, 1:])
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
    pool = MultiScaleDeformRoIPool(list(features), 7, 2)
    table = pool.table(features, (256, 256))
    rois = rois_of([torch.tensor([[4.0, 4, 30, 40], [10, 20, 200, 250]]), torch.tensor([[50.0, 60, 160, 130]])])
    levels = table.levels_of(rois[:, 1:])
    offsets = torch.randn(2, 3, 7, 7, 2, generator=g) * 5
    both = pool(table, rois, levels, offsets)
    assert both.shape == (2, 3, 4, 7, 7)
    for v in range(2):
        torch.testing.assert_close(both[v], pool(table, rois, levels, offsets[v]))
    assert pool(table, rois[:0], levels[:0], offsets[:, :0]).shape == (2, 0, 4, 7, 7)

"""Deformable RoI pooling in pure PyTorch: the pooling behind P, TSD's P-hat-c and P-hat-r.

Each of the k x k bins of a RoI is shifted by its own offset (in input-image pixels) and sampled
bilinearly at a fixed s x s grid of points, which are averaged. The sampling follows
``torchvision.ops.roi_align(aligned=True, sampling_ratio=s)`` exactly (sample j of a bin at
``x1 * scale - 0.5 + (j + 0.5) / s * bin_w``; samples more than one pixel outside the map count
as zero, those within it are clamped to the border), so that with zero offsets both agree.

How: every FPN level of every image is laid out as the rows of one channels-last ``[rows, C]``
matrix (``FeatureTable``); each output bin is then a weighted sum of ``4 s^2`` rows (the corners
of its bilinear samples, weights = bilinear weight / s^2), which is exactly what
``F.embedding_bag(mode="sum", per_sample_weights=...)`` computes in one compiled kernel, on CPU
and CUDA, for all RoIs, levels and images at once: no Python loop, no host-device sync, and its
backward gives the features their gradient and, through the weights, the offsets theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class FeatureTable:
    """The feature maps of every FPN level and image as rows of one ``[rows, C]`` matrix.

    Row ``base[l] + (b * H_l + y) * W_l + x`` holds pixel ``(y, x)`` of image ``b`` at level ``l``.
    Built once per RoI-head run and shared by every pooling of that run (P, P-hat-c, P-hat-r).
    """

    rows: Tensor  # [sum_l N * H_l * W_l, C], float32 (float64 for float64 maps)
    base: Tensor  # [L] first row of each level
    sizes: Tensor  # [L, 2] width and height of each level (x before y, as in boxes)
    scales: Tensor  # [L] feature-map pixels per input pixel (1 / stride)
    k_min: int  # log2 of the stride of level 0 (2 for P2)

    @classmethod
    def build(cls, maps: list[Tensor], scales: list[float]) -> FeatureTable:
        """``maps``: ``[N, C, H_l, W_l]`` per level, finest first; ``scales``: their 1/stride."""
        dtype = torch.promote_types(maps[0].dtype, torch.float32)
        device = maps[0].device
        channels = maps[0].shape[1]
        bases = [0]
        for m in maps:
            bases.append(bases[-1] + m.shape[0] * m.shape[2] * m.shape[3])
        rows = maps[0].new_empty((bases[-1], channels), dtype=dtype)
        for m, start, end in zip(maps, bases, bases[1:], strict=False):  # one copy each, with the cast
            rows[start:end].view(m.shape[0], m.shape[2], m.shape[3], channels).copy_(m.permute(0, 2, 3, 1))
        bases.pop()
        sizes = torch.tensor([[m.shape[3], m.shape[2]] for m in maps], device=device)
        return cls(rows, torch.tensor(bases, device=device), sizes, torch.tensor(scales, dtype=dtype, device=device),
                   int(round(-math.log2(scales[0]))))

    def levels_of(self, boxes: Tensor) -> Tensor:
        """The level (0 = finest) at which each ``[K, 4]`` box is pooled (FPN eq. 1)."""
        return fpn_levels(boxes, self.k_min, self.k_min + len(self.scales) - 1)


def pool_table(table: FeatureTable, rois: Tensor, levels: Tensor, offsets: Tensor | None, output_size: int,
               sampling_ratio: int = 2) -> Tensor:
    """Pool ``[K, C, k, k]`` features of RoIs whose bins are shifted by ``offsets``.

    Args:
        table: the feature maps (``FeatureTable.build``).
        rois: ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in input-image pixels.
        levels: ``[K]`` level index of each RoI in ``table``.
        offsets: ``[K, k, k, 2]`` per-bin ``(dx, dy)`` in input-image pixels, or None (plain RoIAlign),
            or ``[V, K, k, k, 2]``: V sets of offsets for the same RoIs, pooled in one pass.
        output_size: k.
        sampling_ratio: s >= 1; each bin averages s x s bilinear samples.
    Returns:
        ``[K, C, k, k]`` (``[V, K, C, k, k]`` for V offset sets) in the table's dtype: float32,
        also under autocast (the sampling math never runs in half precision). The memory is
        channels-last (each RoI's ``[k, k, C]`` is contiguous, as ``embedding_bag`` writes it; a
        ``[K, C, k, k]`` slice is in ``torch.channels_last`` format): ``heads.PooledLinear`` reads it
        without a copy, anything else can call ``.contiguous()``.
    """
    k, s = output_size, sampling_ratio
    if s < 1:
        raise ValueError(f"sampling_ratio must be >= 1 (got {s})")
    dtype = table.rows.dtype
    num, channels = rois.shape[0], table.rows.shape[1]
    lead = offsets.shape[:-4] if offsets is not None else ()  # () or (V,)
    if num == 0:
        return table.rows.new_zeros((*lead, 0, channels, k, k))
    rois = rois.to(dtype)
    scale = table.scales[levels, None]  # [K, 1]
    size = table.sizes[levels]  # [K, 2] as (x, y)
    first_row = table.base[levels] + rois[:, 0].long() * size[:, 0] * size[:, 1]
    # x and y are handled together in a last dim of 2. A sample's x depends on its bin and its
    # column in the bin, never on its row (and y the other way round): [K, k, k, s, 2]
    t = ((torch.arange(k * s, device=rois.device, dtype=dtype) + 0.5) / s).view(k, s)  # bin units
    start = rois[:, 1:3] * scale - 0.5  # [K, 2]
    bin_size = (rois[:, 3:5] - rois[:, 1:3]) * (scale / k)
    along = start[:, None, :] + t.reshape(-1, 1) * bin_size[:, None, :]  # [K, k*s, 2]
    along = along.view(num, k, s, 2)
    coord = torch.stack([along[:, None, :, :, 0].expand(num, k, k, s),  # x: from the bin's column
                         along[:, :, None, :, 1].expand(num, k, k, s)], dim=-1)  # y: from its row
    if offsets is not None:
        coord = coord + (offsets.to(dtype) * scale[:, :, None, None])[..., None, :]  # [V?, K, k, k, s, 2]
    limit = size.view(num, 1, 1, 1, 2)
    last = (limit - 1).to(dtype)
    inside = ((coord >= -1) & (coord <= limit)).to(dtype)  # roi_align: further out counts as zero
    coord = coord.clamp(min=0)
    low = torch.minimum(coord.detach().floor(), last)
    coord = torch.where(low >= last, low, coord)  # on the last row / column: no interpolation
    frac = coord - low
    index_dtype = torch.int32 if table.rows.shape[0] < 2**31 else torch.int64  # rows as int32 where they fit
    low_i, limit_i = low.to(index_dtype), limit.to(index_dtype)
    near = torch.stack([low_i, torch.minimum(low_i + 1, limit_i - 1)], dim=-1)  # [V?, K, k, k, s, 2 (x/y), 2]
    weight = torch.stack([(1 - frac) * inside, frac * inside], dim=-1)
    # A bin sums the 4 s^2 corners (row, weight) of its s x s samples; the order inside a bin does
    # not matter, so they form a (y sample, y corner) x (x sample, x corner) outer product of two
    # vectors of length 2s per bin: a plain 3-d broadcast.
    bins = near.shape[:-3].numel()
    row_y = (first_row.to(index_dtype).view(num, 1, 1, 1, 1)
             + near[..., 1, :] * limit_i[..., 0, None]).reshape(bins, 2 * s, 1)
    row_x = near[..., 0, :].reshape(bins, 1, 2 * s)
    weight_y = weight[..., 1, :].reshape(bins, 2 * s, 1)
    weight_x = (weight[..., 0, :] / (s * s)).reshape(bins, 1, 2 * s)
    pooled = F.embedding_bag((row_y + row_x).view(bins, 4 * s * s), table.rows, mode="sum",
                             per_sample_weights=(weight_y * weight_x).view(bins, 4 * s * s))
    dims = len(lead)  # [V?, K, k, k, C] -> a [V?, K, C, k, k] view
    order = (*range(dims), dims, dims + 3, dims + 1, dims + 2)
    return pooled.view(*lead, num, k, k, channels).permute(order)


def deform_roi_pool(features: Tensor, rois: Tensor, offsets: Tensor | None, output_size: int,
                    spatial_scale: float, sampling_ratio: int = 2) -> Tensor:
    """Deformable RoI pooling on one feature map ``[N, C, H, W]`` (see ``pool_table``)."""
    table = FeatureTable.build([features], [spatial_scale])
    levels = torch.zeros(rois.shape[0], dtype=torch.long, device=rois.device)
    return pool_table(table, rois, levels, offsets, output_size, sampling_ratio)


def fpn_levels(boxes: Tensor, k_min: int, k_max: int, canonical_scale: float = 224.0,
               canonical_level: int = 4) -> Tensor:
    """FPN level index (0 = finest) of each box: floor(k0 + log2(sqrt(area) / 224)), clamped.

    The rule of the FPN paper (eq. 1), as torchvision's LevelMapper and mmdetection apply it:
    a 224-pixel box maps to P4; TSD pools P-hat-c and P-hat-r at the level of their proposal P.
    """
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0))
    level = torch.floor(canonical_level + torch.log2(scale / canonical_scale + 1e-6))
    return (level.clamp(min=k_min, max=k_max) - k_min).long()


class MultiScaleDeformRoIPool(nn.Module):
    """Deformable RoI pooling over FPN levels, the level chosen from the proposal's own size.

    Like ``torchvision.ops.MultiScaleRoIAlign`` (which it replaces for P, with ``aligned=True``
    sampling so that P, P-hat-c and P-hat-r share one sampling grid): ``table`` infers each level's
    scale from the feature and image sizes. The caller passes the levels, so that a derived box
    (P-hat-c, P-hat-r) is pooled at the level of the proposal it came from.
    """

    def __init__(self, featmap_names: list[str], output_size: int = 7, sampling_ratio: int = 2) -> None:
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio

    def table(self, features: dict[str, Tensor], image_size: tuple[int, int]) -> FeatureTable:
        maps = [features[name] for name in self.featmap_names]
        scales = [2.0 ** round(math.log2(m.shape[-2] / image_size[0])) for m in maps]
        return FeatureTable.build(maps, scales)

    def forward(self, table: FeatureTable, rois: Tensor, levels: Tensor, offsets: Tensor | None = None) -> Tensor:
        """``rois``: ``[K, 5]`` (batch index, box); ``offsets``: ``[K, k, k, 2]``; returns ``[K, C, k, k]``."""
        return pool_table(table, rois, levels, offsets, self.output_size, self.sampling_ratio)


def rois_of(boxes: list[Tensor]) -> Tensor:
    """``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` from per-image ``[n_i, 4]`` boxes."""
    return torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])

"""Deformable RoI pooling in pure PyTorch: the pooling behind P, TSD's P-hat-c and P-hat-r.

Each of the k x k bins of a RoI is shifted by its own offset and sampled bilinearly at a fixed
s x s grid of points, which are averaged. Where the samples lie, how a RoI's extent is measured
and what happens at the border is a ``SamplingRule``; four are used, each equal to a kernel that
users know (tested against float64 loop transcriptions of those kernels):

- ``ALIGNED``: ``torchvision.ops.roi_align(aligned=True)`` (sample j of a bin at
  ``x1 * scale - 0.5 + (j + 0.5) / s * bin_w``; samples more than one pixel outside the map count
  as zero, those within it are clamped to the border); with zero offsets P-hat = P exactly.
- ``TORCHVISION_LEGACY``: ``roi_align(aligned=False)``, torchvision's Faster R-CNN (no half-pixel
  shift, extent at least one pixel).
- ``MMDET_V1_ROI_ALIGN``: mmdetection v1's RoIAlign, the TSD authors' P (extent ``x2 + 1 - x1``).
- ``AUTHORS_DEFORM``: mmdetection v1's deformable RoI pooling, the TSD authors' P-hat-c and
  P-hat-r: the RoI is rounded, ``x1' = round(x1) * scale - 0.5``, extent
  ``(round(x2) + 1 - round(x1)) * scale`` (at least 0.1), sample j of a bin at ``j / s`` of it,
  samples outside ``[-0.5, W - 0.5]`` are skipped and a bin averages the samples that remain.

Offsets are given as the authors' op takes them: in units of the RoI's extent as its rule
measures it (an offset of 0.1 moves a bin by a tenth of the RoI's width), ``[K, k, k, 2]``
with x before y.

How: every FPN level of every image is laid out as the rows of one channels-last ``[rows, C]``
matrix (``FeatureTable``); each output bin is then a weighted sum of ``4 s^2`` rows (the corners
of its bilinear samples, weights = bilinear weight / number of samples), which is exactly what
``F.embedding_bag(mode="sum", per_sample_weights=...)`` computes in one compiled kernel, on CPU
and CUDA, for all RoIs, levels and images at once: no Python loop, no host-device sync, and its
backward gives the features their gradient and, through the weights, the offsets theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class SamplingRule:
    """Where a RoI's bins are sampled and how the border is treated; see the module docstring."""

    name: str
    round_box: bool  # round the RoI's corners to whole pixels first (half away from zero)
    plus_one: bool  # the RoI ends at x2 + 1 (the legacy "+1" extent)
    half_pixel: bool  # shift by -0.5: pixel centres at integer coordinates
    min_extent: float  # the RoI's extent in feature pixels is at least this
    centred_samples: bool  # sample j at (j + 0.5) / s of its bin, else at j / s
    border: Literal["roi_align", "skip"]  # roi_align: zero beyond one pixel out, clamp within;
    #                                        skip: drop samples outside [-0.5, size - 0.5], average the rest


ALIGNED = SamplingRule("aligned", False, False, True, 0.0, True, "roi_align")
TORCHVISION_LEGACY = SamplingRule("torchvision_legacy", False, False, False, 1.0, True, "roi_align")
MMDET_V1_ROI_ALIGN = SamplingRule("mmdet_v1_roi_align", False, True, False, 0.0, True, "roi_align")
AUTHORS_DEFORM = SamplingRule("authors_deform", True, True, True, 0.1, False, "skip")
RULES = {r.name: r for r in (ALIGNED, TORCHVISION_LEGACY, MMDET_V1_ROI_ALIGN, AUTHORS_DEFORM)}


def _round_half_away(x: Tensor) -> Tensor:
    """C's ``round``, as the CUDA kernels use it (``torch.round`` rounds half to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def roi_extent(boxes: Tensor, scale: Tensor | float, rule: SamplingRule) -> tuple[Tensor, Tensor]:
    """Start ``[K, 2]`` and extent ``[K, 2]`` (x, y) of ``[K, 4]`` boxes in feature pixels under ``rule``."""
    if rule.round_box:
        boxes = _round_half_away(boxes)
    end = boxes[:, 2:] + 1 if rule.plus_one else boxes[:, 2:]
    shift = 0.5 if rule.half_pixel else 0.0
    start = boxes[:, :2] * scale - shift
    extent = ((end - boxes[:, :2]) * scale).clamp(min=rule.min_extent)
    return start, extent


def bin_centres(boxes: Tensor, offsets: Tensor | None, output_size: int, sampling_ratio: int,
                rule: SamplingRule = ALIGNED) -> Tensor:
    """``[K, k, k, 2]`` mean position of each (shifted) bin's samples in input-image pixels (x, y):
    where P-hat-c looks, for drawing (paper Fig. 5)."""
    start, extent = roi_extent(boxes, 1.0, rule)
    k = output_size
    t = (torch.arange(k, device=boxes.device, dtype=extent.dtype) + 0.5) / k  # [k]
    if not rule.centred_samples:  # samples at j / s of the bin: their mean lies (s - 1) / 2s into it
        t = t - 1.0 / (2 * k * sampling_ratio)
    xs = start[:, None, 0] + t[None, :] * extent[:, None, 0] + (0.5 if rule.half_pixel else 0.0)
    ys = start[:, None, 1] + t[None, :] * extent[:, None, 1] + (0.5 if rule.half_pixel else 0.0)
    centres = torch.stack([xs[:, None, :].expand(-1, k, k), ys[:, :, None].expand(-1, k, k)], dim=-1)
    if offsets is not None:
        centres = centres + offsets.to(centres.dtype) * extent[:, None, None, :]
    return centres


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
    maps: tuple[Tensor, ...] = ()  # the maps themselves ([N, C, H_l, W_l], not copied): for roi_align
    scale_values: tuple[float, ...] = ()  # ``scales`` as numbers

    @staticmethod
    def rows_needed(maps: list[Tensor]) -> int:
        """How many rows the maps fill: ``sum_l N * H_l * W_l``."""
        return sum(m.shape[0] * m.shape[2] * m.shape[3] for m in maps)

    @classmethod
    def build(cls, maps: list[Tensor], scales: list[float], num_rows: int | None = None) -> FeatureTable:
        """``maps``: ``[N, C, H_l, W_l]`` per level, finest first; ``scales``: their 1/stride.

        ``num_rows`` (at least ``rows_needed``) pads the table with zero rows that no RoI reads: few
        distinct shapes across image sizes, for CUDA graphs (``compiled_stage``)."""
        dtype = torch.promote_types(maps[0].dtype, torch.float32)
        device = maps[0].device
        channels = maps[0].shape[1]
        bases = [0]
        for m in maps:
            bases.append(bases[-1] + m.shape[0] * m.shape[2] * m.shape[3])
        total = bases[-1] if num_rows is None else num_rows
        if total < bases[-1]:
            raise ValueError(f"a table of {total} rows cannot hold the maps' {bases[-1]}")
        rows = maps[0].new_empty((total, channels), dtype=dtype)
        for m, start, end in zip(maps, bases, bases[1:], strict=False):  # one copy each, with the cast
            rows[start:end].view(m.shape[0], m.shape[2], m.shape[3], channels).copy_(m.permute(0, 2, 3, 1))
        if total > bases[-1]:  # only padded tables: an eager step pays no extra operator call
            rows[bases[-1]:].zero_()
        bases.pop()
        scale_values = tuple(float(x) for x in scales)
        base, sizes, scale = _layout_tensors(tuple(bases), tuple((m.shape[3], m.shape[2]) for m in maps),
                                             scale_values, dtype, device)
        return cls(rows, base, sizes, scale, int(round(-math.log2(scales[0]))), tuple(maps), scale_values)

    def levels_of(self, boxes: Tensor, plus_one: bool = False) -> Tensor:
        """The level (0 = finest) at which each ``[K, 4]`` box is pooled (FPN eq. 1); ``plus_one``
        measures sizes as ``x2 - x1 + 1`` (mmdetection v1, the TSD authors)."""
        return fpn_levels(boxes, self.k_min, self.k_min + len(self.scales) - 1, plus_one=plus_one)


@lru_cache(maxsize=256)
def _layout_tensors(bases: tuple[int, ...], sizes: tuple[tuple[int, int], ...], scales: tuple[float, ...],
                    dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """A table's ``base``, ``sizes`` and ``scales`` on ``device``, made once per layout: a tensor made
    from Python numbers on a GPU is a host-to-device copy that waits for the GPU's queue to drain.
    Read only (never written in place), so shared by every table of that layout; made outside
    ``torch.inference_mode`` even when first asked for there, so that training may use them too."""
    with torch.inference_mode(False):
        return (torch.tensor(bases, device=device), torch.tensor(sizes, device=device),
                torch.tensor(scales, dtype=dtype, device=device))


def pool_table(table: FeatureTable, rois: Tensor, levels: Tensor, offsets: Tensor | None, output_size: int,
               sampling_ratio: int = 2, rule: SamplingRule = ALIGNED) -> Tensor:
    """Pool ``[K, C, k, k]`` features of RoIs whose bins are shifted by ``offsets``.

    Args:
        table: the feature maps (``FeatureTable.build``).
        rois: ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in input-image pixels.
        levels: ``[K]`` level index of each RoI in ``table``.
        offsets: ``[K, k, k, 2]`` per-bin ``(dx, dy)`` in units of the RoI's extent (``roi_extent``),
            or None (plain RoI pooling), or ``[V, K, k, k, 2]``: V sets of offsets for the same RoIs,
            pooled in one pass.
        output_size: k.
        sampling_ratio: s >= 1; each bin averages s x s bilinear samples.
        rule: where the samples lie and how the border is treated (``SamplingRule``).
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
    t = ((torch.arange(k * s, device=rois.device, dtype=dtype) + (0.5 if rule.centred_samples else 0.0)) / s)
    start, extent = roi_extent(rois[:, 1:], scale, rule)  # [K, 2] each, feature pixels
    along = start[:, None, :] + t.view(-1, 1) * (extent / k)[:, None, :]  # [K, k*s, 2]
    along = along.view(num, k, s, 2)
    coord = torch.stack([along[:, None, :, :, 0].expand(num, k, k, s),  # x: from the bin's column
                         along[:, :, None, :, 1].expand(num, k, k, s)], dim=-1)  # y: from its row
    if offsets is not None:
        coord = coord + (offsets.to(dtype) * extent[:, None, None, :])[..., None, :]  # [V?, K, k, k, s, 2]
    limit = size.view(num, 1, 1, 1, 2)
    last = (limit - 1).to(dtype)
    if rule.border == "roi_align":
        inside = ((coord >= -1) & (coord <= limit)).to(dtype)  # further out counts as zero
        divisor = coord.new_full((), float(s))
    else:  # skip samples outside [-0.5, size - 0.5]; a bin averages those that remain
        inside = ((coord >= -0.5) & (coord <= limit - 0.5)).to(dtype)
        divisor = inside.sum(dim=-2, keepdim=True).clamp(min=1)  # per bin and axis: rows x columns kept
    coord = coord.clamp(min=0)
    low = torch.minimum(coord.detach().floor(), last)
    coord = torch.where(low >= last, low, coord)  # on the last row / column: no interpolation
    frac = coord - low
    index_dtype = torch.int32 if table.rows.shape[0] < 2**31 else torch.int64  # rows as int32 where they fit
    low_i, limit_i = low.to(index_dtype), limit.to(index_dtype)
    near = torch.stack([low_i, torch.minimum(low_i + 1, limit_i - 1)], dim=-1)  # [V?, K, k, k, s, 2 (x/y), 2]
    inside = inside / divisor  # a sample's share of its bin, per axis
    weight = torch.stack([(1 - frac) * inside, frac * inside], dim=-1)
    # A bin sums the 4 s^2 corners (row, weight) of its s x s samples; the order inside a bin does
    # not matter, so they form a (y sample, y corner) x (x sample, x corner) outer product of two
    # vectors of length 2s per bin: a plain 3-d broadcast.
    bins = near.shape[:-3].numel()
    row_y = (first_row.to(index_dtype).view(num, 1, 1, 1, 1)
             + near[..., 1, :] * limit_i[..., 0, None]).reshape(bins, 2 * s, 1)
    row_x = near[..., 0, :].reshape(bins, 1, 2 * s)
    weight_y = weight[..., 1, :].reshape(bins, 2 * s, 1)
    weight_x = weight[..., 0, :].reshape(bins, 1, 2 * s)
    pooled = F.embedding_bag((row_y + row_x).view(bins, 4 * s * s), table.rows, mode="sum",
                             per_sample_weights=(weight_y * weight_x).view(bins, 4 * s * s))
    dims = len(lead)  # [V?, K, k, k, C] -> a [V?, K, C, k, k] view
    order = (*range(dims), dims, dims + 3, dims + 1, dims + 2)
    return pooled.view(*lead, num, k, k, channels).permute(order)


def roi_align_levels(table: FeatureTable, rois: Tensor, levels: Tensor, output_size: int, sampling_ratio: int,
                     rule: SamplingRule) -> Tensor:
    """``pool_table`` without offsets, by ``torchvision.ops.roi_align`` on each level's map.

    For the rules roi_align implements itself (``ALIGNED``: ``aligned=True``;
    ``TORCHVISION_LEGACY``: ``aligned=False``), so the result equals ``pool_table``'s up to float
    rounding. The RoIs are grouped by level with one sort and one host sync (the per-level
    counts), each level pooled in one call, and the result put back in the RoIs' order. Returns
    ``[K, C, k, k]`` (contiguous) in the table's dtype, as ``pool_table``.
    """
    from torchvision.ops import roi_align

    if rule not in ROI_ALIGN_RULES:
        raise ValueError(f"roi_align does not implement the sampling rule {rule.name!r}")
    k = output_size
    channels = table.rows.shape[1]
    out = table.rows.new_empty((rois.shape[0], channels, k, k))
    if rois.shape[0] == 0:
        return out
    order = torch.argsort(levels, stable=True)
    counts = torch.bincount(levels, minlength=len(table.maps)).tolist()  # the one sync
    start = 0
    for level, count in enumerate(counts):
        if count:
            chosen = order[start:start + count]
            feature = table.maps[level]
            pooled = roi_align(feature, rois[chosen].to(feature.dtype), k, table.scale_values[level], sampling_ratio,
                               aligned=rule is ALIGNED)
            out[chosen] = pooled.to(out.dtype)
            start += count
    return out


ROI_ALIGN_RULES = (ALIGNED, TORCHVISION_LEGACY)
PoolKernel = Literal["auto", "table", "roi_align"]


def deform_roi_pool(features: Tensor, rois: Tensor, offsets: Tensor | None, output_size: int,
                    spatial_scale: float, sampling_ratio: int = 2, rule: SamplingRule = ALIGNED) -> Tensor:
    """Deformable RoI pooling on one feature map ``[N, C, H, W]`` (see ``pool_table``)."""
    table = FeatureTable.build([features], [spatial_scale])
    levels = torch.zeros(rois.shape[0], dtype=torch.long, device=rois.device)
    return pool_table(table, rois, levels, offsets, output_size, sampling_ratio, rule)


def fpn_levels(boxes: Tensor, k_min: int, k_max: int, canonical_scale: float = 224.0,
               canonical_level: int = 4, plus_one: bool = False) -> Tensor:
    """FPN level index (0 = finest) of each box: floor(k0 + log2(sqrt(area) / 224)), clamped.

    The rule of the FPN paper (eq. 1), as torchvision's LevelMapper and mmdetection apply it:
    a 224-pixel box maps to P4; TSD pools P-hat-c and P-hat-r at the level of their proposal P.
    ``plus_one`` measures sides as ``x2 - x1 + 1`` (mmdetection v1).
    """
    extra = 1.0 if plus_one else 0.0
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0] + extra).clamp(min=0) * (boxes[:, 3] - boxes[:, 1] + extra).clamp(min=0))
    level = torch.floor(canonical_level + torch.log2(scale / canonical_scale + 1e-6))
    return (level.clamp(min=k_min, max=k_max) - k_min).long()


class MultiScaleDeformRoIPool(nn.Module):
    """Deformable RoI pooling over FPN levels, the level chosen from the proposal's own size.

    Like ``torchvision.ops.MultiScaleRoIAlign`` (which it replaces for P), with the strides of the
    levels given explicitly. ``table`` lays out the maps once per RoI-head run; the caller passes
    the levels, so that a derived box (P-hat-c, P-hat-r) is pooled at the level of the proposal it
    came from.
    """

    def __init__(self, featmap_names: list[str], strides: list[int], output_size: int = 7,
                 sampling_ratio: int = 2, rule: SamplingRule = ALIGNED, kernel: PoolKernel = "table") -> None:
        super().__init__()
        if kernel not in get_args(PoolKernel):
            raise ValueError(f"unknown pooling kernel {kernel!r} (one of {', '.join(get_args(PoolKernel))})")
        if kernel == "roi_align" and rule not in ROI_ALIGN_RULES:
            raise ValueError(f"roi_align does not implement the sampling rule {rule.name!r}: use the table kernel")
        self.kernel = kernel
        if len(featmap_names) != len(strides):
            raise ValueError(f"{len(featmap_names)} feature maps but {len(strides)} strides")
        self.featmap_names = list(featmap_names)
        self.strides = list(strides)
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.rule = rule

    def maps(self, features: dict[str, Tensor]) -> list[Tensor]:
        """The FPN maps this pooling reads, finest first."""
        return [features[name] for name in self.featmap_names]

    def table(self, features: dict[str, Tensor], num_rows: int | None = None) -> FeatureTable:
        return FeatureTable.build(self.maps(features), [1.0 / s for s in self.strides], num_rows)

    def levels_of(self, table: FeatureTable, boxes: Tensor) -> Tensor:
        """The level of each box under this pooling's size convention."""
        return table.levels_of(boxes, plus_one=self.rule.plus_one)

    def forward(self, table: FeatureTable, rois: Tensor, levels: Tensor, offsets: Tensor | None = None) -> Tensor:
        """``rois``: ``[K, 5]`` (batch index, box); ``offsets``: ``[K, k, k, 2]`` in units of the RoI's
        extent; returns ``[K, C, k, k]``.

        Without offsets, ``kernel`` may pool by ``roi_align`` instead of the table gather (the same
        values): ``"roi_align"``, or ``"auto"`` on CUDA, where its kernel was 2.8x faster forward +
        backward than the gather (BENCHMARKS.md); on the CPU the gather is 3x faster."""
        if offsets is None and self._roi_align(rois):
            return roi_align_levels(table, rois, levels, self.output_size, self.sampling_ratio, self.rule)
        return pool_table(table, rois, levels, offsets, self.output_size, self.sampling_ratio, self.rule)

    def _roi_align(self, rois: Tensor) -> bool:
        if self.kernel == "roi_align":
            return True
        return self.kernel == "auto" and rois.is_cuda and self.rule in ROI_ALIGN_RULES

    def extra_repr(self) -> str:
        return f"strides={self.strides}, output_size={self.output_size}, sampling_ratio={self.sampling_ratio}, " \
               f"rule={self.rule.name}, kernel={self.kernel}"


def rois_of(boxes: list[Tensor]) -> Tensor:
    """``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` from per-image ``[n_i, 4]`` boxes."""
    return torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])

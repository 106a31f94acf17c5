"""Deformable RoI pooling in pure PyTorch: the pooling behind TSD's P-hat-c and P-hat-r.

Each of the k x k bins of a RoI is shifted by its own offset (in input-image pixels) and sampled
bilinearly at a fixed s x s grid of points, which are averaged. Everything is one
``grid_sample`` call per image and FPN level (no Python loop over RoIs), differentiable with
respect to the features and the offsets, on CPU and CUDA alike. With zero offsets it reproduces
``torchvision.ops.roi_align(aligned=True, sampling_ratio=s)``: sample j of a bin lies at
``x1 * scale - 0.5 + (j + 0.5) / s * bin_w``, and ``padding_mode="border"`` matches roi_align's
clamping of samples up to one pixel outside the map (they differ only for samples pushed
further out, which roi_align zeroes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align


def deform_roi_pool(features: Tensor, rois: Tensor, offsets: Tensor | None, output_size: int,
                    spatial_scale: float, sampling_ratio: int = 2) -> Tensor:
    """Pool ``[K, C, k, k]`` features of RoIs whose bins are shifted by ``offsets``.

    Args:
        features: ``[N, C, H, W]`` feature map.
        rois: ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in input-image pixels.
        offsets: ``[K, k, k, 2]`` per-bin ``(dx, dy)`` in input-image pixels, or None (plain RoIAlign).
        output_size: k.
        spatial_scale: feature-map pixels per input pixel (1/stride).
        sampling_ratio: s; each bin averages s x s bilinear samples.
    Returns:
        ``[K, C, k, k]`` in float32, or float64 for float64 features (the sampling math never runs
        in half precision, also under autocast).
    """
    dtype = torch.promote_types(features.dtype, torch.float32)
    k, s = output_size, sampling_ratio
    n_img, channels, height, width = features.shape
    num = rois.shape[0]
    if num == 0:
        return features.new_zeros((0, channels, k, k), dtype=dtype)
    rois = rois.to(dtype)
    t = (torch.arange(k * s, device=rois.device, dtype=dtype) + 0.5) / s  # [ks] bin units
    x1 = rois[:, 1] * spatial_scale - 0.5  # [K]
    y1 = rois[:, 2] * spatial_scale - 0.5
    bin_w = (rois[:, 3] - rois[:, 1]) * spatial_scale / k
    bin_h = (rois[:, 4] - rois[:, 2]) * spatial_scale / k
    xs = (x1[:, None] + t[None, :] * bin_w[:, None])[:, None, :].expand(num, k * s, k * s)  # [K, ks(y), ks(x)]
    ys = (y1[:, None] + t[None, :] * bin_h[:, None])[:, :, None].expand(num, k * s, k * s)
    if offsets is not None:
        off = offsets.to(dtype) * spatial_scale  # [K, k, k, 2]
        off = off.repeat_interleave(s, dim=1).repeat_interleave(s, dim=2)  # [K, ks, ks, 2]
        xs = xs + off[..., 0]
        ys = ys + off[..., 1]
    grid = torch.stack([(2 * xs + 1) / width - 1, (2 * ys + 1) / height - 1], dim=-1)  # [K, ks, ks, 2]
    # channels-last: each bilinear sample then reads the C values of a pixel from one place
    feats = features.to(dtype).contiguous(memory_format=torch.channels_last)
    out = feats.new_empty((num, channels, k, k))
    batch_index = rois[:, 0].long()
    for b in range(n_img):
        idx = torch.nonzero(batch_index == b).flatten()
        if idx.numel() == 0:
            continue
        g = grid[idx].reshape(1, idx.numel() * k * s, k * s, 2)
        sampled = F.grid_sample(feats[b : b + 1], g, mode="bilinear", padding_mode="border", align_corners=False)
        if s > 1:  # average the s x s samples of each bin before anything is copied ([1, C, n*k, k])
            sampled = F.avg_pool2d(sampled, kernel_size=s, stride=s)
        pooled = sampled.view(channels, idx.numel(), k, k).transpose(0, 1)  # [n, C, k, k]
        if idx.numel() == num:
            return pooled.contiguous()
        out[idx] = pooled
    return out


def _pool_translated(features: Tensor, rois: Tensor, shift: Tensor, k: int, scale: float, s: int) -> Tensor:
    """RoIAlign of the RoIs moved by ``shift`` (``[K, 2]`` pixels): deformable pooling with one offset."""
    moved = rois.to(features.dtype).clone()
    moved[:, 1:] += shift.to(features.dtype).repeat(1, 2)
    return roi_align(features, moved, k, scale, s, aligned=True)


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
    sampling so that P, P-hat-c and P-hat-r share one sampling grid): it infers each level's scale
    from the feature and image sizes on its call. Without offsets it runs torchvision's compiled
    ``roi_align``. ``levels`` lets a derived box (P-hat-c, P-hat-r) be pooled at the level of the
    proposal it came from.
    """

    def __init__(self, featmap_names: list[str], output_size: int = 7, sampling_ratio: int = 2) -> None:
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio

    def scales(self, features: dict[str, Tensor], image_size: tuple[int, int]) -> list[float]:
        out = []
        for name in self.featmap_names:
            ratio = features[name].shape[-2] / image_size[0]
            out.append(2.0 ** round(math.log2(ratio)))
        return out

    def levels_of(self, boxes: Tensor, scales: list[float]) -> Tensor:
        k_min = int(-math.log2(scales[0]))
        k_max = int(-math.log2(scales[-1]))
        return fpn_levels(boxes, k_min, k_max)

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor], image_size: tuple[int, int],
                offsets: Tensor | None = None, levels: Tensor | None = None, translation_only: bool = False) -> Tensor:
        """``boxes``: per-image ``[n_i, 4]``; ``offsets``: ``[sum n_i, k, k, 2]``; returns ``[sum n_i, C, k, k]``.

        ``translation_only`` promises that every bin of a RoI has the same offset (TSD's P-hat-r).
        """
        rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)])
        scales = self.scales(features, image_size)
        if levels is None:
            levels = self.levels_of(rois[:, 1:], scales)
        first = features[self.featmap_names[0]]
        # every RoI gets a level (they are clamped), so every row of ``out`` is written
        out = first.new_empty((rois.shape[0], first.shape[1], self.output_size, self.output_size),
                              dtype=torch.promote_types(first.dtype, torch.float32))
        for level, (name, scale) in enumerate(zip(self.featmap_names, scales, strict=True)):
            idx = torch.nonzero(levels == level).flatten()
            if idx.numel() == 0:
                continue
            if offsets is None:  # plain RoIAlign: torchvision's compiled kernel, same sampling grid
                out[idx] = roi_align(features[name], rois[idx].to(features[name].dtype), self.output_size, scale,
                                     self.sampling_ratio, aligned=True).to(out.dtype)
            elif translation_only and not torch.is_grad_enabled():
                # one shift for the whole grid = pooling the translated box; roi_align gives no gradient
                # to the shift, so it serves inference only
                out[idx] = _pool_translated(features[name], rois[idx], offsets[idx, 0, 0], self.output_size, scale,
                                            self.sampling_ratio).to(out.dtype)
            else:
                out[idx] = deform_roi_pool(features[name], rois[idx], offsets[idx], self.output_size, scale,
                                           self.sampling_ratio)
        return out

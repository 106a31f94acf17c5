"""Deformable convolution (DCNv1, and DCNv2's modulated form) as a bilinear gather and one matmul.

``torchvision.ops.deform_conv2d`` is the reference, and on the CPU it is slow: its backward loops
over every column in scalar code, and it dominates a Cascade-DCN-X101 training step there
(BENCHMARKS.md). The same operator can be written from two well-optimised ATen kernels:

1. every kernel tap's deformed sampling position is a point of ``F.grid_sample`` (bilinear,
   zeros outside the map, ``align_corners=False`` in pixel coordinates), which is exactly DCN's
   own sampling rule: a corner outside the map contributes zero, a point a pixel or more outside
   gives zero. This gives the columns ``[N, C, kh*kw, Ho*Wo]`` (times the mask, for DCNv2);
2. the (grouped) convolution is one batched matmul of the weight ``[groups, Co/g, Cg*kh*kw]``
   with those columns.

Forward and backward equal torchvision's to float64 rounding (tested, offset groups, strides,
dilation and masks included). Autograd would keep the columns for the backward of the matmul,
``C*kh*kw`` values per output position, many times what torchvision keeps (it recomputes its
columns in backward); so when a gradient is needed the columns are recomputed in backward too
(activation checkpointing), and the layer holds its inputs only, as torchvision's does.

``kernel`` chooses the implementation: ``"torchvision"``, ``"grid_sample"``, or ``"auto"``:
``grid_sample`` for CPU tensors, torchvision's CUDA kernel otherwise (until the two are measured
side by side on a GPU: ``bench/bench_deform_conv.py``).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair
from torch.utils.checkpoint import checkpoint
from torchvision.ops import deform_conv2d as torchvision_deform_conv2d

DcnKernel = Literal["auto", "torchvision", "grid_sample"]
DCN_KERNELS: tuple[str, ...] = get_args(DcnKernel)

Pair = int | tuple[int, int]


def sampled_columns(x: Tensor, offset: Tensor, mask: Tensor | None, kernel_size: tuple[int, int],
                    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    """``[N, C, kh*kw, Ho*Wo]``: the input at every kernel tap's deformed position (times the mask).

    ``offset``: ``[N, 2*G*kh*kw, Ho, Wo]`` with (dy, dx) per tap, per offset group G (torchvision's
    layout); ``mask``: ``[N, G*kh*kw, Ho, Wo]`` or None.
    """
    n, c, h, w = x.shape
    kh, kw = kernel_size
    taps = kh * kw
    ho, wo = offset.shape[-2:]
    groups = offset.shape[1] // (2 * taps)
    if groups < 1 or offset.shape[1] != 2 * groups * taps or c % groups:
        raise ValueError(f"offset has {offset.shape[1]} channels: expected 2 x offset groups x {taps} taps, "
                         f"with the {c} input channels divisible by the offset groups")
    device, dtype = offset.device, torch.promote_types(offset.dtype, torch.float32)
    tap_y = (torch.arange(kh, device=device, dtype=dtype) * dilation[0]).repeat_interleave(kw)  # [taps]
    tap_x = (torch.arange(kw, device=device, dtype=dtype) * dilation[1]).repeat(kh)
    rows = torch.arange(ho, device=device, dtype=dtype) * stride[0] - padding[0]  # [Ho]
    cols = torch.arange(wo, device=device, dtype=dtype) * stride[1] - padding[1]  # [Wo]
    off = offset.to(dtype).view(n, groups, taps, 2, ho, wo)
    y = rows.view(1, 1, 1, ho, 1) + tap_y.view(1, 1, taps, 1, 1) + off[:, :, :, 0]  # [N, G, taps, Ho, Wo]
    x_pos = cols.view(1, 1, 1, 1, wo) + tap_x.view(1, 1, taps, 1, 1) + off[:, :, :, 1]
    # grid_sample's coordinates with align_corners=False: pixel p of a size-s axis is (2p + 1) / s - 1
    grid = torch.stack([(2 * x_pos + 1) / w - 1, (2 * y + 1) / h - 1], dim=-1)  # [N, G, taps, Ho, Wo, 2]
    # the sampling in float32 at least (as torchvision's op runs under autocast): a half-precision
    # grid would misplace the samples by up to a tenth of a pixel on a 100-pixel map
    source = x if x.dtype == dtype else x.to(dtype)
    sampled = F.grid_sample(source.reshape(n * groups, c // groups, h, w), grid.view(n * groups, taps * ho, wo, 2),
                            mode="bilinear", padding_mode="zeros", align_corners=False)  # [N*G, C/G, taps*Ho, Wo]
    sampled = sampled.view(n, groups, c // groups, taps, ho * wo)
    if mask is not None:
        sampled = sampled * mask.view(n, groups, 1, taps, ho * wo).to(sampled.dtype)
    return sampled.view(n, c, taps, ho * wo)


def _grouped_matmul(columns: Tensor, weight: Tensor, out_hw: tuple[int, int]) -> Tensor:
    n, c, taps, positions = columns.shape
    out_channels, per_group = weight.shape[:2]
    groups = c // per_group
    out = torch.matmul(weight.reshape(groups, out_channels // groups, per_group * taps),
                       columns.reshape(n, groups, per_group * taps, positions))  # [N, groups, Co/g, Ho*Wo]
    return out.reshape(n, out_channels, *out_hw)


def _sampled_conv(x: Tensor, offset: Tensor, mask: Tensor | None, weight: Tensor, stride: tuple[int, int],
                  padding: tuple[int, int], dilation: tuple[int, int]) -> Tensor:
    columns = sampled_columns(x, offset, mask, tuple(weight.shape[-2:]), stride, padding, dilation)
    return _grouped_matmul(columns, weight, tuple(offset.shape[-2:]))


def deform_conv2d_sampled(x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None = None,
                          stride: Pair = 1, padding: Pair = 0, dilation: Pair = 1,
                          mask: Tensor | None = None) -> Tensor:
    """``torchvision.ops.deform_conv2d``'s contract and result, from ``grid_sample`` and a matmul."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, offset, weight, mask)):
        out = checkpoint(_sampled_conv, x, offset, mask, weight, stride, padding, dilation, use_reentrant=False)
    else:
        out = _sampled_conv(x, offset, mask, weight, stride, padding, dilation)
    return out if bias is None else out + bias.view(1, -1, 1, 1).to(out.dtype)


def deform_conv2d(x: Tensor, offset: Tensor, weight: Tensor, bias: Tensor | None, stride: Pair, padding: Pair,
                  dilation: Pair, mask: Tensor | None, kernel: DcnKernel = "auto") -> Tensor:
    """Deformable convolution by the chosen implementation (see the module docstring)."""
    if kernel not in DCN_KERNELS:
        raise ValueError(f"unknown deformable convolution kernel {kernel!r} (one of {', '.join(DCN_KERNELS)})")
    if kernel == "grid_sample" or (kernel == "auto" and x.device.type == "cpu"):
        return deform_conv2d_sampled(x, offset, weight, bias, stride, padding, dilation, mask)
    return torchvision_deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask)

"""Loop references of the RoI poolings, transcribed statement by statement from the kernels they
stand for: a Python loop over RoIs, bins and samples, one bilinear lookup at a time, in float64.

Slow and obviously correct, so that the vectorised ``tsd_model.ops.pool_table`` can be checked
against it (forward, and through autograd on these scalar operations, gradients):

- ``roi_align``: torchvision's ``roi_align`` CPU kernel (``aligned`` True/False), also mmdetection
  v1's RoIAlign (``plus_one``: the RoI ends at ``x2 + 1``, extent at least 0);
- ``authors_deform``: mmdetection v1's ``DeformablePSROIPoolForwardKernel`` with ``group_size=1``,
  ``part_size=k``, one class, as the TSD authors use it for P-hat-c and P-hat-r.

Offsets are ``[K, k, k, 2]`` (x, y) in units of the RoI's extent (the authors' ``trans``, with
``trans_std`` folded in).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _roi_align_bilinear(data: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """torchvision's ``bilinear_interpolate``: zero beyond one pixel out, clamped within."""
    height, width = data.shape[-2:]
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return data.new_zeros(data.shape[0])
    y = torch.clamp(y, min=0.0)
    x = torch.clamp(x, min=0.0)
    y_low, x_low = int(y.item()), int(x.item())
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = y.new_tensor(float(y_low))
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = x.new_tensor(float(x_low))
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * data[:, y_low, x_low] + hy * lx * data[:, y_low, x_high]
            + ly * hx * data[:, y_high, x_low] + ly * lx * data[:, y_high, x_high])


def roi_align(features: Tensor, rois: Tensor, offsets: Tensor | None, k: int, scale: float, s: int,
              aligned: bool, plus_one: bool = False) -> Tensor:
    """``[K, C, k, k]``; the roi_align kernel, each bin moved by ``offsets * extent``."""
    out = []
    for r in range(rois.shape[0]):
        b = int(rois[r, 0])
        data = features[b]
        shift = 0.5 if aligned else 0.0
        x1, y1, x2, y2 = rois[r, 1], rois[r, 2], rois[r, 3], rois[r, 4]
        if plus_one:
            x2, y2 = x2 + 1, y2 + 1
        start_w, start_h = x1 * scale - shift, y1 * scale - shift
        roi_w, roi_h = x2 * scale - shift - start_w, y2 * scale - shift - start_h
        if not aligned:
            floor = 0.0 if plus_one else 1.0
            roi_w, roi_h = torch.clamp(roi_w, min=floor), torch.clamp(roi_h, min=floor)
        bin_w, bin_h = roi_w / k, roi_h / k
        rows = []
        for ph in range(k):
            cols = []
            for pw in range(k):
                dx = offsets[r, ph, pw, 0] * roi_w if offsets is not None else 0.0
                dy = offsets[r, ph, pw, 1] * roi_h if offsets is not None else 0.0
                total = data.new_zeros(data.shape[0])
                for iy in range(s):
                    y = start_h + ph * bin_h + (iy + 0.5) * bin_h / s + dy
                    for ix in range(s):
                        x = start_w + pw * bin_w + (ix + 0.5) * bin_w / s + dx
                        total = total + _roi_align_bilinear(data, y, x)
                cols.append(total / (s * s))
            rows.append(torch.stack(cols, dim=-1))
        out.append(torch.stack(rows, dim=-2))
    return torch.stack(out)


def _deform_bilinear(data: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """mmdetection v1's ``bilinear_interp`` (floor / ceil corners) for the deformable pooling."""
    x1, x2 = math.floor(x.item()), math.ceil(x.item())
    y1, y2 = math.floor(y.item()), math.ceil(y.item())
    dist_x, dist_y = x - x1, y - y1
    v11, v12 = data[:, y1, x1], data[:, y2, x1]
    v21, v22 = data[:, y1, x2], data[:, y2, x2]
    return ((1 - dist_x) * (1 - dist_y) * v11 + (1 - dist_x) * dist_y * v12
            + dist_x * (1 - dist_y) * v21 + dist_x * dist_y * v22)


def _c_round(v: float) -> float:
    return math.copysign(math.floor(abs(v) + 0.5), v)


def authors_deform(features: Tensor, rois: Tensor, offsets: Tensor | None, k: int, scale: float, s: int) -> Tensor:
    """``[K, C, k, k]``; mmdetection v1's deformable RoI pooling kernel."""
    height, width = features.shape[-2:]
    out = []
    for r in range(rois.shape[0]):
        b = int(rois[r, 0])
        data = features[b]
        start_w = _c_round(float(rois[r, 1])) * scale - 0.5
        start_h = _c_round(float(rois[r, 2])) * scale - 0.5
        end_w = (_c_round(float(rois[r, 3])) + 1.0) * scale - 0.5
        end_h = (_c_round(float(rois[r, 4])) + 1.0) * scale - 0.5
        roi_w, roi_h = max(end_w - start_w, 0.1), max(end_h - start_h, 0.1)
        bin_w, bin_h = roi_w / k, roi_h / k
        sub_w, sub_h = bin_w / s, bin_h / s
        rows = []
        for ph in range(k):
            cols = []
            for pw in range(k):
                trans_x = offsets[r, ph, pw, 0] if offsets is not None else features.new_zeros(())
                trans_y = offsets[r, ph, pw, 1] if offsets is not None else features.new_zeros(())
                wstart = pw * bin_w + start_w + trans_x * roi_w
                hstart = ph * bin_h + start_h + trans_y * roi_h
                total, count = data.new_zeros(data.shape[0]), 0
                for ih in range(s):
                    for iw in range(s):
                        w = wstart + iw * sub_w
                        h = hstart + ih * sub_h
                        if w < -0.5 or w > width - 0.5 or h < -0.5 or h > height - 0.5:
                            continue
                        w = torch.clamp(w, 0.0, width - 1.0)
                        h = torch.clamp(h, 0.0, height - 1.0)
                        total = total + _deform_bilinear(data, w, h)
                        count += 1
                cols.append(total / count if count else total)
            rows.append(torch.stack(cols, dim=-1))
        out.append(torch.stack(rows, dim=-2))
    return torch.stack(out)

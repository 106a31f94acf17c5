"""Deformable convolution from grid_sample and a matmul (``tsd_model.deform_conv``) against
``torchvision.ops.deform_conv2d``: the same forward and backward to float64 rounding, for DCNv1 and
the modulated DCNv2, with strides, dilation, conv groups, offset groups and sampling points far
outside the map; the columns are not kept for backward; the model's layer uses the chosen kernel."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import deform_conv2d as torchvision_deform_conv2d

from tsd_model import deform_conv
from tsd_model.backbones import DeformableConv2d
from tsd_model.deform_conv import deform_conv2d, deform_conv2d_sampled

CASES = [  # (n, c, h, w, out, groups, offset groups, kernel, stride, padding, dilation, modulated)
    (2, 16, 11, 13, 8, 1, 1, 3, 1, 1, 1, False),
    (2, 16, 11, 13, 8, 4, 1, 3, 1, 1, 1, True),
    (1, 12, 9, 10, 6, 3, 2, 3, 2, 1, 1, True),
    (2, 8, 12, 9, 4, 1, 2, 3, 1, 2, 2, False),
    (1, 6, 1, 7, 4, 2, 1, 3, 1, 1, 1, True),  # a map one pixel high
    (1, 4, 8, 8, 5, 1, 1, (3, 1), 1, (1, 0), 1, False),  # a non-square kernel
]


def _inputs(n, c, h, w, out, groups, offset_groups, kernel, stride, padding, dilation, modulated, scale=3.0):
    g = torch.Generator().manual_seed(0)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    (sh, sw), (ph, pw), (dh, dw) = ((v, v) if isinstance(v, int) else v for v in (stride, padding, dilation))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    f64 = torch.float64
    x = torch.randn(n, c, h, w, generator=g, dtype=f64, requires_grad=True)
    weight = torch.randn(out, c // groups, kh, kw, generator=g, dtype=f64, requires_grad=True)
    bias = torch.randn(out, generator=g, dtype=f64, requires_grad=True)
    # offsets of a few pixels: many samples fall between pixels, some outside the map entirely
    offset = (torch.randn(n, 2 * offset_groups * kh * kw, ho, wo, generator=g, dtype=f64) * scale).requires_grad_(True)
    mask = (torch.rand(n, offset_groups * kh * kw, ho, wo, generator=g, dtype=f64).requires_grad_(True)
            if modulated else None)
    return x, offset, weight, bias, mask, (stride, padding, dilation)


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_forward_and_backward_equal_torchvision(case):
    x, offset, weight, bias, mask, (stride, padding, dilation) = _inputs(*case)
    ours = deform_conv2d_sampled(x, offset, weight, bias, stride, padding, dilation, mask)
    reference = torchvision_deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    inputs = [t for t in (x, offset, weight, bias, mask) if t is not None]
    grad_out = torch.randn_like(reference)
    for a, b in zip(torch.autograd.grad(ours, inputs, grad_out), torch.autograd.grad(reference, inputs, grad_out),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_offsets_on_whole_pixels_and_zero_offsets():
    """Integer offsets are plain shifted taps (no interpolation); zero offsets give the plain conv."""
    x, offset, weight, bias, _, _ = _inputs(1, 8, 10, 10, 4, 1, 1, 3, 1, 1, 1, False)
    with torch.no_grad():
        zero = torch.zeros_like(offset)
        torch.testing.assert_close(deform_conv2d_sampled(x, zero, weight, bias, 1, 1, 1),
                                   torch.nn.functional.conv2d(x, weight, bias, 1, 1))
        whole = offset.round()
        torch.testing.assert_close(deform_conv2d_sampled(x, whole, weight, bias, 1, 1, 1),
                                   torchvision_deform_conv2d(x, whole, weight, bias, 1, 1, 1))


def test_the_columns_are_recomputed_in_backward_not_kept():
    """Autograd would keep the sampled columns (C x taps values per output position) for the
    matmul's backward; the op keeps only what torchvision's does (its inputs) and recomputes."""
    x = torch.randn(1, 64, 24, 24, requires_grad=True)
    offset = torch.randn(1, 18, 24, 24, requires_grad=True)
    weight = torch.randn(64, 64, 3, 3, requires_grad=True)
    columns_bytes = 64 * 9 * 24 * 24 * 4
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = deform_conv2d_sampled(x, offset, weight, None, 1, 1, 1)
    assert max(saved) < columns_bytes and sum(saved) < 2 * columns_bytes, saved
    out.sum().backward()
    assert x.grad is not None and offset.grad is not None and weight.grad is not None


def test_auto_uses_the_sampled_op_on_the_cpu(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torchvision's CPU kernel was called")

    x, offset, weight, bias, mask, _ = _inputs(1, 8, 6, 6, 4, 1, 1, 3, 1, 1, 1, True)
    expected = torchvision_deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask)
    monkeypatch.setattr(deform_conv, "torchvision_deform_conv2d", refuse)
    torch.testing.assert_close(deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask, "auto"), expected)
    with pytest.raises(AssertionError, match="CPU kernel was called"):
        deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask, "torchvision")
    with pytest.raises(ValueError, match="unknown deformable convolution kernel 'cuda'"):
        deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask, "cuda")


@pytest.mark.parametrize("modulated", [False, True])
def test_the_backbone_layer_gives_the_same_result_with_either_kernel(modulated):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, 1, 1, bias=False)
    layers = {k: DeformableConv2d(conv, modulated, kernel=k) for k in ("torchvision", "grid_sample")}
    with torch.no_grad():  # offsets that move: the offset conv starts at zero
        layers["torchvision"].offset_conv.weight.normal_(std=0.1)
    layers["grid_sample"].load_state_dict(layers["torchvision"].state_dict())
    x = torch.randn(2, 16, 12, 12)
    outs = {k: layer(x) for k, layer in layers.items()}
    torch.testing.assert_close(outs["grid_sample"], outs["torchvision"], rtol=1e-4, atol=1e-4)
    grads = {}
    for k, out in outs.items():
        out.square().sum().backward()
        grads[k] = [p.grad for p in layers[k].parameters()]
    for a, b in zip(grads["grid_sample"], grads["torchvision"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert "kernel=grid_sample" in repr(layers["grid_sample"])


def test_under_autocast_the_sampling_stays_in_float32():
    """Under bf16 autocast the matmul runs in bf16, the sampling positions and values in float32
    (a bf16 grid misplaces samples by a fraction of a pixel on a 200-pixel map): the result is
    within bf16's rounding of fp32."""
    x, offset, weight, bias, mask, _ = _inputs(1, 8, 200, 200, 4, 1, 1, 3, 1, 1, 1, True, scale=1.5)
    x, offset, weight, bias, mask = (t.detach().float().requires_grad_(True) for t in (x, offset, weight, bias, mask))
    reference = torchvision_deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the input as a bf16 layer below would give it
        ours = deform_conv2d_sampled(x.bfloat16(), offset.bfloat16(), weight, bias, 1, 1, 1, mask)
    scale = reference.abs().max()
    assert (ours.float() - reference).abs().max() < 0.02 * scale
    ours.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (x, offset, weight, mask))

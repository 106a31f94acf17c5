"""Backbones with FPN: ResNet-50/101/152, ResNeXt-101 32x4d / 64x4d, SENet-154, MobileNetV2, tiny.

Every builder returns torchvision's ``BackboneWithFPN`` contract: a module whose forward gives an
``OrderedDict`` of FPN maps ``'0'..'3'`` (P2-P5, strides 4-32) plus ``'pool'`` (P6, for the RPN
only) and which has ``out_channels``. The ResNet family and its DCN variants come from
torchvision's own ``ResNet``; weights are never downloaded here (see ``weights.py``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.ops import DeformConv2d, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from tsd_model.config import BackboneConfig
from tsd_model.deform_conv import DcnKernel, deform_conv2d
from tsd_model.senet import senet154_body

# every backbone's FPN maps that RoIs are pooled from (P2-P5) and their strides; P6 ('pool') is the RPN's only
ROI_FEATURE_MAPS = ["0", "1", "2", "3"]
ROI_FEATURE_STRIDES = [4, 8, 16, 32]

RESNET_LAYOUTS = {
    "resnet50": ([3, 4, 6, 3], 1, 64),
    "resnet101": ([3, 4, 23, 3], 1, 64),
    "resnet152": ([3, 8, 36, 3], 1, 64),
    "resnext101_32x4d": ([3, 4, 23, 3], 32, 4),
    "resnext101_64x4d": ([3, 4, 23, 3], 64, 4),
}


class DeformableConv2d(DeformConv2d):
    """A 3x3 deformable conv (DCNv1) or modulated deformable conv (DCNv2) with its offset conv.

    It subclasses ``DeformConv2d`` so that the weight keeps the name of the conv it replaces
    (``conv2.weight``) and ImageNet weights load unchanged. The offset (and mask) conv starts at
    zero: the layer begins as the plain conv it replaced (DCNv2's mask then starts at 0.5).
    ``kernel`` picks the implementation (``tsd_model.deform_conv``).
    """

    def __init__(self, conv: nn.Conv2d, modulated: bool, kernel: DcnKernel = "auto") -> None:
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, bias=conv.bias is not None)
        self.modulated = modulated
        self.kernel = kernel
        kh, kw = self.kernel_size
        self.offset_conv = nn.Conv2d(conv.in_channels, (3 if modulated else 2) * kh * kw, self.kernel_size,
                                     self.stride, self.padding, self.dilation, bias=True)
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        out = self.offset_conv(x)
        n = 2 * self.kernel_size[0] * self.kernel_size[1]
        offset, mask = (out[:, :n], out[:, n:].sigmoid()) if self.modulated else (out, None)
        return deform_conv2d(x, offset.to(x.dtype), self.weight, self.bias, self.stride, self.padding,
                             self.dilation, None if mask is None else mask.to(x.dtype), self.kernel)

    def __repr__(self) -> str:  # DeformConv2d writes its own one-line repr
        return f"{super().__repr__()[:-1]}, modulated={self.modulated}, kernel={self.kernel})"


def add_dcn(body: nn.Module, stages: list[int], modulated: bool, kernel: DcnKernel = "auto") -> int:
    """Replace the 3x3 conv (``conv2``) of every bottleneck in stages c3-c5 (``layer2``..``layer4``)."""
    replaced = 0
    for stage in stages:
        layer = getattr(body, f"layer{stage - 1}")
        for block in layer:
            block.conv2 = DeformableConv2d(block.conv2, modulated, kernel)
            replaced += 1
    return replaced


def _norm(cfg: BackboneConfig):
    return FrozenBatchNorm2d if cfg.norm == "frozen_bn" else nn.BatchNorm2d


def _trainable_layers(frozen_stages: int) -> int:
    return max(0, min(5, 5 - frozen_stages))


def _fpn_from_body(body: nn.Module, in_channels: list[int], cfg: BackboneConfig, prefix: str = "layer") -> BackboneWithFPN:
    return_layers = {f"{prefix}{i + 1}": str(i) for i in range(4)}
    return BackboneWithFPN(body, return_layers, in_channels, cfg.fpn_channels, extra_blocks=LastLevelMaxPool())


class TinyBody(nn.Module):
    """A four-stage CNN (strides 4-32) for CPU tests and the demo; same output contract as ResNet."""

    def __init__(self, channels: list[int], norm_layer) -> None:
        super().__init__()

        def conv(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm_layer(cout), nn.ReLU(inplace=True))

        c1, c2, c3, c4 = channels
        self.stem = nn.Sequential(conv(3, c1, 2), conv(c1, c1, 1))
        self.layer1 = nn.Sequential(conv(c1, c1, 2), conv(c1, c1, 1))
        self.layer2 = nn.Sequential(conv(c1, c2, 2), conv(c2, c2, 1))
        self.layer3 = nn.Sequential(conv(c2, c3, 2), conv(c3, c3, 1))
        self.layer4 = nn.Sequential(conv(c3, c4, 2), conv(c4, c4, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))


class _MobileNetFPN(nn.Module):
    """MobileNetV2 features at strides 4, 8, 16, 32 with an FPN (P2-P5 + P6)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v2
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

        features = mobilenet_v2(weights=None, norm_layer=_norm(cfg)).features
        # block indices whose outputs have strides 4, 8, 16, 32 (channels 24, 32, 96, 1280)
        self.taps = [3, 6, 13, 18]
        self.body = features
        self.fpn = FeaturePyramidNetwork([24, 32, 96, 1280], cfg.fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = cfg.fpn_channels
        for i, block in enumerate(features):
            if i < cfg.frozen_stages * 3:
                block.requires_grad_(False)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        maps = OrderedDict()
        for i, block in enumerate(self.body):
            x = block(x)
            if i in self.taps:
                maps[str(self.taps.index(i))] = x
        return self.fpn(maps)


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """The FPN backbone named by ``cfg``; FPN maps '0'-'3' (P2-P5) and 'pool' (P6)."""
    norm = _norm(cfg)
    if cfg.name in RESNET_LAYOUTS:
        layers, groups, width = RESNET_LAYOUTS[cfg.name]
        body = tv_resnet.ResNet(tv_resnet.Bottleneck, layers, groups=groups, width_per_group=width, norm_layer=norm)
        if cfg.dcn != "none":
            add_dcn(body, cfg.dcn_stages, modulated=cfg.dcn == "v2", kernel=cfg.dcn_kernel)
        return _resnet_fpn_extractor(body, _trainable_layers(cfg.frozen_stages), returned_layers=[1, 2, 3, 4],
                                     extra_blocks=LastLevelMaxPool())
    if cfg.name == "senet154":
        body = senet154_body(norm)
        if cfg.dcn != "none":
            add_dcn(body, cfg.dcn_stages, modulated=cfg.dcn == "v2", kernel=cfg.dcn_kernel)
        for name, child in body.named_children():
            stage = 0 if name == "layer0" else int(name[-1])
            if stage < cfg.frozen_stages:
                child.requires_grad_(False)
        return _fpn_from_body(body, [256, 512, 1024, 2048], cfg)
    if cfg.name == "mobilenet_v2":
        if cfg.dcn != "none":
            raise ValueError("backbone.dcn is only available for the ResNet/ResNeXt/SENet backbones")
        return _MobileNetFPN(cfg)
    if cfg.name == "tiny":
        if cfg.dcn != "none":
            raise ValueError("backbone.dcn is only available for the ResNet/ResNeXt/SENet backbones")
        body = TinyBody(cfg.tiny_channels, norm)
        if cfg.frozen_stages > 0:
            body.stem.requires_grad_(False)
        return _fpn_from_body(body, list(cfg.tiny_channels), cfg)
    raise ValueError(f"unknown backbone {cfg.name!r}")

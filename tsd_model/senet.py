"""SENet-154 (Hu et al., "Squeeze-and-Excitation Networks"), the backbone of TSD's strongest OID entry.

Written here rather than adding a dependency for one network; the module names follow the
reference implementation (Cadene's pretrainedmodels, also used by timm's ``legacy_senet154``) so
that its ImageNet weights load by name: ``layer0.conv1``, ``layer1.0.se_module.fc1``, ...
Only the feature body is built (no pooling or classifier): ``layer0``..``layer4``, strides 4-32,
channels 256/512/1024/2048.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn


class SEModule(nn.Module):
    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class SEBottleneck(nn.Module):
    """SENet-154's bottleneck: 1x1 (2p) -> grouped 3x3 (4p) -> 1x1 (4p) -> SE, plus the shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, groups: int, reduction: int, stride: int,
                 downsample: nn.Module | None, norm_layer) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes * 2, 1, bias=False)
        self.bn1 = norm_layer(planes * 2)
        self.conv2 = nn.Conv2d(planes * 2, planes * 4, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = norm_layer(planes * 4)
        self.conv3 = nn.Conv2d(planes * 4, planes * 4, 1, bias=False)
        self.bn3 = norm_layer(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.se_module = SEModule(planes * 4, reduction)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se_module(self.bn3(self.conv3(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class SENetBody(nn.Module):
    def __init__(self, layers: list[int], groups: int, reduction: int, norm_layer) -> None:
        super().__init__()
        self.layer0 = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 64, 3, 2, 1, bias=False)), ("bn1", norm_layer(64)), ("relu1", nn.ReLU(inplace=True)),
            ("conv2", nn.Conv2d(64, 64, 3, 1, 1, bias=False)), ("bn2", norm_layer(64)), ("relu2", nn.ReLU(inplace=True)),
            ("conv3", nn.Conv2d(64, 128, 3, 1, 1, bias=False)), ("bn3", norm_layer(128)), ("relu3", nn.ReLU(inplace=True)),
            ("pool", nn.MaxPool2d(3, stride=2, ceil_mode=True)),
        ]))
        self.inplanes = 128
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            setattr(self, f"layer{i + 1}", self._make_layer(planes, blocks, groups, reduction, 1 if i == 0 else 2,
                                                           norm_layer))

    def _make_layer(self, planes: int, blocks: int, groups: int, reduction: int, stride: int, norm_layer) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * SEBottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 3, stride, 1, bias=False), norm_layer(planes * 4))
        layers = [SEBottleneck(self.inplanes, planes, groups, reduction, stride, downsample, norm_layer)]
        self.inplanes = planes * 4
        layers += [SEBottleneck(self.inplanes, planes, groups, reduction, 1, None, norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer0(x)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return x


def senet154_body(norm_layer=nn.BatchNorm2d) -> SENetBody:
    return SENetBody([3, 8, 36, 3], groups=64, reduction=16, norm_layer=norm_layer)

"""MobileNetV2 (Sandler et al., 2018) with torchvision's module names, so torchvision's ImageNet
state dict (`mobilenet_v2-b0353104.pth`) loads strictly without torchvision installed.

One inverted residual block, input x (N, c_in, H, W), expansion t, stride s:

    h = ReLU6(BN(conv1x1(x)))              (N, t·c_in, H, W)        skipped when t = 1
    h = ReLU6(BN(dwconv3x3_s(h)))          (N, t·c_in, H/s, W/s)    depthwise: groups = t·c_in
    y = BN(conv1x1(h))                     (N, c_out, H/s, W/s)     linear bottleneck, no activation
    y = x + y                              when s = 1 and c_in = c_out

Network at width 1.0: stem conv3x3/2 (3 -> 32), 17 blocks, conv1x1 (320 -> 1280), global average
pool, dropout 0.2, linear 1280 -> 1000. 3,504,872 parameters. Keys: `features.{i}` (stem 0, blocks
1-17, head conv 18), `features.{i}.conv.{j}` inside a block, `classifier.1` the linear layer.
"""

from __future__ import annotations

import torch
from torch import nn

# (t expansion, c output channels, n repeats, s stride of the first repeat): the paper's Table 2
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def conv_bn_relu6(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """conv (no bias) -> BatchNorm -> ReLU6; keys `0.weight`, `1.{weight,bias,running_mean,...}`."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = c_in * expand_ratio
        self.use_residual = stride == 1 and c_in == c_out
        layers = [conv_bn_relu6(c_in, hidden, kernel_size=1)] if expand_ratio != 1 else []
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),  # depthwise 3x3
            nn.Conv2d(hidden, c_out, 1, bias=False),  # pointwise linear bottleneck
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        c_in = 32
        features: list[nn.Module] = [conv_bn_relu6(3, c_in, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                features.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        features.append(conv_bn_relu6(c_in, 1280, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)  # (N, 1280, H/32, W/32)
        h = nn.functional.adaptive_avg_pool2d(h, 1).flatten(1)  # (N, 1280)
        return self.classifier(h)  # (N, num_classes)

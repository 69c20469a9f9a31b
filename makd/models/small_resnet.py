"""CIFAR-style ResNets (He et al. 2016, sec. 4.2) for 28-32 px inputs: 3 stages of basic blocks.

resnetN has depth N = 6n + 2 (n blocks per stage); `width` is the first stage's channel count.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

DEPTHS = {"resnet8": 1, "resnet14": 2, "resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = (nn.Identity() if stride == 1 and in_ch == out_ch else
                         nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Backbone only: returns pooled features of size `num_features` (= 4 * width)."""

    def __init__(self, depth_name: str, width: int = 16, in_chans: int = 3, init: str = "kaiming_fan_out") -> None:
        super().__init__()
        n = DEPTHS[depth_name]
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, ch = [], width
        for stage, out_ch in enumerate((width, 2 * width, 4 * width)):
            for block in range(n):
                layers.append(BasicBlock(ch, out_ch, 2 if stage > 0 and block == 0 else 1))
                ch = out_ch
        self.layers = nn.Sequential(*layers)
        self.num_features = ch
        if init == "kaiming_fan_out":  # else PyTorch's own (Kaiming uniform, a = sqrt(5)), already in place
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1)

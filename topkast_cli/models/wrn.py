"""Wide ResNet for CIFAR (Zagoruyko & Komodakis 2016): WRN-depth-width, pre-activation
basic blocks, three groups of (depth - 4) / 6 blocks at 16, 32, 64 x width channels.

torchvision has only the ImageNet bottleneck variant (wide_resnet50_2), so the block is
written here. WRN-28-10 and WRN-22-2 are the CIFAR models of many sparse-training papers.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..errors import UserError


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus the input (or a 1x1 projection of
    the activated input when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), conv3x3(cout, cout)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        a = F.relu(self.bn1(x))
        y = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(a)))))
        return y + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple, depth: int = 28, width: int = 10, dropout: float = 0.0):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise UserError(f"model.depth={depth!r} is not allowed; it must be 6n+4 (10, 16, 22, 28, 40, ...)")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise UserError(f"model.width={width!r} must be an integer >= 1")
        if len(input_shape) != 3:
            raise UserError(f"model wrn needs image inputs (channels, height, width); the dataset gives {tuple(input_shape)}")
        blocks = (depth - 4) // 6
        self.conv1 = conv3x3(input_shape[0], 16)
        cin = 16
        for group, stride in enumerate((1, 2, 2)):  # layer1..layer3
            cout = 16 * width * 2**group
            layers = [WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, dropout) for i in range(blocks)]
            self.add_module(f"layer{group + 1}", nn.Sequential(*layers))
            cin = cout
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

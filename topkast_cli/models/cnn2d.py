"""A small 2-D CNN for small images (digits, MNIST, CIFAR at a glance): blocks of 3x3 conv
(+ batch norm) + ReLU, a 2x2 max-pool after each block while the image is at least 2 px,
global average pooling, one linear layer."""

from __future__ import annotations

from torch import nn

from ..errors import UserError


class CNN2d(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple, channels: tuple = (32, 64), batch_norm: bool = True):
        super().__init__()
        if len(input_shape) != 3:
            raise UserError(f"model cnn2d needs image inputs (channels, height, width); the dataset gives {tuple(input_shape)}")
        channels = list(channels)
        if not channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels):
            raise UserError(f"model.channels={channels!r} must be a non-empty list of integers >= 1")
        layers, cin, size = [], input_shape[0], min(input_shape[1:])
        for c in channels:
            layers += [nn.Conv2d(cin, c, 3, padding=1, bias=not batch_norm)]
            layers += [nn.BatchNorm2d(c)] if batch_norm else []
            layers += [nn.ReLU()]
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            cin = c
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))

"""1-D CNN for MNIST-1D: the dataset paper's ConvBase (k5/k3/k3, 25 channels), with the
strides configurable (stride 1 in the later convs keeps more resolution)."""

from __future__ import annotations

from torch import nn


class CNN1d(nn.Module):
    def __init__(
        self,
        num_classes: int,
        input_shape: tuple,
        channels: int = 25,
        kernel_sizes: tuple = (5, 3, 3),
        strides: tuple = (2, 2, 2),
    ):
        super().__init__()
        if len(kernel_sizes) != len(strides):
            raise ValueError("kernel_sizes and strides must have the same length")
        in_channels, length = input_shape[0], input_shape[-1]
        layers = []
        for k, s in zip(kernel_sizes, strides):
            layers += [nn.Conv1d(in_channels, channels, k, stride=s, padding=1), nn.ReLU()]
            in_channels, length = channels, (length + 2 - k) // s + 1
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * length, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))

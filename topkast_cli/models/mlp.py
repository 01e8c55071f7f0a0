"""Multi-layer perceptron over flattened inputs."""

from __future__ import annotations

import math

from torch import nn


class MLP(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple, hidden: tuple = (256, 256), dropout: float = 0.0):
        super().__init__()
        layers, width = [nn.Flatten()], math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)

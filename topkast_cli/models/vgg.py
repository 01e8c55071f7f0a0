"""VGG with batch norm for CIFAR: torchvision's VGG feature stack (13 convs for VGG-16, five
max-pools), then global average pooling and a small classifier instead of the ImageNet
head's two 4096-wide layers (which would hold 90% of the weights at 32 px)."""

from __future__ import annotations

from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from ..errors import UserError

DEPTHS = {11: "A", 13: "B", 16: "D", 19: "E"}  # torchvision's layer configurations


class CifarVGG(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple, depth: int = 16, batch_norm: bool = True, hidden: tuple = ()):
        super().__init__()
        if depth not in DEPTHS:
            raise UserError(f"model.depth={depth!r} is not allowed; allowed: {', '.join(map(str, DEPTHS))}")
        if len(input_shape) != 3 or min(input_shape[1:]) < 32:
            raise UserError(f"model vgg needs images of at least 32x32 px (five 2x2 max-pools); the dataset gives {tuple(input_shape)}")
        self.features = make_layers(cfgs[DEPTHS[depth]], batch_norm=batch_norm)
        if input_shape[0] != 3:  # torchvision builds the stack for RGB
            first = self.features[0]
            self.features[0] = nn.Conv2d(input_shape[0], first.out_channels, 3, padding=1)
        head, width = [], 512
        for h in hidden:
            head += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.classifier = nn.Sequential(*head, nn.Linear(width, num_classes))
        for m in self.modules():  # torchvision's VGG initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(x.flatten(1))


"""torchvision's ResNets, with a stem that fits the input size.

`stem: imagenet` is torchvision's 7x7 stride-2 conv + max-pool; `stem: cifar` a 3x3
stride-1 conv without the max-pool (the usual ResNet for 32x32 inputs, which the ImageNet
stem would shrink to 8x8 before the first block); `auto` picks cifar for inputs up to
64 px. `weights` names torchvision pretrained weights (e.g. IMAGENET1K_V1; downloaded into
torch's hub cache on first use); the head is replaced when num_classes differs.
"""

from __future__ import annotations

import logging

import torchvision
from torch import nn

from ..errors import UserError

log = logging.getLogger("topkast")

STEMS = ("auto", "imagenet", "cifar")
SMALL_INPUT = 64  # px: at or below this, `auto` uses the cifar stem


def choose_stem(stem: str, input_shape: tuple) -> str:
    if stem not in STEMS:
        raise UserError(f"model.stem={stem!r} is not allowed; allowed: {', '.join(STEMS)}")
    if stem == "auto":
        return "cifar" if max(input_shape[1:]) <= SMALL_INPUT else "imagenet"
    return stem


def pretrained_weights(arch: str, name: str):
    """The torchvision weights enum member `name` (e.g. IMAGENET1K_V2, DEFAULT) of `arch`."""
    enum = torchvision.models.get_model_weights(arch)
    if not isinstance(name, str):
        raise UserError(f"model.weights={name!r} must be a name; allowed: null, {', '.join(enum.__members__)}")
    member = name.split(".")[-1]  # accept ResNet50_Weights.IMAGENET1K_V2 too
    if member not in enum.__members__:
        raise UserError(f"model.weights={name!r} is not a weight set of {arch}; allowed: null, {', '.join(enum.__members__)}")
    return enum[member]


def _stem_conv(in_channels: int, stem: str) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False) if stem == "cifar" else nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's convs
    return conv


def build_resnet(
    arch: str,
    num_classes: int,
    input_shape: tuple,
    stem: str = "auto",
    weights: str | None = None,
    zero_init_residual: bool = False,
) -> nn.Module:
    if len(input_shape) != 3:
        raise UserError(f"model {arch} needs image inputs (channels, height, width); the dataset gives {tuple(input_shape)}")
    stem = choose_stem(stem, input_shape)
    builder = getattr(torchvision.models, arch)
    if weights:
        w = pretrained_weights(arch, weights)
        try:
            model = builder(weights=w, zero_init_residual=zero_init_residual)
        except (OSError, RuntimeError) as e:
            raise UserError(f"model.weights={weights}: could not load {w}: {str(e).strip().splitlines()[0]}") from None
        if model.fc.out_features != num_classes:
            model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        model = builder(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    if stem == "cifar" or input_shape[0] != 3:
        if weights:
            log.warning("model.weights=%s: the first conv is replaced (stem %s, %d channels) and starts untrained", weights, stem, input_shape[0])
        model.conv1 = _stem_conv(input_shape[0], stem)  # keeps its place: still the first layer
    if stem == "cifar":
        model.maxpool = nn.Identity()
    return model


def resnet18(num_classes: int, input_shape: tuple, **params) -> nn.Module:
    return build_resnet("resnet18", num_classes, input_shape, **params)


def resnet50(num_classes: int, input_shape: tuple, **params) -> nn.Module:
    return build_resnet("resnet50", num_classes, input_shape, **params)

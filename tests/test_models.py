"""Model registry: every config builds, gives (batch, num_classes), and keeps its first layer
first (the one `dense_first` keeps dense); ResNet stems; pretrained-weight handling."""

import re
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import make_config
from torch import nn

import topkast_cli
from topkast_cli.config import instantiate
from topkast_cli.errors import UserError
from topkast_cli.sparsity import TopKAST
from topkast_cli.sparsity.selection import candidate_layers
from topkast_cli.commands.train import train

MODEL_DIR = Path(topkast_cli.__file__).parent / "conf" / "model"

# The input shapes each model is meant for (per sample).
INPUTS = {
    "mlp": [(1, 40), (1, 8, 8), (1, 28, 28)],
    "cnn1d": [(1, 40)],
    "cnn2d": [(1, 8, 8), (3, 32, 32), (1, 1, 1)],
    "resnet18": [(3, 32, 32), (1, 28, 28), (3, 128, 128)],  # (224 px: test_resnet_stem)
    "resnet50": [(3, 32, 32), (3, 96, 96)],
    "wrn22_2": [(3, 32, 32), (1, 28, 28)],
    "wrn28_10": [(3, 32, 32)],
    "vgg16": [(3, 32, 32), (1, 32, 32)],
}
FIRST_LAYER = {"mlp": "net.1", "cnn1d": "features.0", "cnn2d": "features.0", "vgg16": "features.0"}  # others: conv1


def build(name, input_shape, num_classes=7, overrides=()):
    cfg = make_config([f"model={name}", *overrides])
    return instantiate(cfg.model, "model", num_classes=num_classes, input_shape=input_shape)


LANGUAGE_MODELS = {"transformer", "hf_causal_lm"}  # tests/test_language_model.py, tests/test_hf_model.py


def test_every_model_config_is_covered():
    assert {p.stem for p in MODEL_DIR.glob("*.yaml")} == set(INPUTS) | LANGUAGE_MODELS


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_model_builds_and_gives_batch_by_classes(name):
    torch.manual_seed(0)
    for shape in INPUTS[name]:
        model = build(name, shape).eval()
        with torch.no_grad():
            out = model(torch.randn(2, *shape))
        assert out.shape == (2, 7), (name, shape)
        assert torch.isfinite(out).all()
    first = candidate_layers(model)[0][0]
    assert first == FIRST_LAYER.get(name, "conv1")


def test_topkast_trains_a_wide_resnet():
    """The engine handles the hand-written blocks: every conv/linear but the first is
    sparse, and a step changes only backward-set entries. (ResNets: test_data's runs.)"""
    torch.manual_seed(0)
    model = build("wrn22_2", (3, 32, 32), num_classes=10)
    method = TopKAST(0.9, 0.8).attach(model)
    convs_and_linears = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(method.layers) == len(convs_and_linears) - 1
    before = [layer.theta.detach().clone() for layer in method.layers]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for layer, old in zip(method.layers, before):
        changed = layer.theta.detach() != old
        assert not (changed & ~layer.backward).any()
        assert changed.any()


def feature_size(model, size):
    """Spatial size of layer1's output for a size x size input."""
    seen = []
    model.layer1.register_forward_hook(lambda module, inputs, output: seen.append(output.shape[-1]) and None)
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, size, size))
    return seen[0]


@pytest.mark.parametrize(
    "stem, size, expect",
    [("auto", 32, "cifar"), ("auto", 64, "cifar"), ("auto", 65, "imagenet"), ("auto", 224, "imagenet"),
     ("imagenet", 32, "imagenet"), ("cifar", 96, "cifar")],
)
def test_resnet_stem(stem, size, expect):
    model = build("resnet18", (3, size, size), overrides=[f"model.stem={stem}"])
    if expect == "cifar":
        assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
        assert isinstance(model.maxpool, nn.Identity)
        assert feature_size(model, size) == size  # no downsampling before layer1
    else:
        assert (model.conv1.kernel_size, model.conv1.stride) == ((7, 7), (2, 2))
        assert isinstance(model.maxpool, nn.MaxPool2d)
        assert feature_size(model, size) == (size + 3) // 4


def test_resnet_grey_input_keeps_the_imagenet_stem_shape():
    model = build("resnet50", (1, 224, 224), overrides=["model.stem=imagenet"])
    assert (model.conv1.in_channels, model.conv1.kernel_size) == (1, (7, 7))


def test_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())
    # torchvision's published counts for the ImageNet models
    assert count(build("resnet18", (3, 224, 224), 1000)) == 11_689_512
    assert count(build("resnet50", (3, 224, 224), 1000)) == 25_557_032
    # the usual figures for the CIFAR-10 models (WRN-28-10: 36.5M; VGG-16-BN: 14.7M)
    assert count(build("wrn28_10", (3, 32, 32), 10)) == 36_479_194
    assert count(build("vgg16", (3, 32, 32), 10)) == 14_728_266
    assert count(build("wrn22_2", (3, 32, 32), 10)) == 1_079_642


def test_pretrained_weights_are_loaded_by_name(monkeypatch):
    """No download: torchvision's weight loader is replaced by a reference network's state."""
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", lambda self, **kw: reference.state_dict())
    same = build("resnet18", (3, 224, 224), 1000, ["model.weights=IMAGENET1K_V1"])
    for k, v in reference.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k
    # another class count: a new head, the rest pretrained; the small-image stem is new too
    small = build("resnet18", (3, 32, 32), 10, ["model.weights=ResNet18_Weights.DEFAULT"])
    assert small.fc.out_features == 10 and small.conv1.kernel_size == (3, 3)
    assert torch.equal(small.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


@pytest.mark.parametrize(
    "name, shape, overrides, message",
    [
        ("resnet18", (3, 32, 32), ["model.stem=big"], "model.stem='big' is not allowed; allowed: auto, imagenet, cifar"),
        ("resnet50", (3, 32, 32), ["model.weights=IMAGENET2K"], "allowed: null, IMAGENET1K_V1, IMAGENET1K_V2"),
        ("resnet18", (1, 40), [], "needs image inputs"),
        ("wrn22_2", (3, 32, 32), ["model.depth=21"], "model.depth=21 is not allowed; it must be 6n+4"),
        ("vgg16", (1, 28, 28), [], "at least 32x32"),
        ("vgg16", (3, 32, 32), ["model.depth=15"], "model.depth=15 is not allowed; allowed: 11, 13, 16, 19"),
    ],
)
def test_bad_model_options_are_user_errors(name, shape, overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build(name, shape, overrides=overrides)


def test_model_error_in_a_run_is_one_line(tmp_path):
    cfg = make_config(["model=vgg16", "dataset=digits", "trainer.progress=false"])
    with pytest.raises(UserError, match=r"^model vgg needs images of at least 32x32 px.*\(1, 8, 8\)$"):
        train(cfg, tmp_path)

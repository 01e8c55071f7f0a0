"""Every option of every config group composes with train.yaml and passes validation; the
objects the cheap groups name can be built."""

from pathlib import Path

import pytest
import torch

import topkast_cli
from conftest import make_config
from topkast_cli.config import instantiate, validate
from topkast_cli.run import check_run

CONF = Path(topkast_cli.__file__).parent / "conf"
OPTIONS = [  # (experiment: whole-config presets, in test_recipes.py)
    (group.name, option.stem)
    for group in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment") and not p.name.startswith("_"))
    for option in sorted(group.glob("*.yaml"))
]


def test_config_groups_exist():
    groups = {g for g, _ in OPTIONS}
    assert {"model", "dataset", "sparsity", "optimizer", "scheduler", "trainer"} <= groups


# Options with a mandatory value (`???`) the user must give, and image models, which need
# an image dataset (the default is the 1-D MNIST-1D).
IMAGE_MODELS = ("cnn2d", "resnet18", "resnet50", "wrn22_2", "wrn28_10", "vgg16")
REQUIRED = {("model", m): ["dataset=synthetic"] for m in IMAGE_MODELS}
REQUIRED.update({("dataset", d): ["model=mlp"] for d in ("synthetic", "cifar10", "cifar100", "mnist", "fashion_mnist", "imagenet", "digits")})
REQUIRED[("dataset", "imagefolder")] = ["model=mlp", "dataset.root={tmp}"]
# Language models need text; the pre-flight check of a byte corpus needs no data when it may download.
TEXT = ["model=transformer", "dataset.context=16"]
REQUIRED[("model", "transformer")] = ["dataset=textfile", "dataset.path={tmp}/t.txt", "dataset.context=16"]
REQUIRED[("model", "hf_causal_lm")] = REQUIRED[("model", "transformer")]
# Options that need an optional extra (their absence: test_hf_optional.py).
EXTRAS = {("model", "hf_causal_lm"): "transformers"}
REQUIRED[("dataset", "textfile")] = [*TEXT, "dataset.path={tmp}/t.txt"]
REQUIRED.update({("dataset", d): [*TEXT, "dataset.download=true"] for d in ("enwik8", "text8", "wikitext103")})


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option, tmp_path):
    if (group, option) in EXTRAS:
        pytest.importorskip(EXTRAS[group, option], reason="an optional extra")
    extra = [o.format(tmp=tmp_path) for o in REQUIRED.get((group, option), [])]
    (tmp_path / "t.txt").write_text("a small text file " * 20)
    cfg = make_config([f"{group}={option}", *extra])
    assert cfg[group] is not None
    validate(cfg)
    check_run(cfg)  # built on the meta device, one batch through it


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "optimizer"])
def test_optimizers_and_schedules_build(option):
    cfg = make_config([f"optimizer={option}"])
    opt = instantiate(cfg.optimizer, "optimizer")([torch.nn.Parameter(torch.zeros(2))])
    for _, sched in [o for o in OPTIONS if o[0] == "scheduler"]:
        s = instantiate(make_config([f"scheduler={sched}"]).scheduler, "scheduler")(opt, total_steps=100)
        for _ in range(100):
            opt.step()
            s.step()
        assert opt.param_groups[0]["lr"] >= 0


def test_contract_keys_exist():
    cfg = make_config([])
    for key in ["sparsity.forward", "sparsity.backward", "sparsity.refresh_interval", "sparsity.exploration_steps",
                "sparsity.distribution", "trainer.max_steps", "resume", "seed"]:
        parent, _, leaf = key.rpartition(".")
        assert leaf in (cfg[parent] if parent else cfg), key


def test_overrides_reach_the_objects():
    cfg = make_config(["sparsity.forward=0.95", "sparsity.refresh_interval=7", "optimizer.lr=0.003"])
    method = instantiate(cfg.sparsity, "sparsity")
    assert method.forward_sparsity == 0.95 and method.schedule.every == 7
    assert abs(method.backward_sparsity - 0.9) < 1e-9, "backward null: density 2x forward"
    assert cfg.optimizer.lr == 0.003


def test_a_missing_mandatory_value_is_named():
    from topkast_cli.errors import UserError

    with pytest.raises(UserError, match=r"dataset.root is required"):
        check_run(make_config(["dataset=imagefolder"]))

"""Every option of every config group composes with train.yaml and passes validation; the
objects the cheap groups name can be built."""

from pathlib import Path

import pytest
import torch

from omegaconf import OmegaConf

import topkast_cli
from conftest import make_config
from topkast_cli.config import compose, instantiate, validate
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
    assert group == "task" or cfg[group] is not None  # (a task only sets other groups)
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


# ----------------------------------------------------------------- training defaults per task
LM = ["model=transformer", "dataset=textfile", "dataset.path=t.txt"]


def test_a_language_model_gets_the_lm_defaults():
    cfg = make_config(LM)
    assert cfg.optimizer._target_ == "torch.optim.AdamW"
    assert list(cfg.optimizer.betas) == [0.9, 0.99] and cfg.optimizer.weight_decay == 0.1
    assert cfg.optimizer.lr == pytest.approx(5e-3)  # 5e-3 x 128 / width, width 128
    assert (cfg.scheduler.shape, cfg.scheduler.warmup, cfg.scheduler.final_lr_ratio) == ("cosine", 0.05, 0.1)
    assert cfg.trainer.grad_clip == 1.0


@pytest.mark.parametrize("chosen", [["model=transformer"], ["dataset=enwik8", "model=transformer"], ["dataset=text8", "model=mlp"]])
def test_a_text_dataset_or_the_transformer_alone_selects_the_lm_task(chosen):
    assert compose("train", chosen).hydra.runtime.choices.task == "lm"


def test_the_lm_learning_rate_follows_the_width():
    assert make_config([*LM, "model.width=256"]).optimizer.lr == pytest.approx(2.5e-3)
    # `--cfg job` and .hydra/config.yaml show the rule, not only its value
    assert OmegaConf.to_container(compose("train", LM).optimizer)["lr"].startswith("${scale_by_width:5e-3,128,")


def test_the_image_defaults_do_not_change():
    for overrides in ([], ["model=cnn1d"], ["model=mlp", "dataset=synthetic"]):
        cfg = make_config(overrides)
        assert compose("train", overrides).hydra.runtime.choices.task == "image"
        assert OmegaConf.to_container(cfg.optimizer) == {
            "_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.01, "betas": [0.9, 0.999], "weight_decay": 0.0}
        assert OmegaConf.to_container(cfg.scheduler) == {
            "_target_": "topkast_cli.lr_schedule.warmup_schedule", "_partial_": True, "shape": "constant", "warmup": 0.0}
        assert cfg.trainer.grad_clip is None


@pytest.mark.parametrize("override, key, value", [
    ("optimizer.lr=1e-3", "optimizer.lr", 1e-3),
    ("trainer.grad_clip=0.5", "trainer.grad_clip", 0.5),
    ("optimizer=adam", "optimizer._target_", "torch.optim.Adam"),
    ("scheduler=constant", "scheduler.shape", "constant"),
    ("task=image", "optimizer._target_", "torch.optim.Adam"),
])
def test_the_users_overrides_win_over_the_lm_defaults(override, key, value):
    assert OmegaConf.select(make_config([*LM, override]), key) == value


def test_a_recipe_keeps_its_own_optimizer_under_the_lm_task():
    cfg = make_config(["experiment=enwik8_transformer_topkast80"])
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == 0.00025
    assert cfg.scheduler.warmup == 0.01 and cfg.trainer.grad_clip == 0.25


def test_lm_weight_decay_reaches_dense_parameters_only(tmp_path):
    from topkast_cli.run import build_optimizer

    (tmp_path / "t.txt").write_text("a small text file " * 20)
    cfg = make_config(["model=transformer", "dataset=textfile", f"dataset.path={tmp_path}/t.txt", "dataset.context=16",
                       "model.layers=1", "model.width=16", "model.heads=2"])
    model = instantiate(cfg.model, "model", vocab_size=8, context=16)
    method = instantiate(cfg.sparsity, "sparsity").attach(model)
    optimizer = build_optimizer(instantiate(cfg.optimizer, "optimizer"), model, method)
    dense, sparse = optimizer.param_groups
    assert dense["weight_decay"] == 0.1 and sparse["weight_decay"] == 0.0
    assert {id(p) for p in sparse["params"]} == {id(p) for p in method.sparse_parameters()}

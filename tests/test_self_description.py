"""Each method describes itself (display name, backward rule, what may change on resume), so
the trainer, eval and sweep never read its config keys or class name. Built from the shipped
configs, as Hydra builds them, without a model."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import topkast_cli
from topkast_cli.sparsity import Dense, SparsityMethod, TopKAST, default_backward_sparsity

CONF = Path(topkast_cli.__file__).parent / "conf" / "sparsity"

# The keys that only shape the optimizer steps to come may change on resume for every method.
OPTIMIZER = {"regularization", "regularization_form", "regularization_schedule", "moment_restart", "backend"}
EXPECTED = {  # display_name, backward_is_forward, backward_rule, resume_may_change
    "topkast": ("topkast", False, "2x density", {"refresh_interval", "exploration_steps", "keep_units", *OPTIMIZER}),
    "static": ("static", True, "-", OPTIMIZER),
    "set": ("set", True, "-", {"update_interval", "end_steps", "drop_fraction", "decay", *OPTIMIZER}),
    "rigl": ("rigl", True, "-", {"update_interval", "end_steps", "drop_fraction", "decay", *OPTIMIZER}),
    "gmp": ("gmp", True, "-", {"prune_interval", *OPTIMIZER}),
    "dense": ("dense", True, "-", {"regularization"}),
}


def build(name, **overrides) -> SparsityMethod:
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    return instantiate(OmegaConf.merge(cfg, overrides))


def test_every_shipped_method_is_described():
    assert {p.stem for p in CONF.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", EXPECTED)
def test_self_description(name):
    method = build(name)
    display, same, rule, may_change = EXPECTED[name]
    assert method.display_name == display
    assert method.backward_is_forward is same
    assert method.backward_rule == rule
    assert set(method.resume_may_change) == may_change and isinstance(type(method).resume_may_change, tuple)
    keys = set(OmegaConf.load(CONF / f"{name}.yaml")) | {"regularization"}
    assert set(method.resume_may_change) <= keys, "config keys under sparsity."
    if same:
        assert method.backward_sparsity == method.forward_sparsity


@pytest.mark.parametrize("name", EXPECTED)
def test_no_sparse_layer_is_dense(name):
    if name == "dense":
        assert build(name).display_name == "dense"
        return
    method = build(name, forward=0.0)
    assert method.display_name == "dense" and method.backward_rule == "-"


@pytest.mark.parametrize("backward, rule", [(None, "2x density"), (0.8, "0.8"), (0.9, "0.9"), (0, "0")])
def test_topkast_backward_rule(backward, rule):
    method = build("topkast", forward=0.9, backward=backward)
    assert method.backward_rule == rule
    assert method.backward_sparsity == pytest.approx(0.8 if backward is None else backward)


def test_the_default_backward_rule():
    assert default_backward_sparsity(0.9) == pytest.approx(0.8)
    assert default_backward_sparsity(0.95) == pytest.approx(0.9)
    assert default_backward_sparsity(0.3) == 0.0, "capped at density 1"
    assert TopKAST(0.7).backward_sparsity == default_backward_sparsity(0.7)


def test_phases_before_and_without_layers():
    assert Dense().phase(0) == "dense"
    for name in EXPECTED:
        assert build(name).phase(0) == "dense", "not attached: nothing is sparse yet"

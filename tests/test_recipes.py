"""Each recipe (config group `experiment`) composes by name, validates, and its header carries
a launch command that names it; an installed (non-editable) package finds them by name too."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from topkast_cli.config import compose, validate

from conftest import plain_install, run_topkast

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "topkast_cli" / "conf" / "experiment"
RECIPES = sorted(EXPERIMENTS.glob("*.yaml"))


def launch_command(path: Path) -> list[str]:
    header = "".join(l[1:] for l in path.read_text().splitlines(keepends=True) if l.startswith("#"))
    match = re.search(r"(topkast train .*?)(?:\n\s*\n|\Z)", header.replace("\\\n", " "), re.S)
    assert match, f"{path.name}: no launch command in the header"
    return shlex.split(match.group(1))


def test_there_are_recipes():
    names = {p.stem for p in RECIPES}
    assert {"resnet50_imagenet_topkast80", "resnet50_imagenet_topkast90", "cifar10_wrn22_2_topkast90"} <= names
    assert (ROOT / "recipes").resolve() == EXPERIMENTS.resolve()  # the checkout's shortcut


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_composes_with_its_launch_command(path):
    args = launch_command(path)
    assert args[:2] == ["topkast", "train"]
    assert f"experiment={path.stem}" in args
    assert path.read_text().startswith("# @package _global_\n")
    overrides = [a for a in args[2:] if "=" in a and not a.startswith("-")]
    cfg = compose("train", overrides)
    assert cfg.hydra.runtime.choices.experiment == path.stem
    with open_dict(cfg):
        del cfg["hydra"]
    validate(cfg)
    if "topkast" in path.stem:
        forward = int(re.search(r"topkast(\d+)", path.stem).group(1)) / 100
        assert cfg.sparsity.forward == forward


def test_an_installed_package_finds_recipes_by_name(tmp_path):
    """A non-editable install (the wheel's files only) composes a recipe from any directory,
    and `topkast train --help` lists the recipes."""
    elsewhere, root = tmp_path / "elsewhere", tmp_path / "imagenet"
    for d in (elsewhere, root):
        d.mkdir()
    target = plain_install(tmp_path, "topkast_cli")
    assert (target / "topkast_cli" / "conf" / "experiment" / "resnet50_imagenet_topkast90.yaml").is_file()

    env = {"PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import topkast_cli; print(topkast_cli.__file__)"],
        cwd=elsewhere, capture_output=True, text=True, env={**os.environ, **env},
    )
    assert Path(where.stdout.strip()).is_relative_to(target), where.stdout + where.stderr

    args = ["train", "experiment=resnet50_imagenet_topkast90", f"dataset.root={root}", "--cfg", "job"]
    shown = run_topkast(args, cwd=elsewhere, env=env, module=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-3000:]
    cfg = OmegaConf.create(shown.stdout)
    assert cfg.model._target_.endswith("resnet50")
    assert cfg.sparsity.forward == 0.9 and cfg.dataset.root == str(root)

    helped = run_topkast(["train", "--help"], cwd=elsewhere, env=env, module=True, timeout=120)
    assert helped.returncode == 0, helped.stderr[-3000:]
    line = next(l for l in helped.stdout.splitlines() if l.startswith("experiment:"))
    assert {p.stem for p in RECIPES} <= {n.strip() for n in line.partition(":")[2].split(",")}
    assert not list(elsewhere.iterdir())  # --cfg and --help write nothing


# ------------------------------------------------------------------ bigger-but-sparser
WIDE = sorted(EXPERIMENTS.glob("lm_sparse_wide_*.yaml"))


def nonzero_weights(overrides: list[str]) -> int:
    """Non-zero weights of a composed LM config's model for Tiny Shakespeare's shapes (65
    characters, context 128), as summary.json counts them after training (no parameter is 0)."""
    import torch

    from topkast_cli.config import instantiate

    cfg = compose("train", [*overrides, "dataset.path=t.txt"])
    model = instantiate(cfg.model, "model", vocab_size=65, context=128)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(1.0, 2.0)  # (a normal draw can be exactly 0)
    method = instantiate(cfg.sparsity, "sparsity")
    method.attach(model)
    return method.measured_density(model)["nonzero"]


def test_there_is_a_bigger_but_sparser_pair():
    assert [p.stem for p in WIDE] == ["lm_sparse_wide_80", "lm_sparse_wide_90"]


@pytest.mark.parametrize("path", WIDE, ids=[p.stem for p in WIDE])
def test_a_bigger_but_sparser_recipe_has_no_more_nonzeros_than_the_dense_baseline(path):
    header = path.read_text()
    mine = int(re.search(r"this recipe, width \d+, Top-KAST [\d/]+:\s+([\d,]+)", header).group(1).replace(",", ""))
    dense = int(re.search(r"dense baseline, width 128:\s+([\d,]+)", header).group(1).replace(",", ""))
    assert nonzero_weights([f"experiment={path.stem}"]) == mine  # the header states the tool's count
    assert nonzero_weights(["model=transformer", "dataset=textfile", "sparsity=dense"]) == dense
    assert mine <= dense

"""Each recipe composes, validates, and its header carries a launch command that names it."""

import re
import shlex
from pathlib import Path

import pytest
from omegaconf import open_dict

from topkast_cli.config import compose, validate

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def launch_command(path: Path) -> list[str]:
    header = "".join(l[1:] for l in path.read_text().splitlines(keepends=True) if l.startswith("#"))
    match = re.search(r"(topkast train .*?)(?:\n\s*\n|\Z)", header.replace("\\\n", " "), re.S)
    assert match, f"{path.name}: no launch command in the header"
    return shlex.split(match.group(1))


def test_there_are_recipes():
    names = {p.stem for p in RECIPES}
    assert {"resnet50_imagenet_topkast80", "resnet50_imagenet_topkast90", "cifar10_wrn22_2_topkast90"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_composes_with_its_launch_command(path):
    args = launch_command(path)
    assert args[:2] == ["topkast", "train"]
    assert args[args.index("--config-name") + 1] == path.stem
    overrides = [a for a in args[2:] if "=" in a and not a.startswith("-")]
    cfg = compose(path.stem, overrides, str(path.parent))
    with open_dict(cfg):
        del cfg["hydra"]
    validate(cfg)
    if "topkast" in path.stem:
        forward = int(re.search(r"topkast(\d+)", path.stem).group(1)) / 100
        assert cfg.sparsity.forward == forward

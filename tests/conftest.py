"""Shared helpers: compose configs like the CLI does, train in-process, run the console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from topkast_cli.config import compose

# Small tensors: one thread is faster than two, and keeps parallel test jobs from fighting.
torch.set_num_threads(1)

# A run that takes seconds: few steps on a small MNIST-1D.
TINY = [
    "trainer.max_steps=20",
    "trainer.eval_every=10",
    "trainer.log_every=5",
    "trainer.checkpoint_every=10",
    "trainer.progress=false",
    "dataset.num_samples=1000",
    "sparsity.refresh_interval=5",
]


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory):
    """Generated datasets are cached once per test session, outside the user's cache."""
    path = tmp_path_factory.mktemp("data")
    os.environ["TOPKAST_DATA"] = str(path)
    return path


def make_config(overrides=(), config_name: str = "train"):
    """The job config `topkast <config_name> overrides...` would run (without `hydra`)."""
    cfg = compose(config_name, list(overrides))
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    return cfg


def topkast_script() -> str:
    """The installed console script next to this interpreter."""
    script = Path(sys.executable).parent / "topkast"
    assert script.exists(), "the package is not installed (pip install -e .)"
    return str(script)


def run_topkast(args, cwd, timeout=600, env=None, module=False) -> subprocess.CompletedProcess:
    """Run `topkast args...` (or `python -m topkast_cli`) in `cwd`; output captured."""
    cmd = [sys.executable, "-m", "topkast_cli", *args] if module else [topkast_script(), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)

"""The GPU-minded trainer options, checked where they also run: on the CPU. channels_last and
torch.compile must train exactly what the plain trainer trains; the launcher presets and the
rank overrides must compose; a missing launcher plugin is a hint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from conftest import TINY, make_config, plain_install
from topkast_cli.config import compose
from topkast_cli.launch import rank_overrides
from topkast_cli.loop import train_step
from topkast_cli.run import build_run

# Plain SGD with a small step: the comparison measures the kernels' rounding, not how a
# random-label ResNet amplifies it (Adam's first steps are ±lr by each gradient's sign).
# The regulariser is pinned (decoupled): these tests compare memory formats and compilation;
# with the coupled default the two runs part by more than rounding within 4 steps (measured:
# a BN running mean 2e-4 apart), which is about the regulariser, not the format.
CNN = ["model=resnet18", "dataset=synthetic", "trainer.max_steps=4", "sparsity.refresh_interval=2", "optimizer=sgd",
       "optimizer.lr=1e-3", "optimizer.momentum=0", "optimizer.nesterov=false", "trainer.deterministic=true",
       "sparsity.regularization_form=decoupled", "sparsity.regularization=0.05"]


def steps(overrides, n: int = 4) -> dict:
    """θ after n training steps (with two mask refreshes)."""
    run = build_run(make_config(overrides))
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    batches = iter(run.data.train_loader(0, 0))
    for _ in range(n):
        x, y = next(batches)
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        train_step(run, x, y, params)
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


@pytest.mark.usefixtures("builds_runs")  # (build_run in the test)
def test_channels_last_trains_the_same_network():
    plain, last = steps(CNN), steps([*CNN, "trainer.channels_last=true"])
    for k in plain:
        assert torch.allclose(plain[k].float(), last[k].float(), atol=2e-4), k  # (lr x rounding)


@pytest.mark.usefixtures("builds_runs")  # (build_run in the test)
def test_channels_last_is_used_for_conv2d_models_only():
    run = build_run(make_config([*CNN, "trainer.channels_last=true"]))
    conv = next(m for m in run.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert run.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not build_run(make_config([*TINY, "trainer.channels_last=true"])).channels_last  # (a 1-D CNN)


@pytest.mark.usefixtures("builds_runs")  # (build_run in the test)
@pytest.mark.slow
def test_compiled_model_trains_the_same_network_through_refreshes_and_the_lock():
    args = [*TINY, "trainer.deterministic=true", "sparsity.exploration_steps=3"]
    plain, compiled = steps(args, 6), steps([*args, "trainer.compile=true"], 6)
    for k in plain:
        assert torch.allclose(plain[k], compiled[k], atol=1e-5), k


def test_rank_overrides_keep_other_ranks_from_writing():
    assert rank_overrides(0) == []
    cfg = compose("train", rank_overrides(3))
    assert cfg.hydra.output_subdir is None
    assert "file" not in cfg.hydra.job_logging.handlers  # no train.log
    assert cfg.hydra.job_logging.root.level == "WARNING"
    assert cfg.hydra.job_logging.formatters.simple.format.startswith("[rank 3]")


@pytest.mark.parametrize("launcher", ["slurm_ddp", "local_ddp"])
def test_data_parallel_launcher_presets_compose(launcher):
    cfg = compose("train", [f"hydra/launcher={launcher}", "hydra.launcher.nodes=2"])
    assert cfg.hydra.launcher._target_.endswith("DDPLauncher")
    assert cfg.hydra.launcher.nodes == 2 and cfg.hydra.launcher.tasks_per_node >= 2


# Which launchers Hydra's own plugin scan finds (nothing registers ours), and from which file.
FIND_LAUNCHERS = """
import sys
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
for p in Plugins.instance().discover(Launcher):
    print(p.__name__, sys.modules[p.__module__].__file__)
"""


def launchers_found(cwd, env=None) -> dict[str, Path]:
    done = subprocess.run([sys.executable, "-c", FIND_LAUNCHERS], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: Path(file) for name, _, file in (l.partition(" ") for l in done.stdout.splitlines())}


def test_hydra_finds_the_data_parallel_launchers_from_any_directory(tmp_path):
    """As installed for these tests (an editable install: setup.cfg's package_dir keeps the
    checkout's hydra_plugins/ on the namespace's path), from a directory that is not the
    checkout."""
    found = launchers_found(tmp_path)
    assert {"SlurmDDPLauncher", "LocalDDPLauncher"} <= set(found), found


def test_a_plain_install_ships_the_data_parallel_launchers(tmp_path):
    """A wheel's files only: the plugin lands in site-packages' hydra_plugins/, where the scan
    finds it next to the submitit plugin it extends."""
    target = plain_install(tmp_path, "topkast_cli", "hydra_plugins")
    (tmp_path / "elsewhere").mkdir()
    found = launchers_found(tmp_path / "elsewhere", env={"PYTHONPATH": str(target)})
    for name in ("SlurmDDPLauncher", "LocalDDPLauncher"):
        assert found[name].is_relative_to(target), found


def test_a_submitit_task_finds_its_rank_in_slurm_s_environment():
    from hydra_plugins.topkast_cli_launcher.slurm_ddp import task_environment

    env = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "42", "SLURM_PROCID": "5", "SLURM_NTASKS": "8",
           "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1"}
    # patch.dict restores the whole environment afterwards, including the rendezvous variables
    # the export adds (monkeypatch.delenv does not record a variable that was absent, so a
    # leaked WORLD_SIZE=8 would make later tests wait for 8 ranks).
    with mock.patch.dict(os.environ, env):
        for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
            os.environ.pop(k, None)
        assert task_environment() == rank_overrides(5)
        assert (os.environ["MASTER_ADDR"], os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("gpu01", "5", "8")
        assert (os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"]) == ("1", "4")
    assert "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] != "8"


@pytest.mark.parametrize(
    "message",
    [
        "Could not find 'hydra/launcher/joblib'; available: basic, local_ddp, slurm, slurm_ddp",
        "Could not load 'hydra/launcher/submitit_slurm'",
    ],
)
def test_a_missing_launcher_plugin_says_what_to_install(monkeypatch, message):
    """Hydra's own words when the `launchers` extra is not installed, and the hint added."""
    import importlib.util

    from topkast_cli import config

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if "launcher" in name else real(name, *a)
    )
    assert config._launcher_hint(message) == "; its plugin is not installed: pip install 'topkast-cli[launchers]'"
    monkeypatch.setattr(importlib.util, "find_spec", real)
    assert config._launcher_hint(message) == ""  # (installed: Hydra's message says it all)
    assert config._launcher_hint("Could not find 'model/resnet5'") == ""

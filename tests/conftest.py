"""Shared helpers: compose configs like the CLI does, train in-process, run the console script."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict
from torch import nn

from topkast_cli.config import compose
from topkast_cli.run import kept_torch_settings, set_torch_settings, torch_settings

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


def changed_torch_settings(before: dict) -> dict:
    """The process-wide torch settings that differ from `before`, {name: (before, now)};
    `before` is put back."""
    now = torch_settings()
    set_torch_settings(before)
    return {k: (before[k], now[k]) for k in before if now[k] != before[k]}


@pytest.fixture(autouse=True)
def no_leaked_torch_settings():
    """A test that leaves deterministic algorithms on, another thread count or dtype changes
    what every later test in this process computes, and how fast: fail the test that leaked
    instead. (A run puts back what it sets: `run.kept_torch_settings`.)"""
    before = torch_settings()
    yield
    changed = changed_torch_settings(before)
    assert not changed, f"the test left process-wide torch settings changed (before, now): {changed}"


@pytest.fixture
def builds_runs():
    """For a test that calls build_run itself: the commands put back the process-wide settings
    a run sets (threads, deterministic algorithms, cuDNN's), a bare build_run leaves them to
    its caller."""
    with kept_torch_settings():
        yield


RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_leaked_rendezvous():
    """A test that leaves torchrun's variables behind would make every later run in this
    process wait for ranks that never come: fail the test that leaked them instead."""
    before = {k: os.environ.get(k) for k in RENDEZVOUS}
    yield
    leaked = {k: os.environ.get(k) for k in RENDEZVOUS if os.environ.get(k) != before[k]}
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    assert not leaked, f"the test left the rendezvous environment changed: {leaked}"


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


def plain_install(tmp_path: Path, *packages: str) -> Path:
    """A non-editable install (the wheel's files only) of the checkout's `packages` into
    tmp_path/site, for PYTHONPATH. Built from a copy: building in the checkout would leave
    build/ and egg-info there."""
    root, src, target = Path(__file__).resolve().parents[1], tmp_path / "src", tmp_path / "site"
    for name in packages:
        shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-compile"]
    done = subprocess.run([*pip, "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return target


def default_signals() -> None:
    """`preexec_fn` for subprocesses: SIGINT and SIGTERM at their defaults in the child, as a
    terminal starts a program. pytest may run with SIGINT ignored (a background job, some CI
    runners), and an ignored signal stays ignored across exec: the child's Python would then
    install no KeyboardInterrupt handler, and the trainer (rightly) leaves ignored signals alone."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture
def default_signal_handlers():
    """For in-process tests that send SIGINT/SIGTERM: Python's own handlers (KeyboardInterrupt,
    terminate), whatever pytest was started with; the previous ones are put back afterwards."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in previous.items():
        signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def run_topkast(args, cwd, timeout=600, env=None, module=False) -> subprocess.CompletedProcess:
    """Run `topkast args...` (or `python -m topkast_cli`) in `cwd`; output captured."""
    cmd = [sys.executable, "-m", "topkast_cli", *args] if module else [topkast_script(), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env, preexec_fn=default_signals
    )


# ------------------------------------------------- the sparsity library without the trainer
def net():
    """A small MLP, the same for every call."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 20, generator=g), torch.randint(0, 5, (32,), generator=g)


def step(model, method, optimizer, i, data=None):
    """One training step with the method's hooks in the trainer's order (on `batch(i)`, or on
    `data` = (x, y)); True if masks changed."""
    x, y = batch(i) if data is None else data
    method.before_forward(i)
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    method.after_backward(i)
    method.before_step(i, optimizer)
    optimizer.step()
    return method.after_step(i + 1, optimizer)


# The compute backends every invariant test runs on (`auto` picks one of them per layer).
BACKENDS = ("masked", "sparse")


def grad_of(layer):
    """The gradient of what the optimizer trains for `layer`, in θ's shape (zero outside B)."""
    g = layer.trained.grad
    return None if g is None else layer.dense_state(g)


def state_of(optimizer, layer, key):
    """Optimizer state `key` of `layer` in θ's shape (zero outside B), on any backend."""
    return layer.dense_state(optimizer.state[layer.trained][key])


# Optimizers whose weight decay and momentum would move frozen entries if anything leaked.
OPTIMIZERS = {
    "sgd_momentum_wd": lambda groups: torch.optim.SGD(groups, lr=0.5, momentum=0.9, weight_decay=0.01),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=0.05, weight_decay=0.1),
}


def split_run_matches(tmp_path: Path, common: list[str], stop_at: int) -> tuple[dict, dict, list]:
    """Train `common` straight, and again stopped at step `stop_at` and resumed: the two final
    checkpoints hold the same weights and masks (A and B) and the runs logged the same metrics.
    Returns both checkpoints and the metrics."""
    from topkast_cli.checkpoint import load_checkpoint
    from topkast_cli.commands.train import train
    from topkast_cli.run_logs import read_jsonl

    train(make_config(common), tmp_path / "straight")
    train(make_config([*common, f"trainer.max_steps={stop_at}"]), tmp_path / "split")
    train(make_config([*common, "resume=auto"]), tmp_path / "split")
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.ckpt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["masks"]:
        assert torch.equal(a["masks"][key]["forward"], b["masks"][key]["forward"]), key
        assert torch.equal(a["masks"][key]["backward"], b["masks"][key]["backward"]), key
    metrics = [read_jsonl(tmp_path / d / "metrics.jsonl") for d in ("straight", "split")]
    assert metrics[0] == metrics[1]
    return a, b, metrics[0]

"""Resuming: which checkpoint a run continues from, and whether it was written for this config.

What must match is the model, the dataset, the optimizer and the sparsity method; the method
itself says which of its keys may change (`SparsityMethod.resume_may_change`: Top-KAST's
refresh interval, RigL's update interval, GMP's prune interval, ...). Everything else (steps,
learning-rate schedule, logging) may change.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import load_checkpoint
from .errors import UserError

MUST_MATCH = ("model", "dataset._target_", "optimizer._target_", "sparsity")
RUN_FILES = ("checkpoints", "metrics.jsonl", "sparsity.jsonl", "summary.json")


def resume_path(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The checkpoint `cfg.resume` names: a path, or with `auto` this run's last.ckpt if any."""
    if cfg.resume in (None, ""):
        return None
    if cfg.resume == "auto":
        last = Path(run_dir) / "checkpoints" / "last.ckpt"
        return last if last.exists() else None
    return Path(str(cfg.resume)).expanduser()


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` has outputs of a training run (a fresh run there would mix with them)."""
    return any((Path(run_dir) / name).exists() for name in RUN_FILES)


def _get(tree, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _leaves(node, prefix: str) -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}.{k}"))
        return out
    return {prefix: node}


def check_fits(state: dict, cfg: DictConfig, where: str, method, model: torch.nn.Module | None = None, data=None) -> None:
    """Raise a UserError if checkpoint `state` was written for another model, dataset,
    optimizer or sparsity config than `cfg` (`method`, the one `cfg` builds, says which of
    its keys may differ), or its tensors do not fit `model` (which may live on the meta
    device: only names and shapes are compared), or its data state (a text vocabulary) is not
    `data`'s."""
    saved, now = state.get("config") or {}, OmegaConf.to_container(cfg, resolve=True)
    may_change = {f"sparsity.{key}" for key in method.resume_may_change}
    # keys newer than the checkpoint: it was written with their default
    added = {f"sparsity.{key}": value for key, value in method.added_keys.items()}
    for key in MUST_MATCH:
        a, b = _leaves(_get(saved, key), key), _leaves(_get(now, key), key)
        for leaf in sorted(set(a) | set(b)):
            saved_value = a.get(leaf, added.get(leaf))
            if leaf not in may_change and saved_value != b.get(leaf):
                raise UserError(
                    f"{where} was written with {leaf}={saved_value}, the config has {leaf}={b.get(leaf)}; "
                    "resume with the same model, dataset, optimizer and sparsity (or start a new run)"
                )
    if data is not None:
        data.check_state(state.get("data"), where)
    if model is None:
        return
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state["model"].items() if torch.is_tensor(v)}
    for k in sorted(set(mine) | set(theirs)):
        if mine.get(k) != theirs.get(k):
            raise UserError(
                f"{where} does not fit this model: {k} is {theirs.get(k, 'missing')} in the checkpoint, "
                f"{mine.get(k, 'missing')} in the model"
            )


def check_resume(cfg: DictConfig, run_dir: Path, method, model: torch.nn.Module | None, data=None) -> None:
    """What a run would resume from loads and fits `cfg`: checked before a run directory is
    touched (the tensors are memory-mapped, not read). `method` and `model` are those `cfg`
    builds (on the meta device; model None when unknown before loading data), and `data` the
    data module it checked."""
    path = resume_path(cfg, run_dir)
    if path is None:
        return
    where = f"resume={cfg.resume}" + (f" ({path})" if cfg.resume == "auto" else "")
    try:
        state = load_checkpoint(path, key="resume", mmap=True)
    except UserError as e:
        if cfg.resume != "auto":
            raise
        raise UserError(f"{where}: {e}") from None
    check_fits(state, cfg, where, method, model, data)


def check_fresh(cfg: DictConfig, run_dir: Path, what: str = "it", key: str = "hydra.run.dir") -> None:
    """A fresh run (no `resume`) must not start in a directory that already holds one."""
    if cfg.resume is None and holds_run(run_dir):
        raise UserError(f"{run_dir} already holds a run; continue {what} with resume=auto, or choose another {key}")

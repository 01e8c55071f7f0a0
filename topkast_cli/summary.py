"""What a run reports about itself: summary.json, and the hyperparameters for TensorBoard."""

from __future__ import annotations

import dataclasses

import torch
from omegaconf import DictConfig, OmegaConf

from .flops import count_flops, training_flops
from .run import Run
from .sparsity import SparsityMethod


def summarize(run: Run, status: str, segment_wall: float, start_step: int, error: str | None = None) -> dict:
    """summary.json: wall time is the whole run's (all resumed segments), speed this segment's."""
    m = run.method
    density = m.measured_density(run.model)
    summary = {
        "status": status,
        "method": m.display_name,
        "forward_sparsity": m.forward_sparsity,
        "backward_sparsity": m.backward_sparsity,
        "metric": run.task.metric,
        "step": run.step,
        "total_steps": run.total_steps,
        "epochs": run.epoch,
        "wall_time_s": run.wall_time,
        "steps_per_sec": (run.step - start_step) / max(segment_wall, 1e-9),
        "final": run.last_eval,
        "best": run.best,
        "density": density,  # params (dense weights) and nonzero (non-zero weights) of the whole model
        **train_flops(run),
        "backends": m.backends(),  # each sparse layer's compute backend (masked | sparse)
        "skipped_steps": run.skipped_steps,
        "seed": run.cfg.seed,
    }
    if error:
        summary["error"] = error
    return summary


def train_flops(run: Run) -> dict:
    """FLOPs of one training step per token (language models: a window's count over its
    length) or per example, as `flops.training_flops` counts them with the run's last masks;
    the same model dense beside it."""
    per = "example" if run.data.task == "classification" else "token"
    try:
        x = torch.zeros_like(run.data.example_batch(1, run.device)[0])
        layers = count_flops(run.model, x)
    except Exception:  # (e.g. out of memory after a failed run: its summary must still be written)
        return {"train_flops": None, "dense_train_flops": None, "train_flops_per": per}
    backward = {layer.name.removesuffix(".weight"): layer.k_backward for layer in run.method.layers}
    dense = [dataclasses.replace(l, nonzero=l.params, flops=l.dense_flops) for l in layers]
    n = x[0].numel() if per == "token" else 1
    return {
        "train_flops": training_flops(layers, backward) / n,
        "dense_train_flops": training_flops(dense, {}) / n,
        "train_flops_per": per,
    }


def hparams(cfg: DictConfig, method: SparsityMethod) -> dict:
    """The run's hyperparameters for TensorBoard's HPARAMS view (flat, scalar values)."""
    flat = {"seed": cfg.seed, "method": method.display_name}
    for section in ("model", "dataset", "sparsity", "optimizer", "scheduler"):
        if not isinstance(cfg.get(section), DictConfig):
            continue
        node = OmegaConf.to_container(cfg[section], resolve=True)
        flat[section] = str(node.get("_target_", "")).rsplit(".", 1)[-1]
        for key, value in node.items():
            if not key.startswith("_") and key not in ("root", "num_workers"):
                flat[f"{section}.{key}"] = value
    flat["sparsity.forward"], flat["sparsity.backward"] = method.forward_sparsity, method.backward_sparsity
    flat["trainer.max_steps"], flat["trainer.epochs"] = cfg.trainer.max_steps, cfg.trainer.epochs
    return flat

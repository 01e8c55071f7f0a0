"""topkast export ckpt=PATH: check the checkpoint and the destination before Hydra starts,
then write the trained network α in its two forms (see `export.py`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .. import launch
from ..errors import UserError
from ..evaluate import load
from ..export import export_checkpoint, output_paths
from .eval import ckpt_value

EXAMPLE = "topkast export ckpt=runs/train/<run>/checkpoints/best.ckpt"


def check_job(cfg: DictConfig, out_dir: Path | None = None) -> None:
    """The pre-flight check of `topkast export`: the checkpoint, and where the files go."""
    if OmegaConf.is_missing(cfg, "ckpt") or cfg.ckpt in (None, ""):
        raise UserError(f"ckpt=PATH is required, e.g. {EXAMPLE}")
    load(str(cfg.ckpt))
    launch.writable(output_paths(cfg)[0].parent, "export.output")


def task(cfg: DictConfig):
    return launch.run_job("export", export_checkpoint, cfg)


def main(args: list[str]) -> None:
    ns = launch.hydra_args(args)
    if not launch.only_prints(ns):
        if ns.multirun:
            raise UserError("export writes one checkpoint's network; --multirun is not supported")
        if ckpt_value(ns.overrides) in (None, "", "???"):
            raise UserError(f"ckpt=PATH is required, e.g. {EXAMPLE}")
    args = launch.preflight("export", args, check_job)
    launch.launch("export", task, "topkast export", args)

"""topkast eval ckpt=PATH: check the checkpoint and the report's destination before Hydra
starts, then evaluate (see `evaluate.py`)."""

from __future__ import annotations

from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from .. import launch
from ..errors import UserError
from ..evaluate import checkpoint_overrides, evaluate_checkpoint, load, output_path, validate_eval

EXAMPLE = "topkast eval ckpt=runs/train/<run>/checkpoints/best.ckpt"


def check_job(cfg: DictConfig, out_dir: Path | None = None) -> None:
    """The pre-flight check of `topkast eval`: values, the checkpoint, the report's place."""
    validate_eval(cfg)
    load(str(cfg.ckpt))
    out = output_path(cfg)
    try:
        launch.writable(out.parent, "eval.output")
    except UserError:
        raise UserError(f"cannot write the report to {out.parent}; choose another place with eval.output=PATH") from None


def task(cfg: DictConfig):
    return launch.run_job("eval", evaluate_checkpoint, cfg)


def ckpt_value(overrides: list[str]) -> str | None:
    """The value of ckpt=... as Hydra will read it (quotes removed)."""
    value = None
    for text in overrides:
        if text.startswith("ckpt="):
            try:
                value = OverridesParser.create().parse_overrides([text])[0].value()
            except Exception:
                if any(c in text[5:] for c in "=,"):
                    raise UserError(f"{text}: quote a path that holds '=' or ',': 'ckpt=\"{text[5:]}\"'") from None
                raise UserError(f"{text}: not a valid path") from None
    return None if value is None else str(value)


def main(args: list[str]) -> None:
    ns = launch.hydra_args(args)
    if not launch.only_prints(ns):
        if ns.multirun:
            raise UserError("eval evaluates one checkpoint; --multirun is not supported")
        ckpt = ckpt_value(ns.overrides)
        if ckpt in (None, "", "???"):
            raise UserError(f"ckpt=PATH is required, e.g. {EXAMPLE}")
        mapped = checkpoint_overrides(ns.overrides, load(ckpt)["config"])
        given = set(ns.overrides)
        args = [a for a in args if a not in given] + mapped
    args = launch.preflight("eval", args, check_job)
    launch.launch("eval", task, "topkast eval", args)

"""The `topkast` console script: `topkast train|eval|sweep [overrides...]`.

Each command is a Hydra app over the one config tree in topkast_cli/conf. Before Hydra
starts (and creates a run directory), the overrides are composed and validated here, so a
mistake costs one line on stderr and exit code 2, and touches no file.
"""

from __future__ import annotations

import logging
import sys
from functools import partial
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from . import __version__
from .config import check_job, check_optimizer, expand_sweep, without_hydra
from .errors import UserError

USAGE = """usage: topkast <command> [overrides...]

commands:
  train   train a model (default: Top-KAST 90/80 on MNIST-1D, offline, about a minute)
  eval    evaluate a checkpoint's sparse network: topkast eval ckpt=PATH
  sweep   Hydra multirun over sparsities, then a summary table and plot

Overrides are Hydra's: key=value, group=option, +key=value; `topkast train --help` lists
the config groups and the composed config. Exit codes: 0 done, 1 run failed,
2 a mistake in the input, 130/143 interrupted (last.ckpt written)."""

log = logging.getLogger("topkast")


def fail(command: str, message: str, code: int = 2):
    print(f"topkast {command}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _hydra_args(args: list[str]):
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()
    try:
        return parser.parse_args(args)
    except SystemExit:  # argparse already printed its usage line
        raise SystemExit(2) from None


def _set(overrides: list[str], key: str) -> str | None:
    """Value of `key=...` among the overrides (the last one wins), else None."""
    value = None
    for o in overrides:
        k, _, v = o.lstrip("+~").partition("=")
        if k == key:
            value = v
    return value


def _resume_overrides(overrides: list[str]) -> list[str]:
    """Extra overrides for `resume=PATH`: those the run was started with (unless the user
    sets the same key again), and, if PATH is that run's last.ckpt, its directory as
    hydra.run.dir so the run continues in place. Resuming from another checkpoint (best.ckpt,
    a copy) starts a new run directory and leaves the old run as it is."""
    resume = _set(overrides, "resume")
    if resume in (None, "", "null", "auto"):
        return []
    path = Path(resume).expanduser()
    if not path.is_file():
        return []  # the preflight check says what is wrong with it
    run_dir = path.resolve().parent.parent
    mine = {_key(o) for o in overrides}
    extra = []
    saved = run_dir / ".hydra" / "overrides.yaml"
    if saved.is_file():
        try:
            extra = [str(o) for o in OmegaConf.load(saved) if _key(o) not in mine | {"resume", "hydra.run.dir"}]
        except Exception:
            extra = []
    if path.name == "last.ckpt" and path.resolve().parent.name == "checkpoints" and "hydra.run.dir" not in mine:
        extra.append(f"hydra.run.dir={run_dir}")
    return extra


def _key(override: str) -> str:
    return str(override).lstrip("+~").partition("=")[0]


def _check_run_dir(run_dir: Path, job: DictConfig, multirun: bool = False) -> None:
    """Refuse to start a fresh run in a directory that already holds one, and check what a
    resumed run would load, before Hydra writes into the directory."""
    from .train import check_resume, holds_run

    if "resume" not in job:  # not a training config
        return
    if job.resume is None and holds_run(run_dir):
        what, key = ("the sweep", "hydra.sweep.dir") if multirun else ("it", "hydra.run.dir")
        raise UserError(f"{run_dir} already holds a run; continue {what} with resume=auto, or choose another {key}")
    check_resume(job, run_dir)


def _writable(path: Path, key: str) -> None:
    """`path` must be a directory we can create or write to. (Checked by trying: as root,
    permission bits do not stop writes, but a path under a regular file or a read-only
    file system still fails.)"""
    import os
    import tempfile

    p = Path(os.path.abspath(path.expanduser()))
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise UserError(f"{key}={path} is not a writable directory: {p} is a file")
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise UserError(f"{key}={path} is not writable: {p}: {e.strerror or e}") from None


def _launch(config_name: str, task, argv0: str, args: list[str]) -> None:
    sys.argv = [argv0, *args]
    hydra.main(config_path="conf", config_name=config_name, version_base="1.3")(task)()


def _job_dir(cfg: DictConfig) -> Path | None:
    """A sweep job's directory, when its subdir does not depend on the job number."""
    try:
        return Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)
    except Exception:
        return None


def _preflight(config_name: str, args: list[str], check=partial(check_job, optimizer=False)) -> list[str]:
    """Compose and validate (`check`) every job the arguments describe; return the arguments
    to give Hydra (with the resume overrides added)."""
    ns = _hydra_args(args)
    if ns.help or ns.hydra_help or ns.info or ns.cfg or ns.shell_completion or ns.resolve:
        return args  # Hydra prints something and exits: nothing to check
    args = args + _resume_overrides(ns.overrides)
    overrides = _hydra_args(args).overrides
    name = ns.config_name or config_name
    jobs = expand_sweep(overrides) if ns.multirun else [overrides]
    for job in jobs:
        cfg = check(name, job, ns.config_dir)
        job_cfg = without_hydra(cfg)
        if ns.multirun:
            _writable(Path(cfg.hydra.sweep.dir), "hydra.sweep.dir")
            job_dir = _job_dir(cfg)
            if job_dir is not None:
                _check_run_dir(job_dir, job_cfg, multirun=True)
        else:
            _writable(Path(cfg.hydra.run.dir), "hydra.run.dir")
            _check_run_dir(Path(cfg.hydra.run.dir), job_cfg)
        if "optimizer" in job_cfg:
            check_optimizer(job_cfg)  # last: the slowest check
    return args


# ------------------------------------------------------------------------- tasks
def _in_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def _run_task(command: str, work, cfg: DictConfig):
    """Run a job; in a sweep a failed job is logged and reported, not fatal to the sweep."""
    try:
        return work(cfg)
    except UserError as e:
        log.error("%s", e)
        if _in_multirun():
            return None
        fail(command, str(e), e.exit_code)
    except Exception:
        if _in_multirun():
            log.exception("job failed")
            return None
        raise


def train_task(cfg: DictConfig):
    from .train import train

    return _run_task("train", lambda c: train(c, HydraConfig.get().runtime.output_dir), cfg)


# ---------------------------------------------------------------------- commands
def cmd_train(args: list[str]) -> None:
    args = _preflight("train", args)
    _launch("train", train_task, "topkast train", args)


def cmd_eval(args: list[str]) -> None:
    from .evaluate import cmd_eval as run

    run(args)


def cmd_sweep(args: list[str]) -> None:
    from .sweep import cmd_sweep as run

    run(args)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sweep": cmd_sweep}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    if argv[0] in ("-V", "--version"):
        print(f"topkast {__version__}")
        return
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        fail("", f"unknown command {command!r}; allowed: {', '.join(COMMANDS)}")
    try:
        COMMANDS[command](args)
    except UserError as e:
        fail(command, str(e), e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before training started (once it runs, train handles it)
        fail(command, "interrupted", 130)

"""The Hydra plumbing every command shares: argument parsing, the pre-flight check, launching
an app over the one config tree, and the error policy of a job.

Before Hydra starts (and creates a run directory), every job the arguments describe is
composed and checked here, so a mistake costs one line on stderr and exit code 2 and touches
no file. Commands (`commands/`) import this module; it imports none of them.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .config import CONFIG_MODULE, compose, expand_sweep
from .errors import UserError

log = logging.getLogger("topkast")


def fail(command: str, message: str, code: int = 2):
    print(f"topkast {command}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def hydra_args(args: list[str]):
    """Hydra's own parse of the command line (overrides, --multirun, --help, ...)."""
    from hydra._internal.utils import get_args_parser

    try:
        return get_args_parser().parse_args(args)
    except SystemExit:  # argparse already printed its usage line
        raise SystemExit(2) from None


def only_prints(ns) -> bool:
    """Hydra will print something (help, config, completion) and exit: nothing to check."""
    return bool(ns.help or ns.hydra_help or ns.info or ns.cfg or ns.shell_completion or ns.resolve)


def override_value(overrides: list[str], key: str) -> str | None:
    """Value of `key=...` among the overrides (the last one wins), else None."""
    value = None
    for o in overrides:
        if override_key(o) == key:
            value = o.partition("=")[2]
    return value


def override_key(override: str) -> str:
    return str(override).lstrip("+~").partition("=")[0]


def resume_overrides(overrides: list[str]) -> list[str]:
    """Extra overrides for `resume=PATH`: those the run was started with (unless the user
    sets the same key again), and, if PATH is that run's last.ckpt, its directory as
    hydra.run.dir so the run continues in place. Resuming from another checkpoint (best.ckpt,
    a copy) starts a new run directory and leaves the old run as it is."""
    resume = override_value(overrides, "resume")
    if resume in (None, "", "null", "auto"):
        return []
    path = Path(resume).expanduser()
    if not path.is_file():
        return []  # the pre-flight check says what is wrong with it
    run_dir = path.resolve().parent.parent
    mine = {override_key(o) for o in overrides}
    extra = []
    saved = run_dir / ".hydra" / "overrides.yaml"
    if saved.is_file():
        try:
            extra = [str(o) for o in OmegaConf.load(saved) if override_key(o) not in mine | {"resume", "hydra.run.dir"}]
        except Exception:
            extra = []
    if path.name == "last.ckpt" and path.resolve().parent.name == "checkpoints" and "hydra.run.dir" not in mine:
        extra.append(f"hydra.run.dir={run_dir}")
    return extra


def writable(path: Path, key: str) -> None:
    """`path` must be a directory we can create or write to. (Checked by trying: as root,
    permission bits do not stop writes, but a path under a regular file or a read-only
    file system still fails.)"""
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


def _job_dir(cfg: DictConfig) -> Path | None:
    """A sweep job's directory, when its subdir does not depend on the job number."""
    try:
        return Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir)
    except Exception:
        return None


# A command's check of one job: (its composed config, with `hydra`; its output directory, or
# None when that depends on the job number) -> None, raising UserError on a mistake.
JobCheck = Callable[[DictConfig, "Path | None"], None]


def preflight(config_name: str, args: list[str], check: JobCheck, checked: list | None = None) -> list[str]:
    """Check every job the arguments describe; return the arguments to give Hydra (with the
    resume overrides added). The composed configs are appended to `checked` when given."""
    ns = hydra_args(args)
    if only_prints(ns):
        return args
    args = args + resume_overrides(ns.overrides)
    overrides = hydra_args(args).overrides
    name = ns.config_name or config_name
    for job in expand_sweep(overrides) if ns.multirun else [overrides]:
        cfg = compose(name, job, ns.config_dir)
        if ns.multirun:
            writable(Path(cfg.hydra.sweep.dir), "hydra.sweep.dir")
            out = _job_dir(cfg)
        else:
            writable(Path(cfg.hydra.run.dir), "hydra.run.dir")
            out = Path(cfg.hydra.run.dir)
        check(cfg, out)
        if checked is not None:
            checked.append(cfg)
    return args


def rank_overrides(rank: int) -> list[str]:
    """What Hydra is given on every rank but 0, which writes nothing to the run directory (no
    .hydra/, no log file) and shows only warnings and errors, marked with its rank."""
    if rank == 0:
        return []
    return [
        "hydra.output_subdir=null",
        "hydra/job_logging=stdout",
        "hydra.job_logging.root.level=WARNING",
        f"hydra.job_logging.formatters.simple.format='[rank {rank}][%(levelname)s] %(message)s'",
    ]


def launch(config_name: str, task: Callable[[DictConfig], object], argv0: str, args: list[str]) -> None:
    """Run `task` as a Hydra app over the package's config tree."""
    sys.argv = [argv0, *args]
    hydra.main(config_path=CONFIG_MODULE, config_name=config_name, version_base="1.3")(task)()


def in_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def run_job(command: str, work: Callable[[DictConfig], object], cfg: DictConfig):
    """Run one job; in a sweep a failed job is logged and reported, not fatal to the sweep."""
    try:
        return work(cfg)
    except UserError as e:
        log.error("%s", e)
        if in_multirun():
            return None
        fail(command, str(e), e.exit_code)
    except Exception as e:
        if in_multirun():
            log.exception("job failed")
            return None
        from .distributed import World

        if World.from_env().rank:  # usually a consequence of rank 0's end: one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.error("stopped: %s", first[:300])
            raise SystemExit(1) from None
        raise


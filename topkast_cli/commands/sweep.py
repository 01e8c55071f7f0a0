"""topkast sweep: check every job, run them as a Hydra multirun of the training task, then
summarise (see `sweep_summary.py`); `topkast sweep --summarize DIR` only summarises."""

from __future__ import annotations

import logging
from functools import partial

from omegaconf import OmegaConf

from .. import launch
from ..config import compose, expand_sweep
from ..errors import UserError
from ..sweep_summary import parsed_overrides, merge_params, state, summarize
from . import train

log = logging.getLogger("topkast")


def _summarize_arg(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        if a == "--summarize":
            if i + 1 >= len(args):
                raise UserError("--summarize needs a sweep directory: topkast sweep --summarize runs/sweep/<time>")
            return args[i + 1]
        if a.startswith("--summarize="):
            return a.split("=", 1)[1]
        if a.startswith("summarize="):
            return a.split("=", 1)[1]
    return None


def _quote(key: str) -> str:
    return "'" + key.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sweep_args(overrides: list[str], config_dir: str | None) -> tuple[list[str], list[str]]:
    """(every job's overrides merged with sweep.yaml's params, extra Hydra overrides that name
    each job's directory by its swept values only)."""
    first = expand_sweep(overrides)[0] if overrides else []
    base = compose("sweep", first, config_dir)
    params = OmegaConf.to_container(OmegaConf.select(base, "hydra.sweeper.params") or OmegaConf.create({}))
    merged = merge_params(params, overrides)
    parsed = parsed_overrides(merged)
    task = [o for o in parsed if not o.key_or_group.startswith("hydra.") and o.key_or_group != "hydra"]
    swept = [o for o in task if o.is_sweep_override()]
    extra = []
    if swept:
        fixed = sorted({o.key_or_group for o in task if not o.is_sweep_override()} | {"resume"})
        extra.append(f"hydra.job.config.override_dirname.exclude_keys=[{','.join(_quote(k) for k in fixed)}]")
    elif not [o for o in task if o.key_or_group != "resume"]:
        extra.append("hydra.sweep.subdir=run")  # a sweep of one job with no override
    return merged, extra


def main(args: list[str]) -> None:
    target = _summarize_arg(args)
    if target is not None:
        if summarize(target)["failed"]:
            raise SystemExit(1)
        return
    ns = launch.hydra_args(args)
    if launch.only_prints(ns):
        launch.launch("sweep", train.task, "topkast sweep", args)
        return
    resume = launch.override_value(ns.overrides, "resume")
    if resume not in (None, "", "null", "auto"):
        raise UserError(
            f"resume={resume}: a sweep continues its jobs with resume=auto (and the same hydra.sweep.dir); "
            "to continue one run from a file use topkast train resume=PATH"
        )
    merged, extra = sweep_args(ns.overrides, ns.config_dir)
    flags = [a for a in args if a not in set(ns.overrides) and a not in ("-m", "--multirun")]
    launch.preflight("sweep", ["--multirun", *flags, *merged, *extra], partial(train.check_job, multirun=True))
    state["root"] = state["summary"] = None
    try:
        launch.launch("sweep", train.task, "topkast sweep", ["--multirun", *flags, *ns.overrides, *extra])
    finally:
        # The callback did not run (a launcher raised, or the sweep was interrupted): still
        # summarise what the jobs wrote.
        if state["summary"] is None and state["root"] is not None and state["root"].is_dir():
            try:
                state["summary"] = summarize(state["root"])
            except Exception as e:  # never hide the original error
                log.error("could not write the sweep summary: %s", e)
    if state["summary"] is not None and state["summary"]["failed"]:
        raise SystemExit(1)

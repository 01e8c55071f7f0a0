"""Config composition and validation, before any work is done.

`compose` builds the same config Hydra will (same search path, same overrides) without
running anything, and turns Hydra/OmegaConf errors into one-line `UserError`s. `validate`
checks the trainer's own values; group-specific checks live in the constructors the config
names, which the pre-flight check runs by building the run on the meta device.
"""

from __future__ import annotations

import itertools
import math
import re
import os

import hydra.utils
from hydra.errors import HydraException, InstantiationException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from .errors import UserError

CONFIG_MODULE = "pkg://topkast_cli.conf"
PRECISIONS = ("32", "bf16", "fp16")


def scale_by_width(value: float, base_width: int, width: int) -> float:
    """`value` for a model of `base_width`, scaled as 1/width (e.g. the LM learning rate:
    `${scale_by_width:5e-3,128,${model.width}}`, so the composed config shows the rule)."""
    return float(value) * int(base_width) / int(width)


# Registered on import: every command and the configs it reloads (checkpoints, run dirs) resolve it.
OmegaConf.register_new_resolver("scale_by_width", scale_by_width, replace=True)


# ---------------------------------------------------------------------- composition
def _one_line(e: BaseException) -> str:
    if isinstance(e, MissingConfigException) and getattr(e, "options", None):
        first = str(e).strip().splitlines()[0]
        return f"{first.rstrip('.')}; available: {', '.join(sorted(e.options))}"
    parts = []
    for ex in (e, e.__cause__):
        if ex is None:
            continue
        for line in str(ex).strip().splitlines():
            line = line.strip()
            if line and not line.startswith(("full_key", "object_type", "reference_type", "Config search path")):
                if line not in parts:
                    parts.append(line)
    return " ".join(parts) or type(e).__name__


def compose(config_name: str, overrides: list[str], config_dir: str | None = None) -> DictConfig:
    """The config of one job (overrides without sweep syntax), with the `hydra` node."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    GlobalHydra.instance().clear()
    search_path = create_config_search_path(CONFIG_MODULE)
    if config_dir is not None:
        path = os.path.abspath(config_dir)
        if not os.path.isdir(path):
            raise UserError(f"--config-dir {config_dir}: no such directory")
        search_path.prepend(provider="command-line", path=f"file://{path}")
    try:
        app = Hydra.create_main_hydra2(task_name="topkast", config_search_path=search_path)
        return app.compose_config(config_name, list(overrides), run_mode=RunMode.RUN, with_log_configuration=False)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        message = _one_line(e)
        if isinstance(e, OverrideParseException):
            message = _bad_override(overrides) or message
        unknown = re.match(r"Could not override '([^']+)'", message)
        if unknown and "not in" in message:
            message = _unknown_key(config_name, overrides, config_dir, unknown.group(1)) or message
        raise UserError(message + _launcher_hint(message)) from None
    finally:
        GlobalHydra.instance().clear()


# Launcher options that Hydra plugins provide, and the module each needs.
LAUNCHER_PLUGINS = {
    "joblib": "hydra_plugins.hydra_joblib_launcher",
    "submitit": "hydra_plugins.hydra_submitit_launcher",
    "slurm": "hydra_plugins.hydra_submitit_launcher",
}


def _launcher_hint(message: str) -> str:
    """What to install when a launcher's plugin is missing (Hydra only says it cannot find it)."""
    import importlib.util

    found = re.search(r"hydra/launcher/(\w+)", message)
    if not found:
        return ""
    for key, module in LAUNCHER_PLUGINS.items():
        if key in found.group(1):
            try:
                installed = importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:  # (no hydra_plugins package at all)
                installed = False
            if not installed:
                return "; its plugin is not installed: pip install 'topkast-cli[launchers]'"
    return ""


def _bad_override(overrides: list[str]) -> str | None:
    """Which override Hydra's grammar rejects, and why, in one line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for o in overrides:
        try:
            parser.parse_override(o)
        except HydraException as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            reason = re.sub(r"\s*(None|LexerNoViableAltException\(.*\))$", "", reason).strip() or "unexpected text"
            return f"override {o!r} cannot be parsed: {reason} (key=value; quote values with special characters)"
    return None


def _unknown_key(config_name: str, overrides: list[str], config_dir: str | None, key: str) -> str | None:
    """'a.b.c is not a config key' with the keys `a.b` has, or None if that cannot be told."""
    rest = [o for o in overrides if o.lstrip("+~").partition("=")[0] != key]
    parent, _, name = key.rpartition(".")
    try:
        node = compose(config_name, rest, config_dir)
        node = OmegaConf.select(node, parent) if parent else node
    except UserError:
        return None
    if not isinstance(node, DictConfig):
        return None
    keys = ", ".join(k for k in node.keys() if not str(k).startswith("_") and (parent or k != "hydra"))
    return f"{key} is not a config key; {parent or 'the config'} has: {keys} (to add a new key: +{key}=...)"


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Every job's overrides for Hydra sweep syntax (`a=1,2 b=x,y` -> 4 jobs)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise UserError(_one_line(e)) from None
    choices = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            if o.is_discrete_sweep():
                choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
            else:
                raise UserError(f"{o.input_line}: only discrete sweeps (a,b,c or range) are supported here")
        else:
            choices.append([o.input_line])
    return [list(job) for job in itertools.product(*choices)]


# ------------------------------------------------------------------ instantiation
def instantiate(node: DictConfig, group: str, *args, **kwargs):
    """hydra.utils.instantiate, with the user's mistakes as one-line UserErrors."""
    try:
        return hydra.utils.instantiate(node, *args, _convert_="all", **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        target = OmegaConf.select(node, "_target_", default="?")
        if str(e).startswith("Error locating target"):
            raise UserError(f"{group}._target_={target}: no such class or function (check the spelling)") from None
        if isinstance(cause, (TypeError, ValueError, ImportError)):
            raise UserError(f"{group} ({target}): {cause}") from None
        raise
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", None) or group
        raise UserError(f"{key} is required here: add {key}=...") from None
    except OmegaConfBaseException as e:
        raise UserError(f"{group}: {_one_line(e)}") from None


# --------------------------------------------------------------------- validation
def _check(key: str, value, kind: type, lo=None, hi=None, lo_open=False, none_ok=False):
    if value is None and none_ok:
        return
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    allowed = "an integer" if kind is int else "a number"
    if lo is not None:
        allowed += f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        allowed += f" and <= {hi}" if lo is not None else f" <= {hi}"
    if none_ok:
        allowed += " (or null)"
    if ok and kind is float and not math.isfinite(value):
        ok = False
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        raise UserError(f"{key}={value!r} is not allowed; it must be {allowed}")


def validate(cfg: DictConfig) -> None:
    """Raise UserError for the first wrong value of the trainer's own keys, naming the key and
    what is allowed. (Each group's object checks its own arguments when it is built: see
    `run.check_run`, which builds the whole run on the meta device.)"""
    try:
        _validate(cfg)
    except OmegaConfBaseException as e:  # e.g. an interpolation to a missing key
        raise UserError(_one_line(e)) from None


def _validate(cfg: DictConfig) -> None:
    _check("seed", cfg.seed, int, lo=0, hi=2**32 - 1)
    t = cfg.trainer
    _check("trainer.max_steps", t.max_steps, int, lo=1, none_ok=True)
    _check("trainer.epochs", t.epochs, int, lo=1, none_ok=True)
    if t.max_steps is None and t.epochs is None:
        raise UserError("trainer.max_steps and trainer.epochs are both null; set one of them")
    _check("trainer.eval_every", t.eval_every, int, lo=1, none_ok=True)
    _check("trainer.log_every", t.log_every, int, lo=1)
    _check("trainer.threads", t.get("threads"), int, lo=1, none_ok=True)
    _check("trainer.devices", t.get("devices", 1), int, lo=1)
    _check("trainer.timeout_min", t.get("timeout_min", 30), float, lo=0, lo_open=True)
    _check("trainer.checkpoint_every", t.checkpoint_every, int, lo=1, none_ok=True)
    _check("trainer.grad_clip", t.grad_clip, float, lo=0, lo_open=True, none_ok=True)
    _check("trainer.label_smoothing", t.label_smoothing, float, lo=0, hi=0.99)
    _check("trainer.collapse_window", t.get("collapse_window"), int, lo=1, none_ok=True)
    if str(t.precision) not in PRECISIONS:
        raise UserError(f"trainer.precision={t.precision!r} is not allowed; allowed: {', '.join(PRECISIONS)}")
    if not isinstance(t.device, str) or not (t.device in ("auto", "cpu") or t.device.split(":")[0] in ("cuda", "mps")):
        raise UserError(f"trainer.device={t.device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")
    for key in ("deterministic", "progress", "tensorboard", "skip_nonfinite", "channels_last", "compile", "collapse_stop"):
        if not isinstance(t.get(key, False), bool):
            raise UserError(f"trainer.{key}={t.get(key)!r} must be true or false")
    if cfg.resume is not None and not isinstance(cfg.resume, str):
        raise UserError(f"resume={cfg.resume!r} must be a checkpoint path or auto")

    opt = cfg.optimizer
    _check("optimizer.lr", opt.lr, float, lo=0, lo_open=True)
    _check("optimizer.weight_decay", opt.get("weight_decay", 0.0), float, lo=0)
    if "momentum" in opt:
        _check("optimizer.momentum", opt.momentum, float, lo=0, hi=1)


def run_length(trainer: DictConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of a run: `max_steps`, or `epochs` x steps per epoch. Schedule points
    given as fractions of the run are fractions of this."""
    return trainer.max_steps if trainer.max_steps is not None else trainer.epochs * steps_per_epoch


def without_hydra(cfg: DictConfig) -> DictConfig:
    """The job's own config: a copy without the `hydra` node."""
    job = cfg.copy()
    with open_dict(job):
        del job["hydra"]
    return job

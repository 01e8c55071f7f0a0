"""The `topkast` console script: `topkast train|eval|sweep|export [overrides...]`. It only dispatches
to the commands (`commands/`), and turns a user's mistake into one line and exit code 2."""

from __future__ import annotations

import importlib
import sys

from . import __version__
from .errors import UserError
from .launch import fail

USAGE = """usage: topkast <command> [overrides...]

commands:
  train   train a model (default: Top-KAST 90/80 on MNIST-1D, offline, about a minute)
  eval    evaluate a checkpoint's sparse network: topkast eval ckpt=PATH
  sweep   Hydra multirun over sparsities, then a summary table and plot
  export  write a checkpoint's trained sparse network α (plain state_dict and per-layer CSR):
          topkast export ckpt=PATH

Overrides are Hydra's: key=value, group=option, +key=value; `topkast train --help` lists
the config groups (and the experiment presets) and the composed config. Exit codes: 0 done,
1 run failed, 2 a mistake in the input, 130/143 interrupted (last.ckpt written)."""

COMMANDS = ("train", "eval", "sweep", "export")


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
        importlib.import_module(f"topkast_cli.commands.{command}").main(args)
    except UserError as e:
        fail(command, str(e), e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before training started (once it runs, train handles it)
        fail(command, "interrupted", 130)

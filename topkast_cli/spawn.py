"""`topkast train trainer.devices=N`: the short form of
`torchrun --standalone --nproc_per_node=N -m topkast_cli train ...`. It starts the same N
local processes through torch's elastic launcher (what torchrun runs), waits for them, and
exits as they did (0, 1, 2, or 128 + the signal that stopped them)."""

from __future__ import annotations

import logging
import os
import sys
import uuid

log = logging.getLogger("topkast")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (not on Linux)
        return os.cpu_count() or 1


def run_local(n: int, args: list[str], threads: int | None = None) -> int:
    """Run `topkast train ARGS` as N ranks on this machine; returns the exit code."""
    os.environ.setdefault("LOGLEVEL", "ERROR")  # torch's launcher: no warnings of its own about our stops
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # Each rank's share of the CPU for its math (torchrun would set 1 and say so).
    os.environ.setdefault("OMP_NUM_THREADS", str(threads or max(1, cpu_count() // n)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=n,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
        max_restarts=0,  # a failed rank ends the job: the others are stopped, not restarted
        monitor_interval=0.1,
        # The ranks run in sessions of their own (a terminal's Ctrl-C does not reach them):
        # the launcher passes SIGINT and SIGTERM on, then waits this long for the step to
        # end and last.ckpt to be written before it kills them.
        shutdown_timeout=300,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "topkast_cli", "train", *args)
        return 0
    except ChildFailedError as e:
        return exit_code({rank: f.exitcode for rank, f in e.failures.items()})
    except SignalException as e:
        return 128 + int(e.sigval)


def exit_code(codes: dict[int, int]) -> int:
    """The job's exit code from its failed ranks' (a negative code: killed by that signal):
    2 when any rank found a mistake in the input, else rank 0's, else the first."""
    codes = {rank: 128 - c if c < 0 else c for rank, c in codes.items()}
    if 2 in codes.values():
        return 2
    return codes.get(0, next(iter(codes.values()), 1))

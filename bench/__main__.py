"""`python -m bench [suite] [blocks] [accuracy] [speed] [memory] [lm] [backends] [scaling] [gpu] [--quick] [--out DIR]`: all of them by default.
A part's own options: `python -m bench.suite --help`, `python -m bench.blocks --help`, `python -m bench.lm --help`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import accuracy, backends, blocks, gpu, lm, memory, scaling, speed, suite
from .common import RESULTS

PARTS = {"suite": suite.main, "blocks": blocks.main, "accuracy": accuracy.main, "speed": speed.main, "memory": memory.main, "lm": lm.main, "backends": backends.main,
         "scaling": scaling.main, "gpu": gpu.main}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("parts", nargs="*", choices=[*PARTS, []], help="which benchmarks (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results go (default: bench/results)")
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny settings (numbers mean nothing)")
    args = parser.parse_args()
    for part in args.parts or list(PARTS):
        t0 = time.perf_counter()
        PARTS[part](args.out, quick=args.quick)
        print(f"{part}: {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""The benchmarks run and write their files (numbers are measured, never asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

from bench.accuracy import pivot

ROOT = Path(__file__).parent.parent


def _row(method, forward, final, seed):
    return {"status": "completed", "method": method, "forward_sparsity": forward, "final": final, "seed": seed}


def test_pivot_is_mean_and_std_over_seeds_per_method_and_sparsity():
    rows = [_row("dense", 0.0, 90.0, 0), _row("dense", 0.0, 92.0, 1),
            _row("topkast", 0.9, 80.0, 0), _row("topkast", 0.9, 84.0, 1), _row("static", 0.8, 70.0, 0),
            {"status": "failed", "method": "static", "forward_sparsity": 0.9, "final": None, "seed": 0}]
    lines = pivot(rows).splitlines()
    assert lines[0] == "| method | 0.8 | 0.9 |"
    assert lines[2] == "| dense | 91.0 ± 1.4 | 91.0 ± 1.4 |"
    assert lines[3] == "| static | 70.0 ± 0.0 | - |"
    assert lines[4] == "| topkast | - | 82.0 ± 2.8 |"


@pytest.mark.slow
def test_quick_bench_writes_every_result(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"speed.md", "memory.md", "accuracy_mnist1d.md", "accuracy_mnist1d.png", "accuracy_digits.csv"} <= names
    speed = (out / "speed.md").read_text()
    assert "Machine:" in speed and "Date:" in speed and "refresh every 100 steps" in speed
    table = (out / "accuracy_mnist1d.md").read_text()
    assert "| topkast |" in table and "| dense |" in table

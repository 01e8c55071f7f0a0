"""Property: any value for the numeric keys is either accepted (and the run builds) or
refused with a one-line UserError (the CLI prints it and exits with code 2): never another
exception, which the console script would show as a traceback.

In-process, through what the CLI runs for each job (`commands.train.check_job`), then `build_run()`,
so that many examples stay fast; test_bad_input.py runs a handful through the script.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf, open_dict

from topkast_cli.commands.train import check_job
from topkast_cli.config import compose
from topkast_cli.errors import UserError
from topkast_cli.run import build_run

KEYS = [
    "trainer.max_steps",
    "trainer.epochs",
    "trainer.eval_every",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.grad_clip",
    "trainer.label_smoothing",
    "sparsity.forward",
    "sparsity.backward",
    "sparsity.refresh_interval",
    "sparsity.exploration_steps",
    "sparsity.regularization",
    "dataset.batch_size",
    "dataset.eval_batch_size",
    "dataset.num_workers",
    "optimizer.lr",
    "optimizer.weight_decay",
    "scheduler.warmup",
    "scheduler.shape",
    "seed",
]

# Values as typed on a command line: Hydra's grammar decides their type.
numbers = st.one_of(
    st.integers(min_value=-3, max_value=3),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**31, 2**32, 2**63, 10**30, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-0.5, max_value=1.5),
).map(lambda v: repr(v) if isinstance(v, float) and math.isfinite(v) else str(v).lower())
words = st.sampled_from(["null", "true", "false", "abc", "''", "[]", "[1,2]", "{a: 1}", "1e400", "-inf", "0x10", "1_000", "${seed}", "${nope}"])
text = st.text(alphabet="0123456789.-+eE[]{},:'\" abn$", max_size=8)
values = st.one_of(numbers, numbers, words, text)
overrides = st.lists(st.tuples(st.sampled_from(KEYS), values), min_size=1, max_size=3, unique_by=lambda kv: kv[0])

BASE = ["trainer.progress=false", "dataset.num_samples=1000"]


def check_one_line(error: UserError, pairs) -> None:
    message = str(error)
    assert message and "\n" not in message, repr(message)
    named = [k for k, _ in pairs if k in message or k.split(".")[-1] in message]
    assert named or "override" in message or "interpolation" in message.lower() or "nope" in message, message


def accepted_or_user_error(pairs, run_dir) -> None:
    args = BASE + [f"{k}={v}" for k, v in pairs]
    try:
        cfg = compose("train", args)
        check_job(cfg, None)
    except UserError as e:
        check_one_line(e, pairs)
        return
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    try:
        build_run(cfg, run_dir)
    except UserError as e:  # found only with the data loaded (e.g. batch larger than the data)
        check_one_line(e, pairs)


@pytest.mark.usefixtures("builds_runs")  # (build_run in the test)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(pairs=overrides)
def test_numeric_overrides_are_accepted_or_one_line_errors(pairs, tmp_path):
    accepted_or_user_error(pairs, tmp_path)


@pytest.mark.usefixtures("builds_runs")  # (build_run in the test)
@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(pairs=overrides)
def test_numeric_overrides_many_examples(pairs, tmp_path):
    accepted_or_user_error(pairs, tmp_path)

"""Resuming with a changed schedule: each method says which of its keys may change (its mask
update interval among them); anything else that differs from the checkpoint is refused with
one line before any work."""

from __future__ import annotations

import pytest

from conftest import TINY, make_config, run_topkast
from topkast_cli.commands import train as train_command
from topkast_cli.commands.train import train
from topkast_cli.errors import UserError
from topkast_cli.launch import preflight

BASE = [a for a in TINY if not a.startswith("sparsity.")]

# method: (the key that changes on resume, its new value)
SCHEDULE_KEYS = {
    "topkast": ("refresh_interval", 7),
    "rigl": ("update_interval", 7),
    "set": ("update_interval", 3),
    "gmp": ("prune_interval", 3),
}


def first_run(tmp_path, method: str, extra=()):
    run_dir = tmp_path / "first"
    train(make_config([*BASE, f"sparsity={method}", *extra]), run_dir)
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("method", list(SCHEDULE_KEYS))
def test_resume_with_another_update_interval(tmp_path, method):
    key, value = SCHEDULE_KEYS[method]
    ckpt = first_run(tmp_path, method)
    args = [*BASE, f"sparsity={method}", f"sparsity.{key}={value}", "trainer.max_steps=30", f"resume={ckpt}"]
    second = tmp_path / "second"
    preflight("train", [*args, f"hydra.run.dir={second}"], train_command.check_job)
    summary = train(make_config(args), second)
    assert summary["status"] == "completed" and summary["step"] == 30
    assert summary["method"] == method


@pytest.mark.parametrize("method, change", [("rigl", "sparsity.forward=0.8"), ("gmp", "sparsity.distribution=erk")])
def test_a_real_incompatibility_is_refused(tmp_path, method, change):
    ckpt = first_run(tmp_path, method)
    args = [*BASE, f"sparsity={method}", change, f"resume={ckpt}", f"hydra.run.dir={tmp_path / 'second'}"]
    with pytest.raises(UserError, match=change.split("=")[0]):
        preflight("train", args, train_command.check_job)


def test_a_real_incompatibility_is_one_line_and_exit_2(tmp_path):
    ckpt = first_run(tmp_path, "rigl")
    proc = run_topkast(
        ["train", *BASE, "sparsity=rigl", "sparsity.forward=0.8", f"resume={ckpt}", f"hydra.run.dir={tmp_path / 'second'}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "sparsity.forward=0.9" in lines[0] and "sparsity.forward=0.8" in lines[0], proc.stderr
    assert not (tmp_path / "second").exists()

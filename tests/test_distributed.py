"""Data-parallel training on the CPU: 2 processes (gloo) against 1, through `trainer.devices=2`
(torch's elastic launcher) and through torchrun itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from conftest import default_signals, run_topkast
from topkast_cli import distributed
from topkast_cli.commands.train import check_processes
from topkast_cli.distributed import World
from topkast_cli.errors import RunFailed, UserError

# Refreshes every 5 steps, the lock at step 32 (0.8 of 40), fp32, deterministic kernels.
# EXACT: the decoupled regulariser. With the coupled one (the default) Adam amplifies rounding
# where the penalty's gradient balances the loss gradient (their sum is rounding noise, which
# Adam turns into steps of up to lr), so the 1- and 2-process runs part by ~3e-4 in 40 steps
# with the same masks; these tests compare the data-parallel path, not the regulariser.
ARGS = [
    "trainer.max_steps=40",
    "trainer.eval_every=20",
    "trainer.log_every=5",
    "trainer.checkpoint_every=10",
    "trainer.progress=false",
    "trainer.tensorboard=false",
    "trainer.deterministic=true",
    "dataset.num_samples=1000",
    "sparsity.refresh_interval=5",
    *(EXACT := ["sparsity.regularization_form=decoupled", "sparsity.regularization=0.05"]),
]


def train(args, run_dir: Path, devices: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    done = run_topkast(["train", *args, f"trainer.devices={devices}", f"hydra.run.dir={run_dir}"], run_dir.parent, timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def ckpt(run_dir: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def assert_same_masks(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for kind in ("forward", "backward"):
            assert torch.equal(a[name][kind], b[name][kind]), f"{name} {kind} mask differs"


def records(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same job in 1 process, in 2 (trainer.devices=2), and in 2 under torchrun."""
    root = tmp_path_factory.mktemp("ddp")
    out = {"one": root / "one", "two": root / "two", "torchrun": root / "torchrun"}
    train(ARGS, out["one"], devices=1)
    train(ARGS, out["two"], devices=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "topkast_cli", "train", *ARGS, f"hydra.run.dir={out['torchrun']}"]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300, preexec_fn=default_signals,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("launcher", ["two", "torchrun"])
def test_two_processes_end_with_the_parameters_and_masks_of_one(runs, launcher):
    one, two = ckpt(runs["one"]), ckpt(runs[launcher])
    assert one["step"] == two["step"] == 40
    assert two["sparsity"]["extra"]["locked"]  # the run went through refreshes and the lock
    assert_same_masks(one["masks"], two["masks"])
    diff = largest_difference(one["model"], two["model"])
    assert diff < 1e-5, f"largest parameter difference {diff}"
    # Optimizer state too: a resumed run goes on from it.
    for i, state in one["optimizer"]["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim():
                assert torch.allclose(value, two["optimizer"]["state"][i][key], atol=1e-6), key


def test_evaluation_matches_one_process(runs):
    one, two = records(runs["one"]), records(runs["two"])
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two] == [(20, "val"), (40, "val")]
    for a, b in zip(one, two):
        for key in ("loss", "acc1"):  # (each rank evaluates its share; the sums are added)
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["step"], key)


def test_only_rank_0_writes_the_run_directory(runs):
    def files(run_dir: Path) -> list[str]:
        return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())

    assert files(runs["two"]) == files(runs["one"]) == files(runs["torchrun"])
    for name in ("metrics.jsonl", "sparsity.jsonl"):  # one writer: no record twice
        assert len(records(runs["two"], name)) == len(records(runs["one"], name))
    log = (runs["two"] / "train.log").read_text()
    assert "[rank" not in log and log.count("completed at step 40") == 1
    assert json.loads((runs["two"] / "summary.json").read_text())["status"] == "completed"


def test_a_run_resumes_with_another_world_size(runs, tmp_path):
    """The 2-process run goes on in 1 process: the same global batch, from the same step."""
    run = tmp_path / "run"
    import shutil

    shutil.copytree(runs["two"], run)
    train([*ARGS, "trainer.max_steps=50", "resume=auto"], run, devices=1)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and ckpt(run)["step"] == 50
    assert [r["step"] for r in records(run)] == [20, 40, 50]  # (val records: kept up to 40, then 50)


@pytest.mark.parametrize(
    "method",
    [
        ["sparsity=rigl", "sparsity.update_interval=5"],
        pytest.param(["sparsity=set", "sparsity.update_interval=5"], marks=pytest.mark.slow),
        pytest.param(["sparsity=static"], marks=pytest.mark.slow),
        ["sparsity=topkast", "sparsity.refresh_interval=5", "sparsity.block=[5,5]"],
    ],
    ids=["rigl", "set", "static", "topkast-blocks"],
)
def test_masks_of_every_method_match_one_process(tmp_path, method):
    """RigL grows from the all-reduced dense gradient; static and SET draw their random masks
    from generators seeded alike on every rank; Top-KAST's blocks rank the same θ alike.
    (Every update also checks, across ranks, that the masks are identical: a mismatch would
    fail the run.)"""
    args = [a for a in ARGS if not a.startswith("sparsity.")] + method + EXACT
    train(args, tmp_path / "one", devices=1)
    train(args, tmp_path / "two", devices=2)
    one, two = ckpt(tmp_path / "one"), ckpt(tmp_path / "two")
    assert_same_masks(one["masks"], two["masks"])
    assert largest_difference(one["model"], two["model"]) < 1e-5


def _digest_worker(rank: int, port: int, same: bool, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    world = World(rank, 2, rank, 2)
    distributed.setup(world)
    try:
        digest = torch.tensor([5, 10, 123 if same or rank == 0 else 124, 456])
        distributed.check_same({"layer.weight": digest}, world, step=7)
        result.put((rank, "same"))
    except RunFailed as e:
        result.put((rank, str(e)))
    finally:
        distributed.teardown()


@pytest.mark.parametrize("same", [True, False])
def test_masks_that_differ_across_ranks_stop_the_run(same):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    result = ctx.SimpleQueue()
    mp.start_processes(_digest_worker, args=(port, same, result), nprocs=2, start_method="spawn")
    answers = dict(result.get() for _ in range(2))
    if same:
        assert answers == {0: "same", 1: "same"}
    else:
        for message in answers.values():  # every rank stops, with the layer named
            assert "masks differ across ranks after step 7" in message and "layer.weight" in message


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "args, message",
    [
        (["dataset.batch_size=101", "trainer.devices=2"], "not divisible by the 2 processes"),
        (["trainer.devices=4096"], "trainer.devices=4096 but this machine has"),
        (["trainer.devices=0"], "trainer.devices=0 is not allowed; it must be an integer >= 1"),
    ],
)
def test_impossible_world_sizes_are_one_line_before_any_work(tmp_path, args, message):
    done = run_topkast(["train", *args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_trainer_devices_must_agree_with_the_launcher():
    cfg = OmegaConf.create({"trainer": {"devices": 3, "device": "cpu"}})
    with pytest.raises(UserError, match="the launcher started 2 processes"):
        check_processes(cfg, World(0, 2, 0, 2), multirun=False)
    cfg.trainer.devices = 1  # (the default: the launcher decides)
    assert check_processes(cfg, World(0, 2, 0, 2), multirun=False) == 2
    cfg.trainer.devices = 2
    with pytest.raises(UserError, match="slurm_ddp"):
        check_processes(cfg, World(), multirun=True)


def test_a_sampler_shares_each_global_batch_between_ranks():
    from topkast_cli.data import EpochSampler

    whole = list(EpochSampler(100, seed=3, epoch=1, start=20))
    shares = [list(EpochSampler(100, 3, 1, 20, rank=r, world=2, batch_size=10)) for r in (0, 1)]
    for b in range(8):  # global batch b = rank 0's part, then rank 1's
        assert shares[0][5 * b : 5 * b + 5] + shares[1][5 * b : 5 * b + 5] == whole[10 * b : 10 * b + 10]
    evals = [list(EpochSampler(11, 0, 0, shuffle=False, rank=r, world=2)) for r in (0, 1)]
    assert sorted(evals[0] + evals[1]) == list(range(11))


# ------------------------------------------------------------------ stopping
def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def rank_pids(launcher: int, timeout: float = 120) -> dict[int, int]:
    """{rank: pid} of the processes `trainer.devices` started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = {}
        for pid in children(launcher):
            try:
                env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
            except OSError:
                continue
            if "RANK" in env:
                ranks[int(env["RANK"])] = pid
        if len(ranks) == 2:
            return ranks
        time.sleep(0.1)
    raise AssertionError("the ranks did not start")


def evaluated_step(run_dir: Path) -> int:
    try:
        return records(run_dir)[-1]["step"]
    except (OSError, IndexError, ValueError):
        return 0


LONG = [a for a in ARGS if not a.startswith(("trainer.max_steps", "trainer.eval_every"))] + [
    "trainer.max_steps=600", "trainer.eval_every=10", "trainer.checkpoint_every=200",
]


def in_own_group():
    default_signals()
    os.setsid()  # as a shell starts a job: Ctrl-C goes to this process group


def start(args, run_dir: Path, until_step: int) -> tuple[subprocess.Popen, dict[int, int]]:
    """`trainer.devices=2` started in the background (its own process group) and running past
    `until_step`: the launcher and {rank: pid}."""
    cmd = [sys.executable, "-m", "topkast_cli", "train", *args, "trainer.devices=2", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=run_dir.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=in_own_group, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = rank_pids(proc.pid)
    deadline = time.monotonic() + 120
    while evaluated_step(run_dir) < until_step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended too soon"
    return proc, ranks


@pytest.mark.slow  # (three runs: over a minute on 2 cores)
def test_sigterm_to_one_rank_stops_all_after_the_same_step_and_resume_matches(tmp_path):
    reference = tmp_path / "reference"
    train(LONG, reference, devices=2)
    run = tmp_path / "run"
    proc, ranks = start(LONG, run, until_step=20)
    os.kill(ranks[1], signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, proc.stderr.read()[-3000:]
    stopped = ckpt(run)["step"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["step"] == stopped  # the step rank 0 wrote
    assert 20 <= stopped < 600
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) in (["best.ckpt", "last.ckpt"], ["last.ckpt"])

    train([*LONG, "resume=auto"], run, devices=2)
    done, ref = ckpt(run), ckpt(reference)
    assert done["step"] == ref["step"] == 600
    assert_same_masks(done["masks"], ref["masks"])
    assert largest_difference(done["model"], ref["model"]) == 0.0  # the same world size: exact


def test_ctrl_c_stops_every_rank_after_one_step_with_last_ckpt(tmp_path):
    """A terminal's Ctrl-C reaches the launcher's process group (the ranks run in sessions
    of their own): the launcher passes it on once, and the ranks stop together."""
    run = tmp_path / "run"
    proc, _ = start(LONG, run, until_step=20)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and 20 <= ckpt(run)["step"] == summary["step"] < 600
    assert "Traceback" not in proc.stderr.read()


def test_a_killed_rank_ends_the_job(tmp_path):
    run = tmp_path / "run"
    proc, ranks = start(LONG, run, until_step=10)
    killed = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    code = proc.wait(timeout=120)
    assert code != 0
    assert time.monotonic() - killed < 60
    for pid in ranks.values():  # no rank is left behind
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_a_data_parallel_launcher_s_ranks_must_share_the_global_batch(tmp_path):
    """`hydra/launcher=slurm_ddp` with 2 nodes x 4 tasks: 8 ranks, checked before submitting."""
    from topkast_cli.launch import preflight
    from topkast_cli.commands.train import check_job

    common = ["-m", "hydra/launcher=local_ddp", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=4",
              f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    with pytest.raises(UserError, match="not divisible by the 8 processes"):
        preflight("train", [*common, "dataset.batch_size=100"], check_job)
    preflight("train", [*common, "dataset.batch_size=96"], check_job)


@pytest.mark.slow
def test_the_submitit_path_trains_one_job_as_two_ranks(tmp_path):
    """`hydra/launcher=local_ddp`: slurm_ddp's code path (each submitit task one rank), with
    local processes: the job trains in 2 processes and only rank 0 writes."""
    sweep = tmp_path / "sweep"
    done = run_topkast(["sweep", "hydra/launcher=local_ddp", *ARGS, "sparsity.forward=0.9", f"hydra.sweep.dir={sweep}"],
                       tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (job,) = [p for p in sweep.iterdir() if (p / "summary.json").exists()]
    assert "x 2 processes" in (job / "train.log").read_text()
    assert json.loads((job / "summary.json").read_text())["status"] == "completed"
    one = tmp_path / "one"
    train(ARGS, one)
    assert_same_masks(ckpt(job)["masks"], ckpt(one)["masks"])


def test_stop_signals_agree_across_ranks():
    """What one rank got takes effect on every rank at the same `agree`, and not before (the
    ranks must take the same branches after each step)."""
    from topkast_cli.signals import StopSignals

    ranks = [StopSignals(collective=True), StopSignals(collective=True)]
    ranks[1]._handle(signal.SIGTERM, None)  # as if the signal came to rank 1 only
    assert ranks[1].signalled and not ranks[1].requested  # not yet in effect

    def all_max(flags_of):
        return lambda flags: [max(v) for v in zip(*flags_of)]

    flags = [[s.got or 0] + [int(sig in s.got_chained) for sig in s.CHAINABLE] for s in ranks]
    for s in ranks:
        s.agree(all_max(flags))
    assert [s.received for s in ranks] == [signal.SIGTERM, signal.SIGTERM]

    # A chained signal (submitit's SIGUSR2 on every task): checkpoint, pass it on, and stop.
    calls = []
    ranks = [StopSignals(collective=True), StopSignals(collective=True)]
    for s in ranks:
        s._chained.add(signal.SIGUSR2)
        s._previous[signal.SIGUSR2] = lambda signum, frame: calls.append(signum)
    ranks[0]._handle(signal.SIGUSR2, None)
    flags = [[s.got or 0] + [int(sig in s.got_chained) for sig in s.CHAINABLE] for s in ranks]
    for s in ranks:
        s.agree(all_max(flags))
        assert s.requested and s.received == signal.SIGUSR2
        s.pass_on()
    assert calls == [signal.SIGUSR2, signal.SIGUSR2]

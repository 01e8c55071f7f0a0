"""What only a CUDA machine can check: mixed precision with channels-last and torch.compile on
the GPU, and data-parallel training over NCCL with one GPU per rank. Skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, make_config, run_topkast
from test_distributed import ARGS, assert_same_masks, ckpt, largest_difference, train
from topkast_cli.loop import train_step
from topkast_cli.run import build_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.usefixtures("builds_runs")  # (build_run in the test)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_convnet_trains_on_the_gpu_in_mixed_precision(precision, compiled):
    cfg = make_config(["model=resnet18", "dataset=synthetic", "trainer.device=cuda", f"trainer.precision={precision}",
                       "trainer.channels_last=true", f"trainer.compile={str(compiled).lower()}",
                       "sparsity.refresh_interval=2", "trainer.max_steps=6"])
    run = build_run(cfg)
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    changed_any = False
    for i, (x, y) in zip(range(6), run.data.train_loader(0, 0)):
        x = x.to(run.device).contiguous(memory_format=torch.channels_last)
        _, finite, changed = train_step(run, x, y.to(run.device), params)
        changed_any |= changed
    assert changed_any and run.step == 6
    for layer in run.method.layers:  # exact k after the refreshes, on the GPU
        assert int(layer.forward.sum()) == layer.k_forward and int(layer.backward.sum()) == layer.k_backward


@pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA devices")
def test_two_gpus_end_with_the_parameters_and_masks_of_one(tmp_path):
    args = [*ARGS, "trainer.device=cuda"]
    train(args, tmp_path / "one", devices=1)
    train(args, tmp_path / "two", devices=2)
    one, two = ckpt(tmp_path / "one"), ckpt(tmp_path / "two")
    assert_same_masks(one["masks"], two["masks"])
    assert largest_difference(one["model"], two["model"]) < 1e-4  # (GPU kernels: less exact than the CPU's)


def test_more_devices_than_gpus_is_one_line(tmp_path):
    done = run_topkast(["train", *TINY, f"trainer.devices={GPUS + 1}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert done.returncode == 2 and f"this machine has {GPUS} CUDA devices" in done.stderr

"""ResNet-50 at 224 px on synthetic data on one CUDA device, bf16 and channels-last: training
images per second of dense and of Top-KAST 90/80 (masked backend; `auto`, which keeps the
convolutions masked and may run the classifier sparse), with and without torch.compile.
Skipped (nothing written) without a CUDA device.

Every setting is a run built by the trainer and stepped by its `train_step`, timed with
CUDA synchronisation after warm-up (which includes compilation)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .common import header, write
from .speed import make_run, time_steps

BASE = ["model=resnet50", "dataset=synthetic", "dataset.input_shape=[3,224,224]", "dataset.num_classes=1000",
        "dataset.train_size=2048", "trainer.precision=bf16", "trainer.channels_last=true", "trainer.device=cuda"]
TOPKAST = ["sparsity=topkast", "sparsity.forward=0.9", "sparsity.exploration_steps=null",
           "sparsity.refresh_interval=1000000000"]
SETTINGS = {
    "dense": ["sparsity=dense"],
    "Top-KAST 90/80, masked": [*TOPKAST, "sparsity.backend=masked"],
    "Top-KAST 90/80, auto": [*TOPKAST, "sparsity.backend=auto"],
}


def main(out: Path, quick: bool = False) -> Path | None:
    if not torch.cuda.is_available():
        print("gpu: skipped (no CUDA device)")
        return None
    batch, warmup, steps = (32, 2, 3) if quick else (256, 15, 30)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for compiled in (False, True):
            for name, overrides in SETTINGS.items():
                args = [*BASE, *overrides, f"dataset.batch_size={batch}", f"trainer.compile={str(compiled).lower()}"]
                run, batches, params = make_run(args, Path(tmp) / f"{len(rows)}")
                batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
                time_steps(run, batches, params, warmup)
                seconds = time_steps(run, batches, params, steps)
                torch.cuda.reset_peak_memory_stats()
                time_steps(run, batches, params, 2)
                peak = torch.cuda.max_memory_allocated() / 2**30
                rows.append((name, compiled, batch / seconds, peak))
                print(f"gpu: {name}, compile={compiled}: {batch / seconds:.0f} images/s", flush=True)
                del run, batches, params
                torch.cuda.empty_cache()
    dense = {c: ips for n, c, ips, _ in rows if n == "dense"}
    lines = [header("ResNet-50, 224 px, bf16, channels-last: training throughput on one GPU"),
             f"Synthetic data, batch {batch}, {warmup} warm-up steps then {steps} timed steps (Adam, the trainer's "
             "own step with the method's hooks); mask refreshes off (they are measured in speed.md).\n",
             "| setting | torch.compile | images/s | relative to dense | peak memory (GiB) |", "|---|---|---|---|---|"]
    for name, compiled, ips, peak in rows:
        lines.append(f"| {name} | {'yes' if compiled else 'no'} | {ips:.0f} | {ips / dense[compiled]:.2f} | {peak:.1f} |")
    return write(out, "gpu_resnet50.md", "\n".join(lines) + "\n")

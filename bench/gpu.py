"""ResNet-50 at 224 px on synthetic data on one CUDA device, bf16 and channels-last: training
images per second of dense and of Top-KAST 90/80 (masked backend; `auto`, which keeps the
convolutions masked and may run the classifier sparse), with and without torch.compile.
Then the structured paths (`gpu_structured.md`): the wide MLP's whole training step on the
sparse backend unstructured (CSR) and in r x r blocks (BSR, torch's CUDA kernels), ResNet-50's
1x1 convolutions one layer at a time in blocks, and the 2:4 forward through torch's
semi-structured kernels (`to_sparse_semi_structured`), each as a ratio to dense.
Skipped (nothing written) without a CUDA device.

Every setting is a run built by the trainer and stepped by its `train_step`, timed with
CUDA synchronisation after warm-up (which includes compilation)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from . import backends
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
    structured(out, quick)
    return resnet50(out, quick)


def structured(out: Path, quick: bool = False, device: str = "cuda") -> Path:
    """The block, 1x1-convolution and 2:4 rows on `device` (cuda; cpu only to test the code)."""
    lines = [header(f"Structured sparsity on {device}: blocks (BSR) and 2:4, relative to dense")]
    lines += backends.block_table(quick, device)
    lines += pointwise_blocks(quick, device)
    lines += semi_structured(quick, device)
    return write(out, "gpu_structured.md", "\n".join(lines) + "\n")


def _synced(fn, device: str):
    def run():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    return run


def pointwise_blocks(quick: bool, device: str) -> list[str]:
    """ResNet-50's 1x1 convolutions, forward + backward of one layer, Top-KAST 90/80 on the
    sparse backend unstructured and in blocks, as ratios to the dense layer."""
    from torch import nn

    from topkast_cli.errors import UserError
    from topkast_cli.sparsity import TopKAST

    sizes = (1,) + ((8,) if quick else (8, 16, 32))
    lines = ["\n## 1x1 convolutions, one layer (forward + backward), Top-KAST 90/80 on the sparse backend\n",
             "| layer | input | " + " | ".join("unstructured" if b == 1 else f"{b}x{b}" for b in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for c_in, c_out, side, n in backends.POINTWISE[:1] if quick else backends.POINTWISE:
        x = torch.randn(n, c_in, side, side, device=device)
        layers, cells = [], []
        for b in (0, *sizes):  # 0: the dense layer
            torch.manual_seed(0)
            layer = nn.Conv2d(c_in, c_out, 1).to(device)
            try:
                if b:
                    TopKAST(0.9, 0.8, dense_first=False, backend="sparse", block=(b, b)).attach(layer)
                layers.append(layer)
            except UserError as e:
                layers.append(None)
                cells.append((b, f"refused: {e}"))
        fns = [_synced(backends._forward_backward(m, x), device) for m in layers if m is not None]
        times = iter(backends._best_interleaved(fns, 1 if quick else 10))
        dense = next(times)
        refused = dict(cells)
        row = [refused.get(b) or f"{next(times) / dense:.2f}" for b in sizes]
        lines.append(f"| 1x1 {c_in}->{c_out} | {n}x{c_in}x{side}x{side} | " + " | ".join(row) + " |")
    return lines


def semi_structured(quick: bool, device: str) -> list[str]:
    """The 2:4 forward (`sparsity.pattern=nm sparsity.nm=[2,4]`'s A) through torch's
    semi-structured kernels: a 4096x4096 Linear layer on 4096 rows of input, as a ratio to the
    dense product in the same dtype."""
    import torch.nn.functional as F

    n, size = (64, 256) if quick else (256 * 16, 4096)
    lines = ["\n## 2:4 forward (semi-structured kernels), one Linear layer\n",
             f"{size}x{size} weight, {n} rows of input; A keeps the top 2 |θ| of every 4 inputs.\n",
             "| dtype | 2:4 forward / dense |", "|---|---|"]
    convert = getattr(torch.sparse, "to_sparse_semi_structured", None)
    for dtype in (torch.float16, torch.bfloat16):
        w = torch.randn(size, size, device=device, dtype=dtype)
        groups = w.reshape(size, -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(2, dim=-1).indices, True)
        w24 = (groups * keep).reshape(size, size)
        x = torch.randn(n, size, device=device, dtype=dtype)
        try:
            if convert is None:
                raise RuntimeError("this torch has no torch.sparse.to_sparse_semi_structured")
            ws = convert(w24)
            F.linear(x, ws)
        except Exception as e:  # (no kernel for this device, dtype or GPU generation)
            lines.append(f"| {str(dtype).split('.')[-1]} | unavailable: {str(e).splitlines()[0][:120]} |")
            continue
        dense, sparse = backends._best_interleaved([_synced(lambda: F.linear(x, w24), device),
                                                    _synced(lambda: F.linear(x, ws), device)], 1 if quick else 20)
        lines.append(f"| {str(dtype).split('.')[-1]} | {sparse / dense:.2f} |")
    return lines


def resnet50(out: Path, quick: bool = False) -> Path:
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

"""The compute backends side by side: Top-KAST on `masked`, `sparse` and `auto` against dense,
at 80/60, 90/80 and 95/90, each figure a ratio to dense measured in the same process.

Per model and sparsity the dense run and the three backends are built by the trainer and
stepped by its `train_step` in interleaved rounds (load on the machine falls on all alike):
- step: the whole training step, forward, backward, the optimizer and the refresh amortised
  over the default interval (a step between refreshes + one refresh / 25, both measured);
- refresh: one mask refresh of every layer (top-k, new masks, re-packing), in dense steps;
- inference: a forward pass without gradient of the trained network (what `topkast export`
  writes) on the same batch;
- peak memory: each setting in a fresh process (`bench.memory`), over a few steps with a
  refresh among them: of live tensors (the CPU's counterpart of CUDA's allocator peak), and
  of resident memory (which also holds what the C allocator keeps mapped after frees).

The wide MLP also runs the sparse backend on r x r blocks (`sparsity.block`, α in BSR) against
its unstructured CSR, with the same figures.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from topkast_cli.errors import UserError

from .common import header, write
from .speed import _sync, make_run, refresh_time, time_steps

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
HAS_TRANSFORMER = (ROOT / "topkast_cli" / "conf" / "model" / "transformer.yaml").exists() and TEXT.exists()

# name: (overrides, rounds x steps per round, quick overrides, Top-KAST overrides)
WIDE = "MLP 1024-4096-4096-10, synthetic (batch 256), every layer sparse"
MODELS = {
    WIDE: (
        ["model=mlp", "model.hidden=[4096,4096]", "dataset=synthetic", "dataset.input_shape=[1024]",
         "dataset.batch_size=256", "dataset.train_size=2048"],
        (3, 4),
        ["model.hidden=[64,64]", "dataset.input_shape=[32]", "dataset.batch_size=16", "dataset.train_size=128"],
        ["sparsity.dense_first=false"],
    ),
    "cnn1d, MNIST-1D (batch 100), the default CNN": (["model=cnn1d", "dataset=mnist1d"], (8, 25), ["dataset.num_samples=1000"], []),
}
if HAS_TRANSFORMER:
    MODELS["transformer (4 layers, width 128), Tiny Shakespeare (batch 16 x 128 characters)"] = (
        ["model=transformer", "dataset=textfile", f"dataset.path={TEXT}"],  # with the LM defaults (task=lm)
        (5, 10),
        ["model.layers=1", "model.width=32", "dataset.context=32"],
        [],
    )
SPARSITIES = {"80/60": (0.8, 0.6), "90/80": (0.9, 0.8), "95/90": (0.95, 0.9)}
BACKENDS = ("masked", "sparse", "auto")
BLOCKS = (4, 8, 16, 32)  # r x r blocks on the sparse backend (BSR), the wide MLP
BLOCK_SPARSITIES = ("90/80", "95/90")
# The 10-way classifier has no 4-row blocks: with blocks it stays dense (40K of 21M weights).
BLOCK_EXTRA = ["sparsity.dense_layers=[net.5]"]
REFRESH_EVERY = 25  # Top-KAST's default refresh interval
NEVER = 1000000000  # the timed runs never refresh on their own: refreshes are timed apart


def settings(forward: float, backward: float, extra: list[str], refresh: int = NEVER) -> dict[str, list[str]]:
    topkast = ["sparsity=topkast", f"sparsity.forward={forward}", f"sparsity.backward={backward}",
               "sparsity.exploration_steps=null", f"sparsity.refresh_interval={refresh}", *extra]
    return {"dense": ["sparsity=dense"], **{b: [*topkast, f"sparsity.backend={b}"] for b in BACKENDS}}


def block_settings(forward: float, backward: float, extra: list[str], refresh: int = NEVER) -> dict[str, list[str]]:
    """Dense, the masked and the sparse backend unstructured (CSR), and the sparse one on each of
    `BLOCKS` (BSR)."""
    plain = settings(forward, backward, extra, refresh)
    out = {"dense": plain["dense"], "masked, unstructured (the default backend)": plain["masked"],
           "sparse, unstructured (CSR)": plain["sparse"]}
    for b in BLOCKS:
        out[f"sparse, {b}x{b} blocks (BSR)"] = [*plain["sparse"], f"sparsity.block=[{b},{b}]", *BLOCK_EXTRA]
    return out


def inference_seconds(run, x: torch.Tensor, n: int) -> float:
    run.model.eval()
    with torch.no_grad():
        run.model(x)
        _sync(run)
        t0 = time.perf_counter()
        for _ in range(n):
            run.model(x)
        _sync(run)
    run.model.train()
    return (time.perf_counter() - t0) / n


def peak_memory(overrides: list[str], steps: int) -> dict | None:
    """bench.memory's figures for one setting, in a fresh process (None: the run is refused)."""
    cmd = [sys.executable, "-m", "bench.memory", "--one", json.dumps(overrides), "--steps", str(steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        if "UserError" in done.stderr:
            return None
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(overrides: list[str], named: dict[str, list[str]], rounds: int, steps: int, quick: bool) -> dict:
    """Seconds per step, per refresh and per inference pass, and the backends chosen, for
    each of the `named` settings (dense among them)."""
    found, refused = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for i, (name, o) in enumerate(named.items()):
            try:
                runs[name] = make_run([*overrides, *o], Path(tmp) / str(i))
            except UserError as e:
                refused[name] = str(e)
        for run, batches, params in runs.values():
            time_steps(run, batches, params, 1 if quick else 2)
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, (run, batches, params) in runs.items():
                times[name].append(time_steps(run, batches, params, steps))
        for name, (run, batches, params) in runs.items():
            between = statistics.median(times[name])
            refresh = refresh_time(run, 1 if quick else 2) if name != "dense" else 0.0
            found[name] = {
                "step": between + refresh / REFRESH_EVERY,
                "refresh": refresh,
                "inference": inference_seconds(run, batches[0][0], 2 if quick else 5),
                "backends": sorted(set(run.method.backends().values())),
                "notes": run.method.backend_notes,
            }
    return {"found": found, "refused": refused}


def _ratio(value, dense) -> str:
    return "-" if value is None or not dense else f"{value / dense:.2f}"


def main(out: Path, quick: bool = False) -> Path:
    lines = [header("Backends: Top-KAST on masked, sparse and auto, relative to dense")]
    lines.append(__doc__.split("\n\n", 1)[1].strip() + "\n")
    if not HAS_TRANSFORMER:
        lines.append("The transformer is not included: this checkout has no `model=transformer` "
                     "or no Tiny Shakespeare text next to it.\n")
    sparsities = {"90/80": SPARSITIES["90/80"]} if quick else SPARSITIES
    for model, (overrides, (rounds, steps), small, extra) in MODELS.items():
        overrides = [*overrides, *small] if quick else overrides
        rounds, steps = (1, 2) if quick else (rounds, steps)
        lines.append(f"\n## {model}\n\n{rounds} rounds x {steps} steps per setting.\n")
        lines.append("| sparsity | backend | step | refresh (dense steps) | inference | peak memory (tensors) | peak resident memory | layers on |")
        lines.append("|---|---|---|---|---|---|---|---|")
        notes = {}
        for label, (forward, backward) in sparsities.items():
            print(f"backends: {model}, {label}", flush=True)
            r = measure(overrides, settings(forward, backward, extra), rounds, steps, quick)
            memory = {} if quick else {
                name: peak_memory([*overrides, *o], 4)  # a refresh among the 4 steps
                for name, o in settings(forward, backward, extra, refresh=2).items()
            }
            dense = r["found"]["dense"]
            dense_memory = memory.get("dense") or {}
            peaks = lambda m: (_ratio(m.get("tensor peak"), dense_memory.get("tensor peak")),  # noqa: E731
                               _ratio(m.get("peak"), dense_memory.get("peak")))
            lines.append(f"| {label} | dense | 1.00 ({dense['step'] * 1e3:.1f} ms) | - | 1.00 ({dense['inference'] * 1e3:.1f} ms) "
                         f"| {' | '.join(peaks(dense_memory))} | - |")
            for name in BACKENDS:
                if name in r["refused"]:
                    lines.append(f"| {label} | {name} | refused: {r['refused'][name]} | | | | | |")
                    continue
                f = r["found"][name]
                lines.append(
                    f"| {label} | {name} | {_ratio(f['step'], dense['step'])} | {_ratio(f['refresh'], dense['step'])} "
                    f"| {_ratio(f['inference'], dense['inference'])} | {' | '.join(peaks(memory.get(name) or {}))} "
                    f"| {', '.join(f['backends'])} |"
                )
                if name == "auto" and f["notes"]:
                    notes[label] = f["notes"]
                if name == "auto" and f["backends"] == ["masked"] and "masked" in r["found"]:
                    same = r["found"]["masked"]["step"]
                    lines.append(f"| {label} | | auto kept every layer masked: the masked computation, so its "
                                 f"{f['step'] / same - 1:+.0%} against masked is this run's noise | | | | | |")
            if memory:
                lines.append("")
                lines.append(f"Where the bytes go at {label} (MiB; `bench.memory`):\n")
                lines.append("| setting | " + " | ".join(next(iter(v for v in memory.values() if v))) + " |")
                lines.append("|---" * (1 + len(next(iter(v for v in memory.values() if v)))) + "|")
                for name, m in memory.items():
                    if m:
                        lines.append(f"| {name} | " + " | ".join(f"{v / 2**20:.1f}" for v in m.values()) + " |")
                lines.append("")
        for label, by_layer in notes.items():
            lines.append(f"\n`auto` at {label}: " + "; ".join(f"{k}: {v}" for k, v in by_layer.items()))
    lines += block_table(quick)
    lines += conv_table(quick)
    return write(out, "backends.md", "\n".join(lines) + "\n")


def block_table(quick: bool, device: str = "cpu") -> list[str]:
    """The wide MLP on the sparse backend with r x r blocks (BSR) and unstructured (CSR), as
    ratios to dense in the same process: whole step, refresh, peak memory (on the CPU)."""
    overrides, (rounds, steps), small, extra = MODELS[WIDE]
    overrides = [*overrides, *small] if quick else overrides
    overrides = [*overrides, f"trainer.device={device}"]
    rounds, steps = (1, 2) if quick else (rounds, steps)
    lines = [f"\n## Blocks on the sparse backend: {WIDE.split(',')[0]}\n",
             f"{rounds} rounds x {steps} steps per setting; with blocks the 10-way classifier stays dense "
             "(it has no 4-row blocks). α and α^T in BSR, the weight gradient `sampled_addmm` on B's weights.\n",
             "| sparsity | setting | step | refresh (dense steps) | inference | peak memory (tensors) | peak resident memory |",
             "|---|---|---|---|---|---|---|"]
    for label in BLOCK_SPARSITIES[:1] if quick else BLOCK_SPARSITIES:
        forward, backward = SPARSITIES[label]
        print(f"backends: blocks, {label}", flush=True)
        r = measure(overrides, block_settings(forward, backward, extra), rounds, steps, quick)
        memory = {} if quick or device != "cpu" else {
            name: peak_memory([*overrides, *o], 4) for name, o in block_settings(forward, backward, extra, refresh=2).items()
        }
        dense, dense_memory = r["found"]["dense"], memory.get("dense") or {}
        for name, f in r["found"].items():
            m = memory.get(name) or {}
            step = f"1.00 ({f['step'] * 1e3:.1f} ms)" if name == "dense" else _ratio(f["step"], dense["step"])
            refresh = "-" if name == "dense" else _ratio(f["refresh"], dense["step"])
            lines.append(f"| {label} | {name} | {step} | {refresh} | {_ratio(f['inference'], dense['inference'])} "
                         f"| {_ratio(m.get('tensor peak'), dense_memory.get('tensor peak'))} "
                         f"| {_ratio(m.get('peak'), dense_memory.get('peak'))} |")
        for name, why in r["refused"].items():
            lines.append(f"| {label} | {name} | refused: {why} | | | | |")
    return lines


# (in channels, out channels, side, batch): ResNet-50's 1x1 convolutions at three stages, and
# two 3x3 ones.
POINTWISE = [(64, 256, 56, 8), (256, 1024, 14, 32), (512, 2048, 7, 32)]
SPATIAL = [(64, 64, 56, 8), (256, 256, 14, 32)]


def _best_interleaved(fns: list, repeats: int) -> list[float]:
    """Best time of each function, called in interleaved rounds (load falls on all alike)."""
    best = [float("inf")] * len(fns)
    for i in range(repeats + 1):  # the first round is a warm-up
        for j, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            if i:
                best[j] = min(best[j], time.perf_counter() - t0)
    return best


def _forward_backward(module, x: torch.Tensor):
    x = x.detach().requires_grad_(True)
    grad = torch.randn_like(module(x))
    return lambda: module(x).backward(grad)


def conv_table(quick: bool) -> list[str]:
    """Convolutions on each backend, one layer at a time, as ratios to the dense layer: 1x1
    ones through the sparse backend's own path; 3x3 ones through im2col + the CSR product
    (forward only; not built, since it loses)."""
    import torch.nn.functional as F
    from torch import nn

    from topkast_cli.sparsity import TopKAST

    repeats = 1 if quick else 5
    lines = ["\n## Convolutions, one layer (forward + backward), relative to the dense layer\n",
             "| layer | input | sparsity | masked | sparse |", "|---|---|---|---|---|"]
    for c_in, c_out, side, n in POINTWISE[:1] if quick else POINTWISE:
        x = torch.randn(n, c_in, side, side)
        for label, (forward, backward) in SPARSITIES.items():
            layers = []
            for backend in ("dense", "masked", "sparse"):
                torch.manual_seed(0)
                layers.append(nn.Conv2d(c_in, c_out, 1))
                if backend != "dense":
                    TopKAST(forward, backward, dense_first=False, backend=backend).attach(layers[-1])
            dense, *others = _best_interleaved([_forward_backward(m, x) for m in layers], repeats)
            lines.append(f"| 1x1 {c_in}->{c_out} | {n}x{c_in}x{side}x{side} | {label} | "
                         + " | ".join(f"{t / dense:.2f}" for t in others) + " |")
    lines += ["\n3x3 convolutions through im2col (unfold, then the CSR product), forward only, relative to "
              "the dense convolution: the reason they stay masked.\n",
              "| layer | input | sparsity | im2col + CSR forward |", "|---|---|---|---|"]
    for c_in, c_out, side, n in SPATIAL[:1] if quick else SPATIAL:
        x, weight = torch.randn(n, c_in, side, side), torch.randn(c_out, c_in, 3, 3)
        for label, (forward, _) in SPARSITIES.items():
            mask = torch.rand(c_out, c_in * 9, generator=torch.Generator().manual_seed(0)) >= forward
            alpha = (weight.reshape(c_out, -1) * mask).to_sparse_csr()

            def im2col():
                cols = F.unfold(x, 3, padding=1)  # n, c_in * 9, positions
                return torch.sparse.mm(alpha, cols.transpose(0, 1).reshape(c_in * 9, -1))

            dense, sparse = _best_interleaved([lambda: F.conv2d(x, weight, padding=1), im2col], repeats)
            lines.append(f"| 3x3 {c_in}->{c_out} | {n}x{c_in}x{side}x{side} | {label} | {sparse / dense:.2f} |")
    return lines


def blocks_main(out: Path, quick: bool = False) -> Path:
    """Only the block rows (`python -m bench.backends --blocks`), in their own file."""
    lines = [header("Backends: block sizes on the sparse backend, relative to dense"), *block_table(quick)]
    return write(out, "backends_blocks.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    import argparse

    from .common import RESULTS

    parser = argparse.ArgumentParser(prog="python -m bench.backends", description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", action="store_true", help="only the block rows (backends_blocks.md)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    (blocks_main if args.blocks else main)(args.out, quick=args.quick)

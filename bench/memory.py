"""Peak memory of a Top-KAST run relative to dense. Each setting runs in a fresh process
(peak resident memory cannot be reset within one); CUDA uses the allocator's own peak."""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from .common import header, write
from topkast_cli.loop import train_step

from .speed import MODELS, TOPKAST, make_run

SETTINGS = {
    "dense": ["sparsity=dense"],
    "Top-KAST 90/80": [*TOPKAST, "sparsity.refresh_interval=2"],  # a refresh in the measured steps
}


COLUMNS = ("peak", "step peak", "refresh peak", "tensor peak", "tensor step peak", "tensor refresh peak",
           "parameters", "trained values", "gradients", "optimizer", "masks", "index")


def _live_tensor_bytes() -> int:
    """Bytes of the CPU tensor storages reachable from Python now (each storage once)."""
    seen = {}
    for obj in gc.get_objects():
        try:
            if torch.is_tensor(obj) and obj.device.type == "cpu" and not obj.is_sparse:
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, meta, ...)
            continue
    return sum(seen.values())


def _tensor_peak(fn):
    """(fn's result, peak bytes of live tensors while it ran): the tensors alive before it plus
    the highest running sum of the allocator's allocations and frees during it, as the
    profiler records them. The CPU's counterpart of CUDA's max_memory_allocated: what the
    run needs, not what the C allocator keeps mapped."""
    from torch.profiler import ProfilerActivity, profile

    before = _live_tensor_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return result, before + peak


def _status(key: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _bytes(tensors) -> int:
    """Bytes of distinct tensors (a mask shared by A and B counts once)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in tensors if torch.is_tensor(t)}
    return sum(seen.values())


def _reset_peak() -> bool:
    """Start a new peak: writing 5 to clear_refs resets VmHWM (Linux; False where it cannot)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def one(overrides: list[str], steps: int) -> dict:
    """Memory of one run over a few training steps, in bytes: the peak, and the peaks of a step
    without and of a step with a mask refresh, each over the process before the run was built."""
    before = _status("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        run, batches, params = make_run(overrides, Path(tmp))
        # VmHWM: this process's peak resident memory (reset by exec, unlike ru_maxrss).
        peak = _status("VmHWM") - before
        phases = dict.fromkeys(("step peak", "refresh peak", "tensor peak", "tensor step peak", "tensor refresh peak"), 0)
        for i in range(steps):
            resettable = _reset_peak()
            x, y = batches[i % len(batches)]
            changed = train_step(run, x, y, params)[2]
            hwm = _status("VmHWM") - before
            peak = max(peak, hwm)
            if resettable:
                key = "refresh peak" if changed else "step peak"
                phases[key] = max(phases[key], hwm)
        # Then as many steps again, each under the profiler (slow), for the tensor peaks.
        for i in range(steps, 2 * steps if run.device.type == "cpu" else steps):
            x, y = batches[i % len(batches)]
            changed, tensors = _tensor_peak(lambda: train_step(run, x, y, params)[2])
            key = "tensor refresh peak" if changed else "tensor step peak"
            phases[key] = max(phases[key], tensors)
            phases["tensor peak"] = max(phases["tensor peak"], tensors)
        if run.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated()
        return {**accounting(run, peak), **phases}


def accounting(run, peak: int) -> dict:
    """Where the bytes of a run go: the model's parameters (θ dense), what the optimizer trains
    apart from them (the sparse backend's B values), the gradients of everything trained, the
    optimizer state, the masks, and the sparse backend's CSR index structures."""
    masks, index = [], []
    for layer in run.method.layers:
        held = layer.held()
        masks += held.get("masks", [])
        index += held.get("index", [])
    trained = [p for g in run.optimizer.param_groups for p in g["params"]]
    model_ids = {id(p) for p in run.model.parameters()}
    return {
        "peak": peak,
        "parameters": _bytes(run.model.parameters()),
        "trained values": _bytes(p for p in trained if id(p) not in model_ids),
        "gradients": _bytes(p.grad for p in trained),
        "optimizer": _bytes(v for s in run.optimizer.state.values() for v in s.values()),
        "masks": _bytes(masks),
        "index": _bytes(index),
    }


def main(out: Path, quick: bool = False) -> Path:
    steps = 2 if quick else 4
    lines = [header("Memory: Top-KAST relative to dense")]
    lines.append(
        f"Each run in a fresh process, {steps} training steps (Top-KAST with a refresh among them). "
        "`peak` is the growth of peak resident memory over the process before the run was built "
        "(CUDA: the allocator's peak); `step peak` / `refresh peak` the same over a step without / "
        "with a mask refresh (the peak is reset before each step; 0: no such step, or no reset); "
        "`tensor peak` (and its step / refresh parts) is the peak of live tensor bytes over as many "
        "further steps, the CPU's counterpart of CUDA's allocator peak (resident memory also holds "
        "what the C allocator keeps mapped after a free, and the libraries' code and buffers); "
        "the other columns count tensor bytes: parameters, gradients, "
        "optimizer state (Adam), and the method's masks (bool, stored once per layer; B = A shares one); "
        "`trained values` and `index` are the sparse backend's B values and CSR patterns (see backends.md).\n"
    )
    columns = COLUMNS
    for model, (overrides, _) in MODELS.items():
        print(f"memory: {model}", flush=True)
        found = {}
        for name, o in SETTINGS.items():
            cmd = [sys.executable, "-m", "bench.memory", "--one", json.dumps([*overrides, *o]), "--steps", str(steps)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
            found[name] = json.loads(done.stdout.strip().splitlines()[-1])
        dense = found["dense"]
        lines.append(f"\n## {model}\n\n| setting | " + " | ".join(f"{c} (MiB)" for c in columns)
                     + " | peak relative to dense | tensor peak relative to dense |")
        lines.append("|---" * (len(columns) + 3) + "|")
        for name, r in found.items():
            cells = " | ".join(f"{r[c] / 2**20:.2f}" for c in columns)
            lines.append(f"| {name} | {cells} | {r['peak'] / max(1, dense['peak']):.2f} "
                         f"| {r['tensor peak'] / max(1, dense['tensor peak']):.2f} |")
    return write(out, "memory.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one memory measurement (used by bench.memory.main)")
    parser.add_argument("--one", required=True, help="JSON list of overrides")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    print(json.dumps(one(json.loads(args.one), args.steps)))

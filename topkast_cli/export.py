"""topkast export ckpt=PATH: write the network a run trains, α (not θ), in two forms.

- `<name>.alpha.pt`: a plain state_dict under the dense model's names, zeros in place; it
  loads into the plain PyTorch/torchvision model (`load_state_dict`) and gives eval's metric.
- `<name>.alpha-csr.pt`: the same with each sparse layer's weight compressed, per layer
  `{"layout": "csr", "shape", "crow_indices", "col_indices", "values"}` over the weight seen
  as a matrix (out, rest) with int32 indices; every other tensor as it is (`dense_from_csr`
  turns an entry back).
- `<name>.alpha-bsr.pt`, for a run with r x c blocks (`sparsity.block`): each sparse weight in
  BSR, `{"layout": "bsr", "shape", "blocksize", "crow_indices", "col_indices", "values"}` over
  the same matrix, the blocks of α that hold a nonzero (`dense_from_bsr` turns one back).

The model and sparsity are rebuilt from the checkpoint's config through `run.build_run` and
`run.restore`, as eval does.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import save_checkpoint
from .errors import UserError
from .evaluate import load, run_config
from .run import build_run, kept_torch_settings, restore
from .sparsity import computed_state_dict

log = logging.getLogger("topkast")


def csr_entry(weight: torch.Tensor) -> dict:
    matrix = weight.detach().reshape(weight.shape[0], -1).to_sparse_csr()
    small = weight.numel() < 2**31
    index = torch.int32 if small else torch.int64
    return {
        "layout": "csr",
        "shape": list(weight.shape),
        "crow_indices": matrix.crow_indices().to(index),
        "col_indices": matrix.col_indices().to(index),
        "values": matrix.values().clone(),
    }


def bsr_entry(weight: torch.Tensor, blocksize: tuple[int, int]) -> dict:
    matrix = weight.detach().reshape(weight.shape[0], -1).to_sparse_bsr(blocksize)
    index = torch.int32 if weight.numel() < 2**31 else torch.int64
    return {
        "layout": "bsr",
        "shape": list(weight.shape),
        "blocksize": list(blocksize),
        "crow_indices": matrix.crow_indices().to(index),
        "col_indices": matrix.col_indices().to(index),
        "values": matrix.values().clone(),
    }


def dense_from_bsr(entry: dict) -> torch.Tensor:
    shape = entry["shape"]
    matrix = torch.sparse_bsr_tensor(
        entry["crow_indices"].long(), entry["col_indices"].long(), entry["values"], (shape[0], math.prod(shape[1:])),
        check_invariants=True,
    )
    return matrix.to_dense().reshape(shape)


def dense_from_csr(entry: dict) -> torch.Tensor:
    shape = entry["shape"]
    rows = shape[0]
    matrix = torch.sparse_csr_tensor(
        entry["crow_indices"].long(), entry["col_indices"].long(), entry["values"], (rows, math.prod(shape[1:])),
        check_invariants=True,  # a file from elsewhere: checked, not trusted
    )
    return matrix.to_dense().reshape(shape)


def output_paths(cfg: DictConfig) -> tuple[Path, Path]:
    ckpt = Path(str(cfg.ckpt)).expanduser()
    out = Path(str(cfg.export.output)).expanduser() if cfg.export.output is not None else ckpt.parent
    return out / f"{ckpt.stem}.alpha.pt", out / f"{ckpt.stem}.alpha-csr.pt"


def bsr_path(csr_path: Path) -> Path:
    return csr_path.with_name(csr_path.name.replace("-csr.pt", "-bsr.pt"))


def _mib(path: Path) -> float:
    return path.stat().st_size / 2**20


@kept_torch_settings()
def export_checkpoint(cfg: DictConfig) -> dict:
    """Write both forms of `cfg.ckpt`'s network; print and return their sizes and density."""
    state = load(str(cfg.ckpt))
    where = f"ckpt={cfg.ckpt}"
    settings = OmegaConf.create({"data_root": cfg.export.data_root, "batch_size": None, "num_workers": None,
                                 "device": "cpu", "precision": None})
    run = build_run(run_config(state, settings))
    restore(run, state, where, training=False)
    dense = computed_state_dict(run.model)
    sparse_names = {layer.name for layer in run.method.layers}
    compressed = {k: csr_entry(v) if k in sparse_names else v for k, v in dense.items()}
    plain_path, csr_path = output_paths(cfg)
    structure = run.method.structure
    blocks = None if structure.unstructured else structure.blocksize  # (r, c), or None for N:M
    try:
        save_checkpoint(plain_path, dense)
        save_checkpoint(csr_path, compressed)
        if blocks:
            save_checkpoint(bsr_path(csr_path), {k: bsr_entry(v, blocks) if k in sparse_names else v for k, v in dense.items()})
    except OSError as e:
        raise UserError(f"cannot write the export to {plain_path.parent}: {e.strerror or e}; choose export.output=DIR") from None
    density = run.method.measured_density(run.model)
    report = {
        "ckpt": str(cfg.ckpt),
        "step": int(state["step"]),
        "plain": str(plain_path),
        "plain_bytes": plain_path.stat().st_size,
        "csr": str(csr_path),
        "csr_bytes": csr_path.stat().st_size,
        "density": density,
    }
    if blocks:
        report["bsr"], report["bsr_bytes"] = str(bsr_path(csr_path)), bsr_path(csr_path).stat().st_size
    print(
        f"{cfg.ckpt} (step {report['step']}): the trained network α, measured density "
        f"{density['sparse_density']:.4f} of the sparse weights ({density['density']:.4f} of all parameters)\n"
        f"  plain state_dict: {plain_path} ({_mib(plain_path):.2f} MiB)\n"
        f"  per-layer CSR:    {csr_path} ({_mib(csr_path):.2f} MiB)"
        + (f"\n  per-layer BSR:    {report['bsr']} ({_mib(bsr_path(csr_path)):.2f} MiB)" if blocks else "")
    )
    return report

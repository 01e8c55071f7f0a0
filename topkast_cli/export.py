"""topkast export ckpt=PATH: write the network a run trains, α (not θ), in two forms.

- `<name>.alpha.pt`: a plain state_dict under the dense model's names, zeros in place; it
  loads into the plain PyTorch/torchvision model (`load_state_dict`) and gives eval's metric.
- `<name>.alpha-csr.pt`: the same with each sparse layer's weight compressed, per layer
  `{"layout": "csr", "shape", "crow_indices", "col_indices", "values"}` over the weight seen
  as a matrix (out, rest) with int32 indices; every other tensor as it is (`dense_from_csr`
  turns an entry back). A weight stored (in, out) (transformers' Conv1D) is compressed as
  that matrix too, its transpose, and its entry says `"transposed": true`; `shape` is always
  the stored one.
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
from .sparsity.layer_types import matrix

log = logging.getLogger("topkast")


def _compressed(weight: torch.Tensor, transposed: bool, compressed: torch.Tensor, **fields) -> dict:
    index = torch.int32 if weight.numel() < 2**31 else torch.int64
    return {
        **fields,
        "shape": list(weight.shape),
        **({"transposed": True} if transposed else {}),
        "crow_indices": compressed.crow_indices().to(index),
        "col_indices": compressed.col_indices().to(index),
        "values": compressed.values().clone(),
    }


def csr_entry(weight: torch.Tensor, transposed: bool = False) -> dict:
    """`weight` (stored (in, out) when `transposed`) as its out x in matrix in CSR."""
    compressed = matrix(weight.detach(), transposed).to_sparse_csr()
    return _compressed(weight, transposed, compressed, layout="csr")


def bsr_entry(weight: torch.Tensor, blocksize: tuple[int, int], transposed: bool = False) -> dict:
    compressed = matrix(weight.detach(), transposed).to_sparse_bsr(blocksize)
    return _compressed(weight, transposed, compressed, layout="bsr", blocksize=list(blocksize))


def _stored(entry: dict, dense_matrix: torch.Tensor) -> torch.Tensor:
    """The out x in matrix back in the weight's stored layout."""
    return dense_matrix.t().contiguous() if entry.get("transposed") else dense_matrix.reshape(entry["shape"])


def _matrix_size(entry: dict) -> tuple[int, int]:
    shape = entry["shape"]
    return (shape[1], shape[0]) if entry.get("transposed") else (shape[0], math.prod(shape[1:]))


def dense_from_bsr(entry: dict) -> torch.Tensor:
    compressed = torch.sparse_bsr_tensor(
        entry["crow_indices"].long(), entry["col_indices"].long(), entry["values"], _matrix_size(entry),
        check_invariants=True,
    )
    return _stored(entry, compressed.to_dense())


def dense_from_csr(entry: dict) -> torch.Tensor:
    compressed = torch.sparse_csr_tensor(
        entry["crow_indices"].long(), entry["col_indices"].long(), entry["values"], _matrix_size(entry),
        check_invariants=True,  # a file from elsewhere: checked, not trusted
    )
    return _stored(entry, compressed.to_dense())


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
    transposed = {layer.name: layer.transposed for layer in run.method.layers}  # the sparse weights
    compressed = {k: csr_entry(v, transposed[k]) if k in transposed else v for k, v in dense.items()}
    plain_path, csr_path = output_paths(cfg)
    structure = run.method.structure
    blocks = None if structure.unstructured else structure.blocksize  # (r, c), or None for N:M
    try:
        save_checkpoint(plain_path, dense)
        save_checkpoint(csr_path, compressed)
        if blocks:
            save_checkpoint(bsr_path(csr_path), {k: bsr_entry(v, blocks, transposed[k]) if k in transposed else v
                                                 for k, v in dense.items()})
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

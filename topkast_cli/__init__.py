"""topkast-cli: sparse-from-scratch training with Top-KAST, driven by Hydra configs."""

__version__ = "0.1.0"
